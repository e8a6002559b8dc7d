#!/usr/bin/env bash
# Throughput, p99 and the server's CPU per request of the null RPC, Decrypt
# and GenerateDataKey, each alone against one `coffre dev` (BENCHMARKS.md,
# "The data-key path against the null RPC").
#
#   benches/cpu-per-request.sh ./target/release/coffre [PORT]
#
# Per operation: 1 s of warm-up, then 5 s closed loop at 64 in flight over
# 4 connections (`coffre bench`, the same binary), with the server's utime
# + stime from /proc/PID/stat read before and after. Prints "op ops/s
# µs-of-server-CPU-per-request p99-ms". Extra arguments after the port go
# to `coffre dev` (e.g. --audit-durability fsync).
set -eu
bin=$1
port=${2:-17495}
shift $(($# < 2 ? $# : 2))
dir=$(mktemp -d /tmp/coffre-cpu-XXXX)
"$bin" dev --data-dir "$dir/data" --listen "127.0.0.1:$port" "$@" > "$dir/dev.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do grep -q "is running on" "$dir/dev.log" && break; sleep 0.2; done
bench() {
    "$bin" bench --data-dir "$dir/data" --endpoint "https://127.0.0.1:$port" \
        --concurrency 64 --connections 4 --warmup 0s "$@" 2>&1
}
hz=$(getconf CLK_TCK)
echo "op ops/s cpu_us_per_request p99_ms"
for op in null decrypt generate; do
    bench --ops "$op" --duration 1s > /dev/null
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    out=$(bench --ops "$op" --duration 5s)
    t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    rate=$(awk -v op="$op" '$1 == op {print $2}' <<< "$out")
    p99=$(awk -v op="$op" '$1 == op {print $6}' <<< "$out")
    echo "$op $rate $(awk -v t=$((t1 - t0)) -v hz="$hz" -v r="$rate" 'BEGIN {printf "%.1f", t * 1e6 / hz / (r * 5)}') $p99"
done

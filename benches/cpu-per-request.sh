#!/usr/bin/env bash
# Throughput, p99 and the server's CPU per request of the null RPC, Decrypt
# and GenerateDataKey, each alone against one `coffre dev` (BENCHMARKS.md,
# "The data-key path against the null RPC").
#
#   benches/cpu-per-request.sh ./target/release/coffre [PORT]
#
# Per operation: 1 s of warm-up, then 5 s closed loop at 64 in flight over
# 4 connections (`coffre bench`, the same binary), with the server's utime
# + stime from /proc/PID/stat read before and after, and the load
# generator's own CPU (its children's times, from bash's `times`), and the
# server's write system calls (`syscw` in /proc/PID/io: one `writev` per
# response flush, one `write` per audit batch). Prints "op ops/s
# µs-of-server-CPU-per-request p99-ms µs-of-client-CPU-per-request
# writes-per-request".
# Extra arguments after the port go to `coffre dev` (e.g.
# --audit-durability fsync).
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
# The CPU seconds of every child this shell has waited for (user +
# system): `times` must run in this shell, not in a $(...) subshell.
children_cpu() {
    awk 'NR == 2 {
        split($1, u, /[ms]/); split($2, s, /[ms]/)
        printf "%.3f", u[1] * 60 + u[2] + s[1] * 60 + s[2]
    }' "$dir/times"
}
echo "op ops/s cpu_us_per_request p99_ms client_cpu_us_per_request writes_per_request"
syscw() { awk '$1 == "syscw:" {print $2}' "/proc/$pid/io"; }
for op in null decrypt generate; do
    bench --ops "$op" --duration 1s > /dev/null
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    w0=$(syscw)
    times > "$dir/times"
    c0=$(children_cpu)
    bench --ops "$op" --duration 5s > "$dir/bench.txt"
    times > "$dir/times"
    c1=$(children_cpu)
    t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    w1=$(syscw)
    out=$(cat "$dir/bench.txt")
    rate=$(awk -v op="$op" '$1 == op {print $2}' <<< "$out")
    p99=$(awk -v op="$op" '$1 == op {print $6}' <<< "$out")
    echo "$op $rate $(awk -v t=$((t1 - t0)) -v hz="$hz" -v r="$rate" 'BEGIN {printf "%.1f", t * 1e6 / hz / (r * 5)}') $p99 \
$(awk -v a="$c0" -v b="$c1" -v r="$rate" 'BEGIN {printf "%.1f", (b - a) * 1e6 / (r * 5)}') \
$(awk -v w=$((w1 - w0)) -v r="$rate" 'BEGIN {printf "%.2f", w / (r * 5)}')"
done

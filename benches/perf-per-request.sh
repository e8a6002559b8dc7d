#!/usr/bin/env bash
# Where the server's CPU goes per request, in microseconds, from perf on a
# real run (BENCHMARKS.md, "The data-key path against the null RPC").
#
#   RUSTFLAGS="-C force-frame-pointers=yes" cargo build --release -p coffre --target-dir target/fp
#   benches/perf-per-request.sh target/fp/release/coffre decrypt 'AuditTrail::record::' 'Kms>::open::'
#
# Starts `coffre dev` (audit `write`, the default), runs `coffre bench --ops
# OP` closed loop at 64 in flight over 4 connections for 10 s, and records
# the server with `perf record -e cpu-clock -g` for 5 s in the middle. The
# server's CPU per request is utime + stime from /proc/PID/stat over those
# 5 s divided by the requests answered in them (the bench's rate x 5). It
# prints the 25 symbols with the most self time, then the inclusive time
# of each PATTERN (a regular expression on symbol names; inclusive needs
# the frame pointers of the build above: without them the user-space
# call chains are cut). Needs perf (linux-perf).
set -eu
bin=$1
op=$2
shift 2
port=${PORT:-17490}
dir=$(mktemp -d /tmp/coffre-perf-XXXX)
"$bin" dev --data-dir "$dir/data" --listen "127.0.0.1:$port" > "$dir/dev.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do grep -q "is running on" "$dir/dev.log" && break; sleep 0.2; done
"$bin" bench --data-dir "$dir/data" --endpoint "https://127.0.0.1:$port" --ops "$op" \
    --duration 10s --warmup 1s --concurrency 64 --connections 4 > "$dir/bench.txt" 2>&1 &
bench=$!
sleep 4
t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
perf record -F 2000 -e cpu-clock -g -p "$pid" -o "$dir/perf.data" -- sleep 5 > /dev/null 2>&1
t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
wait "$bench"
rate=$(awk -v op="$op" '$1 == op {print $2}' "$dir/bench.txt")
requests=$((rate * 5))
cpu_us=$(((t1 - t0) * 1000000 / $(getconf CLK_TCK)))
echo "$op: $rate requests/s; server CPU $(awk -v c="$cpu_us" -v r="$requests" 'BEGIN {printf "%.1f", c / r}') µs per request"
per_request() {
    awk -v c="$cpu_us" -v r="$requests" '{p = $1; sub("%", "", p); $1 = ""; if ($2 ~ /%$/) $2 = ""; printf "%7.2f µs %s\n", p / 100 * c / r, $0}' | cut -c1-160
}
echo "-- self"
perf report -i "$dir/perf.data" --no-children --sort symbol --stdio -g none 2> /dev/null |
    grep "%" | head -25 | per_request
if (($#)); then
    echo "-- inclusive"
    perf report -i "$dir/perf.data" --children --sort symbol --stdio -g none 2> /dev/null |
        grep "%" > "$dir/children.txt"
    for pattern in "$@"; do
        grep -E "$pattern" "$dir/children.txt" | head -2 | per_request
    done
fi

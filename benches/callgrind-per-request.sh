#!/usr/bin/env bash
# Instructions the server executes per request, counted by callgrind (noise
# does not move them): coffre dev under valgrind with instrumentation off,
# a warm-up, then one measured `coffre bench` run with it on.
#
#   benches/callgrind-per-request.sh ./target/release/coffre decrypt 17480
#
# Prints the whole server's instructions per request and those of the tonic
# handler without the audit append inside it. Needs valgrind.
set -eu
bin=$1
op=${2:-decrypt}
port=${3:-17480}
dir=$(mktemp -d /tmp/coffre-callgrind-XXXX)
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/cg.out" \
    "$bin" dev --data-dir "$dir/data" --listen "127.0.0.1:$port" --audit-durability write \
    > "$dir/dev.out" 2> "$dir/dev.err" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
    grep -q "is running on" "$dir/dev.out" 2>/dev/null && break
    sleep 0.5
done
bench() {
    "$bin" bench --data-dir "$dir/data" --endpoint "https://127.0.0.1:$port" \
        --concurrency 8 --connections 2 --ops "$op" "$@"
}
bench --duration 2s --warmup 1s > "$dir/warm.txt"
callgrind_control -i on "$pid" > /dev/null
bench --duration 10s --warmup 0s > "$dir/run.txt"
callgrind_control -i off "$pid" > /dev/null
callgrind_control -d "$pid" > /dev/null
sleep 1
kill "$pid"
wait "$pid" 2> /dev/null || true
out=$(ls "$dir"/cg.out.* | head -1)
annotated=$(callgrind_annotate --inclusive=yes "$out")
# One core call per request: Kms::open for decrypt, generate_data_key otherwise.
core=open
[ "$op" = decrypt ] || core=generate_data_key
n=$(grep -oE "Kms>::$core::\{\{closure\}\} \([0-9,]+x\)" <<< "$annotated" | head -1 |
    grep -oE "[0-9,]+x" | tr -d ,x)
total=$(grep -h "^totals:" "$out" | awk '{print $2}')
handler=$(grep -E "DataKeyService.*>::$op[a-z_]*::\{\{closure\}\}" <<< "$annotated" | head -1 |
    awk '{gsub(",","",$1); print $1}')
audit=$(grep -E "::record::\{\{closure\}\}" <<< "$annotated" | head -1 |
    awk '{gsub(",","",$1); print $1}')
echo "requests: $n"
echo "server instructions per request: $((total / n))"
echo "handler without the audit append, per request: $(((handler - audit) / n))"
echo "audit append per request: $((audit / n))"
echo "profile: $out"

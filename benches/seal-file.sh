#!/usr/bin/env bash
# coffre seal / coffre open of a large file, end to end, against the raw
# AES-256-GCM loop over the same bytes in the same run, with each process's
# peak RSS (BENCHMARKS.md, "Client-side encryption").
#
#   cargo build --release -p coffre -p coffre-client --example throughput
#   bash benches/seal-file.sh [MiB] [rounds]      # default 1024 MiB, 3 rounds
#
# It starts its own `coffre dev` (release build) on a free port, in a
# temporary directory under ${TMPDIR:-/tmp} that it removes. The input is
# random bytes (from openssl rand, or /dev/urandom). Per round:
#   raw seal   throughput raw-seal <in >/dev/null    ring alone, 64 KiB chunks
#   seal       coffre seal --in in --out - >/dev/null
#   raw open   throughput raw-open <in.raw >/dev/null
#   open       coffre open --in in.cs --out - >/dev/null
#   seal file  coffre seal --in in --out in.cs       the real file, fsync'd
# and once, through pipes, a 4x larger stream with nothing on disk:
#   head -c 4xMiB /dev/zero | coffre seal | coffre open | wc -c
# to show that the RSS does not grow with the size. Times are wall clock
# (process start, connection and GenerateDataKey or Decrypt included), medians over the rounds; the ratios are per round.
set -euo pipefail

mib=${1:-1024}
rounds=${2:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
coffre="$root/target/release/coffre"
raw="$root/target/release/examples/throughput"
for bin in "$coffre" "$raw"; do
  [[ -x $bin ]] || { echo "$bin is missing: cargo build --release -p coffre -p coffre-client --example throughput" >&2; exit 1; }
done
[[ -x /usr/bin/time ]] || { echo "/usr/bin/time is missing (apt-get install time)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/coffre-seal-bench.XXXXXX")
dev_pid=
cleanup() {
  [[ -n $dev_pid ]] && kill "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$coffre" dev --data-dir "$work/dev" --listen "127.0.0.1:$port" >"$work/dev.log" 2>&1 &
dev_pid=$!
for _ in $(seq 1 300); do
  grep -q '^coffre dev is running on ' "$work/dev.log" && break
  kill -0 "$dev_pid" 2>/dev/null || { cat "$work/dev.log" >&2; exit 1; }
  sleep 0.1
done
export COFFRE_DATA_DIR="$work/dev" COFFRE_ENDPOINT="https://127.0.0.1:$port"
"$coffre" key create --alias bench-files >/dev/null

echo "input: $mib MiB of random bytes"
if command -v openssl >/dev/null; then
  openssl rand -out "$work/in" $((mib << 20))
else
  head -c $((mib << 20)) /dev/urandom >"$work/in"
fi
"$raw" raw-seal <"$work/in" >"$work/in.raw"

# timed OUT CMD...: runs CMD under /usr/bin/time with its standard output
# to OUT; prints "seconds max_rss_kib" (the wall clock from bash's
# microsecond clock, the RSS from time).
timed() {
  local out=$1 start end
  shift
  start=$EPOCHREALTIME
  /usr/bin/time -f '%M' -o "$work/time" "$@" >"$out"
  end=$EPOCHREALTIME
  echo "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.4f", b - a }') $(cat "$work/time")"
}
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
rate() { awk -v mib="$mib" -v s="$1" 'BEGIN { printf "%.0f", mib / s }'; }

printf '%-6s %10s %10s %6s %10s %10s %6s %11s %9s %9s\n' round 'raw seal' seal ratio 'raw open' open ratio 'seal file' 'seal RSS' 'open RSS'
: >"$work/rows"
for r in $(seq 1 "$rounds"); do
  read -r raw_seal _ < <(timed /dev/null sh -c "exec '$raw' raw-seal <'$work/in'")
  read -r seal seal_rss < <(timed /dev/null "$coffre" seal --key bench-files --context bench=file --in "$work/in" --out -)
  read -r raw_open _ < <(timed /dev/null sh -c "exec '$raw' raw-open <'$work/in.raw'")
  rm -f "$work/in.cs"
  read -r seal_file _ < <(timed /dev/null "$coffre" seal --key bench-files --context bench=file --in "$work/in" --out "$work/in.cs")
  read -r open open_rss < <(timed /dev/null "$coffre" open --context bench=file --in "$work/in.cs" --out -)
  sealed_ratio=$(awk -v a="$raw_seal" -v b="$seal" 'BEGIN { printf "%.2f", a / b }')
  opened_ratio=$(awk -v a="$raw_open" -v b="$open" 'BEGIN { printf "%.2f", a / b }')
  printf '%-6s %10s %10s %6s %10s %10s %6s %11s %9s %9s\n' "$r" \
    "$(rate "$raw_seal")" "$(rate "$seal")" "$sealed_ratio" \
    "$(rate "$raw_open")" "$(rate "$open")" "$opened_ratio" \
    "$(rate "$seal_file")" "${seal_rss}K" "${open_rss}K"
  echo "$sealed_ratio $opened_ratio $seal_rss $open_rss" >>"$work/rows"
done
echo "(MiB/s; ratio = coffre's throughput / the raw loop's, same bytes, same round)"
echo "median seal ratio $(cut -d' ' -f1 "$work/rows" | median), open ratio $(cut -d' ' -f2 "$work/rows" | median)," \
  "max RSS seal $(cut -d' ' -f3 "$work/rows" | sort -g | tail -1) KiB, open $(cut -d' ' -f4 "$work/rows" | sort -g | tail -1) KiB"

# Bytes to the end, through pipes, at 4x the size: RSS of each side.
big=$((4 * mib))
/usr/bin/time -f 'seal %M' -o "$work/t1" "$coffre" seal --key bench-files --context bench=pipe --in - --out - \
  < <(head -c $((big << 20)) /dev/zero) \
  | /usr/bin/time -f 'open %M' -o "$work/t2" "$coffre" open --context bench=pipe --in - --out - \
  | wc -c >"$work/count"
[[ $(cat "$work/count") -eq $((big << 20)) ]] || { echo "the pipe lost bytes: $(cat "$work/count")" >&2; exit 1; }
echo "pipe of $big MiB: peak RSS $(cut -d' ' -f2 "$work/t1") KiB (seal), $(cut -d' ' -f2 "$work/t2") KiB (open)"

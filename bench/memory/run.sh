#!/usr/bin/env bash
# Peak resident memory under hostile load (issue #13 item 1). Starts `framematch serve` with a
# stated decode budget, then for $DURATION seconds at once:
#   - 64 MatchVideo streams of 1920x1080 JPEG frames (4 unanswered frames each);
#   - $BOMB_STREAMS streams cycling through decode bombs just under every limit (16-bit RGBA at
#     the decode limit, 8-bit RGB, 8- and 16-bit grey, a progressive JPEG and a WebP just under
#     the pixel limit);
#   - 2 streams sending the issue's 7071x7071 16-bit RGBA PNG, refused from its header;
# and reads the server's VmHWM (peak RSS) from /proc/PID/status at the end. Exits 1 when the peak
# is at or over $CAP_MIB. Pictures and logs go to target/memory/.
#
#   bench/memory/run.sh                       # one run, the defaults below
#   RUNS=3 bench/memory/run.sh                # three runs and their median
#   BIN=target/release/framematch DECODE_MIB=512 CAP_MIB=1024 bench/memory/run.sh
#
# Needs a Python with numpy and pillow ($PY, default ~/.venv-bench/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=$ROOT/target/memory
BIN=${BIN:-$ROOT/target/debug/framematch}
PY=${PY:-$HOME/.venv-bench/bin/python}
DURATION=${DURATION:-60}
WORKERS=${WORKERS:-4}
DECODE_MIB=${DECODE_MIB:-1024}
# The stated cap: the decode budget plus 512 MiB for everything else (runtime, connections and
# the frames in flight of 72 streams, the index).
CAP_MIB=${CAP_MIB:-$((DECODE_MIB + 512))}
BOMB_STREAMS=${BOMB_STREAMS:-6}
RUNS=${RUNS:-1}
mkdir -p "$OUT"
stamp() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

stamp "pictures"
"$PY" "$ROOT/bench/memory/make_images.py" "$OUT" >"$OUT/pictures.tsv"

run_once() {
  local n=$1 dir log addr="" pid
  dir=$(mktemp -d)
  log=$OUT/server-$n.log
  "$BIN" serve --insecure-no-auth --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --data-dir "$dir" --hash-workers "$WORKERS" --decode-memory $((DECODE_MIB << 20)) >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do
    addr=$(sed -n 's/^listening on //p' "$log" | head -1)
    [[ -n $addr ]] && break
    sleep 0.1
  done
  [[ -n $addr ]] || { echo "server did not start: $(cat "$log")" >&2; kill "$pid"; return 1; }
  export FRAMEMATCH_SERVER=http://$addr
  for _ in $(seq 600); do
    "$BIN" stats >/dev/null 2>&1 && break
    sleep 0.2
  done
  local base
  base=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
  stamp "run $n: server $pid on $addr, ${base} KiB resident at start"
  "$BIN" bench --send-as-is "${FRAMES[@]/#/--image=}" --streams 64 --max-in-flight 4 \
    --frames-per-stream 100000 --duration-s "$DURATION" --json >"$OUT/frames-$n.json" &
  local frames=$!
  "$BIN" bench --send-as-is "${BOMBS[@]/#/--image=}" --streams "$BOMB_STREAMS" --max-in-flight 2 \
    --frames-per-stream 100000 --duration-s "$DURATION" --json >"$OUT/bombs-$n.json" &
  local bombs=$!
  "$BIN" bench --send-as-is --image="$OUT/refused/rgba16-7071.png" --streams 2 --max-in-flight 1 \
    --frames-per-stream 100000 --duration-s "$DURATION" --json >"$OUT/refused-$n.json" &
  local refused=$!
  wait "$frames" "$bombs" "$refused" || true
  local hwm
  hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  "$PY" - "$OUT" "$n" "$hwm" <<'PY'
import json, sys
out, n, hwm = sys.argv[1], sys.argv[2], int(sys.argv[3])
for kind in ("frames", "bombs", "refused"):
    r = json.load(open(f"{out}/{kind}-{n}.json"))
    print(f"run {n} {kind}: {r['frames_sent']} frames sent, {r['frames_answered']} answered, "
          f"{r['errors']} errors, {r['frames_per_s']:.1f} frames/s, p99 {r['latency_p99_ms']:.0f} ms; "
          f"{r['error_samples'][:2]}", file=sys.stderr)
print(hwm)
PY
}

mapfile -t FRAMES < <(ls "$OUT"/frames/*.jpg)
mapfile -t BOMBS < <(ls "$OUT"/bombs/*)
peaks=()
for n in $(seq "$RUNS"); do
  peak=$(run_once "$n")
  peaks+=("$peak")
  stamp "run $n: peak RSS (VmHWM) $((peak / 1024)) MiB, cap $CAP_MIB MiB"
done
median=$(printf '%s\n' "${peaks[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo "peak RSS median of $RUNS: $((median / 1024)) MiB (runs: $(printf '%s ' "${peaks[@]/%/KiB}")); cap $CAP_MIB MiB with --decode-memory ${DECODE_MIB} MiB, --hash-workers $WORKERS, $DURATION s"
[[ $((median / 1024)) -lt $CAP_MIB ]]

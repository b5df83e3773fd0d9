#!/usr/bin/env bash
# Speed and memory of onnxq against ONNX Runtime's quantizer on the real bench models.
#
#   ../shared/bench/prepare_models.sh --if-missing      # once: models, samples, venv
#   benches/bench.sh [minilm] [ppocr-det]
#
# Per model it prints: onnxq quantize (wall s, peak RSS MB), ORT quantize_static MinMax
# per-channel QDQ through peer_quantize.py (same model, same 32 samples), their ratios;
# calibration vs plain tract inference (examples/bench_calibrate); calibrate peak RSS with
# 32 vs 512 samples (the 32 samples repeated 16 times).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/onnxq/target}"
BENCH="${ONNXQ_BENCH:-$HOME/.cache/onnxq-bench}"
SHARED="${SHARED:-$(cd .. && pwd)/shared/bench}"
PY="$BENCH/venv/bin/python"
MODELS=("$@"); [ ${#MODELS[@]} -eq 0 ] && MODELS=(minilm ppocr-det)
cargo build --release --quiet --bin onnxq --example bench_calibrate
B="$CARGO_TARGET_DIR/release/onnxq"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

measure() { # prints "wall_s rss_mb"
  /usr/bin/time -f "%e %M" -o "$OUT/time" "$@" > "$OUT/stdout" 2> "$OUT/stderr" || { cat "$OUT/stderr" >&2; return 1; }
  awk '{printf "%.2f %.0f\n", $1, $2/1024}' "$OUT/time"
}

printf "%-10s %22s %22s %14s %14s\n" model "onnxq s / MB" "ORT s / MB" "time ratio" "RSS ratio"
for m in "${MODELS[@]}"; do
  M="$BENCH/models/$m"
  read -r qs qm < <(measure "$B" quantize "$M/model.onnx" --data "$M/calib" -o "$OUT/q.onnx" -q)
  read -r ps pm < <(measure "$PY" "$SHARED/peer_quantize.py" "$M/model.onnx" "$M/calib" "$OUT/p.onnx" --method ort-minmax)
  printf "%-10s %22s %22s %14s %14s\n" "$m" "$qs / $qm" "$ps / $pm" \
    "$(awk -v a="$qs" -v b="$ps" 'BEGIN{printf "%.2fx", a/b}')" "$(awk -v a="$qm" -v b="$pm" 'BEGIN{printf "%.2fx", a/b}')"
done
echo
for m in "${MODELS[@]}"; do
  M="$BENCH/models/$m"
  "$CARGO_TARGET_DIR/release/examples/bench_calibrate" "$M/model.onnx" "$M/calib"
  many=(); for _ in $(seq "${REPEAT:-16}"); do many+=(--data "$M/calib"); done
  read -r _ r32 < <(measure "$B" calibrate "$M/model.onnx" --data "$M/calib" -o "$OUT/s.json" -q)
  read -r _ r512 < <(measure "$B" calibrate "$M/model.onnx" "${many[@]}" -o "$OUT/s.json" -q)
  echo "$m calibrate peak RSS: 32 samples $r32 MB, $((32 * ${REPEAT:-16})) samples $r512 MB"
done

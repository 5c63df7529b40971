#!/usr/bin/env bash
# GPU acceptance check for one CUDA machine: the `gpu` tests, then `bench --sections gpu` (jina-v3
# tokens/s and MFU at 512 and 8,192 tokens: whole inputs, late chunking, naive chunking; jina-v4
# tokens/s and MFU at 512 and 8,192 tokens, images/s and MFU at the published image size).
#
#   infra/gpu-check.sh [OUT_DIR] [JINA_V3_DIR] [JINA_V4_DIR]
#
# Needs python3 with a CUDA torch, numpy, tokenizers, safetensors, transformers, pillow and pytest (peft
# too for the v4 reference tests, which skip the GPU otherwise); not Ray or LanceDB (the model library
# and the bench's gpu section do not import them). Without JINA_V3_DIR a random checkpoint of jina-v3's
# published shape (24 layers, d=1024, 16 heads, FFN 4096; small vocab) is written first; without
# JINA_V4_DIR one of jina-v4's (36 x 2048 text layers with GQA 16/2, FFN 11008; 32 x 1280 vision blocks;
# small vocab; about 7 GB): speed does not depend on the weights. EMBEDLAKE_SHARED_DATA points the tests
# at the STS data when ../shared/data is not beside the checkout. Writes OUT_DIR/{env,pytest,bench}.txt
# and the bench's results.json and results.md.
set -euo pipefail

out=${1:-gpu_check}
model=${2:-}
model_v4=${3:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/tests:$PWD/tests/model${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

python3 - <<'PY' 2>&1 | tee "$out/env.txt"
import torch
from model.attention import kernel_name, varlen_kernel
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
print("varlen kernel:", varlen_kernel() and kernel_name("varlen"))
PY

status=0
python3 -m pytest -m gpu tests/model -q -rs -p no:cacheprovider 2>&1 | tee "$out/pytest.txt" || status=$?

if [[ -z "$model" ]]; then
  model=$(mktemp -d)/jina-v3-shape
  python3 -c "import sys; from tiny_jina import make_tiny_jina; \
make_tiny_jina(sys.argv[1], hidden=1024, layers=24, heads=16, intermediate=4096)" "$model"
fi
if [[ -z "$model_v4" ]]; then
  model_v4=$(mktemp -d)/jina-v4-shape
  python3 -c "import sys; from tiny_jina_v4 import build; build(sys.argv[1], published_shape=True)" "$model_v4"
fi
python3 -m jobs.bench --sections gpu --gpu-model "$model" --gpu-v4-model "$model_v4" --repeats 3 --out "$out" \
  2>&1 | tee "$out/bench.txt"
exit "$status"

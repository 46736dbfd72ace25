#!/usr/bin/env bash
# bf16 PPO with LoRA and gradient checkpointing: GPT-2-small and Llama-1B shapes on a CUDA GPU, or a tiny GPT-2
# shape on the CPU when there is none (the test suite runs it that way). Prints generation tokens/s, seconds per
# phase and peak memory next to the memory model's prediction. See benchmarks/gpu_check.py and benchmarks/README.md.
#
#   benchmarks/gpu_check.sh                 # whatever this machine has
#   PYTHON=/path/to/python benchmarks/gpu_check.sh --phases 1
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    exec "$PYTHON" benchmarks/gpu_check.py --device cuda --shapes gpt2-small,llama-1b "$@"
fi
echo "No CUDA device: the CPU check with a tiny shape (what the test suite runs)."
exec "$PYTHON" benchmarks/gpu_check.py --device cpu --shapes gpt2-tiny --threads 1 --batch-size 4 --minibatch-size 2 \
    --new-tokens 8 --warmup 0 --phases 1 "$@"

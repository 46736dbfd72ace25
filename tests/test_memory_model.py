"""benchmarks/bench_memory.py (the memory model) against counts of real modules, and benchmarks/gpu_check.sh on the
CPU (its tiny shape), so the GPU script cannot rot."""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_memory():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCHMARKS / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_memory", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["gpt2-tiny", "gpt2-small", "llama-1b", "llama-8b"])
def test_the_parameter_count_of_each_shape_is_the_hugging_face_modules(bench_memory, name):
    import transformers as tf

    shape = bench_memory.SHAPES[name]
    if shape.family == "gpt2":
        config = tf.GPT2Config(vocab_size=shape.vocab, n_positions=shape.n_ctx, n_embd=shape.d_model,
                               n_layer=shape.n_layers, n_head=shape.n_heads, n_inner=shape.d_mlp)
    else:
        config = tf.LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.d_model, intermediate_size=shape.d_mlp,
                                num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
                                num_key_value_heads=shape.n_kv_heads, tie_word_embeddings=shape.tied)
    with torch.device("meta"):  # no memory: only the shapes
        model = tf.AutoModelForCausalLM.from_config(config)
    assert shape.parameters == sum(p.numel() for p in model.parameters())


def test_a_gpt2_reference_copy_stores_q_k_v_twice_as_the_model_says(bench_memory, tiny_bridge):
    from rlhf_scratch.models import make_reference

    def storage_bytes(module):
        return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}.values())

    cfg = tiny_bridge.cfg
    shape = bench_memory.Shape("t", "gpt2", cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_heads, cfg.d_mlp,
                               cfg.d_vocab, n_ctx=cfg.n_ctx)
    assert storage_bytes(tiny_bridge) == 4 * shape.parameters  # the policy: q/k/v are views of c_attn
    assert storage_bytes(make_reference(tiny_bridge)) == 4 * shape.reference_parameters  # its deep copy: not
    assert storage_bytes(make_reference(tiny_bridge, "bfloat16")) == 2 * shape.reference_parameters
    # Full-parameter training: the learner gives q/k/v their own storage for the fused AdamW (c_attn kept in step).
    from rlhf_scratch.models import PolicyWithValueHead
    from rlhf_scratch.ppo import PPOConfig, PPOTrainer

    trainer = PPOTrainer(PPOConfig(prompt="The movie", reward="chars:e", phases=1, batch_size=4, minibatch_size=4),
                         policy=PolicyWithValueHead(copy.deepcopy(tiny_bridge)))
    weights = bench_memory.terms(shape, tokens=1)["weights"]
    assert storage_bytes(trainer.policy) == weights == 4 * (shape.reference_parameters + shape.value_head_parameters)
    assert bench_memory.terms(shape, tokens=1, qkv_copy=False)["weights"] == 4 * (shape.parameters
                                                                                 + shape.value_head_parameters)


def test_the_predicted_peak_adds_the_bytes_per_parameter_and_the_fitted_terms(bench_memory):
    shape = bench_memory.SHAPES["llama-8b"]
    fit = bench_memory.Fit(base=1e9, t=3.0, a=100.0, a_ckpt=10.0, v=20.0, c=5e8)
    N, head = shape.parameters, shape.value_head_parameters
    full = bench_memory.predict(shape, 1000, fit)
    assert full["weights"] == 4 * (N + head) and full["reference"] == 4 * N
    assert full["gradients"] == 4 * (N + head) and full["adam"] == 8 * (N + head)
    assert full["activations"] == 100.0 * 1000 * 32 * 4096 and full["logits"] == 20.0 * 1000 * 128256
    assert full["transients"] == 3.0 * (N + head)
    assert full["total"] == pytest.approx(1e9 + 23 * (N + head) - 4 * head + 100.0 * 1000 * 32 * 4096
                                          + 20.0 * 1000 * 128256 + 5e8)
    lora = bench_memory.predict(shape, 1000, fit, lora_rank=16, checkpointing=True, include_base=False)
    adapters = 16 * 32 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)  # q, o; k, v; gate, up, down
    assert shape.lora_parameters(16) == adapters
    assert lora["reference"] == 0 and lora["base"] == 0 and lora["weights"] == 4 * (N + adapters + head)
    assert lora["adam"] == 8 * (adapters + head) and lora["activations"] == 10.0 * 1000 * 32 * 4096
    assert lora["transients"] == 3.0 * (adapters + head)


def test_gpu_check_runs_on_the_cpu_with_a_tiny_shape():
    environment = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")], capture_output=True, text=True,
                          env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "No CUDA device" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("| gpt2-tiny |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert float(cells[4]) > 0  # generated tokens/s
    assert float(cells[6]) > 0.1  # peak GB: at least the process

"""The memory model of one PPO phase, shared by ``memory.py`` (which measures and fits it) and ``gpu_check.py``
(which prints its prediction next to the measured GPU peak). No torch needed.

The peak of a PPO phase is the learning step's (the rollout's is smaller: no gradients, no optimiser state)::

    peak = base                                   the process: Python, torch, transformers (CPU only)
         + w · N                                  the policy's weights (float32: 4 bytes/param)
         + r · N_ref                              the frozen reference: 4 (float32), 2 (bfloat16/float16), 0 (LoRA);
                                                  N_ref = N but for GPT-2's copy, which holds q/k/v twice
         + (g + m + t) · N_trainable              gradients (4), AdamW's two moments (8), and t: what the backward
                                                  pass and the step hold for a while beside them (the tied
                                                  embedding's two gradients being summed, GPT-2's fused q/k/v
                                                  rebuilt with its gradient, ...)
         + a · T · L · D                          activations kept for backward: a without checkpointing,
                                                  a_ckpt with it (then ~ one block input per layer)
         + v · T · V                              full-vocabulary tensors of the loss: logits, log-softmax, ...
         + c                                      what else a phase holds (allocator slack, hook state, ...)

N parameters (N_trainable of them trained: all, or the adapters and the value head with LoRA), T tokens in a
learning minibatch (rows × sequence length), L layers, D the model width, V the vocabulary. w, r, g, m are known
(the dtype's bytes); t, a, a_ckpt, v and c are fitted by ``memory.py`` on measured CPU peaks and kept in
``memory_fit.json`` beside this file. On a GPU ``base`` is not part of the allocated peak (the CUDA context,
~0.5 GB, comes on top of it).

    fit = load_fit()
    predict(shape, tokens=..., fit=fit, lora_rank=16, checkpointing=True, reference_dtype="bfloat16")
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

FIT_FILE = Path(__file__).with_name("memory_fit.json")
GB = 1e9
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's shape: enough to count its parameters and activations."""

    name: str
    family: str  # "gpt2" (learned positions, LayerNorm, 4·D GELU MLP, tied) or "llama" (rotary, RMSNorm, SwiGLU)
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    vocab: int
    n_ctx: int = 1024
    tied: bool = True

    @property
    def parameters(self) -> int:
        """Parameter count of the language model (the value head not included)."""
        D, F, L, V = self.d_model, self.d_mlp, self.n_layers, self.vocab
        head_dim = D // self.n_heads
        kv = self.n_kv_heads * head_dim
        if self.family == "gpt2":  # q/k/v/o with biases, 2 LayerNorms, MLP with biases; positions; final LN
            block = (D * 3 * D + 3 * D) + (D * D + D) + 2 * 2 * D + (D * F + F) + (F * D + D)
            return V * D + self.n_ctx * D + L * block + 2 * D + (0 if self.tied else V * D)
        block = D * D + 2 * D * kv + D * D + 3 * D * F + 2 * D  # q, k, v, o; gate, up, down; 2 RMSNorms
        return V * D + L * block + D + (0 if self.tied else V * D)

    @property
    def reference_parameters(self) -> int:
        """Parameters the frozen reference (a deep copy of the bridge) stores. GPT-2's bridge trains q, k and v as
        views of the fused ``c_attn``; ``copy.deepcopy`` copies the views and ``c_attn`` separately, so a GPT-2
        reference holds its q/k/v weights twice (measured: ``memory.py`` records the copy's storage bytes)."""
        D, L = self.d_model, self.n_layers
        return self.parameters + (3 * D * D + 3 * D) * L if self.family == "gpt2" else self.parameters

    def lora_parameters(self, rank: int) -> int:
        """Adapter parameters of rank ``rank`` on every attention (q, k, v, o) and MLP matrix: r · (in + out) each."""
        D, F = self.d_model, self.d_mlp
        kv = self.n_kv_heads * (D // self.n_heads)
        mlp = [(D, F), (F, D)] if self.family == "gpt2" else [(D, F), (D, F), (F, D)]
        matrices = [(D, D), (D, kv), (D, kv), (D, D), *mlp]
        return self.n_layers * sum(rank * (i + o) for i, o in matrices)

    @property
    def value_head_parameters(self) -> int:
        """``ValueHead``: D → 4D → 1 with biases."""
        return self.d_model * 4 * self.d_model + 4 * self.d_model + 4 * self.d_model + 1


SHAPES = {
    "gpt2-tiny": Shape("gpt2-tiny", "gpt2", 2, 64, 2, 2, 256, 2048, n_ctx=128),  # smoke tests, the CPU gpu_check
    "gpt2-small": Shape("gpt2-small", "gpt2", 12, 768, 12, 12, 3072, 50257),
    "gpt2-small-v2k": Shape("gpt2-small-v2k", "gpt2", 12, 768, 12, 12, 3072, 2048),  # memory.py: apart from vocab
    "gpt2-medium": Shape("gpt2-medium", "gpt2", 24, 1024, 16, 16, 4096, 50257),
    # Llama-shaped models of the sizes interpretability work uses (the shapes of Qwen2.5-0.5B, Llama 3.2 1B / 3B and
    # Llama 3.1 8B; only the shape matters here).
    "llama-0.5b": Shape("llama-0.5b", "llama", 24, 896, 14, 2, 4864, 151936, tied=True),
    "llama-1b": Shape("llama-1b", "llama", 16, 2048, 32, 8, 8192, 128256, tied=True),
    "llama-3b": Shape("llama-3b", "llama", 28, 3072, 24, 8, 8192, 128256, tied=True),
    "llama-8b": Shape("llama-8b", "llama", 32, 4096, 32, 8, 14336, 128256, tied=False),
}


@dataclass
class Fit:
    """The fitted coefficients (bytes) of the module docstring's model."""

    base: float  # the process after imports (CPU), measured
    t: float  # per trainable parameter, beyond its gradient and moments
    a: float  # per token × layer × d_model, without checkpointing
    a_ckpt: float  # the same with checkpointing
    v: float  # per token × vocabulary entry
    c: float  # constant
    source: str = ""  # where the fit came from (command, date)


def load_fit(path: Path = FIT_FILE) -> Fit | None:
    """The fit ``memory.py`` wrote, or None if it has not been run."""
    if not path.is_file():
        return None
    return Fit(**json.loads(path.read_text()))


def save_fit(fit: Fit, path: Path = FIT_FILE) -> None:
    path.write_text(json.dumps(asdict(fit), indent=2) + "\n")


def terms(shape: Shape, tokens: int, lora_rank: int = 0, checkpointing: bool = False,
          reference_dtype: str = "float32", base_dtype: str = "float32", qkv_copy: bool = True) -> dict[str, float]:
    """The model's terms without the fitted coefficients applied to activations: bytes of state, and the counts the
    activation coefficients multiply (``token_layer_width`` = T·L·D, ``token_vocab`` = T·V).

    ``lora_rank`` > 0: only the adapters and the value head train, the reference is the adapter-free model (no
    copy), and ``base_dtype`` is the frozen weights' dtype (float32 in this project; bfloat16 shows what a half-
    precision frozen base would save).

    ``qkv_copy``: in full-parameter training the learner gives GPT-2's q/k/v weights their own contiguous storage
    beside the fused ``c_attn`` they were views of (for the fused AdamW; ``optimization.fuse_strided_groups``, since
    main's 26754fa), so the policy too holds them twice. False: the code before that."""
    N = shape.parameters
    if lora_rank:
        trainable = shape.lora_parameters(lora_rank) + shape.value_head_parameters
        weights = BYTES[base_dtype] * N + 4 * trainable
        reference = 0.0
    else:
        trainable = N + shape.value_head_parameters
        stored = shape.reference_parameters if qkv_copy else N
        weights = 4 * (stored + shape.value_head_parameters)
        reference = BYTES[reference_dtype] * shape.reference_parameters
    return {
        "weights": float(weights), "reference": float(reference), "gradients": 4.0 * trainable,
        "adam": 8.0 * trainable, "trainable": float(trainable), "token_layer_width": float(tokens * shape.n_layers * shape.d_model),
        "token_vocab": float(tokens * shape.vocab), "checkpointing": checkpointing,
    }


def predict(shape: Shape, tokens: int, fit: Fit, include_base: bool = True, **options) -> dict[str, float]:
    """The predicted peak (bytes) of a PPO phase, term by term, and ``total``."""
    t = terms(shape, tokens, **options)
    parts = {
        "base": fit.base if include_base else 0.0,
        "weights": t["weights"], "reference": t["reference"], "gradients": t["gradients"], "adam": t["adam"],
        "transients": fit.t * t["trainable"],
        "activations": (fit.a_ckpt if t["checkpointing"] else fit.a) * t["token_layer_width"],
        "logits": fit.v * t["token_vocab"], "other": fit.c,
    }
    parts["total"] = sum(parts.values())
    return parts

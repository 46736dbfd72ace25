"""Tiny random models of every family the research tools must handle, built from Hugging Face config classes.

No hub: each model is a random 2-layer network with the tiny BPE tokenizer of ``conftest.TINY_TEXTS``, saved
in ``save_pretrained`` layout so that ``load_bridge(directory)`` and every command's ``--model DIR`` take it.
The configs keep each family's distinguishing features: RMSNorm (all but GPT-2 and GPT-NeoX), grouped-query
attention (4 query heads over 2 key/value heads), rotary positions (no positional embedding matrix), untied
unembeddings (Llama, Mistral, OLMo 2, Phi-3, GPT-NeoX), Gemma's embedding scale √D and logit soft-capping.

    build_family_model("llama", directory) -> directory
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2", "phi3"]
RMSNORM_FAMILIES = [f for f in FAMILIES if f not in ("gpt2", "gpt_neox")]

D_MODEL, N_LAYERS, N_HEADS, N_KV_HEADS, D_MLP, N_CTX = 32, 2, 4, 2, 64, 64


def family_config(family: str, vocab_size: int, special: int):
    """The Hugging Face config of a tiny ``family`` model (random weights are drawn by the model class)."""
    import transformers as tf

    ids = dict(bos_token_id=special, eos_token_id=special, pad_token_id=special)
    rotary = dict(
        vocab_size=vocab_size, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, max_position_embeddings=N_CTX, **ids,
    )
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_positions=N_CTX, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, **ids)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
            num_attention_heads=N_HEADS, max_position_embeddings=N_CTX, rotary_pct=0.25, **ids,
        )
    if family == "llama":
        return tf.LlamaConfig(**rotary)
    if family == "mistral":
        return tf.MistralConfig(**rotary, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**rotary)
    if family == "qwen3":
        return tf.Qwen3Config(**rotary, head_dim=D_MODEL // N_HEADS)
    if family == "gemma2":
        return tf.Gemma2Config(**rotary, head_dim=D_MODEL // N_HEADS, final_logit_softcapping=30.0,
                               attn_logit_softcapping=50.0, sliding_window=N_CTX)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**rotary, head_dim=D_MODEL // N_HEADS, final_logit_softcapping=30.0,
                                   sliding_window=N_CTX)
    if family == "olmo2":
        return tf.Olmo2Config(**rotary)
    if family == "phi3":
        return tf.Phi3Config(**rotary)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def build_family_model(family: str, directory: str | Path, texts: list[str] | None = None, seed: int = 0) -> Path:
    """Train the tiny tokenizer on ``texts`` and save a random ``family`` model with it in ``directory``."""
    from transformers import AutoModelForCausalLM

    from rlhf_scratch.pretrain import train_tokenizer

    if texts is None:
        from conftest import TINY_TEXTS

        texts = TINY_TEXTS
    directory = Path(directory)
    tokenizer = train_tokenizer(texts, vocab_size=320, directory=directory)
    config = family_config(family, len(tokenizer), tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # Some families initialise norm weights to exactly 0 or 1: make them non-trivial, so a
        for name, param in model.named_parameters():  # test notices a norm weight that is left out or misapplied.
            if "norm" in name and param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    return directory


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 9 random token ids, the last two left-padded by 3 and 6 (mask 0): (tokens, attention_mask)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 300, (3, 9), generator=generator)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return tokens, mask

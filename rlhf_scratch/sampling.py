"""Batched, KV-cached generation from left-padded prompts, with masks and decoding.

Layout of one generated batch (B rows, P prompt positions, G generated positions)::

    sequences       [B, P + G]   pad..pad BOS prompt | gen gen EOS pad pad
    attention_mask  [B, P + G]    0 .. 0   1    1    |  1   1   1   0   0
    gen_mask        [B, G]                           |  T   T   T   F   F

Prompts of different lengths are *left*-padded so that every row's first generated
token sits at index P: then "generated token i" means column P + i in every row, and
its log-prob comes from the logits at column P − 1 + i. The attention mask hides the
left padding and the bridge derives position ids from it, so a padded row computes
exactly what it would compute alone. A response ends at its first EOS (which is kept
and carries loss, so the policy can learn when to stop); everything after it is
padding: ``gen_mask`` False, ``attention_mask`` 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from beartype import beartype
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor


@dataclass
class SamplingConfig:
    """How responses are sampled."""

    max_new_tokens: int = 24
    """Maximum number of generated tokens per response."""
    temperature: float = 1.0
    """Softmax temperature; log-probs used in training are taken at this temperature too."""
    top_k: int | None = None
    """Keep only the k most likely tokens at each step (None: no top-k filter)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with total probability >= top_p (1.0: off)."""
    stop_at_eos: bool = True
    """End a response at its first EOS token; later positions become padding."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0, got {self.temperature}. For greedy decoding use a "
                "small temperature such as 1e-3 or top_k=1."
            )
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (no filter), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}; use 1.0 to turn it off.")


@dataclass
class Generation:
    """A batch of prompts and their sampled responses (see the module docstring)."""

    sequences: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    gen_mask: Bool[Tensor, "batch gen"]
    prompt_len: int
    ended_with_eos: Bool[Tensor, "batch"]
    """Rows whose response ended with EOS rather than at max_new_tokens."""
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)

    @property
    def texts(self) -> list[str]:
        """Prompt and response joined: what a reward model reads."""
        return [p + r for p, r in zip(self.prompts, self.responses)]

    @property
    def response_tokens(self) -> Int[Tensor, "batch gen"]:
        return self.sequences[:, self.prompt_len :]

    def __repr__(self) -> str:
        return (
            f"Generation(sequences={tuple(self.sequences.shape)}, prompt_len={self.prompt_len}, "
            f"gen={self.gen_mask.shape[1]}, mean_response_tokens={self.gen_mask.sum(1).float().mean():.1f})"
        )


def encode(tokenizer, text: str, prepend_bos: bool = True) -> list[int]:
    """Token ids of ``text``, optionally preceded by the BOS token (as in pretraining)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prepend_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def padding_id(tokenizer) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else its EOS (GPT-2 has no pad token).
    Padded positions are masked everywhere, so the choice only has to be a valid token id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Int[Tensor, "batch prompt"], Int[Tensor, "batch prompt"]]:
    """Left-pad token lists to a common length: ``(tokens [B, P], attention_mask [B, P])``."""
    if not prompts:
        raise ValueError("No prompts given: pass at least one prompt.")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("A prompt encodes to zero tokens; give every prompt some text or prepend BOS.")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return tokens, mask


@jaxtyped(typechecker=beartype)
def filter_logits(
    logits: Float[Tensor, "batch vocab"], temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0
) -> Float[Tensor, "batch vocab"]:
    """Temperature-scaled logits with tokens outside top-k / the top-p nucleus set to −inf.

    Nucleus: sort probabilities in descending order and drop every token whose
    preceding cumulative probability already reaches ``top_p`` (the most likely token
    is always kept).
    """
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@jaxtyped(typechecker=beartype)
def sample_tokens(probs: Float[Tensor, "batch vocab"], generator: torch.Generator | None = None) -> Int[Tensor, "batch"]:
    """One token per row by inverse-CDF sampling: the first v with cdf(v) > u·cdf(V), u ~ U[0, 1).

    The uniforms come from ``generator`` on its own device (a CPU generator works for a
    model on a GPU, and the same seed gives the same tokens on either); tokens with
    probability 0 are never chosen because the comparison is strict.
    """
    device = generator.device if generator is not None else probs.device
    uniform = torch.rand((probs.shape[0], 1), generator=generator, device=device).to(probs.device)
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
    return index.clamp(max=probs.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def generate(
    bridge,
    prompts: list[list[int]],
    config: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    fwd_hooks: list | tuple = (),
) -> Generation:
    """Sample responses for a batch of tokenised prompts with a KV cache.

    The first step runs the whole left-padded prompt; each later step feeds only the
    newest token and the grown attention mask, reusing the keys and values of all
    earlier positions (``return_type="logits_and_cache"``). ``fwd_hooks`` are
    TransformerLens hooks applied to every forward pass of this generation.
    """
    tokenizer = bridge.tokenizer
    eos_id = tokenizer.eos_token_id
    pad_id = padding_id(tokenizer)
    tokens, attention_mask = left_pad(prompts, pad_id)
    n_ctx = bridge.cfg.n_ctx
    if tokens.shape[1] + config.max_new_tokens > n_ctx:
        raise ValueError(
            f"Longest prompt ({tokens.shape[1]} tokens) + max_new_tokens ({config.max_new_tokens}) "
            f"exceeds the model's context of {n_ctx} tokens. Use shorter prompts "
            "(e.g. --max-prompt-tokens) or fewer new tokens."
        )
    device = next(bridge.parameters()).device
    tokens, attention_mask = tokens.to(device), attention_mask.to(device)
    batch, prompt_len = tokens.shape

    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    ended_with_eos = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens, new_real = [], []
    step_input, cache = tokens, None
    with bridge.hooks(fwd_hooks=list(fwd_hooks)):
        for _ in range(config.max_new_tokens):
            logits, cache = bridge(
                step_input, return_type="logits_and_cache", attention_mask=attention_mask, past_key_values=cache
            )
            next_logits = filter_logits(logits[:, -1, :].float(), config.temperature, config.top_k, config.top_p)
            next_token = sample_tokens(torch.softmax(next_logits, dim=-1), generator)
            # Rows that already ended keep emitting padding; it carries no loss.
            next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
            new_tokens.append(next_token)
            new_real.append(~finished)
            if config.stop_at_eos and eos_id is not None:
                just_ended = (~finished) & (next_token == eos_id)
                ended_with_eos |= just_ended
                finished |= just_ended
            # The token just sampled is real (mask 1) iff its row had not ended before it.
            attention_mask = torch.cat([attention_mask, new_real[-1].long()[:, None]], dim=1)
            step_input = next_token[:, None]
            if bool(finished.all()):
                break

    gen_tokens = torch.stack(new_tokens, dim=1)
    gen_mask = torch.stack(new_real, dim=1)
    sequences = torch.cat([tokens, gen_tokens], dim=1)
    full_mask = torch.cat([attention_mask[:, :prompt_len], gen_mask.long()], dim=1)
    generation = Generation(
        sequences=sequences.cpu(),
        attention_mask=full_mask.cpu(),
        gen_mask=gen_mask.cpu(),
        prompt_len=prompt_len,
        ended_with_eos=ended_with_eos.cpu(),
        prompts=decode_prompts(tokenizer, tokens.cpu(), full_mask[:, :prompt_len].cpu()),
        responses=decode_responses(tokenizer, gen_tokens.cpu(), gen_mask.cpu()),
    )
    return generation


def decode_prompts(tokenizer, tokens: Tensor, mask: Tensor) -> list[str]:
    """Text of each prompt's real tokens, special tokens (BOS) dropped."""
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True) for row, m in zip(tokens, mask)]


def decode_responses(tokenizer, gen_tokens: Tensor, gen_mask: Tensor) -> list[str]:
    """Text of each response's real tokens, the closing EOS dropped."""
    return [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(gen_tokens, gen_mask)]

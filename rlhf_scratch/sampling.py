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

import contextlib
import importlib.metadata as metadata
import warnings
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor
from transformers import DynamicCache

from rlhf_scratch import compat
from rlhf_scratch.anatomy import FINAL_RESIDUAL_HOOK, check_fwd_hooks
from rlhf_scratch.compat import cache_kwarg_name
from rlhf_scratch.plain_decoding import plain_decoder_for
from rlhf_scratch.typecheck import typechecker
from rlhf_scratch.config import SamplingConfig  # noqa: F401 (defined there: importable without torch)

# Before any cached decoding: TransformerLens 4.3 misses the KV cache under transformers 5.24's name.
compat.install()


@dataclass
class Generation:
    """A batch of prompts and their sampled responses (see the module docstring)."""

    sequences: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    gen_mask: Bool[Tensor, "batch gen"]
    prompt_len: int
    ended_with_eos: Bool[Tensor, "batch"]
    """Rows whose response ended with EOS rather than at max_new_tokens."""
    sampled_logprobs: Float[Tensor, "batch gen"]
    """log π(token) of each generated token as the cached decoding step computed it, at the sampling
    temperature and before top-k/top-p (the distribution training uses); 0 at padding. ``--debug``
    compares it with the rollout's full forward pass."""
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    logp_gen: Float[Tensor, "batch gen vocab"] | None = None
    """With ``generate(..., record=True)``: the log-softmax at the sampling temperature of each decoding step's
    logits (before top-k/top-p), on the model's device; row b, column i is the distribution token i was drawn
    from. What the rollout's policy forward would compute at columns P − 1 + i; None otherwise."""
    final_resid: Float[Tensor, "batch gen d_model"] | None = None
    """With ``record=True``: the final residual stream (``ln_final.hook_out``) at the position each token was
    chosen from, on the model's device: the value head's input for that state. None otherwise."""

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


@jaxtyped(typechecker=typechecker)
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


@jaxtyped(typechecker=typechecker)
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


class NonFiniteModelError(ValueError):
    """The model's own logits are NaN or inf, so nothing sampled from it means anything."""


class GenerationStackError(RuntimeError):
    """KV-cached decoding disagrees with a full forward pass: the installed library versions
    generate wrong samples. The message names the versions and what to do."""


def installed_versions() -> dict[str, str]:
    """Versions of the libraries that generation depends on, for error messages and reports."""

    versions = {}
    for name in ("torch", "transformers", "transformer-lens"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def new_kv_cache():
    """An empty Hugging Face KV cache; ``decode_step`` fills it in place, layer by layer."""
    return DynamicCache()


def decode_step(bridge, step_input: Int[Tensor, "batch new"], attention_mask: Int[Tensor, "batch seen"], kv_cache):
    """Logits ``[B, new, V]`` for ``step_input`` given the keys and values of every earlier position in
    ``kv_cache``, which is extended in place by ``new`` positions.

    ``attention_mask`` covers every position seen so far, cached and new; the bridge derives
    position ids from it, so left padding is skipped. The cache goes to the Hugging Face model under
    the name its ``forward`` takes (``compat.cache_kwarg_name``).
    """
    name = cache_kwarg_name(bridge.original_model)
    return bridge(step_input, attention_mask=attention_mask, use_cache=True, **{name: kv_cache})


_SELF_CHECKED = "_rlhf_scratch_generation_checked"


@torch.no_grad()
def check_cached_generation(bridge, n_steps: int = 4, tolerance: float | None = None, plain: bool = False) -> float:
    """Prove that KV-cached decoding computes what one full forward pass computes; raise if not.

    Two left-padded prompts of different lengths (fixed token ids, no randomness) are decoded
    greedily for ``n_steps`` steps through ``decode_step`` (``plain``: through the plain module's
    decoding steps, ``plain_decoding.PlainDecoder``, which must then exist for the bridge); then the
    whole sequence runs once through the bridge, without a cache. The step log-probs must equal the
    full pass's log-probs at the same positions (column P − 1 + i for generated token i) to within
    ``tolerance`` (default 1e-3 nats in float32, 0.1 in lower precision). Runs without hooks and draws
    no random numbers, so it changes nothing a caller sees. Returns the largest difference found.

    A broken stack (transformers 5.24 with TransformerLens 4.3 before ``compat.install``)
    differs by 0.4 to 12 nats; a correct one by about 1e-6.
    """
    dtype = next(bridge.parameters()).dtype
    if tolerance is None:
        tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 0.1
    device = next(bridge.parameters()).device
    vocab, n_ctx = bridge.cfg.d_vocab, bridge.cfg.n_ctx
    # Two prompts of different lengths (5 and 3 tokens, fewer in a tiny context), ids spread over the
    # vocabulary: any ids work, the check compares two paths on the same ones.
    longest = max(1, min(5, n_ctx - 1))
    prompts = [[(7 * i + 3) % vocab for i in range(longest)], [(11 * i + 5) % vocab for i in range(max(1, longest - 2))]]
    n_steps = min(n_steps, n_ctx - longest)
    if n_steps < 1:
        return 0.0  # a context of one token: nothing can be generated, so nothing to check
    tokens, attention_mask = (t.to(device) for t in left_pad(prompts, padding_id(bridge.tokenizer)))
    prompt_len = tokens.shape[1]
    kv_cache, step_input, step_logprobs = new_kv_cache(), tokens, []
    decoder = plain_decoder_for(bridge, tokens.shape[0], prompt_len + n_steps) if plain else None
    if plain and decoder is None:
        raise ValueError("check_cached_generation(plain=True) needs a bridge that the plain module can stand in for "
                         "(plain_forward.plain_forward_for), in eval mode, with no hook attached.")
    for _ in range(n_steps):
        if decoder is None:
            logits = decode_step(bridge, step_input, attention_mask, kv_cache)[:, -1].float()
        else:
            logits = decoder(step_input, attention_mask)[0][:, -1].float()
        step_logprobs.append(torch.log_softmax(logits, dim=-1))
        step_input = logits.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, step_input], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(step_input)], dim=1)
    full_logits = bridge(tokens[:, :-1], attention_mask=attention_mask[:, :-1])[:, prompt_len - 1 :].float()
    if not torch.isfinite(full_logits).all():
        raise NonFiniteModelError(
            "The model gives NaN or inf logits on a plain forward pass: its weights are damaged (a corrupted or "
            "partly written file?) or a training run diverged. This is not a library problem; load an intact copy "
            "of the model (a run's checkpoint.old, or the model it started from)."
        )
    difference = float((torch.stack(step_logprobs, dim=1) - torch.log_softmax(full_logits, dim=-1)).abs().max())
    if not difference <= tolerance:
        versions = ", ".join(f"{name} {version}" for name, version in installed_versions().items())
        raise GenerationStackError(
            f"KV-cached generation disagrees with a full forward pass by {difference:.3g} nats (tolerance "
            f"{tolerance:g}) with {versions}: samples from this stack would be wrong. Install the versions "
            "the project was tested with: `pip install torch==2.13.0 -e . -c constraints.txt` (see the "
            "README, 'Dependency versions'), and report the versions above if they are within the "
            "bounds in pyproject.toml."
        )
    return difference


def ensure_generation_checked(bridge, plain: bool = False) -> None:
    """Run ``check_cached_generation`` once per bridge object and decoding path (the bridge's steps; ``plain``: the
    plain module's), about one forward pass each (see the README for its cost), so a broken library stack stops the
    first command that samples."""
    checked = getattr(bridge, _SELF_CHECKED, ())
    path = "plain" if plain else "bridge"
    if path not in checked:
        check_cached_generation(bridge, plain=plain)
        setattr(bridge, _SELF_CHECKED, (*checked, path))


@torch.no_grad()
def generate(
    bridge,
    prompts: list[list[int]],
    config: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    fwd_hooks: list | tuple = (),
    record: bool = False,
    plain: bool = True,
) -> Generation:
    """Sample responses for a batch of tokenised prompts with a KV cache.

    The first step runs the whole left-padded prompt; each later step feeds only the
    newest token and the grown attention mask, reusing the keys and values of all
    earlier positions (``decode_step``). ``fwd_hooks`` are TransformerLens hooks applied
    to every forward pass of this generation; a name that never runs on this model is refused
    (``anatomy.check_fwd_hooks``, one probe per new name). The first call on a bridge checks that
    cached decoding equals a full forward pass (``ensure_generation_checked``).

    ``record=True`` also keeps what a forward pass of the policy over the finished sequences would read at the
    generated positions, so that the rollout needs no such pass: each step's log-softmax at the sampling
    temperature (``Generation.logp_gen`` [B, G, V]) and the final residual at the position the token was chosen
    from (``Generation.final_resid`` [B, G, D], captured at ``ln_final.hook_out``). Cached decoding and a full
    forward pass agree to float rounding (``check_cached_generation``; ``--debug`` compares them every phase).

    With ``plain`` (the default), no ``fwd_hooks``, no hook attached to the bridge and the bridge in eval mode, each
    step runs as the plain Hugging Face module on the bridge's weights (``plain_decoding``: the same function
    without the hook points' cost, checked once per bridge like the bridge's steps); ``config.compiled_decoding``
    compiles that step (opt-in: a compile per batch size and cache length).
    """
    tokenizer = bridge.tokenizer
    eos_id = tokenizer.eos_token_id
    pad_id = padding_id(tokenizer)
    tokens, attention_mask = left_pad(prompts, pad_id)
    n_ctx = bridge.cfg.n_ctx
    if tokens.shape[1] + config.max_new_tokens > n_ctx:
        raise ValueError(
            f"Longest prompt ({tokens.shape[1]} tokens) + max_new_tokens ({config.max_new_tokens}) "
            f"exceeds the model's context of {n_ctx} tokens. Use a shorter prompt (--prompt, or --max-prompt-tokens "
            "for prompts cut from --data) or fewer new tokens (--max-new-tokens)."
        )
    ensure_generation_checked(bridge)
    if fwd_hooks:
        fwd_hooks = check_fwd_hooks(bridge, fwd_hooks)
    device = next(bridge.parameters()).device
    tokens, attention_mask = tokens.to(device), attention_mask.to(device)
    batch, prompt_len = tokens.shape
    decoder = plain_decoder_for(bridge, batch, prompt_len + config.max_new_tokens, fwd_hooks,
                                compiled=config.compiled_decoding) if plain else None
    if decoder is not None:
        ensure_generation_checked(bridge, plain=True)
    elif config.compiled_decoding:
        warnings.warn("compiled_decoding is ignored here: the decoding steps go through the TransformerLens bridge "
                      "(hooks asked for or attached, the model in training mode, or the plain module off).",
                      stacklevel=3)  # past torch.no_grad's wrapper: the caller's line

    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    ended_with_eos = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens, new_real, new_logprobs = [], [], []
    step_logp, step_resid, captured = [], [], {}

    def capture_final_resid(resid, hook):
        captured["resid"] = resid[:, -1]
        return resid

    hooks = [*fwd_hooks, (FINAL_RESIDUAL_HOOK, capture_final_resid)] if record and decoder is None else list(fwd_hooks)
    step_input, kv_cache = tokens, new_kv_cache()
    unfiltered = config.top_k is None and config.top_p >= 1.0
    with bridge.hooks(fwd_hooks=hooks), decoder if decoder is not None else contextlib.nullcontext():
        for _ in range(config.max_new_tokens):
            if decoder is None:
                logits = decode_step(bridge, step_input, attention_mask, kv_cache)[:, -1, :].float()
            else:
                logits, captured["resid"] = decoder(step_input, attention_mask, want_resid=record)
                logits = logits[:, -1, :].float()
            # log π at the sampling temperature, before top-k/top-p: what training reads back (x / 1 is x: skipped).
            scaled = logits / config.temperature if config.temperature != 1 else logits
            if record:  # the whole log-distribution, as the rollout's forward pass would give it
                step_logp.append(torch.log_softmax(scaled, dim=-1))
                step_resid.append(captured.pop("resid"))
            if record and unfiltered:  # the sampling distribution is exp of the recorded one: no second softmax
                probs = step_logp[-1].exp()
            else:
                probs = torch.softmax(filter_logits(logits, config.temperature, config.top_k, config.top_p), dim=-1)
            next_token = sample_tokens(probs, generator)
            # Rows that already ended keep emitting padding; it carries no loss.
            next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
            if record:
                step_logprobs = step_logp[-1].gather(-1, next_token[:, None])[:, 0]
            else:  # scaled[token] − logsumexp(scaled) is log_softmax at one entry, without a [B, V] result per step
                step_logprobs = scaled.gather(-1, next_token[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)
            new_logprobs.append(torch.where(finished, torch.zeros_like(step_logprobs), step_logprobs))
            new_tokens.append(next_token)
            new_real.append(~finished)
            if config.stop_at_eos and eos_id is not None:
                just_ended = (~finished) & (next_token == eos_id)
                ended_with_eos |= just_ended
                finished |= just_ended
            # The token just sampled is real (mask 1) iff its row had not ended before it.
            attention_mask = torch.cat([attention_mask, new_real[-1].long()[:, None]], dim=1)
            step_input = next_token[:, None]
            # bool() waits for the device (a host-device sync per token on a GPU): only when rows can end early.
            if config.stop_at_eos and bool(finished.all()):
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
        sampled_logprobs=torch.stack(new_logprobs, dim=1).cpu(),
        prompts=decode_prompts(tokenizer, tokens.cpu(), full_mask[:, :prompt_len].cpu()),
        responses=decode_responses(tokenizer, gen_tokens.cpu(), gen_mask.cpu()),
        logp_gen=torch.stack(step_logp, dim=1) if record else None,
        final_resid=torch.stack(step_resid, dim=1) if record else None,
    )
    return generation


def decode_prompts(tokenizer, tokens: Tensor, mask: Tensor) -> list[str]:
    """Text of each prompt's real tokens, special tokens (BOS) dropped."""
    return [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True) for row, m in zip(tokens, mask)]


def decode_responses(tokenizer, gen_tokens: Tensor, gen_mask: Tensor) -> list[str]:
    """Text of each response's real tokens, the closing EOS dropped."""
    return [tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(gen_tokens, gen_mask)]

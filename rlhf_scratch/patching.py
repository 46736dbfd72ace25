"""Activation patching between a policy and its reference: which components carry what RL changed?

Both models read the same token sequences (the policy's own samples). One model, the *receiver*, runs with the
activation of one component taken from the other model, the *donor*, on the same tokens (the donor's value at
every position), and we measure how far that moves the receiver's behaviour towards the donor's.

Components (``components(bridge)``; N batch, S positions, D d_model, H heads, d d_head):

* ``"L{l}.H{h}"`` — attention head h's output in layer l, its slice of the attention output
  r_h = z_h · W_O[h]  [N, S, D]  (z = ``blocks.l.attn.hook_z`` [N, S, H, d], each model's own W_O [H, d, D]).
  Patching it replaces the receiver's r_h by the donor's inside ``blocks.l.attn.hook_out``
  (out ← out − r_h^receiver + r_h^donor), so a change of W_O moves with the head. It is taken before any norm the
  family applies after attention (Gemma 2/3, OLMo 2), which the receiver then applies to the patched sum.
* ``"L{l}.mlp"`` — the MLP's output as the block adds it to the residual stream (``blocks.l.hook_mlp_out``;
  after the post-MLP norm where the family has one).
* ``"L{l}.resid"`` — the residual stream after block l (``blocks.l.hook_resid_post``). Patching the last layer's
  residual stream gives the donor's logits up to what the final norm and unembedding changed (the receiver's own
  ln_final, W_U are applied): nearly complete by construction, so it says nothing about *where*; its shortfall from
  100 % is the share of the change that sits in the final norm and unembedding.

Measures of a model x on the sequences (``response_mask`` [N, S] marks the response tokens; the distribution that
predicts token t is read at position t − 1, so the *scored positions* are those t − 1):

* sequence KL: KL_seq(a ‖ b) = mean over sequences of Σ over scored positions of Σ_v π_a(v)(log π_a(v) − log π_b(v)).
* token-set log-prob: m_T(x) = mean over scored positions of log Σ_{t∈T} π_x(t)  (``token_ids`` = T).
* reward: R(x) = mean reward of responses *sampled* from x (patched if x is) after each sequence's prompt, with
  the same random numbers for every model (one seeded generator per model: common random numbers), scored by
  ``rewards_fn`` (a reward as ``rewards.make_reward`` builds it: texts -> [N]; prompts= when it takes them).

Recovered fraction of a component, with P the patched model (receiver r, donor d):

    policy_into_reference  (r = reference, d = policy):
        KL:            1 − KL_seq(π_pol ‖ π_P) / KL_seq(π_pol ‖ π_ref)
        tokens/reward: (M(P) − M(ref)) / (M(pol) − M(ref))
    reference_into_policy  (r = policy, d = reference; the mirror: how much of the change is lost):
        KL:            1 − KL_seq(π_P ‖ π_ref) / KL_seq(π_pol ‖ π_ref)
        tokens/reward: (M(pol) − M(P)) / (M(pol) − M(ref))

1 means the patched model behaves like the donor (on that measure), 0 like the receiver; values outside [0, 1]
happen (a component can overshoot, or pull the other way). The denominator is the gap between the two unpatched
models. When it is ~0 the fraction is **None**, never a division by noise: KL_seq(π_pol ‖ π_ref) or
|M(pol) − M(ref)| below ``min_gap`` (float rounding), and for the sampled reward also a gap within twice its
standard error (paired over prompts: SE = std_i(R_pol,i − R_ref,i)/√N).

    components(bridge) -> ["L0.H0", ..., "L0.mlp", "L0.resid", "L1.H0", ...]
    patched_logits(receiver, donor, tokens, attention_mask, components) -> logits [N, S, V]
    patch_scan(reference, policy, tokens, attention_mask, response_mask, token_ids=, rewards_fn=, direction=) -> PatchScan
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor

from rlhf_scratch.typecheck import typechecker

DIRECTIONS = ("policy_into_reference", "reference_into_policy")
METRICS = ("kl", "reward", "tokens")
"""Measures of ``PatchScan``: sequence KL, reward gap, log-prob of the token set."""
KINDS = ("head", "mlp", "resid")
"""Row kinds of a per-component scan ("set" for the rows of ``patch_scan(sets=...)``)."""
_COMPONENT = re.compile(r"^L(\d+)\.(?:H(\d+)|(mlp)|(resid))$")


# --------------------------------------------------------------------------- components and hooks


def components(bridge) -> list[str]:
    """Every patchable component, layer by layer: "L{l}.H{h}" for each head, then "L{l}.mlp", then "L{l}.resid"."""
    names = []
    for layer in range(bridge.cfg.n_layers):
        names += [f"L{layer}.H{head}" for head in range(bridge.cfg.n_heads)] + [f"L{layer}.mlp", f"L{layer}.resid"]
    return names


def parse_component(name: str, n_layers: int | None = None, n_heads: int | None = None) -> tuple[str, int, int | None]:
    """"L3.H1" -> ("head", 3, 1); "L3.mlp" -> ("mlp", 3, None); "L3.resid" -> ("resid", 3, None)."""
    match = _COMPONENT.match(name)
    if match is None:
        raise ValueError(f"component {name!r} is not one of L<layer>.H<head>, L<layer>.mlp, L<layer>.resid "
                         "(e.g. L0.H2); patching.components(bridge) lists them.")
    layer = int(match.group(1))
    head = None if match.group(2) is None else int(match.group(2))
    kind = "head" if head is not None else ("mlp" if match.group(3) else "resid")
    if n_layers is not None and layer >= n_layers:
        raise ValueError(f"component {name!r}: the model has {n_layers} layers (0..{n_layers - 1}).")
    if n_heads is not None and head is not None and head >= n_heads:
        raise ValueError(f"component {name!r}: the model has {n_heads} heads per layer (0..{n_heads - 1}).")
    return kind, layer, head


def _z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _attn_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_out"


def _site_hook(kind: str, layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out" if kind == "mlp" else f"blocks.{layer}.hook_resid_post"


@dataclass
class DonorActivations:
    """What the donor computed on the sequences: per layer z [N, S, H, d] and W_O [H, d, D] for head outputs,
    and hook name -> [N, S, D] for MLP outputs and residual streams."""

    z: dict[int, Tensor] = field(default_factory=dict)
    W_O: dict[int, Tensor] = field(default_factory=dict)
    sites: dict[str, Tensor] = field(default_factory=dict)

    def rows(self, index) -> "DonorActivations":
        """The same activations for a subset of the sequences (``index`` into the batch dimension)."""
        return DonorActivations({k: v[index] for k, v in self.z.items()}, self.W_O,
                                {k: v[index] for k, v in self.sites.items()})


def _parsed(bridge, names: Sequence[str]) -> list[tuple[str, int, int | None]]:
    if isinstance(names, str):
        raise ValueError(f"components must be a list of names, got the string {names!r}; pass [{names!r}].")
    return [parse_component(name, bridge.cfg.n_layers, bridge.cfg.n_heads) for name in names]


@torch.no_grad()
def donor_activations(donor, tokens: Tensor, attention_mask: Tensor, names: Sequence[str]) -> tuple[Tensor, DonorActivations]:
    """The donor's logits [N, S, V] and the activations that patching ``names`` needs, from one forward pass."""
    parsed = _parsed(donor, names)
    head_layers = sorted({layer for kind, layer, _ in parsed if kind == "head"})
    sites = sorted({_site_hook(kind, layer) for kind, layer, _ in parsed if kind != "head"})
    wanted = [_z_hook(layer) for layer in head_layers] + sites
    device = next(donor.parameters()).device
    logits, cache = donor.run_with_cache(tokens.to(device), attention_mask=attention_mask.to(device),
                                         names_filter=lambda name: name in wanted)
    acts = DonorActivations(
        z={layer: cache[_z_hook(layer)].detach() for layer in head_layers},
        W_O={layer: donor.blocks[layer].attn.W_O.detach() for layer in head_layers},
        sites={name: cache[name].detach() for name in sites},
    )
    return logits, acts


def patch_hooks(receiver, acts: DonorActivations, names: Sequence[str]) -> list[tuple[str, Callable]]:
    """TransformerLens forward hooks that put the donor's ``acts`` of ``names`` into ``receiver``'s forward pass."""
    parsed = _parsed(receiver, names)
    hooks: list[tuple[str, Callable]] = []
    heads_by_layer: dict[int, list[int]] = {}
    for kind, layer, head in parsed:
        if kind == "head":
            heads_by_layer.setdefault(layer, []).append(head)
        else:
            name = _site_hook(kind, layer)

            def replace(x, hook, value=acts.sites[name]):
                return value.to(x.device, x.dtype)

            hooks.append((name, replace))
    for layer, heads in heads_by_layer.items():
        heads = sorted(set(heads))
        seen: dict[str, Tensor] = {}
        W_O_receiver = receiver.blocks[layer].attn.W_O.detach()[heads]  # [h, d, D]
        W_O_donor = acts.W_O[layer][heads]

        def record_z(z, hook, seen=seen):
            seen["z"] = z
            return z

        def swap_heads(out, hook, seen=seen, heads=heads, W_r=W_O_receiver, W_d=W_O_donor, z_d=acts.z[layer]):
            # out ← out − Σ_h z_h^r W_O^r[h] + Σ_h z_h^d W_O^d[h]  over the patched heads h
            mine = torch.einsum("bshd,hdm->bsm", seen["z"][:, :, heads].to(W_r.dtype), W_r.to(out.device))
            theirs = torch.einsum("bshd,hdm->bsm", z_d[:, :, heads].to(out.device, W_d.dtype), W_d.to(out.device))
            return out + (theirs - mine).to(out.dtype)

        hooks += [(_z_hook(layer), record_z), (_attn_hook(layer), swap_heads)]
    return hooks


@torch.no_grad()
def run_patched(receiver, tokens: Tensor, attention_mask: Tensor, acts: DonorActivations, names: Sequence[str]) -> Tensor:
    """The receiver's logits [N, S, V] with ``names`` patched from the donor's activations ``acts`` (same sequences)."""
    device = next(receiver.parameters()).device
    return receiver.run_with_hooks(tokens.to(device), attention_mask=attention_mask.to(device),
                                   fwd_hooks=patch_hooks(receiver, acts, names))


@torch.no_grad()
def patched_logits(receiver, donor, tokens: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"],
                   components: Sequence[str]) -> Float[Tensor, "batch seq vocab"]:
    """The receiver's forward pass on ``tokens`` with the activations of ``components`` (all at once) taken from the
    donor's forward pass on the same tokens. tokens, attention_mask [N, S] -> logits [N, S, V]."""
    _, acts = donor_activations(donor, tokens, attention_mask, components)
    return run_patched(receiver, tokens, attention_mask, acts, components)


# --------------------------------------------------------------------------- measures


@jaxtyped(typechecker=typechecker)
def sequence_kl(logp_a: Float[Tensor, "batch seq vocab"], logp_b: Float[Tensor, "batch seq vocab"],
                scored: Bool[Tensor, "batch seq"]) -> Float[Tensor, "batch"]:
    """Σ over scored positions of KL(a ‖ b) = Σ_v exp(logp_a)(logp_a − logp_b), per sequence [N] (log-probs [N, S, V])."""
    per_position = (logp_a.exp() * (logp_a - logp_b)).sum(-1)
    return (per_position * scored).sum(-1)


@jaxtyped(typechecker=typechecker)
def token_set_logprob(logp: Float[Tensor, "batch seq vocab"], token_ids: list[int]) -> Float[Tensor, "batch seq"]:
    """log Σ_{t∈T} π(t) at every position: logsumexp of the log-probs of T. [N, S, V] -> [N, S]"""
    return torch.logsumexp(logp[..., token_ids], dim=-1)


def scored_positions(response_mask: Tensor) -> Tensor:
    """[N, S] bool: True at t − 1 for each response token t (where the distribution predicting it is read)."""
    response_mask = response_mask.bool()
    return torch.cat([response_mask[:, 1:], torch.zeros_like(response_mask[:, :1])], dim=1)


def recovered_fraction(patched: float, receiver: float, donor: float, gap_floor: float) -> float | None:
    """(patched − receiver) / (donor − receiver), or None when |donor − receiver| <= gap_floor (no gap to recover)."""
    gap = donor - receiver
    if not math.isfinite(gap) or abs(gap) <= gap_floor:
        return None
    return (patched - receiver) / gap


# --------------------------------------------------------------------------- sampling under a patch


@torch.no_grad()
def sample_patched(receiver, donor, prompts: list[list[int]], n_new: int, names: Sequence[str],
                   generator: torch.Generator, eos_id: int | None, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sample ``n_new`` tokens per prompt from the receiver with ``names`` patched from the donor at every step
    (no KV cache: both models reread the whole sequence each step; ``names`` empty: the plain receiver).
    Returns (sequences [N, P + G], attention_mask [N, P + G], response_mask [N, P + G])."""
    from rlhf_scratch.sampling import left_pad, sample_tokens

    tokens, mask = left_pad(prompts, pad_id)
    response = torch.zeros_like(mask, dtype=torch.bool)
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(n_new):
        if names:
            _, acts = donor_activations(donor, tokens, mask, names)
            logits = run_patched(receiver, tokens, mask, acts, names)
        else:
            logits = receiver(tokens.to(next(receiver.parameters()).device), attention_mask=mask.to(next(receiver.parameters()).device))
        probs = torch.softmax(logits[:, -1].float().cpu(), dim=-1)
        token = torch.where(finished, torch.full_like(finished, pad_id, dtype=torch.long), sample_tokens(probs, generator))
        real = ~finished
        if eos_id is not None:
            finished = finished | (token == eos_id)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        mask = torch.cat([mask, real.long()[:, None]], dim=1)
        response = torch.cat([response, real[:, None]], dim=1)
        if bool(finished.all()):
            break
    return tokens, mask, response


def _prompts_of(tokens: Tensor, attention_mask: Tensor, response_mask: Tensor) -> list[list[int]]:
    keep = attention_mask.bool() & ~response_mask.bool()
    prompts = [row[k].tolist() for row, k in zip(tokens, keep)]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a sequence has no prompt token (response_mask covers all its real tokens); the reward "
                         "measure samples new responses after each prompt, so keep at least BOS outside the response.")
    return prompts


@torch.no_grad()
def sampled_rewards(receiver, donor, tokens, attention_mask, response_mask, names, rewards_fn, seed: int) -> Tensor:
    """Rewards [N] of responses sampled from the (patched) receiver after each sequence's prompt (``sample_patched``),
    as long as the longest response in ``response_mask``; the generator is seeded with ``seed`` for every model."""
    from rlhf_scratch.rewards import score_texts
    from rlhf_scratch.sampling import decode_prompts, decode_responses, padding_id

    tokenizer = receiver.tokenizer
    prompts = _prompts_of(tokens.cpu(), attention_mask.cpu(), response_mask.cpu())
    n_new = max(1, int(response_mask.bool().sum(1).max()))
    sequences, mask, response = sample_patched(receiver, donor, prompts, n_new, names, torch.Generator().manual_seed(seed),
                                               tokenizer.eos_token_id, padding_id(tokenizer))
    width = max(len(p) for p in prompts)
    prompt_texts = decode_prompts(tokenizer, sequences[:, :width], mask[:, :width])
    gen_mask = response[:, width:]
    if tokenizer.eos_token_id is not None:  # the closing EOS is part of the response but not of its text
        gen_mask = gen_mask & (sequences[:, width:] != tokenizer.eos_token_id)
    responses = decode_responses(tokenizer, sequences[:, width:], gen_mask)
    return score_texts(rewards_fn, [p + r for p, r in zip(prompt_texts, responses)], prompt_texts)


# --------------------------------------------------------------------------- the scan


@dataclass
class PatchScan:
    """One row per component: the recovered fraction of each measure (None where there is no gap to recover).

    rows: [{"component", "kind", "layer", "head", "kl", "reward", "tokens",            (recovered fractions)
            "kl_patched", "reward_patched", "tokens_patched"}, ...]                   (the patched model's values)
    baselines: KL_seq(pol ‖ ref) ("kl_gap"), M(ref) and M(pol) for tokens and reward, the reward gap's SE.
    """

    direction: str
    rows: list[dict]
    baselines: dict
    token_ids: list[int] | None = None
    n_layers: int = 0
    n_heads: int = 0

    def ranked(self, metric: str = "kl", kinds: Sequence[str] = KINDS) -> list[str]:
        """Components of ``kinds`` by recovered fraction of ``metric`` ("kl", "reward", "tokens"), best first;
        components whose fraction is None come last, in model order."""
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r}: choose from {METRICS}.")
        rows = [row for row in self.rows if row["kind"] in kinds]
        known = sorted((row for row in rows if row[metric] is not None), key=lambda row: -row[metric])
        return [row["component"] for row in known] + [row["component"] for row in rows if row[metric] is None]

    def value(self, component: str, metric: str = "kl") -> float | None:
        """The recovered fraction of ``metric`` for one component (None where there is no gap)."""
        for row in self.rows:
            if row["component"] == component:
                return row[metric]
        raise ValueError(f"component {component!r} is not in this scan; it has {[r['component'] for r in self.rows][:6]} ...")

    def head_grid(self, metric: str = "kl") -> Tensor:
        """[L, H] recovered fraction of every head (NaN where None), for the heatmap."""
        grid = torch.full((self.n_layers, self.n_heads), float("nan"))
        for row in self.rows:
            if row["kind"] == "head" and row[metric] is not None:
                grid[row["layer"], row["head"]] = row[metric]
        return grid

    def layer_values(self, kind: str, metric: str = "kl") -> list[float | None]:
        """Recovered fraction of each layer's "mlp" or "resid" component, in layer order."""
        return [row[metric] for row in self.rows if row["kind"] == kind]


@torch.no_grad()
def patch_scan(
    reference,
    policy,
    tokens: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"],
    response_mask: Bool[Tensor, "batch seq"],
    *,
    token_ids: list[int] | None = None,
    rewards_fn=None,
    direction: str = "policy_into_reference",
    names: Sequence[str] | None = None,
    sets: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 16,
    min_gap: float = 1e-6,
    seed: int = 0,
) -> PatchScan:
    """Patch each component (``names``, default ``components(reference)``) on its own from the donor into the
    receiver and measure the recovered fraction of the sequence KL, the token-set log-prob (``token_ids``) and the
    reward (``rewards_fn``; sampling, so the slowest measure); formulas in the module docstring.

    ``sets`` {label: [component, ...]} instead: one row per labelled set, its components patched together
    (row kind "set", with "members"), e.g. the top-ranked heads and MLPs of an earlier scan against random ones.

    tokens, attention_mask [N, S] (the policy's samples), response_mask [N, S] (True at response tokens).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: choose from {DIRECTIONS}.")
    if tokens.shape != attention_mask.shape or tokens.shape != response_mask.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)}, attention_mask {tuple(attention_mask.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must have the same shape [N, S].")
    scored = scored_positions(response_mask) & attention_mask.bool()
    if not scored.any():
        raise ValueError("response_mask marks no response token after a real position; pass the mask of the "
                         "policy's generated tokens (True at each response token).")
    if token_ids is not None:
        vocab = policy.cfg.d_vocab
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if not token_ids or bad:
            raise ValueError(f"token_ids {token_ids}: need at least one id, all in [0, {vocab}).")
    if sets is not None and names is not None:
        raise ValueError("pass either names (one row per component) or sets (one row per set of components), not both.")
    if sets is not None:
        items = {str(label): list(members) for label, members in sets.items()}
        if not items or any(not members for members in items.values()):
            raise ValueError("sets must name at least one non-empty set of components, e.g. {'top2': ['L0.mlp', 'L1.H0']}.")
    else:
        items = {name: [name] for name in (list(names) if names is not None else components(reference))}
    names = list(dict.fromkeys(member for members in items.values() for member in members))
    _parsed(reference, names)
    receiver, donor = (reference, policy) if direction == "policy_into_reference" else (policy, reference)
    n = tokens.shape[0]
    sums = {"kl_gap": torch.zeros(n, dtype=torch.float64), "tokens_ref": 0.0, "tokens_pol": 0.0}
    patched_kl = {label: torch.zeros(n, dtype=torch.float64) for label in items}
    patched_tokens = {label: 0.0 for label in items}
    count = scored.sum().item()
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        batch, mask, keep = tokens[rows], attention_mask[rows], scored[rows]
        donor_logits, acts = donor_activations(donor, batch, mask, names)
        receiver_logits = receiver(batch.to(donor_logits.device), attention_mask=mask.to(donor_logits.device))
        logp_donor = F.log_softmax(donor_logits.double().cpu(), -1)
        logp_receiver = F.log_softmax(receiver_logits.double().cpu(), -1)
        logp_pol, logp_ref = (logp_donor, logp_receiver) if receiver is reference else (logp_receiver, logp_donor)
        sums["kl_gap"][rows] = sequence_kl(logp_pol, logp_ref, keep)
        if token_ids is not None:
            sums["tokens_ref"] += token_set_logprob(logp_ref, token_ids)[keep].sum().item()
            sums["tokens_pol"] += token_set_logprob(logp_pol, token_ids)[keep].sum().item()
        for label, members in items.items():
            logp = F.log_softmax(run_patched(receiver, batch, mask, acts, members).double().cpu(), -1)
            kl = sequence_kl(logp_pol, logp, keep) if receiver is reference else sequence_kl(logp, logp_ref, keep)
            patched_kl[label][rows] = kl
            if token_ids is not None:
                patched_tokens[label] += token_set_logprob(logp, token_ids)[keep].sum().item()
    kl_gap = sums["kl_gap"].mean().item()
    baselines = {"direction": direction, "kl_gap": kl_gap, "n_sequences": n, "n_positions": int(count)}
    m_ref = m_pol = None
    if token_ids is not None:
        m_ref, m_pol = sums["tokens_ref"] / count, sums["tokens_pol"] / count
        baselines.update(tokens_ref=m_ref, tokens_pol=m_pol)
    r_ref = r_pol = None
    reward_floor = min_gap
    if rewards_fn is not None:
        rewards_ref = sampled_rewards(reference, policy, tokens, attention_mask, response_mask, [], rewards_fn, seed)
        rewards_pol = sampled_rewards(policy, reference, tokens, attention_mask, response_mask, [], rewards_fn, seed)
        r_ref, r_pol = rewards_ref.mean().item(), rewards_pol.mean().item()
        se = ((rewards_pol - rewards_ref).std().item() / math.sqrt(n)) if n > 1 else float("inf")
        reward_floor = max(min_gap, 2 * se)
        baselines.update(reward_ref=r_ref, reward_pol=r_pol, reward_gap_se=se)
    m_receiver, m_donor = (m_ref, m_pol) if receiver is reference else (m_pol, m_ref)
    r_receiver, r_donor = (r_ref, r_pol) if receiver is reference else (r_pol, r_ref)

    result_rows = []
    for name, members in items.items():
        kind, layer, head = ("set", None, None) if sets is not None else parse_component(name)
        kl_patched = patched_kl[name].mean().item()
        row = {"component": name, "kind": kind, "layer": layer, "head": head, **({"members": members} if sets else {}),
               "kl": None if kl_gap <= min_gap else 1 - kl_patched / kl_gap, "kl_patched": kl_patched,
               "tokens": None, "tokens_patched": None, "reward": None, "reward_patched": None}
        if token_ids is not None:
            row["tokens_patched"] = patched_tokens[name] / count
            row["tokens"] = recovered_fraction(row["tokens_patched"], m_receiver, m_donor, min_gap)
        if rewards_fn is not None:
            rewards = sampled_rewards(receiver, donor, tokens, attention_mask, response_mask, members, rewards_fn, seed)
            row["reward_patched"] = rewards.mean().item()
            row["reward"] = recovered_fraction(row["reward_patched"], r_receiver, r_donor, reward_floor)
        result_rows.append(row)
    return PatchScan(direction=direction, rows=result_rows, baselines=baselines, token_ids=token_ids,
                     n_layers=reference.cfg.n_layers, n_heads=reference.cfg.n_heads)

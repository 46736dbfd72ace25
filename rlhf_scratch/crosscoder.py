"""A BatchTopK crosscoder on paired activations of a reference and a policy, and Latent Scaling.

A crosscoder (Lindsey et al. 2024) is one sparse dictionary read from and written to both models at once. With
N tokens, M = 2 models (index 0 = reference, 1 = policy), D = d_model and F latents:

    inputs         x       [N, M, D]   activations of the same tokens at the same hook in each model
    normalisation  x̃_m = s_m · x_m,    s_m = sqrt(D / mean_n ‖x_m,n‖²)   [M]   (fitted once on the training data,
                   so that each model's normalised activations have mean squared norm D and neither model
                   dominates the loss; ``Crosscoder.scale``)
    pre-activation a = ReLU(Σ_m x̃_m · W_enc[m] + b_enc)            W_enc [M, D, F], b_enc [F]  ->  a [N, F]
    score          v_j = a_j · Σ_m ‖W_dec[j, m]‖                     decoder-norm-weighted activation [N, F]
    BatchTopK      f = a ⊙ 1[v among the k·N largest entries of v over the whole batch]  (training; Bussmann et
                   al. 2024): on average k latents per token, more on some tokens, fewer on others;
                   inference: f = a ⊙ 1[v > θ], θ = mean over training batches of the smallest kept v
    decoder        x̂_m = f · W_dec[:, m] + b_dec[m]                 W_dec [F, M, D], b_dec [M, D]  ->  x̂ [N, M, D]
    loss           L = mean_n Σ_m ‖x̃_m − x̂_m‖²  +  α · L_aux
    AuxK (dead latents: none fired in the last ``dead_after`` tokens): the k_aux largest dead-latent scores per token
                   reconstruct the error e = x̃ − x̂ (x̂ detached, no bias): L_aux = Σ‖e − ê‖² / Σ‖e‖²,  α = 1/32.

BatchTopK has no L1 term, so it avoids the L1 artefacts Minder, Dumas et al. (2025, arXiv 2504.02922) found in
crosscoders ("complete shrinkage": a latent present in both models whose reference decoder the L1 penalty shrank
to zero; "latent decoupling": its reference part is carried by other latents).

Per latent j, with decoder rows d_j^m = W_dec[j, m] [D]:

    relative decoder norm  r_j = ‖d_j^pol‖ / (‖d_j^ref‖ + ‖d_j^pol‖)  ∈ [0, 1]
                           ≈ 0: reference-only,  ≈ 0.5: shared,  ≈ 1: policy-only      (Lindsey et al. 2024)
    norm difference        Δ_j = ½ ((‖d_j^pol‖ − ‖d_j^ref‖) / max(‖d_j^ref‖, ‖d_j^pol‖) + 1)  ∈ [0, 1]
                           (Minder, Dumas et al. 2025's "relative norm difference"; a monotone function of r:
                           Δ = 1 − (1 − r) / (2r) for r ≥ ½, r / (2(1 − r)) below)
    classes (theirs, on Δ): policy-only Δ ≥ 0.9  ⇔  ‖d^pol‖ ≥ 5 ‖d^ref‖  ⇔  r ≥ 5/6;  reference-only Δ ≤ 0.1  ⇔
                           r ≤ 1/6;  shared 0.4 ≤ Δ < 0.6  ⇔  4/9 ≤ r < 5/9;  else "mixed". (A threshold of 0.9 on r
                           itself, ‖d^pol‖ ≥ 9 ‖d^ref‖, is stricter than the paper's.)

Latent Scaling (Minder, Dumas et al. 2025): for a latent whose *home* model h is the one with the larger decoder
norm (the other model is o), and its home direction d = d_j^h, fit one scalar β per model and target y:

    β(y) = Σ_n f_j,n ⟨d, y_n⟩ / (‖d‖² Σ_n f_j,n²)        (least squares of  β · f_j · d ≈ y)
    error target          y^ε_m = x̃_m − (x̂_m − f_j d_j^m)   what the other latents leave unexplained in model m
    reconstruction target y^r_m = x̂_m                        the crosscoder's reconstruction of model m
    ν^ε_j = β(y^ε_o) / β(y^ε_h),   ν^r_j = β(y^r_o) / β(y^r_h)

A genuinely policy-only latent has both ratios near 0; ν^ε near 1 flags complete shrinkage (the direction is in the
reference's error), ν^r near 1 latent decoupling (the reference's reconstruction carries it through other latents).
Minder, Dumas et al. call a policy-only latent with ν^ε < 0.2 and ν^r < 0.5 *specific* (``SPECIFIC_NU``).

    train_crosscoder(x [N, 2, D], CrosscoderSettings) -> Crosscoder
    explained_variance(crosscoder, x) -> {"reference", "policy", "both"};  latent_scaling(crosscoder, x, latents)
"""

from __future__ import annotations

import torch
from jaxtyping import Float, jaxtyped
from torch import Tensor, nn

from rlhf_scratch.typecheck import typechecker
from rlhf_scratch.research_configs import CrosscoderSettings  # noqa: F401 (defined there: importable without torch)

MODELS = ("reference", "policy")
AUX_COEF = 1 / 32
POLICY_ONLY, REFERENCE_ONLY, SHARED = 0.9, 0.1, (0.4, 0.6)
"""Classes on the norm difference Δ_j (module docstring): Δ ≥ POLICY_ONLY policy-only, Δ ≤ REFERENCE_ONLY
reference-only, SHARED[0] ≤ Δ < SHARED[1] shared (Minder, Dumas et al. 2025's thresholds)."""
SPECIFIC_NU = (0.2, 0.5)
"""A policy-only latent is policy-specific when ν^ε < SPECIFIC_NU[0] and ν^r < SPECIFIC_NU[1] (same paper)."""


class Crosscoder(nn.Module):
    """W_enc [M, D, F], b_enc [F], W_dec [F, M, D], b_dec [M, D]; buffers scale [M] (s_m) and threshold (θ)."""

    def __init__(self, d_model: int, n_latents: int, k: int, n_models: int = 2):
        super().__init__()
        self.k = k
        self.W_enc = nn.Parameter(torch.zeros(n_models, d_model, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.zeros(n_latents, n_models, d_model))
        self.b_dec = nn.Parameter(torch.zeros(n_models, d_model))
        self.register_buffer("scale", torch.ones(n_models))
        self.register_buffer("threshold", torch.tensor(0.0))

    @property
    def n_latents(self) -> int:
        return self.W_dec.shape[0]

    def normalise(self, x: Tensor) -> Tensor:
        """x̃ = s_m · x_m: [N, M, D] -> [N, M, D]."""
        return x * self.scale[None, :, None]

    def decoder_norms(self) -> Tensor:
        """‖W_dec[j, m]‖: [F, M]."""
        return self.W_dec.norm(dim=-1)

    def pre_activations(self, x_norm: Tensor) -> Tensor:
        """a = ReLU(Σ_m x̃_m W_enc[m] + b_enc): [N, M, D] -> [N, F]."""
        return torch.relu(torch.einsum("nmd,mdf->nf", x_norm, self.W_enc) + self.b_enc)

    def encode(self, x_norm: Tensor, batch_topk: bool = False) -> Tensor:
        """f [N, F] from normalised x̃ [N, M, D]: BatchTopK over the batch (training) or a > θ by score (inference)."""
        a = self.pre_activations(x_norm)
        score = a * self.decoder_norms().sum(dim=1)
        if batch_topk:
            return a * batch_topk_mask(score, self.k)
        return a * (score > self.threshold)

    def decode(self, f: Tensor) -> Tensor:
        """x̂ = f W_dec + b_dec: [N, F] -> [N, M, D] (normalised units)."""
        return torch.einsum("nf,fmd->nmd", f, self.W_dec) + self.b_dec

    def forward(self, x_norm: Tensor) -> tuple[Tensor, Tensor]:
        f = self.encode(x_norm)
        return f, self.decode(f)

    def relative_norms(self) -> Tensor:
        """r_j = ‖d_j^pol‖ / (‖d_j^ref‖ + ‖d_j^pol‖): [F] (0.5 for a latent whose decoder is zero in both)."""
        norms = self.decoder_norms().detach()
        total = norms.sum(dim=1)
        return torch.where(total > 0, norms[:, 1] / total.clamp_min(1e-12), torch.full_like(total, 0.5))


@jaxtyped(typechecker=typechecker)
def batch_topk_mask(score: Float[Tensor, "batch latents"], k: int) -> Float[Tensor, "batch latents"]:
    """1 at the k·N largest entries of ``score`` over the whole batch (N rows), and only where score > 0; else 0."""
    n_keep = min(k * score.shape[0], score.numel())
    flat = score.flatten()
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat, n_keep).indices] = 1.0
    return mask.view_as(score) * (score > 0)


def activation_scales(x: Tensor) -> Tensor:
    """s_m = sqrt(D / mean_n ‖x_m,n‖²) for x [N, M, D] -> [M]."""
    if x.ndim != 3:
        raise ValueError(f"paired activations must be [tokens, models, d_model], got shape {tuple(x.shape)}.")
    mean_sq = x.double().pow(2).sum(dim=-1).mean(dim=0)
    if not (mean_sq > 0).all():
        raise ValueError("a model's activations are all zero; the crosscoder needs non-zero activations from each model.")
    return (x.shape[-1] / mean_sq).sqrt().float()


def initial_crosscoder(x: Tensor, settings: CrosscoderSettings, generator: torch.Generator) -> Crosscoder:
    """Every latent starts shared: the same random direction of norm ``init_norm`` in each model's decoder row (so two
    identical models give r = 0.5 exactly), W_enc = W_decᵀ, b_dec = mean x̃, b_enc = 0."""
    n, n_models, d_model = x.shape
    model = Crosscoder(d_model, settings.n_latents, settings.k, n_models)
    with torch.no_grad():
        model.scale.copy_(activation_scales(x))
        directions = torch.randn(settings.n_latents, 1, d_model, generator=generator).expand(-1, n_models, -1)
        model.W_dec.copy_(directions / directions.norm(dim=-1, keepdim=True) * settings.init_norm)
        model.W_enc.copy_(model.W_dec.permute(1, 2, 0))
        model.b_dec.copy_(model.normalise(x).mean(dim=0))
    return model


def aux_loss(model: Crosscoder, x_norm: Tensor, x_hat: Tensor, a: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """L_aux = Σ‖e − ê‖² / Σ‖e‖², e = x̃ − x̂ (x̂ detached), ê from the aux_k largest dead-latent scores per token."""
    if not dead.any():
        return x_norm.new_zeros(())
    error = x_norm - x_hat.detach()
    score = (a * model.decoder_norms().sum(dim=1)) * dead
    top = torch.topk(score, min(aux_k, int(dead.sum())), dim=1)
    f_aux = torch.zeros_like(a).scatter(1, top.indices, a.gather(1, top.indices))
    error_hat = torch.einsum("nf,fmd->nmd", f_aux, model.W_dec)
    return (error - error_hat).pow(2).sum() / error.pow(2).sum().clamp_min(1e-12)


def train_crosscoder(x: Float[Tensor, "tokens models d_model"], settings: CrosscoderSettings,
                     log=None) -> Crosscoder:
    """Train on paired activations x [N, M, D] (raw, not normalised): Adam on L (module docstring), batches drawn
    without replacement per epoch from a seeded generator; then θ is set from the training batches. Deterministic
    for a given seed, data and thread count. ``log(step, metrics)`` is called every 10 % of the steps."""
    if x.ndim != 3 or x.shape[0] < 2:
        raise ValueError(f"paired activations must be [tokens >= 2, models, d_model], got shape {tuple(x.shape)}.")
    generator = torch.Generator().manual_seed(settings.seed)
    x = x.float()
    model = initial_crosscoder(x, settings, generator)
    x_norm = model.normalise(x).detach()
    n = x.shape[0]
    batch = min(settings.batch_size, n)
    aux_k = settings.aux_k or x.shape[-1]
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.9, 0.999))
    decay_from = int(0.8 * settings.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: 1.0 if s < decay_from else max(0.0, (settings.steps - s) / (settings.steps - decay_from)))
    since_fired = torch.zeros(model.n_latents)
    order, cursor = torch.randperm(n, generator=generator), 0
    for step in range(settings.steps):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        xb = x_norm[order[cursor : cursor + batch]]
        cursor += batch
        a = model.pre_activations(xb)
        f = a * batch_topk_mask(a * model.decoder_norms().sum(dim=1), model.k)
        x_hat = model.decode(f)
        mse = (xb - x_hat).pow(2).sum(dim=(1, 2)).mean()
        fired = (f > 0).any(dim=0)
        since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + batch)
        dead = since_fired > settings.dead_after
        loss = mse + AUX_COEF * aux_loss(model, xb, x_hat, a, dead, aux_k)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if log is not None and (step + 1) % max(1, settings.steps // 10) == 0:
            log(step + 1, {"mse": mse.item(), "dead_fraction": dead.float().mean().item()})
    set_threshold(model, x_norm, batch)
    return model


@torch.no_grad()
def set_threshold(model: Crosscoder, x_norm: Tensor, batch: int) -> float:
    """θ = mean over consecutive batches of the smallest score BatchTopK keeps (Bussmann et al. 2024's inference rule)."""
    minima = []
    for start in range(0, x_norm.shape[0] - batch + 1, batch):
        a = model.pre_activations(x_norm[start : start + batch])
        score = a * model.decoder_norms().sum(dim=1)
        kept = score[batch_topk_mask(score, model.k).bool()]
        if kept.numel():
            minima.append(kept.min())
    model.threshold.fill_(torch.stack(minima).mean().item() if minima else 0.0)
    return model.threshold.item()


@torch.no_grad()
def encode_all(model: Crosscoder, x: Tensor, batch: int = 4096) -> tuple[Tensor, Tensor]:
    """(f [N, F], x̂ [N, M, D] normalised) for raw x [N, M, D] with the inference threshold."""
    fs, x_hats = [], []
    for start in range(0, x.shape[0], batch):
        f, x_hat = model(model.normalise(x[start : start + batch].float()))
        fs.append(f)
        x_hats.append(x_hat)
    return torch.cat(fs), torch.cat(x_hats)


@torch.no_grad()
def explained_variance(model: Crosscoder, x: Float[Tensor, "tokens models d_model"]) -> dict[str, float]:
    """1 − Σ_n ‖x̃_m − x̂_m‖² / Σ_n ‖x̃_m − mean x̃_m‖² per model ("reference", "policy") and over both ("both")."""
    _, x_hat = encode_all(model, x)
    x_norm = model.normalise(x.float())
    residual = (x_norm - x_hat).double().pow(2).sum(dim=(0, 2))
    total = (x_norm - x_norm.mean(dim=0)).double().pow(2).sum(dim=(0, 2))
    result = {name: 1 - (residual[m] / total[m]).item() for m, name in enumerate(MODELS[: x.shape[1]])}
    result["both"] = 1 - (residual.sum() / total.sum()).item()
    return result


@torch.no_grad()
def dead_fraction(model: Crosscoder, x: Tensor) -> float:
    """Share of latents that fire on none of the tokens of x [N, M, D] (inference rule)."""
    f, _ = encode_all(model, x)
    return 1.0 - (f > 0).any(dim=0).float().mean().item()


def norm_difference(r: float) -> float:
    """Δ = ½ ((‖d^pol‖ − ‖d^ref‖) / max(‖d^ref‖, ‖d^pol‖) + 1) from r = ‖d^pol‖ / (‖d^ref‖ + ‖d^pol‖)."""
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"a relative decoder norm is in [0, 1], got {r}.")
    return 1.0 - (1.0 - r) / (2.0 * r) if r >= 0.5 else r / (2.0 * (1.0 - r))


def latent_class(r: float) -> str:
    """"policy-only" (Δ ≥ 0.9, i.e. r ≥ 5/6), "reference-only" (Δ ≤ 0.1, r ≤ 1/6), "shared" (0.4 ≤ Δ < 0.6,
    4/9 ≤ r < 5/9) or "mixed", with Δ = ``norm_difference(r)`` (Minder, Dumas et al. 2025's classes)."""
    delta = norm_difference(r)
    if delta >= POLICY_ONLY:
        return "policy-only"
    if delta <= REFERENCE_ONLY:
        return "reference-only"
    return "shared" if SHARED[0] <= delta < SHARED[1] else "mixed"


def is_specific(nu_error: float, nu_recon: float) -> bool:
    """ν^ε < 0.2 and ν^r < 0.5: the other model carries the latent neither in its error nor in its reconstruction."""
    return nu_error < SPECIFIC_NU[0] and nu_recon < SPECIFIC_NU[1]


@jaxtyped(typechecker=typechecker)
def scaling_beta(f: Float[Tensor, "tokens"], direction: Float[Tensor, "d_model"],
                 target: Float[Tensor, "tokens d_model"]) -> float:
    """β = Σ_n f_n ⟨d, y_n⟩ / (‖d‖² Σ_n f_n²), the least-squares scale of β·f·d ≈ y (nan when f or d is zero)."""
    denominator = direction.double().pow(2).sum() * f.double().pow(2).sum()
    if denominator == 0:
        return float("nan")
    return ((f.double() * (target.double() @ direction.double())).sum() / denominator).item()


@torch.no_grad()
def latent_scaling(model: Crosscoder, x: Float[Tensor, "tokens models d_model"], latents: list[int]) -> list[dict]:
    """Per latent j: its home model (larger decoder norm), the four β (error and reconstruction targets in the
    reference and the policy, direction d_j^home) and ν^ε = β^ε_other / β^ε_home, ν^r = β^r_other / β^r_home."""
    f, x_hat = encode_all(model, x)
    x_norm = model.normalise(x.float())
    norms = model.decoder_norms()
    rows = []
    for j in latents:
        active = f[:, j] > 0
        fj = f[active, j]
        home = int(norms[j, 1] >= norms[j, 0])
        direction = model.W_dec[j, home]
        row = {"latent": j, "home": MODELS[home], "n_active": int(active.sum())}
        for m, name in enumerate(MODELS):
            own = fj[:, None] * model.W_dec[j, m]
            row[f"beta_error_{name}"] = scaling_beta(fj, direction, x_norm[active, m] - (x_hat[active, m] - own))
            row[f"beta_recon_{name}"] = scaling_beta(fj, direction, x_hat[active, m])
        other = MODELS[1 - home]
        for kind in ("error", "recon"):
            at_home = row[f"beta_{kind}_{MODELS[home]}"]
            row[f"nu_{kind}"] = row[f"beta_{kind}_{other}"] / at_home if at_home != 0 else float("nan")
        rows.append(row)
    return rows


def decoder_directions(model: Crosscoder, model_index: int) -> Tensor:
    """Latents' decoder rows in the raw (un-normalised) units of model m: W_dec[:, m] / s_m  [F, D]."""
    return model.W_dec[:, model_index].detach() / model.scale[model_index]


def state(model: Crosscoder) -> dict:
    """A plain state_dict plus the shape facts needed to rebuild the module (``from_state``)."""
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "k": model.k}


def from_state(saved: dict) -> Crosscoder:
    sd = saved["state_dict"]
    n_latents, n_models, d_model = sd["W_dec"].shape
    model = Crosscoder(d_model, n_latents, saved["k"], n_models)
    model.load_state_dict(sd)
    return model


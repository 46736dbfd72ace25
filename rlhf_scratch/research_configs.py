"""The configs of the feature-level research commands (``crosscode``, ``sae``) and the crosscoder's training settings.

Plain dataclasses, importable without torch (see ``algorithm_configs``); ``crosscoder.py``, ``crosscoder_report.py``
and ``sae_report.py`` re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class CrosscoderSettings:
    """Training settings of a BatchTopK crosscoder (see the module docstring for the loss)."""

    n_latents: int = 1024
    """F: dictionary size."""
    k: int = 16
    """Mean active latents per token (BatchTopK keeps k·N per batch of N tokens)."""
    steps: int = 3000
    """Adam steps."""
    batch_size: int = 512
    """Tokens per step."""
    lr: float = 1e-3
    """Adam learning rate (linearly decayed to 0 over the last 20 % of steps)."""
    init_norm: float = 0.1
    """Initial norm of each decoder row per model; the encoder starts as the decoder's transpose."""
    aux_k: int | None = None
    """Dead latents each token's AuxK reconstruction uses (default: D)."""
    dead_after: int = 20_000
    """A latent is dead after this many tokens without firing (for AuxK and the training log)."""
    seed: int = 0

    def __post_init__(self):
        if self.n_latents < 1 or self.k < 1 or self.k > self.n_latents:
            raise ValueError(f"crosscoder: need 1 <= k <= n_latents, got k={self.k}, n_latents={self.n_latents}.")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("crosscoder: steps and batch_size must be >= 1 and lr > 0.")


@dataclass
class CrosscodeConfig:
    """A BatchTopK crosscoder on paired reference/policy activations: which latents are policy-only?"""

    policy: str = ""
    """The trained policy: a run's checkpoint directory (e.g. runs/ppo/checkpoint), or any model source."""
    reference: str = "builtin"
    """The model the policy was trained from: "builtin", a model directory, or a hub name."""
    texts: str = "builtin"
    """Held-out text: "builtin" held-out reviews, a .txt/.jsonl/.csv file, or a datasets name."""
    column: str = "text"
    """Text column for .jsonl/.csv/datasets sources."""
    n_texts: int = 256
    """Held-out texts read by both models."""
    n_samples: int = 128
    """Policy samples (on held-out prompts) read by both models; 0 for text only."""
    max_new_tokens: int = 24
    """Length of the policy's samples."""
    max_tokens: int = 32
    """Texts are cut to this many tokens."""
    layer: int | None = None
    """Read blocks.{layer}.hook_resid_post; default: the middle layer (n_layers // 2)."""
    hook: str | None = None
    """Any other hook name of shape [batch, pos, d_model] (overrides --layer), e.g. blocks.1.hook_mlp_out."""
    n_latents: int = 1024
    """Dictionary size F."""
    k: int = 16
    """Mean active latents per token (BatchTopK)."""
    steps: int = 3000
    """Adam steps."""
    train_batch: int = 512
    """Tokens per training step."""
    lr: float = 1e-3
    """Adam learning rate."""
    n_show: int = 10
    """Latents listed per class (policy-only, reference-only, shared) in the report."""
    top_k: int = 8
    """Top contexts and top logit-effect tokens per latent."""
    prepend_bos: bool = True
    """Put BOS in front of each text (as the built-in model was trained); its position is never read."""
    batch_size: int = 32
    """Sequences per forward pass."""
    seed: int = 0
    """Seed of the texts, prompts, samples and crosscoder."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps (the crosscoder trains on the CPU)."""
    out: Path = Path("runs/crosscode")
    """Output directory: report.md, relative_norms.png, summary.json, crosscoder.pt, config.json."""

    def __post_init__(self):
        checks = [
            (bool(self.policy), "--policy is required: the trained checkpoint directory, e.g. runs/ppo/checkpoint."),
            (self.n_texts >= 1 and self.n_samples >= 0 and self.max_new_tokens >= 1 and self.max_tokens >= 2,
             "n_texts and max_new_tokens must be >= 1, n_samples >= 0 and max_tokens >= 2."),
            (self.n_show >= 1 and self.top_k >= 1, "n_show and top_k must be >= 1."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.settings  # noqa: B018 (refuses bad crosscoder settings now)

    @property
    def settings(self) -> CrosscoderSettings:
        return CrosscoderSettings(n_latents=self.n_latents, k=self.k, steps=self.steps, batch_size=self.train_batch,
                                  lr=self.lr, seed=self.seed)


@dataclass
class SAEConfig:
    """Splice a sparse autoencoder into the reference and the policy: which features' activations changed most?"""

    policy: str = ""
    """The trained policy: a run's checkpoint directory (e.g. runs/ppo/checkpoint), or any model source."""
    reference: str = "builtin"
    """The model the policy was trained from."""
    sae: str | None = None
    """An SAE directory in sae-lens's layout (cfg.json + sae_weights.safetensors); default: train one on the
    reference at --hook and save it under OUT/sae."""
    hook: str | None = None
    """Hook of the SAE to train (default blocks.{n_layers // 2}.hook_resid_post); a loaded SAE brings its own."""
    texts: str = "builtin"
    """Held-out text both models read."""
    column: str = "text"
    """Text column for .jsonl/.csv/datasets sources."""
    n_texts: int = 256
    """Held-out texts compared (the SAE trained here reads the next n_texts)."""
    max_tokens: int = 32
    """Texts are cut to this many tokens."""
    n_features: int = 512
    """F of the SAE trained when --sae is not given."""
    k: int = 16
    """Mean active features per token of the trained SAE."""
    steps: int = 2000
    """Adam steps of the SAE trained when --sae is not given."""
    top_n: int = 10
    """Features listed per direction (risen, fallen)."""
    top_k: int = 6
    """Contexts per feature."""
    prepend_bos: bool = True
    """Put BOS in front of each text; its position is never read."""
    batch_size: int = 32
    """Sequences per forward pass."""
    seed: int = 0
    """Seed of the texts and of the SAE trained here."""
    device: str = "cpu"
    """Where the models run: cpu, cuda, cuda:N or mps."""
    out: Path = Path("runs/sae")
    """Output directory: report.md, feature_changes.png, summary.json (and sae/ when one is trained)."""

    def __post_init__(self):
        if not self.policy:
            raise ValueError("--policy is required: the trained checkpoint directory, e.g. runs/ppo/checkpoint.")
        if self.n_texts < 1 or self.max_tokens < 2 or self.top_n < 1 or self.top_k < 1:
            raise ValueError("n_texts, top_n and top_k must be >= 1 and max_tokens >= 2.")
        CrosscoderSettings(n_latents=self.n_features, k=self.k, steps=self.steps)

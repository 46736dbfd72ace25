"""Sparse autoencoders in sae-lens's file layout, read and written without the sae-lens package.

sae-lens 6 pins TransformerLens < 4 and cannot be imported beside TransformerLens 4, so this module reads its
files itself. A saved SAE is a directory with

    cfg.json                  {"architecture": "standard" | "jumprelu" | "topk", "d_in": D, "d_sae": F,
                               "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": bool,
                               "normalize_activations": "none" | "constant_norm_rescale" | "layer_norm",
                               "reshape_activations": "none", "k": K (topk only),
                               "metadata": {"hook_name": "blocks.L.hook_resid_post", "model_name": ..., ...}}
    sae_weights.safetensors   W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], threshold [F] (jumprelu only)

(sae-lens 6's ``SAEConfig.to_dict`` and ``SAE.save_model``). The older layout (sae-lens ≤ 5) keeps ``hook_name``,
``model_name`` and ``prepend_bos`` at the top level and names the activation in ``activation_fn_str`` ("relu",
"topk" with ``activation_fn_kwargs: {"k": K}``); both are read. The forward pass, x [..., D]:

    x_in  = n(x) − b_dec · apply_b_dec_to_input        n: the input normalisation (identity for "none";
                                                        "constant_norm_rescale": x · sqrt(D) / ‖x‖, undone on output;
                                                        "layer_norm": (x − μ)/σ, undone on output)
    h     = x_in · W_enc + b_enc                        [..., F]
    f     = ReLU(h)                      (standard)
            ReLU(h) · 1[h > threshold]   (jumprelu)
            ReLU(h) on the K largest h of each position, 0 elsewhere   (topk)
    x̂     = n⁻¹(f · W_dec + b_dec)                     [..., D]

Spliced into a model with the error term, the hook returns x̂ + (x − x̂) — the model's own activation, so its
logits are unchanged while f is recorded (an edit of f moves x by the change it makes to x̂, as in sae-lens's
``use_error_term``); without it, x̂ replaces x (the reconstruction's cost).

    load_sae(dir) -> SAE;  save_sae(sae, dir);  sae_hook(sae, record, keep_error=True) -> (hook_name, fn)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
ARCHITECTURES = ("standard", "jumprelu", "topk")
NORMALISATIONS = ("none", "constant_norm_rescale", "layer_norm")
SAE_LENS_VERSION = "6.12.1"
"""The sae-lens version whose layout ``save_sae`` writes (recorded in metadata.sae_lens_version)."""


@dataclass
class SAE:
    """A sparse autoencoder's weights and the facts from its cfg.json (see the module docstring for the maths)."""

    W_enc: Tensor
    """[D, F]"""
    b_enc: Tensor
    """[F]"""
    W_dec: Tensor
    """[F, D]"""
    b_dec: Tensor
    """[D]"""
    hook_name: str
    architecture: str = "standard"
    threshold: Tensor | None = None
    """[F], jumprelu only."""
    k: int | None = None
    """topk only."""
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    metadata: dict = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def _normalise(self, x: Tensor) -> tuple[Tensor, tuple]:
        if self.normalize_activations == "constant_norm_rescale":
            coefficient = self.d_in ** 0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * coefficient, ("scale", coefficient)
        if self.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)
            return (x - mu) / (std + 1e-5), ("ln", mu, std)
        return x, ("none",)

    @staticmethod
    def _denormalise(x: Tensor, undo: tuple) -> Tensor:
        if undo[0] == "scale":
            return x / undo[1]
        if undo[0] == "ln":
            return x * undo[2] + undo[1]
        return x

    def encode(self, x: Tensor) -> Tensor:
        """f [..., F] from activations x [..., D]."""
        x_in, _ = self._normalise(x.to(self.W_enc.dtype))
        h = (x_in - self.b_dec * float(self.apply_b_dec_to_input)) @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return torch.relu(h) * (h > self.threshold)
        if self.architecture == "topk":
            top = torch.topk(h, min(self.k, h.shape[-1]), dim=-1)
            return torch.zeros_like(h).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(h)

    def decode(self, f: Tensor, like: Tensor | None = None) -> Tensor:
        """x̂ [..., D] from f [..., F]; pass the input ``like`` to undo a per-token input normalisation."""
        out = f @ self.W_dec + self.b_dec
        if self.normalize_activations != "none":
            if like is None:
                raise ValueError(f"decode needs the input activations to undo {self.normalize_activations!r}.")
            out = self._denormalise(out, self._normalise(like.to(self.W_enc.dtype))[1])
        return out

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f [..., F], x̂ [..., D])."""
        f = self.encode(x)
        return f, self.decode(f, like=x)

    def to(self, device) -> "SAE":
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self


def _refuse(directory: Path, message: str) -> ValueError:
    return ValueError(f"SAE {directory}: {message}")


def load_sae(directory: str | Path, device: str = "cpu") -> SAE:
    """Read an SAE saved in sae-lens's layout (cfg.json + sae_weights.safetensors; sae-lens 6 or the older flat cfg)."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise _refuse(directory, f"expected {CFG_FILE} and {WEIGHTS_FILE} (sae-lens's layout); a sae-lens release on "
                      "the hub is a folder of its repository: download that folder and pass its path.")
    cfg = json.loads(cfg_path.read_text())
    metadata = dict(cfg.get("metadata") or {})
    for key in ("hook_name", "model_name", "prepend_bos", "context_size", "hook_head_index"):
        if key in cfg and key not in metadata:  # the flat layout of sae-lens <= 5
            metadata[key] = cfg[key]
    hook_name = metadata.get("hook_name")
    if not hook_name:
        raise _refuse(directory, "cfg.json names no hook_name (in metadata or at the top level).")
    if metadata.get("hook_head_index") is not None or cfg.get("reshape_activations", "none") != "none":
        raise _refuse(directory, "SAEs on one head or on hook_z (reshape_activations) are not supported; use one on "
                      "a [batch, pos, d_model] hook such as hook_resid_post.")
    architecture = cfg.get("architecture")
    k = cfg.get("k")
    if architecture is None:  # sae-lens <= 5
        function = cfg.get("activation_fn_str", "relu")
        architecture = {"relu": "standard", "topk": "topk"}.get(function)
        k = (cfg.get("activation_fn_kwargs") or {}).get("k", k)
        if architecture is None:
            raise _refuse(directory, f"activation_fn_str {function!r} is not supported (relu or topk).")
    if architecture not in ARCHITECTURES:
        raise _refuse(directory, f"architecture {architecture!r} is not supported; this reader knows "
                      f"{', '.join(ARCHITECTURES)} (gated and others: convert with sae-lens first).")
    normalise = cfg.get("normalize_activations", "none") or "none"
    if normalise not in NORMALISATIONS:
        raise _refuse(directory, f"normalize_activations {normalise!r} needs a dataset scaling factor this reader does "
                      f"not have; supported: {', '.join(NORMALISATIONS)}.")
    weights = load_file(str(weights_path), device=device)
    missing = [name for name in ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if architecture == "jumprelu" else ())
               if name not in weights]
    if missing:
        raise _refuse(directory, f"{WEIGHTS_FILE} lacks {', '.join(missing)} (has {', '.join(sorted(weights))}).")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, shape in expected.items():
        if name in weights and tuple(weights[name].shape) != shape:
            raise _refuse(directory, f"{name} has shape {tuple(weights[name].shape)}, but cfg.json's d_in={d_in}, "
                          f"d_sae={d_sae} require {shape}.")
    if architecture == "topk" and not k:
        raise _refuse(directory, "a topk SAE needs k in cfg.json.")
    return SAE(W_enc=weights["W_enc"].float(), b_enc=weights["b_enc"].float(), W_dec=weights["W_dec"].float(),
               b_dec=weights["b_dec"].float(), hook_name=hook_name, architecture=architecture,
               threshold=weights["threshold"].float() if architecture == "jumprelu" else None,
               k=int(k) if architecture == "topk" else None,
               apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), normalize_activations=normalise,
               metadata=metadata)


def save_sae(sae: SAE, directory: str | Path) -> Path:
    """Write ``sae`` in sae-lens 6's layout (cfg.json + sae_weights.safetensors), loadable by ``SAE.load_from_disk``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.architecture == "jumprelu":
        weights["threshold"] = sae.threshold
    save_file({name: tensor.detach().float().contiguous().cpu() for name, tensor in weights.items()},
              str(directory / WEIGHTS_FILE))
    cfg = {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": sae.normalize_activations,
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAE_LENS_VERSION, "sae_lens_training_version": SAE_LENS_VERSION,
                        "hook_head_index": None, **sae.metadata, "hook_name": sae.hook_name}}
    if sae.architecture == "topk":
        cfg["k"] = sae.k
    (directory / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return directory


def sae_hook(sae: SAE, record: list | None = None, keep_error: bool = True, edit=None):
    """(hook_name, fn) for ``run_with_hooks``. fn reads the activation x [B, S, D], appends f [B, S, F] (float32, CPU)
    to ``record`` and returns, with the error term (the default),

        x̂' + (x − x̂)  =  x + (x̂' − x̂),   x̂ = decode(f),  x̂' = decode(edit(f))  (x̂' = x̂ without ``edit``)

    computed in the second form, so that without an edit the value is x itself and the model's logits are unchanged
    exactly, while an edit of the features (e.g. ``lambda f: f * mask``) moves x by exactly the change it makes to
    the reconstruction. Without the error term it returns x̂' (the model runs on the SAE's reconstruction)."""

    def splice(x, hook):
        f, x_hat = sae.reconstruct(x.float())
        if record is not None:
            record.append(f.detach().cpu())
        edited = x_hat if edit is None else sae.decode(edit(f), like=x.float())
        out = x.float() + (edited - x_hat) if keep_error else edited
        return out.to(x.dtype)

    return sae.hook_name, splice

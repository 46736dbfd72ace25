"""The lens's z statistic (``diff_lens.alignment_z``, ``lens_alignment``) and the lens check built on it.

z_t = √n · cos(x̂, w_t): hand-built vectors with a known angle; the same z from the lens logits' own difference
lens(Δ) − lens(0); no change when the constant part of the lens logit (β, b_U) moves; and the null it is built
on: random directions through a tiny LayerNorm model give z > Φ⁻¹(0.999) about 0.1 % of the time.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

from rlhf_scratch.anatomy import final_norm_parameters, logit_lens
from rlhf_scratch.diff_lens import alignment_z, lens_alignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import planted_checks  # noqa: E402


def test_rmsnorm_z_along_orthogonal_and_at_45_degrees():
    gamma = torch.tensor([2.0, 1.0, 1.0])
    W_U = torch.tensor([[0.5, 0.0], [0.0, 1.0], [0.0, 0.0]])  # w_0 = γ ⊙ W_U[:, 0] = e_0, w_1 = e_1
    delta = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    z = alignment_z(delta, gamma, W_U, center=False)  # n = D = 3
    torch.testing.assert_close(z, torch.tensor([[math.sqrt(3), 0.0], [math.sqrt(1.5), math.sqrt(1.5)], [0.0, 0.0]]))


def test_layernorm_z_ignores_the_mean_and_uses_the_centred_subspace():
    gamma = torch.ones(4)
    W_U = torch.tensor([[3.0], [-1.0], [-1.0], [-1.0]]) + 7.0  # centred: (3, -1, -1, -1), |w| = √12
    delta = torch.tensor([[3.0, -1.0, -1.0, -1.0], [5.0, 5.0, 5.0, 5.0], [0.0, 1.0, -1.0, 0.0], [1.0, -1.0, 0.0, 0.0]]) + 2.0
    z = alignment_z(delta, gamma, W_U, center=True)  # n = D − 1 = 3
    # along: √3; the constant vector centres to 0: 0; orthogonal: 0; (1, -1, 0, 0): cos = 4 / (√2 √12), z = √2
    torch.testing.assert_close(z[:, 0], torch.tensor([math.sqrt(3), 0.0, 0.0, math.sqrt(2)]))
    with pytest.raises(ValueError, match="too small"):
        alignment_z(torch.ones(1, 2), torch.ones(2), torch.ones(2, 1), center=True)


def test_z_min_is_the_bonferroni_normal_quantile():
    assert planted_checks.lens_z_min(1) == pytest.approx(3.090232, abs=1e-5)  # Φ⁻¹(0.999)
    assert planted_checks.lens_z_min(8) == pytest.approx(3.662260, abs=1e-5)  # Φ⁻¹(1 − 0.001/8)
    with pytest.raises(ValueError, match="n_readings"):
        planted_checks.lens_z_min(0)


def test_z_is_the_lens_logit_change_over_its_norms_and_ignores_beta_and_b_U(tiny_bridge):
    """a_t = lens(Δ)_t − lens(0)_t = w_t · x̂; z = √n a_t / (|x̂| |w_t|). Moving β (ln_final's bias) moves every lens
    logit but not z."""
    torch.manual_seed(0)
    delta = torch.randn(2, tiny_bridge.cfg.d_model)
    with torch.no_grad():
        tiny_bridge.original_model.transformer.ln_f.weight.copy_(0.5 + torch.rand(tiny_bridge.cfg.d_model))
        tiny_bridge.original_model.transformer.ln_f.bias.copy_(torch.randn(tiny_bridge.cfg.d_model))
    norm = final_norm_parameters(tiny_bridge)
    a = (logit_lens(tiny_bridge, delta) - logit_lens(tiny_bridge, torch.zeros(1, delta.shape[1]))).double()
    centred = delta.double() - delta.double().mean(-1, keepdim=True)
    x_hat = centred / (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    w = norm.weight.double()[:, None] * tiny_bridge.W_U.detach().double()
    w = w - w.mean(0, keepdim=True)
    expected = math.sqrt(delta.shape[1] - 1) * a / (x_hat.norm(dim=-1, keepdim=True) * w.norm(dim=0))
    z = lens_alignment(tiny_bridge, delta)
    torch.testing.assert_close(z.double(), expected, atol=1e-4, rtol=1e-4)
    before = logit_lens(tiny_bridge, delta)
    with torch.no_grad():
        tiny_bridge.original_model.transformer.ln_f.bias.add_(torch.randn(tiny_bridge.cfg.d_model))
    assert (logit_lens(tiny_bridge, delta) - before).abs().max() > 0.1  # the lens logits moved...
    torch.testing.assert_close(lens_alignment(tiny_bridge, delta), z)  # ...z did not


def test_z_ignores_the_unembedding_bias(tiny_bridge, monkeypatch):
    import rlhf_scratch.diff_lens as diff_lens

    delta = torch.randn(2, tiny_bridge.cfg.d_model, generator=torch.Generator().manual_seed(1))
    z = lens_alignment(tiny_bridge, delta)
    W_U = tiny_bridge.W_U.detach().float()
    b_U = 10 * torch.randn(W_U.shape[1], generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(diff_lens, "unembedding", lambda bridge: (W_U, b_U))
    torch.testing.assert_close(lens_alignment(tiny_bridge, delta), z)


@pytest.fixture(scope="module")
def wide_layernorm_model(tmp_path_factory):
    """A random 1-layer GPT-2 with d_model 256 (n = 255) and a γ spread over [0.2, 1.8]."""
    from conftest import TINY_TEXTS
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_scratch.models import load_bridge
    from rlhf_scratch.pretrain import train_tokenizer

    directory = tmp_path_factory.mktemp("wide")
    tokenizer = train_tokenizer(TINY_TEXTS, vocab_size=320, directory=directory)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=256, n_layer=1, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.bos_token_id,
                        pad_token_id=tokenizer.bos_token_id)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.copy_(0.2 + 1.6 * torch.rand(256))
    model.save_pretrained(directory)
    return load_bridge(directory)


def test_random_directions_exceed_the_one_sided_0_1_percent_quantile_about_0_1_percent_of_the_time(wide_layernorm_model):
    """Under the null (Δ's direction uniform, unrelated to t), z_t ≈ N(0, 1): E[z²] = 1 exactly, and P(z > 3.09) is
    0.093 % for n = 255 (exactly ½ I_{1 − 3.09²/n}((n − 1)/2, ½), the Beta tail; 0.1 % for a normal). 20,000 seeded
    directions, direction i paired with token i mod V (independent draws): the count of z > 3.09 is binomial,
    mean 18.7 (20 for a normal), sd 4.3; the band [5, 38] is beyond ±4 sd of both."""
    bridge = wide_layernorm_model
    n_directions = 20_000
    delta = torch.randn(n_directions, bridge.cfg.d_model, generator=torch.Generator().manual_seed(0))
    z = lens_alignment(bridge, delta)  # [20000, V]
    assert abs(z.double().pow(2).mean().item() - 1) < 0.03
    paired = z[torch.arange(n_directions), torch.arange(n_directions) % z.shape[1]]
    count = int((paired > 3.0902).sum())
    assert 5 <= count <= 38, count


def test_a_token_the_prior_puts_first_is_top_10_but_does_not_fire(tiny_bridge):
    """β ∝ W_U[:, t] makes t the lens's first token for any small Δ (the old rule fires); z_t is that of a random
    direction, so the new rule does not. Δ along w_t fires both."""
    W_U = tiny_bridge.W_U.detach()
    t = 7
    with torch.no_grad():
        tiny_bridge.original_model.transformer.ln_f.bias.copy_(50 * W_U[:, t] / W_U[:, t].norm())
    delta = torch.randn(2, tiny_bridge.cfg.d_model, generator=torch.Generator().manual_seed(0))
    check = planted_checks.lens_check(tiny_bridge, tiny_bridge, delta, t)
    assert check["fired_top10"] and check["rank"] == 1 and not check["fired"], check["figure"]
    assert abs(check["z"]) < 3 and check["figure"].endswith(f"z {check['z']:.1f}")
    gamma = final_norm_parameters(tiny_bridge).weight
    along = (gamma * W_U[:, t]).expand(2, -1).clone()  # γ = 1 here: x̂ ∝ centred w_t, z = √(D − 1)
    check = planted_checks.lens_check(tiny_bridge, tiny_bridge, along, t)
    assert check["fired"] and check["z"] == pytest.approx(math.sqrt(tiny_bridge.cfg.d_model - 1), rel=1e-4)

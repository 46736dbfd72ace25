"""The BatchTopK crosscoder against known answers: paired activations built from a known dictionary in which some
atoms exist only in the "policy" (or only in the "reference"); closed forms for the mask, the scales and β."""

import pytest
import torch

from rlhf_scratch.crosscoder import (
    Crosscoder,
    CrosscoderSettings,
    activation_scales,
    batch_topk_mask,
    dead_fraction,
    decoder_directions,
    explained_variance,
    from_state,
    is_specific,
    latent_class,
    norm_difference,
    latent_scaling,
    state,
    train_crosscoder,
)

N_SHARED, N_POLICY, N_REFERENCE = 20, 3, 3


def planted_dictionary(n=4000, d=16, p=0.08, seed=0):
    """x [n, 2, d]: sparse non-negative codes over unit atoms; atoms N_SHARED.. exist only in the policy (index 1),
    the last N_REFERENCE only in the reference (index 0). Returns (x, atoms [K, d])."""
    g = torch.Generator().manual_seed(seed)
    k = N_SHARED + N_POLICY + N_REFERENCE
    atoms = torch.randn(k, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    on = torch.rand(n, k, generator=g) < p
    codes = (torch.rand(n, k, generator=g) * 2 + 0.5) * on
    in_ref, in_pol = torch.ones(k), torch.ones(k)
    in_ref[N_SHARED : N_SHARED + N_POLICY] = 0
    in_pol[N_SHARED + N_POLICY :] = 0
    return torch.stack([(codes * in_ref) @ atoms, (codes * in_pol) @ atoms], dim=1), atoms


@pytest.fixture(scope="module")
def trained():
    x, atoms = planted_dictionary()
    settings = CrosscoderSettings(n_latents=64, k=3, steps=1000, batch_size=256, lr=3e-3, dead_after=5000, seed=0)
    return x, atoms, train_crosscoder(x, settings)


def best_latents(model, atoms, model_index):
    """For each atom: (cosine of the closest decoder row in that model, that latent's index)."""
    rows = decoder_directions(model, model_index)
    cos = atoms @ (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).T
    best = cos.max(dim=1)
    return best.values, best.indices


def test_policy_only_atoms_are_recovered_as_policy_only_latents(trained):
    x, atoms, model = trained
    r = model.relative_norms()
    cos, latents = best_latents(model, atoms, 1)
    for atom in range(N_SHARED, N_SHARED + N_POLICY):
        assert cos[atom] > 0.95 and r[latents[atom]] > 0.9, (atom, cos[atom], r[latents[atom]])
        assert latent_class(r[latents[atom]].item()) == "policy-only"
    cos, latents = best_latents(model, atoms, 0)
    for atom in range(N_SHARED + N_POLICY, N_SHARED + N_POLICY + N_REFERENCE):
        assert cos[atom] > 0.95 and r[latents[atom]] < 0.1, (atom, cos[atom], r[latents[atom]])
    shared = [latents[a].item() for a in range(N_SHARED) if cos[a] > 0.95]
    assert len(shared) >= N_SHARED // 2
    assert all(abs(r[j] - 0.5) < 0.1 for j in shared)  # a shared atom has the same norm in both decoders


def test_norm_difference_and_classes_by_hand():
    """Δ = ½((‖d_pol‖ − ‖d_ref‖) / max + 1): decoder norms (1, 5) give r = 5/6 and Δ = ½(4/5 + 1) = 0.9; (2, 1) give
    r = 1/3 and Δ = ½(−1/2 + 1) = 0.25; equal norms give ½ for both."""
    assert norm_difference(5 / 6) == pytest.approx(0.9) and norm_difference(1 / 3) == pytest.approx(0.25)
    assert norm_difference(0.5) == 0.5 and norm_difference(1.0) == 1.0 and norm_difference(0.0) == 0.0
    # r = 0.86: ‖d_pol‖ = 6.14 ‖d_ref‖, Δ = 0.919 (policy-only); r = 0.8: 4 ‖d_ref‖, Δ = 0.875 (mixed)
    assert [latent_class(r) for r in (0.86, 0.8, 0.5, 0.55, 0.6, 0.2, 0.1)] == [
        "policy-only", "mixed", "shared", "shared", "mixed", "mixed", "reference-only"]
    assert is_specific(0.1, 0.4) and not is_specific(0.25, 0.1) and not is_specific(0.1, 0.6)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        norm_difference(1.5)


def test_explained_variance_near_one_and_latent_scaling_of_a_true_policy_only_latent(trained):
    x, atoms, model = trained
    ev = explained_variance(model, x)
    assert ev["reference"] > 0.95 and ev["policy"] > 0.95 and ev["both"] > 0.95
    assert 0.0 <= dead_fraction(model, x) < 0.8
    _, latents = best_latents(model, atoms, 1)
    rows = latent_scaling(model, x, [latents[N_SHARED].item()])
    # the atom is absent from the reference: nothing of it in the reference's error; its reconstruction projects a
    # little onto it only because the 26 random atoms in 16 dimensions are not orthogonal (|cos| ~ 0.25)
    assert rows[0]["home"] == "policy" and abs(rows[0]["nu_error"]) < 0.1 and abs(rows[0]["nu_recon"]) < 0.3
    assert rows[0]["beta_error_policy"] == pytest.approx(1.0, abs=0.15)  # in its home model the latent is the whole story


def test_training_is_deterministic_under_a_seed_and_state_round_trips():
    x, _ = planted_dictionary(n=600)
    settings = CrosscoderSettings(n_latents=32, k=3, steps=30, batch_size=128, seed=3)
    a, b = train_crosscoder(x, settings), train_crosscoder(x, settings)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    c = train_crosscoder(x, CrosscoderSettings(n_latents=32, k=3, steps=30, batch_size=128, seed=4))
    assert not torch.equal(a.W_dec, c.W_dec)
    again = from_state(state(a))
    assert torch.equal(again(a.normalise(x[:5]))[1], a(a.normalise(x[:5]))[1])


def test_batch_topk_keeps_k_per_token_on_average_over_the_batch():
    score = torch.tensor([[5.0, 4.0, 3.0], [0.5, 0.4, 6.0]])
    assert batch_topk_mask(score, 1).tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    # k·N = 4: the first row keeps three, the second one
    assert batch_topk_mask(score, 2).tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    assert batch_topk_mask(torch.zeros(2, 3), 1).sum() == 0  # zeros are never kept


def test_scales_give_mean_squared_norm_d():
    x = torch.zeros(2, 2, 4)
    x[0, 0, 0], x[1, 0, 1] = 2.0, 2.0  # reference: mean ‖x‖² = 4  ->  s = sqrt(4/4) = 1
    x[:, 1] = 4.0  # policy: ‖x‖² = 64  ->  s = sqrt(4/64) = 0.25
    assert activation_scales(x).tolist() == pytest.approx([1.0, 0.25])
    with pytest.raises(ValueError, match="all zero"):
        activation_scales(torch.zeros(3, 2, 4))


def test_latent_scaling_detects_complete_shrinkage():
    """A latent whose reference decoder is zero, on data where the reference does carry half of it: the direction
    sits in the reference's error, so ν^ε = 0.5 (not 0): the latent is not really policy-only."""
    d = 4
    model = Crosscoder(d_model=d, n_latents=1, k=1)
    direction = torch.tensor([1.0, 0.0, 0.0, 0.0])
    with torch.no_grad():
        model.W_enc[1, :, 0] = direction  # reads the policy
        model.W_dec[0, 1] = direction  # writes only to the policy
    code = torch.tensor([1.0, 2.0, 3.0, 0.5])
    x = torch.zeros(4, 2, d)
    x[:, 1] = code[:, None] * direction
    x[:, 0] = 0.5 * code[:, None] * direction + torch.tensor([0.0, 1.0, 0.0, 0.0])  # half the latent, plus another direction
    with torch.no_grad():
        model.scale.fill_(1.0)
        model.threshold.fill_(0.0)
    (row,) = latent_scaling(model, x, [0])
    assert row["home"] == "policy"
    assert row["beta_error_policy"] == pytest.approx(1.0) and row["beta_error_reference"] == pytest.approx(0.5)
    assert row["nu_error"] == pytest.approx(0.5)
    assert row["beta_recon_reference"] == pytest.approx(0.0) and row["nu_recon"] == pytest.approx(0.0)


def test_bad_settings_and_inputs_are_refused_in_one_line():
    with pytest.raises(ValueError, match="k <= n_latents"):
        CrosscoderSettings(n_latents=4, k=8)
    with pytest.raises(ValueError, match="tokens >= 2, models, d_model"):
        train_crosscoder(torch.zeros(5, 8), CrosscoderSettings(n_latents=4, k=1))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_crosscode_command_on_identical_models_finds_only_shared_latents(family, tmp_path):
    """Reference = policy: both halves of every latent see the same data and start from the same direction, so every
    decoder norm is the same in both models (r = 0.5 exactly) and no latent is policy- or reference-only."""
    import json

    from model_families import build_family_model

    from rlhf_scratch.cli import main

    directory = build_family_model(family, tmp_path / family)
    (tmp_path / "texts.txt").write_text("The movie was great and I loved it.\nThe acting was not bad at all.\n"
                                        "The plot was dull.\nA slow drama.\n")
    assert main(["crosscode", "--policy", str(directory), "--reference", str(directory), "--texts",
                 str(tmp_path / "texts.txt"), "--n-texts", "4", "--n-samples", "2", "--max-new-tokens", "3",
                 "--n-latents", "32", "--k", "2", "--steps", "20", "--train-batch", "16", "--n-show", "2",
                 "--threads", "1", "--out", str(tmp_path / "cc")]) == 0
    summary = json.loads((tmp_path / "cc" / "summary.json").read_text())
    assert summary["hook"] == "blocks.1.hook_resid_post" and summary["n_samples"] == 2
    assert summary["class_counts"]["policy-only"] == 0 and summary["class_counts"]["reference-only"] == 0
    assert all(r == pytest.approx(0.5, abs=1e-6) for r in summary["relative_norms_alive"])
    assert summary["explained_variance"]["reference"] == pytest.approx(summary["explained_variance"]["policy"], abs=1e-6)
    row = summary["latents"][0]
    assert row["logit_tokens_policy"] == row["logit_tokens_reference"] and row["contexts"]
    assert (tmp_path / "cc" / "report.md").read_text().startswith("# Crosscoder")
    assert main(["crosscode", "--policy", str(directory), "--reference", str(directory), "--layer", "7",
                 "--threads", "1", "--out", str(tmp_path / "bad")]) == 1


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_logit_effect_is_the_logit_lens_of_the_direction_without_the_scale_and_the_offset(family, tmp_path):
    """effect(d) = N_lin(d)·W_U, and the lens gives N(d)·W_U + b_U = N_lin(d)·W_U / s(d) + (β·W_U + b_U), with
    (β·W_U + b_U) = lens(0) (pre-cap). So effect(d) / s(d) = lens(d) − lens(0), for LayerNorm and RMSNorm alike."""
    from model_families import build_family_model

    from rlhf_scratch.anatomy import final_norm_parameters, logit_lens
    from rlhf_scratch.crosscoder_report import logit_effects
    from rlhf_scratch.models import load_bridge

    bridge = load_bridge(build_family_model(family, tmp_path / family))
    d = torch.randn(3, bridge.cfg.d_model, generator=torch.Generator().manual_seed(0))
    effect = logit_effects(bridge, d)
    scale = final_norm_parameters(bridge).scale(d)
    with torch.no_grad():
        lens = logit_lens(bridge, d, capped=False) - logit_lens(bridge, torch.zeros(1, bridge.cfg.d_model), capped=False)
    assert torch.allclose(effect / scale, lens, atol=1e-4)

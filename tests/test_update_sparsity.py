"""Update sparsity and rank on updates with known answers: a set share of changed entries, a set rank, two identical
masks (overlap 1) and two independent random masks (overlap at chance)."""

import copy
import json

import pytest
import torch

from rlhf_scratch.update_sparsity import (
    changed_mask,
    chance_jaccard,
    effective_rank,
    energy_rank,
    jaccard,
    update_sparsity,
    weight_matrices,
)


def test_changed_share_at_each_tolerance_is_the_planted_share():
    generator = torch.Generator().manual_seed(0)
    w_ref = torch.randn(40, 50, generator=generator)  # RMS ≈ 1
    delta = torch.zeros(40, 50)
    flat = delta.view(-1)
    order = torch.randperm(2000, generator=generator)
    flat[order[:100]] = 0.5       # 100 entries: a large change, seen by every tolerance
    flat[order[100:300]] = 3e-3   # 200 entries: above 1e-3·RMS, below 1e-2·RMS
    flat[order[300:700]] = 1e-6   # 400 entries: exact only (w + 1e-6 ≠ w in float32 for |w| < ~8, lost in bf16)
    w_pol = w_ref + delta
    share = lambda tolerance: changed_mask(w_ref, w_pol, tolerance).double().mean().item()  # noqa: E731
    rms = w_ref.double().pow(2).mean().sqrt().item()
    assert 0.9 < rms < 1.1  # so 3e-3 lies between the two RMS tolerances
    assert share("1e-2 RMS") == 100 / 2000
    assert share("1e-3 RMS") == 300 / 2000
    assert share("exact") == pytest.approx(700 / 2000, abs=3 / 2000)  # a 1e-6 step can vanish only at |w| near 8+
    # bf16 keeps 8 bits of mantissa: a change of 0.5 always survives, 1e-6 never does, 3e-3 only for small |w|.
    assert 100 / 2000 <= share("bf16") < 300 / 2000
    with pytest.raises(ValueError, match="unknown tolerance"):
        changed_mask(w_ref, w_pol, "2 RMS plus")


def test_bf16_round_trip_counts_what_survives_in_bfloat16():
    w_ref = torch.tensor([[1.0, 1.0, 1.0, 256.0]])
    w_pol = torch.tensor([[1.0 + 2**-6, 1.0 + 2**-10, 1.0, 257.0]])  # bf16 step at 1 is 2**-7, at 256 it is 2
    assert changed_mask(w_ref, w_pol, "bf16").tolist() == [[True, False, False, False]]
    assert changed_mask(w_ref, w_pol, "exact").tolist() == [[True, True, False, True]]


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_effective_rank_and_energy_rank_of_an_update_of_known_rank(rank):
    generator = torch.Generator().manual_seed(rank)
    u, _ = torch.linalg.qr(torch.randn(30, rank, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, rank, generator=generator, dtype=torch.float64))
    delta = (u @ v.T).float()  # r equal singular values (all 1)
    sigma = torch.linalg.svdvals(delta.double()).float()
    assert effective_rank(sigma) == pytest.approx(rank, abs=1e-3)
    assert energy_rank(sigma) == rank


def test_effective_rank_of_unequal_spectra_by_hand():
    # p = (3, 1)/4: exp(−(¾ log ¾ + ¼ log ¼)) = 1.7548...
    assert effective_rank(torch.tensor([3.0, 1.0, 0.0])) == pytest.approx(1.75476, abs=1e-4)
    # energies 0.9, 0.09, 0.01: 99 % needs the first two.
    assert energy_rank(torch.tensor([0.9, 0.09, 0.01]).sqrt()) == 2
    assert energy_rank(torch.tensor([0.1, 0.1])) == 2 and energy_rank(torch.zeros(3)) == 0
    assert effective_rank(torch.zeros(3)) == 0.0


def test_identical_masks_overlap_fully_and_independent_masks_at_chance():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(400, 500, generator=generator) < 0.3
    b = torch.rand(400, 500, generator=generator) < 0.1
    assert jaccard(a, a.clone()) == 1.0
    measured = jaccard(a, b)
    expected = chance_jaccard(int(a.sum()), int(b.sum()), a.numel())
    # Closed form for densities 0.3 and 0.1: 0.03 / (0.4 − 0.03) = 0.0811.
    assert expected == pytest.approx(0.03 / 0.37, rel=0.02)
    assert measured == pytest.approx(expected, rel=0.03)
    assert jaccard(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 1.0
    assert chance_jaccard(10, 10, 10) == 1.0  # both sets are everything


def test_weight_matrices_are_the_heads_side_by_side(tiny_bridge):
    matrices = weight_matrices(tiny_bridge)
    d, h, d_head = tiny_bridge.cfg.d_model, tiny_bridge.cfg.n_heads, tiny_bridge.cfg.d_head
    assert matrices["L0 W_Q"].shape == (d, h * d_head) and matrices["L1 W_O"].shape == (h * d_head, d)
    # Head 2's W_Q is columns 2·d_head ... 3·d_head.
    assert torch.equal(matrices["L0 W_Q"][:, 2 * d_head : 3 * d_head], tiny_bridge.blocks[0].attn.W_Q[2].detach())
    assert "embed W_E" in matrices and "L1 W_out" in matrices


def test_a_policy_that_changed_one_matrix_in_known_entries(tiny_bridge):
    policy, second = copy.deepcopy(tiny_bridge), copy.deepcopy(tiny_bridge)
    with torch.no_grad():
        w = policy.blocks[1].mlp.W_out  # [M, D]
        w[:5, :] += 0.5  # 5 full rows: rank 1, 5·D entries
        second.blocks[1].mlp.W_out[:5, :] += 0.3  # the same entries, another size
    rows = {r["matrix"]: r for r in update_sparsity(tiny_bridge, policy, second)}
    target = rows["L1 W_out"]
    m, d = target["shape"]
    assert target["changed"]["1e-2 RMS"] == 5 * d / (m * d) and target["changed"]["bf16"] == 5 * d / (m * d)
    assert target["effective_rank"] == pytest.approx(1.0, abs=1e-6) and target["rank_99"] == 1
    assert target["overlap"]["bf16"] == 1.0 and target["chance"]["bf16"] == pytest.approx(5 / m / (2 - 5 / m))
    for name, row in rows.items():
        if name not in ("L1 W_out", "all"):
            assert row["changed"]["exact"] == 0.0 and row["effective_rank"] == 0.0, name
    assert rows["all"]["changed"]["bf16"] == 5 * d / rows["all"]["entries"] and rows["all"]["overlap"]["bf16"] == 1.0


def test_diff_report_has_the_sparsity_table_and_plot(tiny_model_dir, tmp_path):
    from rlhf_scratch.cli import main
    from rlhf_scratch.models import load_bridge, save_model_dir

    reference = load_bridge(tiny_model_dir)
    dirs = []
    for seed in (1, 2):
        policy = copy.deepcopy(reference)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            mask = torch.rand(policy.blocks[0].mlp.W_in.shape, generator=generator) < 0.2
            policy.blocks[0].mlp.W_in.add_(0.5 * mask)
        dirs.append(save_model_dir(policy, tmp_path / f"policy{seed}", meta={"kind": "ppo"}))
    texts = tmp_path / "texts.txt"
    texts.write_text("The movie was great.\nThe plot was dull.\n")
    out = tmp_path / "diff"
    code = main(["diff", "--policy", str(dirs[0]), "--second-policy", str(dirs[1]), "--reference", str(tiny_model_dir),
                 "--prompts", str(texts), "--n-texts", "2", "--max-new-tokens", "3", "--out", str(out)])
    assert code == 0
    assert (out / "update_sparsity.png").stat().st_size > 0
    assert "## Update sparsity and rank" in (out / "report.md").read_text()
    rows = {r["matrix"]: r for r in json.loads((out / "summary.json").read_text())["update_sparsity"]}
    # Two independent 20 % masks: share ≈ 0.2 each, overlap ≈ chance = 0.04 / 0.36.
    assert rows["L0 W_in"]["changed"]["bf16"] == pytest.approx(0.2, abs=0.03)
    assert rows["L0 W_in"]["overlap"]["bf16"] == pytest.approx(rows["L0 W_in"]["chance"]["bf16"], abs=0.03)
    assert rows["L0 W_in"]["chance"]["bf16"] == pytest.approx(0.04 / 0.36, abs=0.02)


def test_grouped_query_attention_one_kv_head_changed(tmp_path):
    """Llama with grouped K/V heads: moving K/V head 0's rows of k_proj changes exactly 1/H_kv of the layer's W_K
    [D, H_kv·d_head] and nothing else; its ΔW has rank at most d_head."""
    from model_families import build_family_model

    from rlhf_scratch.models import load_bridge

    directory = build_family_model("llama", tmp_path / "llama")
    reference, policy = load_bridge(directory), load_bridge(directory)
    d_head, n_kv = reference.cfg.d_head, reference.blocks[0].attn.W_K.shape[0]
    assert n_kv < reference.cfg.n_heads  # the family model really groups its K/V heads
    with torch.no_grad():
        weight = policy.original_model.model.layers[1].self_attn.k_proj.weight  # [H_kv·d_head, D]
        weight[:d_head].add_(0.5 * torch.randn(weight[:d_head].shape, generator=torch.Generator().manual_seed(0)))
    rows = {r["matrix"]: r for r in update_sparsity(reference, policy)}
    assert "pos_embed W_pos" not in rows and rows["L1 W_K"]["shape"] == [reference.cfg.d_model, n_kv * d_head]
    assert rows["L1 W_K"]["changed"]["1e-2 RMS"] == pytest.approx(1 / n_kv)
    assert rows["L1 W_K"]["rank_99"] <= d_head
    assert all(row["changed"]["exact"] == 0 for name, row in rows.items() if name not in ("L1 W_K", "all"))

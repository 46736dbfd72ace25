"""Greedy forward selection of patched components on a case with a known answer.

The policy differs from the reference in exactly two components, the two MLPs' output biases: L0.mlp moves by
0.15·v + 0.5·w and L1.mlp by −0.5·w, with v the residual direction that the final norm reads as the planted token t
and w a direction orthogonal to v (centred, as large as v). Together the two changes add 0.15·v to the last residual
stream (the policy says t); alone, L0.mlp's change is mostly w (it moves p(t) a little) and L1.mlp's is −w (it
lowers p(t)). Patching both from the policy gives the policy exactly (L1's heads then read the policy's residual),
so greedy selection must pick exactly those two, and its prefix of 2 recovers 100 %; the two best *singles* are
L0.mlp and a component that changed nothing, which recover only what L0.mlp alone does.
"""

import pytest
import torch
import torch.nn.functional as F
from test_patching import MASK, RESPONSE, TOKENS, planted_token, sharp

from rlhf_scratch.patching import components, patched_logits, scored_positions
from rlhf_scratch.patching_greedy import greedy_ranking, kl_score, token_prob_score, token_set_score

SCORED = scored_positions(RESPONSE) & MASK.bool()


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    reference = sharp(tiny_model_dir)
    t, v = planted_token(reference)
    w = torch.randn(v.shape[0], generator=torch.Generator().manual_seed(1))
    w = w - (w @ v) / (v @ v) * v
    w = w - w.mean()
    w = w / w.norm() * v.norm()
    policy = sharp(tiny_model_dir)
    with torch.no_grad():
        policy.original_model.transformer.h[0].mlp.c_proj.bias.add_(0.15 * v + 0.5 * w)
        policy.original_model.transformer.h[1].mlp.c_proj.bias.add_(-0.5 * w)
    candidates = [c for c in components(reference) if not c.endswith(".resid")]
    return reference, policy, t, candidates


def test_greedy_picks_the_two_changed_mlps_that_act_only_together(pair):
    reference, policy, t, candidates = pair
    score = token_prob_score(t, SCORED)
    p_ref = score(reference(TOKENS, attention_mask=MASK), slice(None))
    p_pol = score(policy(TOKENS, attention_mask=MASK), slice(None))
    assert p_ref < 1e-3 and p_pol > 0.5  # the policy says t, the reference does not

    def share(value):
        return (value - p_ref) / (p_pol - p_ref)

    greedy = greedy_ranking(reference, policy, TOKENS, MASK, candidates, score, max_n=3, batch_size=2)
    assert greedy.order[:2] == ["L0.mlp", "L1.mlp"]
    assert share(greedy.scores[1]) == pytest.approx(1.0, abs=1e-4)
    assert greedy.empty == pytest.approx(p_ref)
    singles = greedy.steps[0]
    assert set(singles) == set(candidates) and greedy.singles()[0] == "L0.mlp"
    assert 0.02 < share(singles["L0.mlp"]) < 0.2  # each alone moves p(t) little ...
    assert singles["L1.mlp"] < 0.5 * p_ref  # ... or the other way: L1.mlp alone lowers it
    # the singles ranking: its top 2 are L0.mlp and a component below it that is not L1.mlp; together they recover
    # what L0.mlp alone does, not the whole change
    top2 = greedy.singles()[:2]
    assert "L1.mlp" not in top2
    assert share(score(patched_logits(reference, policy, TOKENS, MASK, top2), slice(None))) < 0.2
    # the greedy step-2 scores are exactly the scores of those sets patched together
    assert greedy.steps[1]["L1.mlp"] == pytest.approx(score(patched_logits(reference, policy, TOKENS, MASK, ["L0.mlp", "L1.mlp"]), slice(None)))


def test_greedy_by_kl_and_by_token_set_find_the_same_two(pair):
    reference, policy, t, candidates = pair
    score = kl_score(SCORED)
    ref_logp = F.log_softmax(reference(TOKENS, attention_mask=MASK).double(), -1)
    pol_logp = F.log_softmax(policy(TOKENS, attention_mask=MASK).double(), -1)
    gap = (pol_logp.exp() * (pol_logp - ref_logp)).sum(-1)[SCORED].sum().item() / TOKENS.shape[0]  # mean KL_seq(pol ‖ ref)
    assert -score(reference(TOKENS, attention_mask=MASK), slice(None), policy(TOKENS, attention_mask=MASK)) == pytest.approx(gap)
    greedy = greedy_ranking(reference, policy, TOKENS, MASK, candidates, score, max_n=2)
    assert gap > 0.1 and sorted(greedy.order) == ["L0.mlp", "L1.mlp"]
    assert 1 + greedy.scores[1] / gap == pytest.approx(1.0, abs=1e-6)
    by_tokens = greedy_ranking(reference, policy, TOKENS, MASK, candidates, token_set_score([t], SCORED), max_n=2)
    assert sorted(by_tokens.order) == ["L0.mlp", "L1.mlp"]


def test_bad_input_is_refused_with_one_line(pair):
    reference, policy, t, candidates = pair
    score = token_prob_score(t, SCORED)
    with pytest.raises(ValueError, match="max_n must be >= 1"):
        greedy_ranking(reference, policy, TOKENS, MASK, candidates, score, max_n=0)
    with pytest.raises(ValueError, match="candidates is empty"):
        greedy_ranking(reference, policy, TOKENS, MASK, [], score, max_n=1)
    with pytest.raises(ValueError, match="is not one of"):
        greedy_ranking(reference, policy, TOKENS, MASK, ["L0.attn"], score, max_n=1)

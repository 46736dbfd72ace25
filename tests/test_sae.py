"""SAEs in sae-lens's file layout without sae-lens: hand-computed encodings, a saved SAE round-trips and, spliced with
the error term, leaves the logits unchanged; a policy that adds a known direction at the hook moves exactly the
feature that reads it."""

import json

import pytest
import torch
from model_families import build_family_model

from rlhf_scratch.cli import main
from rlhf_scratch.crosscoder import CrosscoderSettings, encode_all, train_crosscoder
from rlhf_scratch.crosscoder_report import paired_activations
from rlhf_scratch.models import load_bridge, save_model_dir
from rlhf_scratch.sae import SAE, load_sae, sae_hook, save_sae
from rlhf_scratch.sae_report import feature_changes, spliced_features, train_sae
from rlhf_scratch.sampling import left_pad

HOOK = "blocks.0.hook_resid_post"


def hand_sae(architecture="standard", **extra):
    W_enc = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]])  # D = 2, F = 3
    return SAE(W_enc=W_enc, b_enc=torch.tensor([0.0, -0.5, 0.0]), W_dec=W_enc.T.clone(), b_dec=torch.tensor([1.0, 0.0]),
               hook_name=HOOK, architecture=architecture, **extra)


def test_encode_by_hand_for_each_architecture():
    x = torch.tensor([[3.0, 1.0]])  # x − b_dec = [2, 1]; h = [2, 1 − 0.5, 2 − 1] = [2, 0.5, 1]
    assert hand_sae().encode(x).tolist() == [[2.0, 0.5, 1.0]]
    assert hand_sae("topk", k=1).encode(x).tolist() == [[2.0, 0.0, 0.0]]
    assert hand_sae("jumprelu", threshold=torch.tensor([2.5, 0.1, 0.9])).encode(x).tolist() == [[0.0, 0.5, 1.0]]
    assert hand_sae(apply_b_dec_to_input=False).encode(x).tolist() == [[3.0, 0.5, 2.0]]
    f = torch.tensor([[2.0, 0.5, 1.0]])
    assert hand_sae().decode(f).tolist() == [[1.0 + 2.0 + 1.0, 0.5 - 1.0]]  # f W_dec + b_dec


def test_save_and_load_round_trip_in_sae_lens_layout(tmp_path):
    sae = hand_sae("jumprelu", threshold=torch.tensor([0.1, 0.2, 0.3]), metadata={"model_name": "tiny"})
    save_sae(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_in"] == 2 and cfg["d_sae"] == 3
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["normalize_activations"] == "none"
    loaded = load_sae(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    assert loaded.hook_name == HOOK and loaded.metadata["model_name"] == "tiny"


def test_older_flat_layout_and_bad_files_are_read_or_refused_in_one_line(tmp_path):
    save_sae(hand_sae(), tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "cfg.json").read_text())
    flat = {"d_in": 2, "d_sae": 3, "hook_name": HOOK, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 2},
            "apply_b_dec_to_input": True, "normalize_activations": "none", "model_name": "gpt2"}
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(flat))
    old = load_sae(tmp_path / "old")
    assert old.architecture == "topk" and old.k == 2 and old.hook_name == HOOK
    cfg["architecture"] = "gated"
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture 'gated' is not supported"):
        load_sae(tmp_path / "old")
    cfg.update(architecture="standard", d_sae=4)
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"W_enc has shape \(2, 3\), but cfg.json's d_in=2, d_sae=4"):
        load_sae(tmp_path / "old")
    with pytest.raises(ValueError, match="expected cfg.json and sae_weights.safetensors"):
        load_sae(tmp_path / "nothing")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return build_family_model("gpt2", tmp_path_factory.mktemp("gpt2"))


def texts_tokens(bridge, n=6):
    texts = ["The movie was great and I loved it.", "The acting was not bad at all.", "The plot was dull.",
             "A slow drama.", "I would watch it again.", "Nothing works here."][:n]
    return left_pad([bridge.to_tokens(t)[0].tolist() for t in texts], 0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_trained_sae_saved_and_spliced_with_the_error_term_leaves_logits_unchanged(family, gpt2_dir, tmp_path):
    directory = gpt2_dir if family == "gpt2" else build_family_model(family, tmp_path / family)
    bridge = load_bridge(directory)
    tokens, mask = texts_tokens(bridge)
    paired = paired_activations(bridge, bridge, HOOK, tokens, mask, ["text"] * len(tokens), skip_first=True)
    settings = CrosscoderSettings(n_latents=64, k=4, steps=60, batch_size=64, seed=0)
    sae = train_sae(paired.x[:, 0], HOOK, settings)
    # the jumprelu export encodes exactly as the one-model crosscoder it came from
    crosscoder = train_crosscoder(paired.x[:, :1], settings)
    exported, original = sae.encode(paired.x[:, 0]), encode_all(crosscoder, paired.x[:, :1])[0]
    differ = (exported - original).abs() > 1e-4
    assert differ.float().mean() < 1e-3, differ.sum()  # only rounding-level ties at the threshold may differ
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    with torch.no_grad():
        plain = bridge(tokens, attention_mask=mask)
        record = []
        spliced = bridge.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[sae_hook(loaded, record)])
        replaced = bridge.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[sae_hook(loaded, None, keep_error=False)])
    assert (spliced - plain).abs().max().item() < 1e-5
    assert (replaced - plain).abs().max().item() > 1e-3  # without the error term the reconstruction's error shows
    assert record[0].shape == (*tokens.shape, 64) and (record[0] > 0).any()
    # an edit of the features moves the activation by exactly the change of the reconstruction
    feature = int(record[0].flatten(0, 1).sum(0).argmax())
    moved = {}
    def capture(x, hook):
        moved["x"] = x.detach().clone()
    def zero_one(f):
        return f * (torch.arange(f.shape[-1]) != feature)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n == HOOK)
        bridge.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[sae_hook(loaded, edit=zero_one), (HOOK, capture)])
    f = loaded.encode(cache[HOOK])
    expected = cache[HOOK] - f[..., feature : feature + 1] * loaded.W_dec[feature]
    assert torch.allclose(moved["x"], expected, atol=1e-5)


def test_a_known_direction_added_at_the_hook_moves_exactly_the_feature_that_reads_it(gpt2_dir, tmp_path):
    """Policy = reference with block 0's MLP output bias moved by α·e_2, so resid_post of block 0 is x + α·e_2 at
    every position. An SAE whose features read e_0..e_3 in the linear regime (b_enc large): Δ_2 = α, the rest 0."""
    alpha, d = 0.7, 32
    reference = load_bridge(gpt2_dir)
    policy = load_bridge(gpt2_dir)
    with torch.no_grad():
        policy.original_model.transformer.h[0].mlp.c_proj.bias[2] += alpha
    policy_dir = save_model_dir(policy, tmp_path / "policy", meta={"kind": "ppo", "phase": 1})
    policy = load_bridge(policy_dir)
    eye = torch.eye(d)[:, :4]
    sae = SAE(W_enc=eye, b_enc=torch.full((4,), 100.0), W_dec=eye.T.clone(), b_dec=torch.zeros(d), hook_name=HOOK)
    tokens, mask = texts_tokens(reference)
    keep = mask.bool()
    f_ref = spliced_features(reference, sae, tokens, mask, keep)["f"]
    f_pol = spliced_features(policy, sae, tokens, mask, keep)["f"]
    changes = feature_changes(f_ref, f_pol)
    assert changes[0]["feature"] == 2 and changes[0]["delta"] == pytest.approx(alpha, abs=1e-4)
    assert all(abs(row["delta"]) < 1e-4 for row in changes[1:])

    save_sae(sae, tmp_path / "sae")
    assert main(["sae", "--policy", str(policy_dir), "--reference", str(gpt2_dir), "--sae", str(tmp_path / "sae"),
                 "--texts", str(write_texts(tmp_path)), "--n-texts", "4", "--threads", "1", "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["risen"][0]["feature"] == 2 and summary["risen"][0]["delta"] == pytest.approx(alpha, abs=1e-4)
    assert max(q["max_logit_drift"] for q in summary["quality"].values()) < 1e-5
    assert (tmp_path / "out" / "report.md").read_text().startswith("# SAE features")


def write_texts(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("The movie was great and I loved it.\nThe acting was not bad at all.\nThe plot was dull.\nA slow drama.\n")
    return path


def test_sae_command_trains_and_saves_one_when_none_is_given_and_refuses_a_wrong_hook(gpt2_dir, tmp_path):
    texts = write_texts(tmp_path)
    common = ["--policy", str(gpt2_dir), "--reference", str(gpt2_dir), "--texts", str(texts), "--threads", "1"]
    assert main(["sae", *common, "--n-texts", "2", "--n-features", "32", "--k", "2", "--steps", "20",
                 "--out", str(tmp_path / "trained")]) == 0
    loaded = load_sae(tmp_path / "trained" / "sae")
    assert loaded.architecture == "jumprelu" and loaded.hook_name == "blocks.1.hook_resid_post"
    summary = json.loads((tmp_path / "trained" / "summary.json").read_text())
    assert all(delta == 0 for delta in summary["deltas"])  # the policy is the reference: nothing changed
    save_sae(SAE(W_enc=torch.zeros(32, 2), b_enc=torch.zeros(2), W_dec=torch.zeros(2, 32), b_dec=torch.zeros(32),
                 hook_name="blocks.9.hook_resid_post"), tmp_path / "wrong")
    assert main(["sae", *common, "--sae", str(tmp_path / "wrong"), "--out", str(tmp_path / "refused")]) == 1


def test_sae_command_refuses_a_policy_with_another_tokenizer_in_one_line(gpt2_dir, tmp_path, capsys):
    """Same shapes, but the policy's vocabulary swaps two tokens' ids: the features would be read on other text."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(gpt2_dir, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert main(["sae", "--policy", str(other), "--reference", str(gpt2_dir), "--texts", str(write_texts(tmp_path)),
                 "--threads", "1", "--out", str(tmp_path / "refused")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert any("use different tokenizers" in line for line in error)


def test_feature_page_is_self_contained_and_escapes_text(tmp_path):
    from rlhf_scratch.feature_html import write_feature_page

    page = write_feature_page(tmp_path / "f.html", "T <1>", "intro & more",
                              [{"title": "Feature 3", "facts": {"Δ": "+0.5"}, "tokens": {"logit": [" <b>"]},
                                "contexts": [{"label": "text 2.0", "tokens": [("The", 0.0), (" <x>", 2.0), (" end", 1.0)]}]}])
    text = page.read_text()
    assert "http" not in text and "<script" not in text  # no CDN, nothing to fetch
    assert "T &lt;1&gt;" in text and "&lt;x&gt;" in text and "intro &amp; more" in text
    assert 'rgba(220, 60, 30, 1.00)">  &lt;x&gt;' not in text  # the activation shades, the text stays as written
    assert 'title="2.000" style="background: rgba(220, 60, 30, 1.00)"> &lt;x&gt;</span>' in text
    assert 'title="1.000" style="background: rgba(220, 60, 30, 0.50)"> end</span>' in text

"""The research tools on a tiny random model of every family: how exactly each reproduces the model's own output.

For each family of ``tests/model_families.py`` (random 2-layer models built from Hugging Face config classes, no hub)
it prints the anatomy ``rlhf_scratch.anatomy`` reads, and on 2 sequences of 8 tokens:

    lens error   max |logit_lens(blocks.{L-1}.hook_resid_post) − the model's logits|   (anatomy.final_norm + unembed)
    value lens   max |value lens at the last layer − the value head's output|          (a random value head)
    DLA error    |Σ DLA contributions + bias − (mean_T z_t − mean_v z_v)|, z the model's pre-cap logits taken from
                 its real output (c·atanh(logits/c) for a soft-capped family), T = 3 tokens
    diff         run_diff of a copy with block 1 moved: do the block-1 matrices rank first, every other one at 0?

    python experiments/families_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TOKENS = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
TEXTS = "The movie was great and I loved it.\nThe acting was not bad at all.\nThe plot was dull.\n"


def check_family(family: str, root: Path) -> dict:
    from model_families import build_family_model

    from rlhf_scratch.anatomy import logit_lens, require_supported
    from rlhf_scratch.model_diff import model_dla
    from rlhf_scratch.model_diff_report import DiffConfig, run_diff
    from rlhf_scratch.models import PolicyWithValueHead, ValueHead, load_bridge, save_model_dir
    from rlhf_scratch.value_lens import lens_values

    directory = build_family_model(family, root / family)
    bridge = load_bridge(directory)
    facts = require_supported(bridge, "diff")
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(TOKENS, attention_mask=MASK)
    real = MASK.bool()
    final = cache[f"blocks.{facts.n_layers - 1}.hook_resid_post"]
    lens_error = (logit_lens(bridge, final) - logits)[real].abs().max().item()

    head = ValueHead(bridge.cfg.d_model)
    torch.nn.init.normal_(head.out.weight, std=0.5)
    values, _, lens = lens_values(PolicyWithValueHead(bridge, head), TOKENS, MASK)
    value_error = (lens[-1] - values)[real].abs().max().item()

    tokens = [3, 7, 11]
    cap = facts.logit_soft_cap
    z = logits.double() if cap is None else cap * torch.atanh(logits.double() / cap)
    expected = (z[real][:, tokens].mean(-1) - z[real].mean(-1)).mean().item()
    dla = model_dla(bridge, dict(cache.items()), real, tokens)
    dla_error = abs(sum(r["contribution"] for r in dla["rows"]) - expected)

    policy = load_bridge(directory)
    with torch.no_grad():
        for name, param in policy.original_model.named_parameters():
            if re.search(r"\.(h|layers)\.1\.", name):
                param.add_(0.05 * torch.randn_like(param))
    save_model_dir(policy, root / f"{family}_policy")
    (root / "texts.txt").write_text(TEXTS)
    summary = run_diff(DiffConfig(policy=str(root / f"{family}_policy"), reference=str(directory),
                                  prompts=str(root / "texts.txt"), from_samples=False, n_texts=3, max_tokens=10, top_k=3,
                                  out=root / f"{family}_diff"))
    rows = sorted(summary["weights"], key=lambda r: -r["rel_change"])
    n_block = sum(r["layer"] == 1 for r in rows)
    found = all(r["layer"] == 1 for r in rows[:n_block]) and max(r["rel_change"] for r in rows[n_block:]) < 1e-7
    return {"family": family, "anatomy": facts.describe(), "lens": lens_error, "value_lens": value_error,
            "dla": dla_error, "diff_found_block": found, "diff_check": summary["dla_check_max_error"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where the models and diffs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    from model_families import FAMILIES

    torch.manual_seed(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as temporary:
        root = args.out or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        results = [check_family(family, root) for family in FAMILIES]
    print("| family | lens error | value lens error | DLA sum error | diff finds block 1 |")
    print("|---|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['family']} | {r['lens']:.1e} | {r['value_lens']:.1e} | {r['dla']:.1e} | "
              f"{'yes' if r['diff_found_block'] else 'NO'} |")
    for r in results:
        print(r["anatomy"])
    print(f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

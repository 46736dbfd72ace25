"""``rlhf-scratch patch``: which heads, MLPs and layers carry what RL changed? The command, its report and plots.

``run_patch(PatchConfig)`` samples the policy's responses to held-out prompts, then patches every component
(``patching.components``: each attention head's output, each MLP's output, each layer's residual stream) from the
policy into the reference and from the reference into the policy (``patching.patch_scan``; definitions of the
recovered fractions there), and writes ``report.md``, ``patch_<direction>.png`` (layer × head heatmaps of the
recovered fraction, with the MLP and residual columns), ``summary.json`` and ``config.json``
(``rlhf-scratch patch --policy runs/ppo/checkpoint --out runs/patch``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from rlhf_scratch.data import load_texts, prompts_from_texts
from rlhf_scratch.evaluation import HELDOUT_SEED_OFFSET, markdown_table, pyplot
from rlhf_scratch.model_diff import load_pair, mean_probs, parse_token_set
from rlhf_scratch.outputs import write_json
from rlhf_scratch.patching import DIRECTIONS, METRICS, PatchScan, components, patch_scan, scored_positions
from rlhf_scratch.patching_greedy import greedy_ranking, kl_score, token_set_score
from rlhf_scratch.rewards import make_reward
from rlhf_scratch.sampling import SamplingConfig, encode, generate, left_pad, padding_id
from rlhf_scratch.command_configs import PatchConfig  # noqa: F401 (defined there: importable without torch)

METRIC_TITLES = {"kl": "sequence KL(policy‖reference)", "reward": "reward gap", "tokens": "log-prob of the token set"}


def policy_samples(policy, prompts: list[list[int]], max_new_tokens: int, batch_size: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The policy's responses to ``prompts``: (tokens [N, S], attention_mask [N, S], response_mask [N, S]), each
    row's real tokens (prompt then response) left-padded to one width; response_mask is True at response tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows, lengths = [], []
    for start in range(0, len(prompts), batch_size):
        g = generate(policy, prompts[start : start + batch_size], SamplingConfig(max_new_tokens=max_new_tokens), generator=generator)
        for r in range(len(g.prompts)):
            rows.append(g.sequences[r][g.attention_mask[r].bool()].tolist())
            lengths.append(int(g.gen_mask[r].sum()))
    tokens, mask = left_pad(rows, padding_id(policy.tokenizer))
    width = tokens.shape[1]
    response = torch.zeros_like(mask, dtype=torch.bool)
    for r, length in enumerate(lengths):
        response[r, width - length :] = True
    return tokens, mask, response


@torch.no_grad()
def risen_tokens(reference, policy, tokens: Tensor, mask: Tensor, response: Tensor, k: int) -> list[int]:
    """The k tokens whose mean probability rose most (policy − reference) at the positions predicting responses."""
    scored = scored_positions(response) & mask.bool()
    device = next(policy.parameters()).device
    rise = (mean_probs(policy(tokens.to(device), attention_mask=mask.to(device)).float().cpu(), scored)
            - mean_probs(reference(tokens.to(device), attention_mask=mask.to(device)).float().cpu(), scored))
    return torch.topk(rise, k).indices.tolist()


def run_patch(config: PatchConfig) -> dict:
    """Sample, scan both directions, write report.md, plots, summary.json; return the summary."""
    console = Console()
    torch.manual_seed(config.seed)
    reference, policy, facts = load_pair(config.reference, config.policy, config.device, "patch")
    given = parse_token_set(config.tokens, policy.tokenizer) if config.tokens else None
    reward = make_reward(config.reward) if config.reward else None

    def encode_text(text: str) -> list[int]:
        return encode(policy.tokenizer, text, prepend_bos=config.prepend_bos)

    texts = load_texts(config.prompts, column=config.column, seed=config.seed + HELDOUT_SEED_OFFSET)
    prompts = prompts_from_texts(texts, encode_text, config.n_texts, seed=config.seed + HELDOUT_SEED_OFFSET,
                                 decode=policy.tokenizer.decode)
    tokens, mask, response = policy_samples(policy, prompts, config.max_new_tokens, config.batch_size, config.seed)
    token_ids = given or risen_tokens(reference, policy, tokens, mask, response, config.top_k)
    directions = DIRECTIONS if config.direction == "both" else (config.direction,)
    console.print(f"patch: {tokens.shape[0]} policy samples, {len(components(reference))} components, "
                  f"directions {', '.join(directions)}{', reward ' + config.reward if reward else ''}")
    scans, seconds = {}, {}
    for direction in directions:
        started = time.perf_counter()
        scans[direction] = patch_scan(reference, policy, tokens, mask, response, token_ids=token_ids, rewards_fn=reward,
                                      direction=direction, batch_size=config.batch_size, seed=config.seed)
        seconds[direction] = time.perf_counter() - started
    transplant = None
    if "policy_into_reference" in scans:
        sets = transplant_sets(scans["policy_into_reference"], config.seed)
        if sets:
            started = time.perf_counter()
            scan = patch_scan(reference, policy, tokens, mask, response, token_ids=token_ids, rewards_fn=reward,
                              sets=sets, batch_size=config.batch_size, seed=config.seed)
            transplant = scan.rows
            seconds["transplant"] = time.perf_counter() - started
    greedy = None
    if config.greedy:
        started = time.perf_counter()
        greedy = greedy_transplant(reference, policy, tokens, mask, response, token_ids, reward, config)
        seconds["greedy"] = time.perf_counter() - started
    decode = lambda t: policy.tokenizer.decode([t])  # noqa: E731
    summary = {
        "reference": config.reference, "policy": config.policy, "anatomy": facts.describe(),
        "n_sequences": int(tokens.shape[0]), "n_components": len(components(reference)),
        "token_ids": token_ids, "tokens": [decode(t) for t in token_ids], "token_source": "--tokens" if given else "risen",
        "reward": config.reward, "seconds": seconds,
        "scans": {d: {"baselines": s.baselines, "rows": s.rows,
                      "top": {m: top_components(s, m) for m in METRICS}} for d, s in scans.items()},
        "transplant": transplant, "greedy": greedy,
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    for direction, scan in scans.items():
        plot_patch_heatmaps(scan, out / f"patch_{direction}.png")
    write_patch_report(out, config, summary)
    write_json(out / "summary.json", summary)
    print_patch_tables(console, summary)
    console.print(f"outputs in {out} (report.md, {', '.join(f'patch_{d}.png' for d in scans)}, summary.json)")
    return summary


def top_components(scan: PatchScan, metric: str, n: int = 10) -> list[dict]:
    """The n heads and MLPs (residual streams left out: the last one is nearly complete by construction) that recover the
    most of ``metric``, as rows {"component", "recovered"}; empty when the measure has no gap."""
    ranked = scan.ranked(metric, kinds=("head", "mlp"))[:n]
    return [{"component": c, "recovered": scan.value(c, metric)} for c in ranked if scan.value(c, metric) is not None]


def transplant_sets(scan: PatchScan, seed: int) -> dict[str, list[str]]:
    """{label: components}: the top n heads and MLPs by KL recovered (n = 1, 2, 4, ... up to a quarter of them),
    each beside n chosen at random (seeded) as a control. Empty when the KL has no gap."""
    pool = [row["component"] for row in scan.rows if row["kind"] in ("head", "mlp")]
    if scan.rows and all(row["kl"] is None for row in scan.rows):
        return {}
    ranked = scan.ranked("kl", kinds=("head", "mlp"))
    quarter = max(1, len(pool) // 4)
    sizes = sorted({2**i for i in range(quarter.bit_length()) if 2**i <= quarter} | {quarter})
    generator = torch.Generator().manual_seed(seed)
    sets = {}
    for n in sizes:
        sets[f"top {n}"] = ranked[:n]
        sets[f"random {n}"] = [pool[i] for i in torch.randperm(len(pool), generator=generator)[:n].tolist()]
    return sets


@torch.no_grad()
def greedy_transplant(reference, policy, tokens: Tensor, mask: Tensor, response: Tensor, token_ids: list[int], reward,
                      config: PatchConfig) -> dict:
    """Greedy forward selection (``patching_greedy``) of ``config.greedy`` heads and MLPs, policy → reference, by the
    KL recovered (m(S) = −KL_seq(π_pol ‖ π_P)) or the token set's mean log-prob (``config.greedy_metric``); then each
    prefix S_n and the n best singles by the same metric (greedy's step 1), patched together and measured by
    ``patch_scan(sets=...)`` (KL, reward, token set). {"metric", "order", "singles", "rows"}."""
    scored = scored_positions(response) & mask.bool()
    candidates = [c for c in components(reference) if not c.endswith(".resid")]
    score = kl_score(scored) if config.greedy_metric == "kl" else token_set_score(token_ids, scored)
    ranking = greedy_ranking(reference, policy, tokens, mask, candidates, score, config.greedy, batch_size=config.batch_size)
    singles = ranking.singles()
    sets = {}
    for n in range(1, len(ranking.order) + 1):
        sets[f"greedy {n}"] = ranking.prefix(n)
        sets[f"singles {n}"] = singles[:n]
    scan = patch_scan(reference, policy, tokens, mask, response, token_ids=token_ids, rewards_fn=reward, sets=sets,
                      batch_size=config.batch_size, seed=config.seed)
    return {"metric": config.greedy_metric, "order": ranking.order, "singles": singles[: len(ranking.order)],
            "rows": scan.rows}


def _fraction(value) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _baseline_lines(baselines: dict, tokens: list[str]) -> list[str]:
    lines = [f"- mean sequence KL(policy‖reference) over response positions: {baselines['kl_gap']:.4f} nats"]
    if "tokens_ref" in baselines:
        lines.append(f"- mean log Σ_T p of the token set: reference {baselines['tokens_ref']:.3f}, policy "
                     f"{baselines['tokens_pol']:.3f}")
    if "reward_ref" in baselines:
        lines.append(f"- mean reward of fresh samples: reference {baselines['reward_ref']:.3f}, policy "
                     f"{baselines['reward_pol']:.3f} (gap SE {baselines['reward_gap_se']:.3f}; a gap within 2 SE "
                     "is noise and its fractions are –)")
    return lines


def write_patch_report(out: Path, config: PatchConfig, summary: dict) -> Path:
    """report.md: setup, definitions, baselines, heatmaps and top components per direction."""
    tokens = ", ".join(f"`{t!r}`" for t in summary["tokens"])
    text = [
        f"# Activation patching: `{config.policy}` ↔ `{config.reference}`", "",
        f"{summary['n_sequences']} policy samples (held-out prompts from {config.prompts}, {config.max_new_tokens} new "
        f"tokens); {summary['n_components']} components (each head's output z_h·W_O[h], each MLP's output, each "
        f"layer's residual stream). Model: {summary['anatomy']}. Token set T = {tokens} "
        f"({'from --tokens' if summary['token_source'] == '--tokens' else 'the tokens whose probability rose most'}).", "",
        "**Recovered fraction** (receiver r runs with one component taken from donor d on the same tokens; P = patched): "
        "policy → reference: KL 1 − KL(π_pol‖π_P)/KL(π_pol‖π_ref), tokens and reward (M(P) − M(ref))/(M(pol) − M(ref)); "
        "reference → policy (the mirror: how much of the change is lost): KL 1 − KL(π_P‖π_ref)/KL(π_pol‖π_ref), "
        "tokens and reward (M(pol) − M(P))/(M(pol) − M(ref)). 100 % = behaves like the donor, 0 % = like the "
        "receiver; – = no gap to recover (never a division by noise). The reward is measured on responses "
        "sampled anew from each patched model (same random numbers for every model). The last layer's residual "
        "stream is complete by construction except for what the final norm and unembedding changed (the receiver "
        "applies its own): its shortfall from 100 % is their share.", "",
    ]
    for direction, scan in summary["scans"].items():
        text += [f"## {direction.replace('_', ' ')}", "", *_baseline_lines(scan["baselines"], summary["tokens"]),
                 f"- time: {summary['seconds'][direction]:.1f} s", "", f"![heatmaps](patch_{direction}.png)", ""]
        ranked = scan["top"]["kl"] or scan["top"]["tokens"] or scan["top"]["reward"]
        rows = {row["component"]: row for row in scan["rows"]}
        if ranked:
            text += ["Heads and MLPs that recover the most (by KL; all rows in summary.json):", "",
                     markdown_table(["component", "KL", "reward", "token set"],
                                    [[r["component"], _fraction(rows[r["component"]]["kl"]),
                                      _fraction(rows[r["component"]]["reward"]),
                                      _fraction(rows[r["component"]]["tokens"])] for r in ranked]), ""]
        layers = sorted({row["layer"] for row in scan["rows"]})
        text += ["Per layer (MLP output and residual stream after the block):", "",
                 markdown_table(["layer", "mlp KL", "mlp reward", "mlp tokens", "resid KL", "resid reward", "resid tokens"],
                                [[f"L{l}", *[_fraction(rows[f"L{l}.{kind}"][m]) for kind in ("mlp", "resid") for m in METRICS]]
                                 for l in layers]), ""]
    if summary.get("transplant"):
        text += ["## Transplant: the top components together", "",
                 "The n heads and MLPs that recover the most KL (policy → reference), patched together into the "
                 "reference, beside n chosen at random (seeded), n up to a quarter of all heads and MLPs. A behaviour "
                 "that lives in few components moves with the top set and not with the random one.", "",
                 markdown_table(["set", "KL", "reward", "token set", "components"],
                                [[r["component"], _fraction(r["kl"]), _fraction(r["reward"]), _fraction(r["tokens"]),
                                  " ".join(r["members"])] for r in summary["transplant"]]), ""]
    if summary.get("greedy"):
        text += _greedy_section(summary["greedy"])
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path


def _greedy_section(greedy: dict) -> list[str]:
    rows = {row["component"]: row for row in greedy["rows"]}
    table = []
    for n, added in enumerate(greedy["order"], start=1):
        g, s = rows[f"greedy {n}"], rows[f"singles {n}"]
        table.append([str(n), f"+ {added}", _fraction(g["kl"]), _fraction(g["reward"]), _fraction(g["tokens"]),
                      " ".join(s["members"]), _fraction(s["kl"]), _fraction(s["reward"]), _fraction(s["tokens"])])
    return ["## Greedy forward selection", "",
            f"S_n = S_(n−1) + the head or MLP that, patched from the policy into the reference together with S_(n−1), "
            f"recovers the most {'KL' if greedy['metric'] == 'kl' else 'token-set log-prob'}; beside it the n best "
            "*singles* by the same measure, patched together. Components that act together (through the final norm, "
            "or one cancelling part of another) are found by the first and can be missed by the second.", "",
            markdown_table(["n", "greedy adds", "KL", "reward", "token set", "n best singles", "KL", "reward",
                            "token set"], table), ""]


def print_patch_tables(console, summary: dict) -> None:
    for direction, scan in summary["scans"].items():
        table = Table(title=f"{direction}: top heads and MLPs (recovered fraction)")
        for header in ("component", "KL", "reward", "token set"):
            table.add_column(header, justify="right")
        rows = {row["component"]: row for row in scan["rows"]}
        for entry in (scan["top"]["kl"] or scan["top"]["tokens"])[:8]:
            row = rows[entry["component"]]
            table.add_row(row["component"], _fraction(row["kl"]), _fraction(row["reward"]), _fraction(row["tokens"]))
        console.print(table)


def patch_grid(scan: PatchScan, metric: str) -> Tensor:
    """[L, H + 2]: each head's recovered fraction, then the layer's MLP and residual stream (NaN where None)."""
    extra = torch.tensor([[math.nan if v is None else v for v in scan.layer_values(kind, metric)]
                          for kind in ("mlp", "resid")]).T
    return torch.cat([scan.head_grid(metric), extra], dim=1)


def plot_patch_heatmaps(scan: PatchScan, path: Path) -> Path:
    """One heatmap per measure: layers × (heads, mlp, resid), cells = recovered fraction in %."""
    plt = pyplot()
    metrics = [m for m in METRICS if any(row[m] is not None for row in scan.rows)] or ["kl"]
    n_layers, n_heads = scan.n_layers, scan.n_heads
    fig, axes = plt.subplots(1, len(metrics), figsize=(0.6 * (n_heads + 2) * len(metrics) + 2.5, 0.5 * n_layers + 2.2),
                             squeeze=False)
    image = None
    for ax, metric in zip(axes[0], metrics):
        grid = patch_grid(scan, metric)
        image = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_title(METRIC_TITLES[metric], fontsize=9)
        ax.set_xticks(range(n_heads + 2), [f"H{h}" for h in range(n_heads)] + ["mlp", "resid"], fontsize=7)
        ax.set_yticks(range(n_layers), [f"L{l}" for l in range(n_layers)], fontsize=7)
        if n_layers * (n_heads + 2) <= 120:
            for i in range(n_layers):
                for j in range(n_heads + 2):
                    value = grid[i, j].item()
                    ax.text(j, i, "–" if math.isnan(value) else f"{100 * value:.0f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="recovered fraction")
    fig.suptitle(f"Activation patching, {scan.direction.replace('_', ' ')} (cells: %)", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path

"""A static HTML page of dictionary features that works offline: inline CSS, no script, no CDN.

Each feature is a card: its title, facts (e.g. r, ν^ε, frequency), token lists (e.g. the logit effect in each
model) and its top contexts, each token shaded by the feature's activation there (opacity = activation / the
largest activation shown in that card; the hover title gives the number).

    write_feature_page(path, title, intro, features)   features: [{"title", "facts": {k: v}, "tokens": {label: [str]},
                                                                   "contexts": [{"label", "tokens": [(text, act)]}]}]
"""

from __future__ import annotations

import html
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.8em 1em; margin: 1em 0; }
.card h2 { font-size: 1.05em; margin: 0 0 0.4em 0; }
.facts span { display: inline-block; background: #f2f2f2; border-radius: 4px; padding: 0.1em 0.5em; margin: 0 0.3em 0.3em 0; }
.tokens { margin: 0.3em 0; } .tokens b { display: inline-block; min-width: 12em; }
code { background: #f6f6f6; padding: 0 0.2em; }
.context { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 0.2em 0; }
.context .label { color: #777; display: inline-block; min-width: 11em; }
.tok { border-radius: 2px; }
"""


def _shade(text: str, activation: float, scale: float) -> str:
    alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, activation / scale))
    return (f'<span class="tok" title="{activation:.3f}" style="background: rgba(220, 60, 30, {alpha:.2f})">'
            f"{html.escape(text)}</span>")


def feature_card(feature: dict) -> str:
    scale = max((act for context in feature.get("contexts", []) for _, act in context["tokens"]), default=0.0)
    parts = [f'<div class="card"><h2>{html.escape(feature["title"])}</h2>', '<div class="facts">']
    parts += [f"<span>{html.escape(str(k))}: {html.escape(str(v))}</span>" for k, v in feature.get("facts", {}).items()]
    parts.append("</div>")
    for label, tokens in feature.get("tokens", {}).items():
        parts.append(f'<div class="tokens"><b>{html.escape(label)}</b> '
                     + " ".join(f"<code>{html.escape(repr(t)[1:-1])}</code>" for t in tokens) + "</div>")
    for context in feature.get("contexts", []):
        parts.append(f'<div class="context"><span class="label">{html.escape(context["label"])}</span>'
                     + "".join(_shade(text, act, scale) for text, act in context["tokens"]) + "</div>")
    parts.append("</div>")
    return "\n".join(parts)


def write_feature_page(path: str | Path, title: str, intro: str, features: list[dict]) -> Path:
    """Write the page (UTF-8, self-contained) and return its path."""
    body = "\n".join(feature_card(feature) for feature in features)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n<p>{html.escape(intro)}</p>\n{body}\n"
            "</body></html>\n")
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path

"""Build the built-in offline model: review corpus → BPE tokenizer → tiny GPT-2 → bridge.

Steps (``pretrain(config)``):

1. texts: the project's own generated review corpus (``rlhf_scratch.corpus``), or the
   user's file with ``--data PATH``; a held-out slice is kept apart for perplexity;
2. a byte-level BPE tokenizer trained on the training texts (``tokenizers``), with one
   special token ``<|endoftext|>`` that serves as BOS, EOS and padding, as in GPT-2;
3. a small GPT-2 built from a local ``GPT2Config`` and trained on ``BOS text EOS``
   examples with next-token cross-entropy (padding masked out of the loss);
4. measurements: held-out perplexity, and the share of words in the model's own
   samples that are real English words (``corpus.english_word_share``).

The language-model pretraining runs on the plain Hugging Face module (the bridge
would only add hook overhead to a job that hooks nothing); the saved directory is
then loaded as a ``TransformerBridge`` like any other model, so generation uses the
Hugging Face KV cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rlhf_scratch.config import finite_float_checks
from rlhf_scratch.corpus import english_word_share, generate_reviews
from rlhf_scratch.data import load_texts
from rlhf_scratch.models import load_bridge
from rlhf_scratch.outputs import replace_dir, write_json
from rlhf_scratch.sampling import SamplingConfig, encode, generate, installed_versions

BUILTIN_MODEL_NAME = "tiny-reviews-v1"
SPECIAL_TOKEN = "<|endoftext|>"


def default_cache_dir() -> Path:
    """``$RLHF_SCRATCH_CACHE`` if set, else the user's cache directory for rlhf_scratch."""

    return Path(os.environ.get("RLHF_SCRATCH_CACHE") or user_cache_dir("rlhf_scratch"))


def builtin_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / BUILTIN_MODEL_NAME


@dataclass
class PretrainConfig:
    """Pretraining of a small GPT-2 on the built-in review corpus or your own text."""

    out: Path | None = None
    """Directory for config.json, summary.json, samples.txt and the model (out/model)."""
    data: Path | None = None
    """Your own text (.txt one text per line, .jsonl or .csv with --column); default: the built-in review corpus."""
    column: str = "text"
    """Column/field holding the text in a .jsonl or .csv --data file."""
    n_texts: int = 24000
    """Number of generated reviews to train on (built-in corpus only)."""
    n_heldout: int = 1000
    """Texts kept apart to measure perplexity: at most a tenth of all texts (fewer with a small --data file; the run
    then says how many it held out)."""
    vocab_size: int = 2048
    """BPE vocabulary size (including the special token)."""
    n_layer: int = 4
    """Transformer blocks (GPT-2 architecture)."""
    n_head: int = 4
    """Attention heads per block (must divide d_model)."""
    d_model: int = 128
    """Width of the residual stream."""
    n_ctx: int = 128
    """Context length in tokens; longer texts are truncated."""
    steps: int = 900
    """Optimizer steps."""
    batch_size: int = 48
    lr: float = 3e-3
    """Peak learning rate (AdamW), with linear warmup over 5% of the steps and cosine decay."""
    weight_decay: float = 0.01
    """AdamW weight decay (decoupled, on every optimised parameter)."""
    seed: int = 0
    """Seed of every random choice (sampling, prompts, initialisation, shuffling): the same seed gives the same run."""
    n_samples: int = 200
    """Samples drawn after training to measure the English-word share."""
    install_builtin: bool | None = None
    """Install the model as the cached built-in model, which every `--model builtin` command then uses. None
    (default): only when every setting that shapes the model is the default (no --data, --steps, --seed, ...
    changed); otherwise the model goes to --out/model or, without --out, a directory of its own in the cache
    (printed). True: install it even with other settings. False: never."""
    cache_dir: Path | None = None
    """Where the built-in model is cached (default: $RLHF_SCRATCH_CACHE or the user cache dir)."""

    def __post_init__(self):
        for ok, message in finite_float_checks(self):
            if not ok:
                raise ValueError(message)
        if self.data is not None and Path(self.data).is_dir():
            raise ValueError(f"--data {self.data} is a directory; give a .txt, .jsonl or .csv file of texts.")
        if self.data is not None and not Path(self.data).is_file():
            raise ValueError(f"--data {self.data}: no such file. Give a .txt, .jsonl or .csv file of texts.")
        for name in ("n_texts", "n_heldout", "vocab_size", "n_layer", "n_head", "d_model", "n_ctx", "steps", "batch_size",
                     "n_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}).")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 byte symbols + merges), got {self.vocab_size}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if self.install_builtin and self.data is not None:
            raise ValueError(
                f"--install-builtin True installs a model of the built-in review corpus; a model of --data {self.data} "
                "is used with --model OUT/model (pass --out OUT) instead of replacing the built-in model."
            )


MODEL_SETTINGS = ("data", "column", "n_texts", "n_heldout", "vocab_size", "n_layer", "n_head", "d_model", "n_ctx",
                  "steps", "batch_size", "lr", "weight_decay", "seed")
"""The PretrainConfig fields that shape the trained model (n_samples, out and cache_dir do not)."""


def changed_settings(config: PretrainConfig) -> dict[str, tuple]:
    """``{field: (value, default)}`` for each of ``MODEL_SETTINGS`` that differs from its default."""
    default = PretrainConfig()
    changed = {}
    for name in MODEL_SETTINGS:
        value, default_value = getattr(config, name), getattr(default, name)
        if name == "column" and config.data is None:
            continue  # only read with --data
        if value != default_value:
            changed[name] = (value, default_value)
    return changed


def describe_settings(changed: dict[str, tuple]) -> str:
    """``--steps 150 (default 900), --seed 1 (default 0)``."""
    return ", ".join(f"--{name.replace('_', '-')} {value} (default {default})" for name, (value, default) in changed.items())


def installs_builtin(config: PretrainConfig) -> bool:
    """Does this run replace the cached built-in model? (See ``PretrainConfig.install_builtin``.)"""
    if config.data is not None or config.install_builtin is False:
        return False
    return config.install_builtin is True or not changed_settings(config)


def custom_model_dir(config: PretrainConfig) -> Path:
    """Where a model that is not the built-in one goes when no --out is given: a directory of its own in the cache,
    named after a hash of its settings (and of the --data file's bytes), so that different settings never share one
    and a rerun with the same settings replaces its own earlier copy."""
    settings = {name: str(getattr(config, name)) for name in MODEL_SETTINGS}
    if config.data is not None:
        settings["data_sha256"] = hashlib.sha256(Path(config.data).read_bytes()).hexdigest()
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(config.cache_dir or default_cache_dir()) / f"{BUILTIN_MODEL_NAME}-custom-{digest}"


def load_training_texts(config: PretrainConfig) -> tuple[list[str], list[str]]:
    """``(train_texts, heldout_texts)``; held-out texts never appear in training."""
    if config.data is None:
        texts = generate_reviews(config.n_texts + config.n_heldout, seed=config.seed)
    else:
        texts = load_texts(str(config.data), column=config.column)
        random.Random(config.seed).shuffle(texts)
    if len(texts) < 2:
        raise ValueError(f"Need at least 2 texts to pretrain, got {len(texts)}.")
    n_heldout = min(config.n_heldout, max(1, len(texts) // 10))
    return texts[n_heldout:], texts[:n_heldout]


def train_tokenizer(texts: list[str], vocab_size: int, directory: Path):
    """Byte-level BPE (as GPT-2) trained on ``texts``; saved to ``directory`` and returned."""

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN
    )
    # The bridge reloads its tokenizer from tokenizer.name_or_path: it must live on disk.
    tokenizer.save_pretrained(directory)
    return PreTrainedTokenizerFast.from_pretrained(directory)


def encode_examples(tokenizer, texts: list[str], n_ctx: int) -> list[list[int]]:
    """``BOS text EOS`` token lists, truncated to ``n_ctx`` tokens."""
    special = tokenizer.bos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [([special] + ids + [special])[:n_ctx] for ids in encoded]


def make_batch(examples: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids [B, L]`` and ``labels [B, L]`` (−100 on padding).

    Padding is marked by length, not by id: the pad id equals the EOS id, and the
    closing EOS must stay in the loss so the model learns to end a review.
    """
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, ids in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
    return input_ids, labels


def length_bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random, window: int = 50) -> list[list[int]]:
    """One epoch of batches of indices, each batch made of examples of similar length.

    Shuffle, then sort within windows of ``window`` batches and cut: batches stay
    random, but a batch pads to a length close to its examples' own, which roughly
    halves the padded tokens (and the time) of a review corpus.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def heldout_perplexity(model, examples: list[list[int]], pad_id: int, batch_size: int = 64) -> float:
    """exp(mean next-token cross-entropy over all held-out tokens)."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        input_ids, labels = make_batch(examples[start : start + batch_size], pad_id)
        attention_mask = (labels != -100).long()
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    return math.exp(total_nll / total_tokens)


def pretrain(config: PretrainConfig, console=None) -> dict:
    """Run the whole pipeline; returns the summary (also written to ``out/summary.json``)."""


    console = console or Console()
    start_time = time.time()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)

    out = Path(config.out) if config.out is not None else None
    # Build into a temporary directory and move it into place at the end, so that a
    # run killed half-way never leaves a half-written model where a loader looks.
    work_dir = Path(tempfile.mkdtemp(prefix="rlhf_scratch_pretrain_"))
    model_dir = work_dir / "model"

    train_texts, heldout_texts = load_training_texts(config)
    console.print(f"[bold]pretrain[/]: {len(train_texts)} training texts, {len(heldout_texts)} held out")
    install = installs_builtin(config)
    changed = changed_settings(config)
    if install and changed:
        console.print(f"[bold yellow]note:[/] --install-builtin True with {describe_settings(changed)}: this model will "
                      f"replace the built-in model at {builtin_model_dir(config.cache_dir)}, and every --model builtin "
                      "command will use it. `rlhf-scratch pretrain` with the defaults restores the usual one.")
    # Said now, before minutes of training, and again in the summary.
    data_warnings = heldout_warnings(config, len(train_texts), len(heldout_texts))
    data_warnings += few_texts_warnings(config, len(train_texts), len(heldout_texts))
    for warning in data_warnings:
        console.print(f"[bold yellow]warning:[/] {warning}")
    tokenizer = train_tokenizer(train_texts, config.vocab_size, model_dir)
    special = tokenizer.bos_token_id
    train_examples = encode_examples(tokenizer, train_texts, config.n_ctx)
    heldout_examples = encode_examples(tokenizer, heldout_texts, config.n_ctx)

    model_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_ctx,
        n_embd=config.d_model,
        n_layer=config.n_layer,
        n_head=config.n_head,
        bos_token_id=special,
        eos_token_id=special,
        pad_token_id=special,
    )
    model = GPT2LMHeadModel(model_config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    warmup = max(1, config.steps // 20)

    def lr_multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier)
    batches: list[list[int]] = []
    losses: list[float] = []
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("pretraining", total=config.steps, loss=float("nan"))
        for step in range(config.steps):
            if not batches:
                batches = length_bucketed_batches([len(e) for e in train_examples], config.batch_size, rng)
            batch_ids = batches.pop()
            input_ids, labels = make_batch([train_examples[i] for i in batch_ids], special)
            loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            progress.update(task, advance=1, loss=sum(losses[-50:]) / len(losses[-50:]))

    model.eval()
    perplexity = heldout_perplexity(model, heldout_examples, special)
    model.save_pretrained(model_dir)
    write_json(model_dir / "pretrain_config.json", config)

    # Sample through the bridge, exactly as the RL code will.
    bridge = load_bridge(model_dir)
    generator = torch.Generator().manual_seed(config.seed)
    prompts = [encode(bridge.tokenizer, "", prepend_bos=True)] * config.n_samples
    samples = generate(bridge, prompts, SamplingConfig(max_new_tokens=min(64, config.n_ctx - 1)), generator=generator).responses
    word_share = english_word_share(samples)
    corpus_share = english_word_share(train_texts[: max(config.n_samples, 200)])
    warnings = data_warnings + word_share_warnings(word_share, corpus_share)

    summary = {
        "train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "heldout_perplexity": perplexity,
        "english_word_share": word_share,
        "corpus_english_word_share": corpus_share,
        "warnings": warnings,
        "seconds": time.time() - start_time,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_texts": len(train_texts),
        "steps": config.steps,
    }
    # The model's homes: --out/model if given, plus the built-in slot if installed; a model with neither --out nor
    # the built-in slot gets a directory of its own, so that it is never lost.
    home = builtin_model_dir(config.cache_dir) if install else custom_model_dir(config) if out is None else None
    model_dirs = ([out / "model"] if out is not None else []) + ([home] if home is not None else [])
    summary["model_dirs"] = [str(d) for d in model_dirs]
    summary["installed_builtin"] = install
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config)
        (out / "samples.txt").write_text("\n".join(samples) + "\n")
        replace_dir(model_dir, out / "model", copy=True)
        write_json(out / "summary.json", summary)
    if home is not None:
        replace_dir(model_dir, home, copy=True)
    shutil.rmtree(work_dir, ignore_errors=True)
    console.print(
        f"train loss {summary['train_loss']:.3f} · held-out perplexity {perplexity:.2f} · "
        f"English-word share {word_share:.3f} · {summary['seconds']:.0f} s"
    )
    for sample in samples[:5]:
        console.print(f"  [dim]sample:[/] {sample}")
    for warning in warnings:
        console.print(f"[bold yellow]warning:[/] {warning}")
    for directory in model_dirs:
        console.print(f"model saved to {directory}")
    if not install:
        why = (f"it was trained on --data {config.data}" if config.data is not None
               else "--install-builtin False" if config.install_builtin is False
               else f"its settings differ from the defaults: {describe_settings(changed)}")
        hint = "" if config.data is not None or config.install_builtin is False else \
            "; pass --install-builtin True to make it the built-in model"
        console.print(f"not installed as the built-in model ({why}); use it with --model {model_dirs[0]}{hint}.")
    return summary


FEW_TEXTS = 1000
"""Fewer training texts than this get a warning: a model pretrained on so few memorises them (the built-in corpus has 24,000)."""


def heldout_warnings(config: PretrainConfig, n_train: int, n_heldout: int) -> list[str]:
    """A warning when fewer texts are held out than --n-heldout asks (at most a tenth of all texts are)."""
    if n_heldout >= config.n_heldout:
        return []
    source = "the built-in corpus" if config.data is None else f"--data {config.data}"
    return [f"--n-heldout {config.n_heldout} is more than a tenth of the {n_train + n_heldout} texts of {source}: "
            f"{n_heldout} {'is' if n_heldout == 1 else 'are'} held out for perplexity instead, so that most texts "
            f"train. Pass --n-heldout {n_heldout} or less to silence this."]


def few_texts_warnings(config: PretrainConfig, n_train: int, n_heldout: int) -> list[str]:
    """A warning when pretraining has fewer than ``FEW_TEXTS`` training texts, saying where they came from and what to do."""
    if n_train >= FEW_TEXTS:
        return []
    if config.data is None:
        source, fix = "the built-in corpus (--n-texts)", "Raise --n-texts (default 24000)."
    else:
        source = f"--data {config.data} ({n_train + n_heldout} non-blank texts in all)"
        fix = "Add texts to the file, or leave out --data to train on the built-in corpus of 24,000 reviews."
    return [
        f"only {n_train} training text{'' if n_train == 1 else 's'} ({n_heldout} more held out for perplexity) from "
        f"{source}: a model pretrained on fewer than {FEW_TEXTS} texts learns little beyond repeating them, and its "
        f"perplexity and samples say little. {fix}"
    ]


WORD_SHARE_DROP = 0.1
"""A sample English-word share this far below the training texts' own share is reported as a warning.
Correct builds of the built-in model measure 0.995 against the corpus's 1.0; samples drawn with a
KV cache that lost its context (transformers 5.24 with TransformerLens 4.3, unpatched) measured 0.713."""


def word_share_warnings(sample_share: float, corpus_share: float) -> list[str]:
    """A warning (with the likely causes) when the samples hold far fewer English words than the texts trained on."""
    if sample_share >= corpus_share - WORD_SHARE_DROP:
        return []

    versions = ", ".join(f"{name} {version}" for name, version in installed_versions().items())
    return [
        f"the samples' English-word share is {sample_share:.3f}, far below the training texts' {corpus_share:.3f}: "
        "the model writes non-words. Likely causes: too few steps or too small a model for this data (raise "
        "--steps), a learning rate too high for it (loss curve), or a library stack whose generation is "
        f"wrong ({versions}; compare with constraints.txt). Read samples.txt before training on this model."
    ]


def ensure_builtin_model(cache_dir: str | os.PathLike | None = None, console=None) -> Path:
    """The built-in model's directory, pretraining it first if no cached copy exists."""
    target = builtin_model_dir(cache_dir)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target

    console = console or Console(stderr=True)
    console.print(
        f"[yellow]No cached built-in model at {target}: pretraining it now "
        "(a few minutes on 2 CPU cores, once; `rlhf-scratch pretrain` does the same).[/]"
    )
    # Pretraining seeds and draws from the global RNG; fork it so that a caller's
    # random state (e.g. the value head's initialisation) is the same whether or not
    # this call had to build the model.
    with torch.random.fork_rng():
        pretrain(PretrainConfig(cache_dir=Path(cache_dir) if cache_dir else None), console=console)
    return target

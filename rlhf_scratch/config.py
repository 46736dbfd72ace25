"""The config every system shares: which model, which reward, which prompts, which sampler.

Each command's config (``PPOConfig``, ``REINFORCEConfig``, ``EvalConfig``, ...) extends
``TaskConfig``; every field is a documented command-line flag, and ``__post_init__``
rejects bad values with a message that says how to fix them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_scratch.sampling import SamplingConfig


@dataclass
class TaskConfig:
    """The model, reward, prompts and sampler of a run. Defaults: the built-in offline sentiment task."""

    model: str = "builtin"
    """Model: "builtin", a local model directory or run checkpoint, or a hub name such as gpt2 (the policy to
    start from when training, the reference when evaluating)."""
    reward: str = "vader"
    """Reward: vader | chars:. | hf:PATH_OR_NAME:LABEL[:prob] | rm:DIR (a reward model trained with `rlhf-scratch rm`)."""
    data: str = "builtin"
    """Prompt texts (dataset mode): "builtin" held-out reviews, a .txt/.jsonl/.csv file, or a datasets name."""
    column: str = "text"
    """Text column for .jsonl/.csv/datasets prompt sources."""
    prompt: str | None = None
    """Fixed-prefix mode: every row gets this prompt (overrides --data)."""
    min_prompt_tokens: int = 2
    """Dataset mode: shortest prompt, in tokens (first k tokens of a text, k uniform in [min, max])."""
    max_prompt_tokens: int = 8
    """Dataset mode: longest prompt, in tokens."""
    prepend_bos: bool = True
    """Put BOS in front of each prompt (the built-in model was trained that way)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        for ok, message in self._checks():
            if not ok:
                raise ValueError(message)

    def _checks(self) -> list[tuple[bool, str]]:
        """(condition, message saying how to fix it) pairs; subclasses add their own."""
        return [
            (1 <= self.min_prompt_tokens <= self.max_prompt_tokens,
             f"need 1 <= min_prompt_tokens <= max_prompt_tokens, got {self.min_prompt_tokens}, {self.max_prompt_tokens}."),
            (self.prompt is None or self.prompt != "", "--prompt must not be empty; omit it to use --data."),
        ]

"""``rlhf-scratch export``: a model as a plain ``save_pretrained`` directory, a LoRA run's adapters merged in.

A LoRA checkpoint holds the frozen base weights and ``lora_adapters.safetensors``; this project's commands merge
them when they load it, other tools (``AutoModelForCausalLM.from_pretrained``, vLLM, ...) would see only the base.
``export`` writes ``W + (alpha/r)·B A`` for every adapted matrix, with the tokenizer and the value head if any.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_scratch.command_configs import ExportConfig
from rlhf_scratch.lora import ADAPTER_FILE
from rlhf_scratch.model_loading import complete_checkpoint_dir
from rlhf_scratch.models import VALUE_HEAD_FILE, load_policy, save_model_dir


def run_export(config: ExportConfig) -> Path:
    """Load ``config.model`` (merged), write it to ``config.out``; returns the directory."""
    source = complete_checkpoint_dir(config.model)
    policy = load_policy(config.model, device=config.device)
    has_head = (source / VALUE_HEAD_FILE).is_file()
    out = save_model_dir(policy.bridge, config.out, value_head=policy.value_head if has_head else None,
                         meta={"kind": "export", "source": str(config.model), "lora_merged": (source / ADAPTER_FILE).is_file()})
    print(f"exported {config.model} to {out}" + (" (LoRA adapters merged into the weights)"
                                                   if (source / ADAPTER_FILE).is_file() else ""))
    return out

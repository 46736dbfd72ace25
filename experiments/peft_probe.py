"""Does PEFT compose with the TransformerLens 4 bridge? The test that decided LoRA is written by hand (docs/lora.md).

PEFT is not a dependency. Install it beside the venv without touching it, then run on two tiny random models:

    pip install --no-deps --target /tmp/peftpkg peft==0.22.0
    PYTHONPATH=.:/tmp/peftpkg:tests python experiments/peft_probe.py

For GPT-2 and Llama it injects rank-4 LoRA (PEFT's ``inject_adapter_in_model``) into the bridge's wrapped q and v
matrices with B ≠ 0 and checks what the engine needs: the bridge forward and its hooks see the adapters; the plain
forward (``plain_forward.py``) can stand in for the bridge; the bridge's state dict and ``save_model_dir`` still work.
"""
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from rlhf_scratch.models import load_bridge, save_model_dir, PolicyWithValueHead
from rlhf_scratch.plain_forward import plain_forward_for
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from model_families import build_family_model  # noqa: E402

root = Path(tempfile.mkdtemp())
toks = torch.tensor([[1, 5, 9, 14, 20, 3]])
for fam in ["gpt2", "llama"]:
    print("==", fam)
    b = load_bridge(build_family_model(fam, root / fam))
    with torch.no_grad(): base = b(toks)
    # the bridge's matrices are LinearBridge._original_component; PEFT matches module names by regex
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=r".*\.(q|v|q_proj|v_proj)\._original_component", init_lora_weights=True)
    try:
        inject_adapter_in_model(cfg, b.original_model)
    except Exception as e:
        print("inject failed:", type(e).__name__, str(e)[:200]); continue
    lora_params = [n for n, p in b.named_parameters() if "lora_" in n]
    print("lora params:", len(lora_params), lora_params[:2])
    with torch.no_grad():
        for n, p in b.named_parameters():
            if "lora_B" in n: p.normal_(0, 0.2)
    seen = []
    with torch.no_grad():
        out = b.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.q.hook_out", lambda a, hook: seen.append(a.clone()))])
    print("bridge forward changed by adapters:", (out - base).abs().max().item(), "hook fired:", len(seen))
    print("state_dict keys sample:", [k for k in b.state_dict() if "blocks.0.attn.q" in k][:4])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        plain = plain_forward_for(b)
    print("plain forward:", "available" if plain is not None else "unavailable", [str(x.message)[-160:] for x in w])
    if plain is not None:
        with torch.no_grad(): print("  plain - bridge:", (plain(toks)[0] - out).abs().max().item())
    try:
        save_model_dir(b, root / f"peft_save_{fam}")
        print("save_model_dir: ok")
    except Exception as e:
        print("save_model_dir failed:", type(e).__name__, str(e)[:200])

"""One type-checking convention: an int is accepted wherever a float is annotated (PEP 484's tower).

Before it was shared, three modules used plain ``beartype``, which rejects ``2`` for ``float``:
``SamplingConfig(temperature=2)`` from Python failed inside ``generate``.
"""

import pathlib
import re

import torch

import rlhf_scratch
from rlhf_scratch.sampling import SamplingConfig, encode, filter_logits, generate


def test_integer_temperature_samples_like_the_float(tiny_bridge):
    prompts = [encode(tiny_bridge.tokenizer, "The movie")] * 2
    as_int = generate(tiny_bridge, prompts, SamplingConfig(max_new_tokens=4, temperature=2),
                      generator=torch.Generator().manual_seed(0))
    as_float = generate(tiny_bridge, prompts, SamplingConfig(max_new_tokens=4, temperature=2.0),
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(as_int.sequences, as_float.sequences)
    logits = torch.randn(3, 7)
    assert torch.equal(filter_logits(logits, temperature=2, top_p=1), filter_logits(logits, temperature=2.0))


def test_every_module_uses_the_shared_typechecker():
    """The class of bug: a module that decorates with plain ``beartype`` (no numeric tower)."""
    package = pathlib.Path(rlhf_scratch.__file__).parent
    for path in package.glob("*.py"):
        source = path.read_text()
        assert "typechecker=beartype" not in source, f"{path.name} uses plain beartype; use rlhf_scratch.typecheck"
        if path.name == "typecheck.py":
            continue
        assert not re.search(r"^typechecker = ", source, re.M), f"{path.name} defines its own typechecker"
        if "@jaxtyped(" in source:
            assert "from rlhf_scratch.typecheck import typechecker" in source, path.name

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


def test_shape_checks_can_be_turned_off_for_a_block_and_come_back():
    """The learning loop turns the checks off unless --debug (``typecheck.shape_checks``)."""
    import jaxtyping
    import pytest

    from rlhf_scratch.objectives import masked_mean
    from rlhf_scratch.typecheck import shape_checks

    x, wrong_mask = torch.ones(2, 3), torch.ones(3, dtype=torch.bool)  # shapes differ; torch would broadcast
    with pytest.raises(jaxtyping.TypeCheckError):
        masked_mean(x, wrong_mask)
    with shape_checks(False):
        assert masked_mean(x, wrong_mask).item() == 2.0  # unchecked: torch broadcasts, 6 / 3, the silent error
        with shape_checks(True):  # nested: off stays off (the outer block asked for it)
            masked_mean(x, wrong_mask)
    with shape_checks(True):
        with pytest.raises(jaxtyping.TypeCheckError):
            masked_mean(x, wrong_mask)
    with pytest.raises(jaxtyping.TypeCheckError):  # back on after the blocks
        masked_mean(x, wrong_mask)


def test_debug_learning_phase_checks_shapes_and_a_plain_one_does_not(tiny_bridge, monkeypatch):
    import jaxtyping

    from rlhf_scratch.models import PolicyWithValueHead
    from rlhf_scratch.ppo import PPOConfig, PPOTrainer

    seen = []
    original = PPOTrainer.compute_losses
    monkeypatch.setattr(PPOTrainer, "compute_losses",
                        lambda self, piece: seen.append(jaxtyping.config.jaxtyping_disable) or original(self, piece))
    for debug in (False, True):
        config = PPOConfig(prompt="The movie", reward="chars:e", phases=1, batch_size=4, minibatch_size=4, ppo_epochs=1,
                           sampling=SamplingConfig(max_new_tokens=4), debug=debug)
        trainer = PPOTrainer(config, policy=PolicyWithValueHead(tiny_bridge))
        trainer.learning_phase(trainer.rollout_phase())
    assert seen == [True, False] and not jaxtyping.config.jaxtyping_disable

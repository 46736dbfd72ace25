"""The one run-time type-checking convention of the project.

Every shape-annotated function is decorated ``@jaxtyped(typechecker=typechecker)``: jaxtyping
checks the shapes (``Float[Tensor, "batch gen"]``: the same ``batch`` everywhere in one call) and
beartype the types. ``is_pep484_tower=True`` follows PEP 484's numeric tower: an ``int`` is
accepted where a ``float`` is annotated, so ``SamplingConfig(temperature=2)`` or ``kl_coef=1``
from Python work as they would without checking (plain ``beartype`` rejects them).
"""

import contextlib

import jaxtyping
from beartype import BeartypeConf, beartype

typechecker = beartype(conf=BeartypeConf(is_pep484_tower=True))


@contextlib.contextmanager
def shape_checks(enabled: bool):
    """Run-time shape and type checks on (``enabled``) or off within the block, as they were after it.

    The trainers' learning loop runs its steps with the checks off unless ``--debug``: each checked call costs
    tens to hundreds of microseconds (about 0.5 ms for ``calc_clipped_surrogate`` with the calls inside it), paid on
    every minibatch. The checks stay on everywhere else (tests, notebooks, the rollout, ``step_through.py``); a
    shape error in the loop then surfaces as torch's own error, and ``--debug`` names the argument.
    """
    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", previous or not enabled)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", previous)

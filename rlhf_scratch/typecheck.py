"""The one run-time type-checking convention of the project.

Every shape-annotated function is decorated ``@jaxtyped(typechecker=typechecker)``: jaxtyping
checks the shapes (``Float[Tensor, "batch gen"]``: the same ``batch`` everywhere in one call) and
beartype the types. ``is_pep484_tower=True`` follows PEP 484's numeric tower: an ``int`` is
accepted where a ``float`` is annotated, so ``SamplingConfig(temperature=2)`` or ``kl_coef=1``
from Python work as they would without checking (plain ``beartype`` rejects them).
"""

from beartype import BeartypeConf, beartype

typechecker = beartype(conf=BeartypeConf(is_pep484_tower=True))

"""Local symmetry (RELION ``relion_localsym``): operators, search, refinement, apply.

* :mod:`~cryoavg.localsym.operators`: the operator (RELION Euler angles + Å translation).
* :mod:`~cryoavg.localsym.io`: operator / mask-list STAR and DM text files; mask checks.
* :mod:`~cryoavg.localsym.apply`: impose (average), duplicate, transform.
* :mod:`~cryoavg.localsym.masks`: ``relion_mask_create``.
* :mod:`~cryoavg.localsym.search`: batched exhaustive global/local search.
* :mod:`~cryoavg.localsym.refine`: autograd (L-BFGS) refinement of all 6 parameters.
* :mod:`~cryoavg.localsym.microtubule`: mask-less microtubule operators.
* :mod:`~cryoavg.localsym.verify`: per-operator correlation report.
"""

from cryoavg.localsym.apply import (
    apply_local_symmetry,
    check_operators_in_sphere,
    duplicate_masked_density,
    transform_map,
)
from cryoavg.localsym.masks import create_mask, create_mask_denovo
from cryoavg.localsym.microtubule import microtubule_operators
from cryoavg.localsym.operators import (
    LocalSymmetryOperator,
    MaskOperators,
    operators_to_tensors,
)
from cryoavg.localsym.refine import RefineSettings, refine_operators
from cryoavg.localsym.search import SearchSettings, search_operator
from cryoavg.localsym.verify import verify_operators

__all__ = [
    "LocalSymmetryOperator",
    "MaskOperators",
    "RefineSettings",
    "SearchSettings",
    "apply_local_symmetry",
    "check_operators_in_sphere",
    "create_mask",
    "create_mask_denovo",
    "duplicate_masked_density",
    "microtubule_operators",
    "operators_to_tensors",
    "refine_operators",
    "search_operator",
    "transform_map",
    "verify_operators",
]

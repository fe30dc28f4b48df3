"""Per-operator verification: how well each operator superposes the masked region.

For operator ``T`` of mask ``M`` the report gives the mask-weighted Pearson correlation
between ``V(x)`` and ``V(T x)`` over the mask (the transformed masked region against
the target region) and RELION's RMS score, for a map before and (optionally) after a
refinement or symmetrisation.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cryoavg.localsym.apply import _pull_back
from cryoavg.localsym.operators import LocalSymmetryOperator, operators_to_tensors

__all__ = ["OperatorReport", "format_report", "verify_operators"]


@dataclass
class OperatorReport:
    """Agreement of one operator.

    Attributes
    ----------
    mask_name, index
        Mask and operator number (1-based).
    correlation
        Mask-weighted correlation of ``V(T x)`` with ``V(x)``.
    rms_difference
        RELION's score ``sqrt(sum M (V(Tx) - V(x))^2 / sum M)``.
    """

    mask_name: str
    index: int
    correlation: float
    rms_difference: float


def verify_operators(
    volume: torch.Tensor,
    mask: torch.Tensor,
    operators: Sequence[LocalSymmetryOperator],
    pixel_size_angstrom: float,
    mask_name: str = "",
) -> list[OperatorReport]:
    """Correlation and RMS difference per operator (see the module docstring)."""
    matrices, translations = operators_to_tensors(operators, pixel_size_angstrom)
    if matrices.shape[0] == 0:
        return []
    ref = volume.float()
    weights = mask.float()
    pulled = _pull_back(ref, matrices, translations)  # (k, n, n, n)
    w_sum = weights.sum()
    ref_c = ref - (ref * weights).sum() / w_sum
    out = []
    for i, copy in enumerate(pulled):
        copy_c = copy - (copy * weights).sum() / w_sum
        cc = (weights * copy_c * ref_c).sum() / torch.sqrt(
            (weights * copy_c**2).sum() * (weights * ref_c**2).sum()
        ).clamp(min=1e-20)
        rms = torch.sqrt((weights * (copy - ref) ** 2).sum() / w_sum)
        out.append(OperatorReport(mask_name, i + 1, float(cc), float(rms)))
    return out


def format_report(
    before: Sequence[OperatorReport], after: Sequence[OperatorReport] | None = None
) -> str:
    """Plain-text table: mask, operator, CC and RMS before (and after)."""
    header = f"{'mask':<30} {'op':>3} {'cc_before':>10} {'rms_before':>11}"
    if after is not None:
        header += f" {'cc_after':>10} {'rms_after':>11}"
    lines = [header]
    for i, first in enumerate(before):
        line = (
            f"{first.mask_name[-30:]:<30} {first.index:>3} {first.correlation:>10.4f} "
            f"{first.rms_difference:>11.5g}"
        )
        if after is not None:
            line += f" {after[i].correlation:>10.4f} {after[i].rms_difference:>11.5g}"
        lines.append(line)
    return "\n".join(lines)

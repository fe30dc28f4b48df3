"""Numerical guards of Class2D: find NaN/Inf early and name the particle or class.

A NaN that enters the E-step (a damaged image, a zero noise power, an overflow) spreads
through the sufficient statistics into every class within one M-step, and the run goes
on producing grey images. These checks run once per E-step chunk and once per M-step
(a few ``isfinite`` reductions, negligible next to the E-step) and stop the run with
one :class:`NumericalError` line naming the first bad particle (by its ``rlnImageName``
when known) or class.

Images are already checked when they are read (:mod:`cryoavg.io.stack`); the weights
are computed from ``diff2 - min(diff2)`` with a log-sum-exp (:mod:`cryoavg.class2d.estep`),
so a particle whose best pose scores far below every other still gets weights summing
to 1 (RELION's "no orientation was found as better than any other" cannot occur); what
is left to guard is a non-finite result of either step.
"""

from collections.abc import Callable, Mapping, Sequence

import torch

from cryoavg.errors import CryoavgError

__all__ = [
    "NumericalError",
    "check_class_images",
    "check_particle_values",
]


class NumericalError(CryoavgError):
    """A computation produced NaN or Inf; the message names the particle or class."""


def _particle_name(
    particle_index: torch.Tensor,
    row: int,
    names: Sequence[str] | Callable[[], Sequence[str]] | None,
) -> str:
    particle = int(particle_index[row])
    if callable(names):
        names = names()
    if names is not None and 0 <= particle < len(names):
        return f"particle {particle + 1} ({names[particle]})"
    return f"particle {particle + 1}"


def check_particle_values(
    values: Mapping[str, torch.Tensor],
    particle_index: torch.Tensor,
    *,
    names: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    iteration: int | None = None,
) -> None:
    """Raise :class:`NumericalError` when a per-particle value is NaN or Inf.

    Parameters
    ----------
    values
        Name -> ``(b, ...)`` tensor of per-particle results (log-likelihood, norm
        correction, offsets, ...), row ``i`` belonging to ``particle_index[i]``.
    particle_index
        ``(b,)`` 0-based particle indices (rows of the particle table).
    names
        ``rlnImageName`` of every particle (indexed by particle), or a function
        returning them (called only when a value is bad), for the message.
    iteration
        Named in the message.
    """
    for label, tensor in values.items():
        if tensor.numel() == 0 or not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
        if bool(finite.all()):
            continue
        row = int(torch.nonzero(~finite)[0, 0])
        flat = tensor.reshape(tensor.shape[0], -1)[row]
        bad_value = float(flat[~torch.isfinite(flat)][0])
        when = f" in iteration {iteration}" if iteration is not None else ""
        raise NumericalError(
            f"{label} of {_particle_name(particle_index, row, names)} is {bad_value}"
            f"{when}; check this image and its CTF parameters"
        )


def check_class_images(
    class_images: torch.Tensor, *, iteration: int | None = None
) -> None:
    """Raise :class:`NumericalError` naming the first class with a NaN or Inf pixel.

    Parameters
    ----------
    class_images
        ``(k, h, w)`` class images after an M-step.
    iteration
        Named in the message.
    """
    finite = torch.isfinite(class_images.reshape(class_images.shape[0], -1)).all(1)
    if bool(finite.all()):
        return
    bad = torch.nonzero(~finite)[:, 0].tolist()
    when = f" after iteration {iteration}" if iteration is not None else ""
    shown = ", ".join(str(k + 1) for k in bad[:5])
    raise NumericalError(
        f"class{'es' if len(bad) > 1 else ''} {shown} became NaN/Inf{when} "
        f"({len(bad)} of {class_images.shape[0]}); the last written iteration can be "
        "continued with continue_from=... (try a smaller tau2_fudge)"
    )

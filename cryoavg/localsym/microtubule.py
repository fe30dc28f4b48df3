"""Mask-less local-symmetry operators of an n-protofilament, s-start microtubule.

Derivation (the example table of RELION's wiki, ``localsym-3s13m.star``, could not be
retrieved, so this is derived rather than copied): the microtubule axis is z through
the box centre. Protofilament ``j`` (1..n, numbered around the tube; the seam lies
between ``n`` and 1) is protofilament ``ref`` rotated about z by ``(j - ref) * twist``
and shifted along z by ``(j - ref) * rise``, where the lateral ``rise`` between
neighbouring protofilaments is ``s * monomer_repeat / n`` (9.23 Å for 13-pf 3-start
with a 40 Å monomer repeat) and ``twist = 360 / n`` degrees for straight protofilaments.
Operators never cross the seam (the lattice is discontinuous there), so with the mask
on ``ref`` (default: the protofilament opposite the seam, ``n // 2 + 1`` = #7 for 13)
there are ``n - 1`` operators with ``k = j - ref`` in ``1 - ref .. n - ref``, ``k != 0``.

An active rotation by ``phi`` about z is RELION ``A = Rz(phi)``, i.e. Euler
``(0, 0, -phi)`` (for ``tilt = 0`` RELION puts the whole rotation into ``psi``, and
``A`` restricted to xy is ``Rz(-psi)``).
"""

from cryoavg.localsym.operators import LocalSymmetryOperator, _wrap_degrees

__all__ = ["microtubule_operators"]


def microtubule_operators(
    n_protofilaments: int = 13,
    n_start: int = 3,
    twist_degrees: float | None = None,
    rise_angstrom: float | None = None,
    *,
    monomer_repeat_angstrom: float = 40.0,
    reference_protofilament: int | None = None,
) -> list[LocalSymmetryOperator]:
    """Operators from the reference protofilament to every other one (no seam crossing).

    Parameters
    ----------
    n_protofilaments
        ``n`` (>= 2).
    n_start
        ``s``: helix starts in monomers (3 for the common 13-pf B-lattice).
    twist_degrees
        Rotation between neighbouring protofilaments (default ``360 / n``).
    rise_angstrom
        Axial shift between neighbouring protofilaments (default
        ``s * monomer_repeat / n``).
    monomer_repeat_angstrom
        Axial monomer repeat used for the default rise.
    reference_protofilament
        Masked protofilament (1-based; default ``n // 2 + 1``, opposite the seam).

    Returns
    -------
    list of LocalSymmetryOperator
        ``n - 1`` operators ordered by protofilament number.
    """
    if n_protofilaments < 2:
        raise ValueError(f"n_protofilaments must be >= 2, got {n_protofilaments}")
    twist = 360.0 / n_protofilaments if twist_degrees is None else float(twist_degrees)
    rise = (
        n_start * monomer_repeat_angstrom / n_protofilaments
        if rise_angstrom is None
        else float(rise_angstrom)
    )
    ref = (
        n_protofilaments // 2 + 1
        if reference_protofilament is None
        else reference_protofilament
    )
    if not 1 <= ref <= n_protofilaments:
        raise ValueError(f"reference_protofilament must be in 1..{n_protofilaments}")
    operators = []
    for j in range(1, n_protofilaments + 1):
        k = j - ref
        if k == 0:
            continue
        operators.append(
            LocalSymmetryOperator(
                0.0, 0.0, _wrap_degrees(-k * twist), (0.0, 0.0, k * rise)
            )
        )
    return operators

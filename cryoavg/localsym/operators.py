"""Local-symmetry operators in RELION's convention (spec §D.1).

Conventions owned by this module
--------------------------------
* An operator is ``(rot, tilt, psi)`` RELION ZYZ Euler angles in degrees plus a
  translation ``(dx, dy, dz)`` in Å (**xyz** order, as in the STAR columns
  ``rlnOriginX/Y/ZAngst``).
* Geometry: ``T(x) = A x + t`` with ``x`` the voxel position (xyz, pixels) relative to
  the box centre ``n // 2``, ``A = euler_angles_to_matrix((rot, tilt, psi))`` (RELION's
  ``A``, not its transpose) and ``t`` the translation in pixels (Å / pixel size). ``T``
  maps the masked reference copy onto a symmetry-related copy: ``rho(T x) ~ rho(x)``.
* Applying an operator to a map is ``out(x) = in(T^{-1} x) = in(A^T (x - t))``, exactly
  :func:`cryoavg.ops.transforms.transform_volumes_3d`; the inverse operator is
  ``(A^T, -A^T t)``.
* Standardisation: if ``|rot| > 179`` or ``tilt < 1`` or ``tilt > 179`` or
  ``|psi| > 179`` the angles are replaced by ``matrix_to_euler_angles(A)`` (same
  rotation, canonical angles), as RELION does.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from cryoavg.ops.rotations import euler_angles_to_matrix, matrix_to_euler_angles

__all__ = [
    "IDENTITY_TOLERANCE",
    "LocalSymmetryOperator",
    "MaskOperators",
    "operators_to_tensors",
    "same_operator",
]

#: absolute tolerance (degrees for angles, Å for translations) for "the same" operator
IDENTITY_TOLERANCE = 1e-4


def _wrap_degrees(angle_degrees: float) -> float:
    """Wrap an angle to (-180, 180]."""
    wrapped = math.fmod(angle_degrees, 360.0)
    if wrapped > 180.0:
        wrapped -= 360.0
    elif wrapped <= -180.0:
        wrapped += 360.0
    return wrapped


@dataclass(frozen=True)
class LocalSymmetryOperator:
    """One local-symmetry operator ``T(x) = A x + t``.

    Attributes
    ----------
    rot_degrees, tilt_degrees, psi_degrees
        RELION ZYZ Euler angles of ``A`` in degrees.
    translation_angstrom
        ``(dx, dy, dz)`` translation in Å, xyz order.
    score
        Optional search score (RELION's mask-weighted RMS difference, lower is better;
        or ``1 - cc`` for the normalised cross-correlation score).
    """

    rot_degrees: float = 0.0
    tilt_degrees: float = 0.0
    psi_degrees: float = 0.0
    translation_angstrom: tuple[float, float, float] = (0.0, 0.0, 0.0)
    score: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        values = (
            self.rot_degrees,
            self.tilt_degrees,
            self.psi_degrees,
            *self.translation_angstrom,
        )
        if len(self.translation_angstrom) != 3:
            raise ValueError(
                "translation_angstrom must have 3 values, got "
                f"{self.translation_angstrom}"
            )
        if not all(math.isfinite(float(v)) for v in values):
            raise ValueError(f"operator values must be finite, got {values}")
        object.__setattr__(
            self,
            "translation_angstrom",
            tuple(float(v) for v in self.translation_angstrom),
        )

    @property
    def angles_degrees(self) -> tuple[float, float, float]:
        """``(rot, tilt, psi)`` in degrees."""
        return (self.rot_degrees, self.tilt_degrees, self.psi_degrees)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """RELION matrix ``A`` (3, 3) acting on xyz columns."""
        return euler_angles_to_matrix(torch.tensor(self.angles_degrees, dtype=dtype))

    def translation_px(
        self, pixel_size_angstrom: float, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Translation ``t`` (3,) in pixels, xyz order."""
        if not pixel_size_angstrom > 0:
            raise ValueError(
                f"pixel_size_angstrom must be positive, got {pixel_size_angstrom}"
            )
        return torch.tensor(self.translation_angstrom, dtype=dtype) / float(
            pixel_size_angstrom
        )

    @classmethod
    def from_matrix(
        cls,
        matrix: torch.Tensor,
        translation_angstrom: Sequence[float] | torch.Tensor,
        score: float | None = None,
    ) -> "LocalSymmetryOperator":
        """Operator from a matrix ``A`` (3, 3) and a translation (3,) in Å (xyz)."""
        angles = matrix_to_euler_angles(torch.as_tensor(matrix, dtype=torch.float64))
        rot, tilt, psi = (float(a) for a in angles)
        translation = tuple(float(v) for v in torch.as_tensor(translation_angstrom))
        return cls(rot, tilt, psi, translation, score)  # type: ignore[arg-type]

    def inverse(self) -> "LocalSymmetryOperator":
        """The inverse operator ``(A^T, -A^T t)``."""
        matrix = self.matrix()
        translation = torch.tensor(self.translation_angstrom, dtype=torch.float64)
        return LocalSymmetryOperator.from_matrix(
            matrix.T, -(matrix.T @ translation), self.score
        )

    def compose(self, other: "LocalSymmetryOperator") -> "LocalSymmetryOperator":
        """``self o other``: ``x -> A1 (A2 x + t2) + t1``."""
        a1, a2 = self.matrix(), other.matrix()
        t1 = torch.tensor(self.translation_angstrom, dtype=torch.float64)
        t2 = torch.tensor(other.translation_angstrom, dtype=torch.float64)
        return LocalSymmetryOperator.from_matrix(a1 @ a2, a1 @ t2 + t1)

    def standardised(self) -> "LocalSymmetryOperator":
        """Canonical angles when RELION's standardisation condition holds (§D.1)."""
        rot, tilt, psi = self.angles_degrees
        if abs(rot) > 179.0 or tilt < 1.0 or tilt > 179.0 or abs(psi) > 179.0:
            angles = matrix_to_euler_angles(self.matrix())
            rot, tilt, psi = (float(a) for a in angles)
            return replace(
                self,
                rot_degrees=_wrap_degrees(rot),
                tilt_degrees=tilt,
                psi_degrees=_wrap_degrees(psi),
            )
        return self

    def is_identity(self, tolerance: float = IDENTITY_TOLERANCE) -> bool:
        """Whether the rotation is the identity and the translation is zero.

        Compares the rotation angle of ``A`` (degrees) and ``|t|`` (Å) with
        ``tolerance``.
        """
        matrix = self.matrix()
        cos_angle = float((matrix.trace() - 1.0) / 2.0)
        angle = math.degrees(math.acos(max(-1.0, min(1.0, cos_angle))))
        shift = math.sqrt(sum(v * v for v in self.translation_angstrom))
        return angle <= tolerance and shift <= tolerance


def same_operator(
    first: LocalSymmetryOperator,
    second: LocalSymmetryOperator,
    tolerance: float = IDENTITY_TOLERANCE,
) -> bool:
    """Whether two operators agree (standardised angles and translations, §D.1).

    Angles are compared through their matrices (so equivalent Euler triples match),
    translations in Å; ``tolerance`` is in degrees of rotation angle / Å.
    """
    relative = LocalSymmetryOperator.from_matrix(
        first.matrix().T @ second.matrix(), (0.0, 0.0, 0.0)
    )
    shift = max(
        abs(a - b)
        for a, b in zip(
            first.translation_angstrom, second.translation_angstrom, strict=True
        )
    )
    return relative.is_identity(tolerance) and shift <= tolerance


@dataclass
class MaskOperators:
    """One set of identical regions: a mask and the operators onto its other copies.

    Attributes
    ----------
    mask_name
        The mask file (as written in the STAR file; resolved relative to the working
        directory when read).
    operators
        ``K - 1`` operators for a set of ``K`` identical regions.
    """

    mask_name: str
    operators: list[LocalSymmetryOperator] = field(default_factory=list)


def operators_to_tensors(
    operators: Sequence[LocalSymmetryOperator],
    pixel_size_angstrom: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack operators into matrices and pixel translations.

    Parameters
    ----------
    operators
        ``n`` operators.
    pixel_size_angstrom
        Pixel size in Å used to convert translations.
    dtype, device
        Placement of the result.

    Returns
    -------
    matrices : torch.Tensor
        ``(n, 3, 3)`` RELION matrices ``A`` (xyz).
    translations_px : torch.Tensor
        ``(n, 3)`` translations ``t`` in pixels (xyz).
    """
    if not operators:
        return (
            torch.zeros((0, 3, 3), dtype=dtype, device=device),
            torch.zeros((0, 3), dtype=dtype, device=device),
        )
    angles = torch.tensor([op.angles_degrees for op in operators], dtype=torch.float64)
    shifts = torch.tensor(
        [op.translation_angstrom for op in operators], dtype=torch.float64
    ) / float(pixel_size_angstrom)
    return (
        euler_angles_to_matrix(angles).to(dtype=dtype, device=device),
        shifts.to(dtype=dtype, device=device),
    )

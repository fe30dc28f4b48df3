"""Options of a 2D classification run (``Class2DSettings``).

One plain dataclass that the command line (``cryoavg.cli.class2d``) fills from the Hydra
config, that the Lightning module and the M-step read, and that is written to / read from
``run_itNNN_optimiser.star`` for ``continue``. Field names are cryoavg's; the RELION label each
maps to is given in :data:`OPTIMISER_LABELS` (used by ``cryoavg.class2d.export``).

Sampling values are the *fine* (oversampled) values as in RELION's GUI: ``psi_step_degrees=6``
and ``offset_step_px=1`` give a coarse search of 12° and 2 px, refined to 6° / 1 px.
"""

from dataclasses import asdict, dataclass, fields
from typing import Any

from cryoavg.errors import ConfigError


@dataclass
class Class2DSettings:
    """Options of a Class2D run (RELION's Class2D defaults unless stated).

    Attributes
    ----------
    n_classes
        K, number of classes (``--K``).
    tau2_fudge
        Regularisation parameter T (``--tau2_fudge``).
    n_iterations
        Iterations (VDAM mini-batches or EM iterations, ``--iter``).
    algorithm
        ``"vdam"`` (gradient-driven, ``--grad``) or ``"em"``.
    particle_diameter_angstrom
        Mask diameter in Å (``--particle_diameter``); ``None`` = (N − mask edge)·pixel size.
    zero_mask
        Background of the masked particle images set to its weighted mean (``--zero_mask``)
        instead of noise.
    flatten_solvent
        Multiply class averages by the circular mask each iteration (``--flatten_solvent``).
    highres_limit_angstrom
        E-step resolution limit in Å (``--strict_highres_exp``); ≤ 0 = none.
    center_classes
        Re-centre class averages on their centre of mass (``--center_classes``).
    psi_step_degrees
        Fine in-plane angular step (GUI value; coarse = 2×).
    offset_range_px
        Translation search range in pixels (``--offset_range``).
    offset_step_px
        Fine translation step in pixels (GUI value; coarse = 2×).
    do_ctf
        Use the CTF (``--ctf``).
    ctf_intact_first_peak
        Ignore the CTF until its first peak (``--ctf_intact_first_peak``).
    do_norm, do_scale
        Per-particle norm and per-group scale corrections (``--norm``, ``--scale``).
    class_inactivity_threshold
        Re-seed classes whose share falls below this fraction of 1/K_active (VDAM only).
    seed
        Random seed (``--random_seed``).
    write_every
        Write the RELION files every this many iterations (``--grad_write_iter``).
    mask_edge_px
        Width of the soft edge of the circular mask (``--maskedge``, 5 px).
    offset_prior_sigma_angstrom
        Initial σ of the offset prior (``--offset``, 10 Å).
    adaptive_fraction
        Fraction of the probability mass kept in the coarse pass (``--adaptive_fraction``).
    max_significant
        Cap on significant coarse samples per particle; ``None`` = 5·K for VDAM, none for EM.
    grad_ini_frac, grad_fin_frac, grad_stepsize, mu
        VDAM schedule (``--grad_ini_frac``, ``--grad_fin_frac``, ``--grad_stepsize``, ``--mu``);
        ``grad_stepsize`` ≤ 0 means the default 0.3.
    grad_ini_subset, grad_fin_subset
        Mini-batch sizes at the start / end; ``None`` = RELION's automatic sizes.
    preread_images
        Read all particle images into memory first (``--preread_images``).
    pad
        Fourier padding factor (``--pad``).
    """

    n_classes: int = 50
    tau2_fudge: float = 2.0
    n_iterations: int = 100
    algorithm: str = "vdam"
    particle_diameter_angstrom: float | None = None
    zero_mask: bool = True
    flatten_solvent: bool = True
    highres_limit_angstrom: float = -1.0
    center_classes: bool = True
    psi_step_degrees: float = 6.0
    offset_range_px: float = 5.0
    offset_step_px: float = 1.0
    do_ctf: bool = True
    ctf_intact_first_peak: bool = False
    do_norm: bool = True
    do_scale: bool = True
    class_inactivity_threshold: float = 0.1
    seed: int = 1
    write_every: int = 10
    mask_edge_px: float = 5.0
    offset_prior_sigma_angstrom: float = 10.0
    adaptive_fraction: float = 0.999
    max_significant: int | None = None
    grad_ini_frac: float = 0.3
    grad_fin_frac: float = 0.2
    grad_stepsize: float = -1.0
    mu: float = 0.9
    grad_ini_subset: int | None = None
    grad_fin_subset: int | None = None
    preread_images: bool = False
    pad: int = 2

    @property
    def is_vdam(self) -> bool:
        """True for the gradient-driven algorithm."""
        return self.algorithm == "vdam"

    @property
    def psi_step_coarse_degrees(self) -> float:
        """Coarse in-plane step (2 × the fine step, oversampling order 1)."""
        return 2.0 * self.psi_step_degrees

    @property
    def offset_step_coarse_px(self) -> float:
        """Coarse translation step (2 × the fine step)."""
        return 2.0 * self.offset_step_px

    @property
    def effective_max_significant(self) -> int:
        """Cap on significant coarse samples (5·K for VDAM; 0 = no cap for EM)."""
        if self.max_significant is not None:
            return int(self.max_significant)
        return 5 * self.n_classes if self.is_vdam else 0

    def validate(
        self,
        *,
        box_size: int | None = None,
        pixel_size_angstrom: float | None = None,
        n_particles: int | None = None,
    ) -> None:
        """Check the options (and their fit to the data when the data are known).

        Raises
        ------
        ConfigError
            With a one-line explanation naming the offending key.
        """
        if self.algorithm not in ("vdam", "em"):
            raise ConfigError(
                f"algorithm must be 'vdam' or 'em', got {self.algorithm!r}"
            )
        if self.n_classes < 1:
            raise ConfigError(f"classes must be ≥ 1, got {self.n_classes}")
        if self.n_iterations < 1:
            raise ConfigError(f"iterations must be ≥ 1, got {self.n_iterations}")
        if self.tau2_fudge <= 0:
            raise ConfigError(f"tau2_fudge must be > 0, got {self.tau2_fudge}")
        if not 0 < self.psi_step_degrees <= 90:
            raise ConfigError(
                f"psi_step must be in (0, 90] degrees, got {self.psi_step_degrees}"
            )
        if self.offset_range_px < 0:
            raise ConfigError(f"offset_range must be ≥ 0, got {self.offset_range_px}")
        if self.offset_step_px <= 0:
            raise ConfigError(f"offset_step must be > 0, got {self.offset_step_px}")
        if not 0 < self.adaptive_fraction <= 1:
            raise ConfigError(
                f"adaptive_fraction must be in (0, 1], got {self.adaptive_fraction}"
            )
        if self.write_every < 1:
            raise ConfigError(f"write_every must be ≥ 1, got {self.write_every}")
        if n_particles is not None:
            if n_particles == 0:
                raise ConfigError("no particles to classify")
            if self.n_classes > n_particles:
                raise ConfigError(
                    f"classes={self.n_classes} is larger than the number of particles "
                    f"({n_particles})"
                )
        if box_size is not None and pixel_size_angstrom is not None:
            diameter = self.particle_diameter_angstrom
            if diameter is not None and diameter > box_size * pixel_size_angstrom:
                raise ConfigError(
                    f"mask_diameter={diameter:g} Å is larger than the box "
                    f"({box_size} px × {pixel_size_angstrom:g} Å = "
                    f"{box_size * pixel_size_angstrom:g} Å)"
                )
            if diameter is not None and diameter <= 0:
                raise ConfigError(f"mask_diameter must be > 0, got {diameter}")

    def mask_radius_px(self, box_size: int, pixel_size_angstrom: float) -> float:
        """Radius of the circular mask in pixels (RELION: D/(2p), default (N − edge)/2)."""
        if self.particle_diameter_angstrom is None:
            return (box_size - self.mask_edge_px) / 2.0
        return self.particle_diameter_angstrom / (2.0 * pixel_size_angstrom)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints and logging)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Class2DSettings":
        """Build from a dict, ignoring unknown keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

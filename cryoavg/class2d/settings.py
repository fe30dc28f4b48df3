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

from cryoavg.errors import ConfigError, CryoavgError

#: which class a re-seeded (inactive) class copies in VDAM: the most populated one
#: (cryoavg's default) or the one with the largest class error (RELION's rule)
EXPAND_CLASS_RULES = ("largest", "gradient")


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
        Re-seed classes whose share falls below this fraction of 1/K_active (VDAM: a
        copy of a populated class; EM: half of the most populated class).
    expand_class
        Which class a re-seeded class copies (VDAM only): ``"largest"`` (the most
        populated class) or ``"gradient"`` (RELION's rule, the largest π-weighted
        gradient). Not in RELION's files: on continue it comes from the command line.
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
    expand_class: str = "largest"
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
        if self.expand_class not in EXPAND_CLASS_RULES:
            raise ConfigError(
                f"expand_class must be one of {', '.join(EXPAND_CLASS_RULES)}, "
                f"got {self.expand_class!r}"
            )
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


# --------------------------------------------------------------------------------------
# E-step memory budget (config key ``estep_memory_mib``)

#: bytes in a MiB
MIB = 1 << 20
#: E-step working memory with ``estep_memory_mib=auto`` off the GPU: the bound on chunked
#: temporaries the E-step has always used on CPUs (256 MiB), so CPU runs keep their speed
CPU_ESTEP_MEMORY_BYTES = 256 * MIB
#: share of the free GPU memory (measured after the iteration's reference tables are
#: built) that ``auto`` gives to one chunk's E-step; the rest absorbs what the estimate
#: does not count (allocator fragmentation, CUDA workspaces, small tensors)
GPU_MEMORY_FRACTION = 0.6
#: upper bound of the automatic GPU budget: beyond a few GiB per chunk the GEMMs are no
#: faster, and a smaller working set leaves room for the statistics and the M-step
MAX_AUTO_ESTEP_MEMORY_BYTES = 8 << 30
#: the out-of-memory back-off gives up when the halved budget falls below this
MIN_ESTEP_MEMORY_BYTES = 1 * MIB
#: working memory per particle (bytes) of the image-sized tensors of preparing a chunk
#: (raw, normalised, shifted and masked images, background noise, their transforms,
#: the CTF), per pixel of the box
PREPARE_BYTES_PER_BOX_PIXEL = 48
#: working memory per particle of the per-particle vectors of the E-step and of the
#: statistics (gathered inputs and their weighted copies), per pixel of the pixel set
ESTEP_BYTES_PER_PIXEL = 160
#: working memory per particle and significant coarse sample (dense fine-pass layouts of
#: 8 fine samples in float64, sorting, the sparse fine-pass entries)
ESTEP_BYTES_PER_SIGNIFICANT = 1100


class EStepMemoryError(CryoavgError):
    """The E-step ran out of memory even with the smallest budget."""


def parse_estep_memory_mib(value: Any) -> float | None:
    """The ``estep_memory_mib`` config value: ``None`` for ``auto``, else MiB (> 0).

    Parameters
    ----------
    value
        ``"auto"`` (or ``None``), or a positive number of MiB (int, float or numeric
        string).

    Returns
    -------
    float or None

    Raises
    ------
    ConfigError
        For anything else.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        mib = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"estep_memory_mib={value!r}: expected 'auto' or a number of MiB"
        ) from None
    if not mib > 0 or mib == float("inf"):
        raise ConfigError(f"estep_memory_mib must be 'auto' or > 0, got {value}")
    return mib


def estep_memory_budget_bytes(
    memory_mib: float | None,
    *,
    device_type: str,
    free_bytes: int | None = None,
) -> int:
    """Working-memory budget of one chunk's E-step (its ``max_chunk_bytes``).

    Parameters
    ----------
    memory_mib
        The parsed ``estep_memory_mib`` (:func:`parse_estep_memory_mib`); ``None`` =
        automatic.
    device_type
        ``"cuda"``, ``"cpu"``, ... (of the device the E-step runs on).
    free_bytes
        Free device memory (CUDA: driver-free plus PyTorch's cached, unused blocks),
        measured after the iteration's reference tables are built; ``None`` = unknown.

    Returns
    -------
    int
        Bytes. An explicit value is used as given; ``auto`` is
        :data:`GPU_MEMORY_FRACTION` of ``free_bytes`` on CUDA, clamped to
        [:data:`MIN_ESTEP_MEMORY_BYTES`, :data:`MAX_AUTO_ESTEP_MEMORY_BYTES`], and
        :data:`CPU_ESTEP_MEMORY_BYTES` elsewhere (or when ``free_bytes`` is unknown).
    """
    if memory_mib is not None:
        return max(1, int(memory_mib * MIB))
    if device_type != "cuda" or free_bytes is None:
        return CPU_ESTEP_MEMORY_BYTES
    budget = int(GPU_MEMORY_FRACTION * max(0, int(free_bytes)))
    return min(MAX_AUTO_ESTEP_MEMORY_BYTES, max(MIN_ESTEP_MEMORY_BYTES, budget))


def backed_off_budget(budget_bytes: int) -> int | None:
    """The budget after an out-of-memory error: half, or ``None`` below the floor.

    Parameters
    ----------
    budget_bytes
        The budget that ran out of memory.

    Returns
    -------
    int or None
        ``budget_bytes // 2``, or ``None`` when that is below
        :data:`MIN_ESTEP_MEMORY_BYTES` (give up).
    """
    halved = int(budget_bytes) // 2
    return halved if halved >= MIN_ESTEP_MEMORY_BYTES else None


def particles_per_pass(
    budget_bytes: int, bytes_per_particle: int, n_particles: int
) -> int:
    """Particles processed at once so that their working memory fits the budget.

    The ``n_particles`` of a chunk are split into ``ceil(n / (budget // per particle))``
    passes of equal size (at least one particle per pass).

    Parameters
    ----------
    budget_bytes
        The E-step budget.
    bytes_per_particle
        Working memory of one particle (:func:`prepare_bytes_per_particle`,
        :func:`estep_bytes_per_particle`).
    n_particles
        Particles in the chunk.

    Returns
    -------
    int
        Particles per pass, in ``[1, max(1, n_particles)]``.
    """
    n = max(1, int(n_particles))
    fit = max(1, int(budget_bytes) // max(1, int(bytes_per_particle)))
    if fit >= n:
        return n
    passes = -(-n // fit)
    return -(-n // passes)


def prepare_bytes_per_particle(box_size: int) -> int:
    """Working memory of preparing one particle's E-step inputs (bytes, estimate)."""
    return PREPARE_BYTES_PER_BOX_PIXEL * int(box_size) ** 2


def estep_bytes_per_particle(n_pixels: int, n_significant: int) -> int:
    """Working memory of one particle in the E-step and statistics (bytes, estimate).

    Parameters
    ----------
    n_pixels
        ``p``, pixels of the current image size.
    n_significant
        Significant coarse samples expected per particle (the cap ``max_significant``;
        the E-step's own chunking bounds everything that scales with the full search).
    """
    return ESTEP_BYTES_PER_PIXEL * int(n_pixels) + ESTEP_BYTES_PER_SIGNIFICANT * int(
        n_significant
    )


# --------------------------------------------------------------------------------------
# E-step GEMM precision (config key ``estep_precision``)

#: arithmetic of the coarse-search scoring GEMMs of the E-step: ``fp32`` (IEEE single
#: precision, the default), ``tf32`` (TensorFloat-32 on CUDA: operands rounded to a
#: 10-bit mantissa, fp32 accumulation; emulated by rounding on other devices) or ``bf16``
#: (bfloat16 operands, fp32 accumulation); see :mod:`cryoavg.class2d.estep` and
#: docs/scaleout.md, "Reduced precision"
ESTEP_PRECISIONS = ("fp32", "tf32", "bf16")


def parse_estep_precision(value: Any) -> str:
    """The ``estep_precision`` config value, one of :data:`ESTEP_PRECISIONS`.

    Parameters
    ----------
    value
        ``"fp32"``, ``"tf32"`` or ``"bf16"`` (case-insensitive).

    Returns
    -------
    str

    Raises
    ------
    ConfigError
        For anything else.
    """
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in ESTEP_PRECISIONS:
        raise ConfigError(
            f"estep_precision must be one of {', '.join(ESTEP_PRECISIONS)}, "
            f"got {value!r}"
        )
    return text

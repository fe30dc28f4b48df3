"""Particle simulator with ground truth: projections of a 3D map, CTF, noise and junk.

Conventions (those of :mod:`cryoavg.ops`, i.e. RELION's):

* Orientations are RELION ZYZ Euler angles ``(rot, tilt, psi)`` in degrees; the projection
  for angles ``a`` is ``P_A(x, y) = Σ_z V(Aᵀ(x, y, z))`` with ``A = euler_angles_to_matrix(a)``.
* ``origin_px`` (yx, pixels) is RELION's ``rlnOriginY/X`` divided by the pixel size: the shift
  that re-centres a particle. The simulated particle is the projection shifted by ``−origin``.
* Images are formed on a canvas twice the box size (no wrap-around of shifted or junk
  signal), multiplied by the CTF there, cropped to the box, given white Gaussian noise at the
  requested SNR (signal variance inside the particle circle over noise variance) and finally
  normalised like ``relion_preprocess``: background (outside the particle circle) mean 0, std 1.

Junk kinds: ``noise`` (no signal), ``ice`` (1–3 large soft discs, no CTF), ``carbon`` (a soft
straight edge across the image, with CTF), ``aggregate`` (2–3 overlapping projections at random
orientations), ``offcentre`` (one projection shifted by 35–48 % of the box).

Example
-------
>>> from cryoavg.simulate.particles import SimulationParameters, simulate_particles
>>> params = SimulationParameters(n_particles=100, box_size=64, pixel_size_angstrom=7.84)
>>> result = simulate_particles(volume, params)  # doctest: +SKIP
>>> result.images.shape  # doctest: +SKIP
torch.Size([100, 64, 64])
"""

import math
from dataclasses import dataclass, field

import torch

from cryoavg.errors import ConfigError
from cryoavg.ops.ctf import ctf_2d
from cryoavg.ops.fourier import dft_2d, idft_2d
from cryoavg.ops.projection import project_volume_2d
from cryoavg.ops.rotations import random_rotations
from cryoavg.ops.shifts import shift_images_2d

JUNK_TYPES: tuple[str, ...] = ("noise", "ice", "carbon", "aggregate", "offcentre")


@dataclass
class SimulationParameters:
    """What to simulate.

    Attributes
    ----------
    n_particles
        Total number of images, junk included.
    box_size
        Image size in pixels.
    pixel_size_angstrom
        Pixel size of the images (Å/px); the map must already be sampled at it.
    junk_fraction
        Fraction of the images that are junk, shared equally by ``junk_types``.
    junk_types
        Kinds of junk to mix in (subset of :data:`JUNK_TYPES`).
    snr
        Signal-to-noise ratio (variance inside the particle circle); ``None`` for no noise.
    defocus_min_um, defocus_max_um
        Range of the mean defocus (µm, underfocus positive), drawn per micrograph.
    astigmatism_max_angstrom
        Largest ``|defocusU − defocusV|`` in Å.
    voltage_kv, cs_mm, amplitude_contrast, bfactor_angstrom2
        Optics (RELION's rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast, rlnCtfBfactor).
    apply_ctf
        Multiply by the CTF (``False`` for CTF-free test data).
    shift_sigma_px
        Standard deviation of the origin offsets (px, per axis).
    particles_per_micrograph
        Inclusive range of the number of particles per micrograph name.
    seed
        Random seed; the same seed gives the same particles.
    """

    n_particles: int = 5000
    box_size: int = 64
    pixel_size_angstrom: float = 1.0
    junk_fraction: float = 0.2
    junk_types: tuple[str, ...] = JUNK_TYPES
    snr: float | None = 0.05
    defocus_min_um: float = 0.8
    defocus_max_um: float = 2.5
    astigmatism_max_angstrom: float = 500.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor_angstrom2: float = 0.0
    apply_ctf: bool = True
    shift_sigma_px: float = 2.0
    particles_per_micrograph: tuple[int, int] = (10, 50)
    seed: int = 1

    def validate(self) -> None:
        """Raise :class:`~cryoavg.errors.ConfigError` for values that make no sense."""
        checks = [
            (self.n_particles >= 1, f"n_particles must be ≥ 1, got {self.n_particles}"),
            (
                self.box_size >= 16 and self.box_size % 2 == 0,
                f"box must be an even number ≥ 16, got {self.box_size}",
            ),
            (
                self.pixel_size_angstrom > 0,
                f"pixel_size must be > 0, got {self.pixel_size_angstrom}",
            ),
            (
                0.0 <= self.junk_fraction <= 1.0,
                f"junk_fraction must be in [0, 1], got {self.junk_fraction}",
            ),
            (self.snr is None or self.snr > 0, f"snr must be > 0, got {self.snr}"),
            (
                0 < self.defocus_min_um <= self.defocus_max_um,
                f"need 0 < defocus_min_um ≤ defocus_max_um, got "
                f"{self.defocus_min_um}, {self.defocus_max_um}",
            ),
            (self.astigmatism_max_angstrom >= 0, "astigmatism must be ≥ 0"),
            (
                0.0 <= self.amplitude_contrast < 1.0,
                "amplitude_contrast must be in [0, 1)",
            ),
            (self.shift_sigma_px >= 0, "shift_sigma_px must be ≥ 0"),
            (
                1
                <= self.particles_per_micrograph[0]
                <= self.particles_per_micrograph[1],
                f"bad particles_per_micrograph {self.particles_per_micrograph}",
            ),
        ]
        unknown = sorted(set(self.junk_types) - set(JUNK_TYPES))
        checks.append(
            (not unknown, f"unknown junk types {unknown}; known: {JUNK_TYPES}")
        )
        checks.append(
            (
                self.junk_fraction == 0 or len(self.junk_types) > 0,
                "junk_fraction > 0 needs at least one junk type",
            )
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class SimulatedParticles:
    """Images and their ground truth.

    Attributes
    ----------
    images
        ``(n, N, N)`` float32 images, background-normalised.
    angles_degrees
        ``(n, 3)`` true (rot, tilt, psi); zeros for junk.
    origin_px
        ``(n, 2)`` true origin (yx px; particle = projection shifted by −origin); zeros for junk.
    defocus_u_angstrom, defocus_v_angstrom, defocus_angle_degrees
        ``(n,)`` CTF parameters written to the STAR file.
    micrograph_index
        ``(n,)`` 0-based micrograph of each particle.
    is_junk
        ``(n,)`` bool.
    junk_type
        Per-particle junk kind, ``"none"`` for real particles.
    noise_sigma
        Standard deviation of the added noise before normalisation.
    particle_radius_px
        Radius of the particle circle used for SNR and normalisation.
    """

    images: torch.Tensor
    angles_degrees: torch.Tensor
    origin_px: torch.Tensor
    defocus_u_angstrom: torch.Tensor
    defocus_v_angstrom: torch.Tensor
    defocus_angle_degrees: torch.Tensor
    micrograph_index: torch.Tensor
    is_junk: torch.Tensor
    junk_type: list[str] = field(default_factory=list)
    noise_sigma: float = 0.0
    particle_radius_px: float = 0.0

    def ctf_parameters(self, params: SimulationParameters) -> dict[str, torch.Tensor]:
        """Per-particle CTF parameters of this simulation, ``(n,)`` each.

        The keys of :func:`cryoavg.ops.ctf.ctf_2d` (as the reconstruction and
        refinement code takes them): the drawn defoci plus the optics of ``params``.
        """
        n = self.images.shape[0]
        return {
            "defocus_u_angstrom": self.defocus_u_angstrom,
            "defocus_v_angstrom": self.defocus_v_angstrom,
            "defocus_angle_degrees": self.defocus_angle_degrees,
            "voltage_kv": torch.full((n,), params.voltage_kv),
            "cs_mm": torch.full((n,), params.cs_mm),
            "amplitude_contrast": torch.full((n,), params.amplitude_contrast),
            "pixel_size_angstrom": torch.full((n,), params.pixel_size_angstrom),
            "phase_shift_degrees": torch.zeros(n),
            "bfactor_angstrom2": torch.full((n,), params.bfactor_angstrom2),
            "scale": torch.ones(n),
        }


def particle_radius_px(volume: torch.Tensor, fraction: float = 0.99) -> float:
    """Radius (px, about the box centre) of the sphere holding ``fraction`` of the density.

    Parameters
    ----------
    volume
        ``(d, d, d)`` map; its background (median of the outer shell) is subtracted and
        negative values ignored.
    fraction
        Fraction of the positive density that must lie inside the sphere.

    Returns
    -------
    float
        The radius in pixels.
    """
    size = volume.shape[-1]
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    radius = torch.sqrt(
        coords[:, None, None] ** 2
        + coords[None, :, None] ** 2
        + coords[None, None, :] ** 2
    )
    outer = radius > 0.45 * size
    background = volume[outer].median() if bool(outer.any()) else volume.new_zeros(())
    density = (volume - background).clamp_min(0).flatten()
    order = torch.argsort(radius.flatten())
    cumulative = torch.cumsum(density[order].double(), 0)
    if float(cumulative[-1]) <= 0:
        return 0.25 * size
    position = int(torch.searchsorted(cumulative, fraction * cumulative[-1]))
    return float(radius.flatten()[order][min(position, order.numel() - 1)])


def fit_volume_to_box(volume: torch.Tensor, box_size: int) -> torch.Tensor:
    """Centre-pad or centre-crop a cubic volume to ``box_size`` (centre pixel kept at N//2)."""
    size = volume.shape[-1]
    if size == box_size:
        return volume
    out = volume.new_zeros((box_size,) * 3)
    if size < box_size:
        lo = box_size // 2 - size // 2
        out[lo : lo + size, lo : lo + size, lo : lo + size] = volume
    else:
        lo = size // 2 - box_size // 2
        out = volume[lo : lo + box_size, lo : lo + box_size, lo : lo + box_size].clone()
    return out


def _embed(images: torch.Tensor, canvas: int) -> torch.Tensor:
    """Place ``(c, N, N)`` images at the centre of a ``canvas`` × ``canvas`` frame."""
    size = images.shape[-1]
    out = images.new_zeros((*images.shape[:-2], canvas, canvas))
    lo = canvas // 2 - size // 2
    out[..., lo : lo + size, lo : lo + size] = images
    return out


def _crop(images: torch.Tensor, size: int) -> torch.Tensor:
    canvas = images.shape[-1]
    lo = canvas // 2 - size // 2
    return images[..., lo : lo + size, lo : lo + size]


def _uniform(
    generator: torch.Generator, low: float, high: float, *shape: int
) -> torch.Tensor:
    return low + (high - low) * torch.rand(
        shape, generator=generator, dtype=torch.float64
    )


def _micrograph_sizes(
    n: int, lo: int, hi: int, generator: torch.Generator
) -> torch.Tensor:
    """Random micrograph sizes in [lo, hi] that add up to ``n``; returns the index of each particle."""
    sizes: list[int] = []
    total = 0
    while total < n:
        size = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        size = min(size, n - total)
        sizes.append(size)
        total += size
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def simulate_particles(
    volume: torch.Tensor,
    params: SimulationParameters,
    *,
    chunk_size: int = 256,
) -> SimulatedParticles:
    """Simulate particle images from a map, with CTF, noise, junk and ground truth.

    Parameters
    ----------
    volume
        ``(N, N, N)`` map sampled at ``params.pixel_size_angstrom`` with ``N = params.box_size``
        (see :func:`fit_volume_to_box`), indexed ``[z, y, x]``.
    params
        What to simulate; validated first.
    chunk_size
        Images formed at once (bounds memory).

    Returns
    -------
    SimulatedParticles
        Images and ground truth; identical for identical inputs and seed.
    """
    params.validate()
    size = params.box_size
    if tuple(volume.shape) != (size, size, size):
        raise ConfigError(f"map shape {tuple(volume.shape)} does not match box {size}")
    volume = volume.to(torch.float32)
    generator = torch.Generator().manual_seed(int(params.seed))
    n = params.n_particles
    canvas = 2 * size
    pixel = params.pixel_size_angstrom
    radius = min(particle_radius_px(volume), 0.5 * size - 1)

    # --- per-particle random parameters, drawn in a fixed order
    n_junk = round(params.junk_fraction * n) if params.junk_types else 0
    permutation = torch.randperm(n, generator=generator)
    is_junk = torch.zeros(n, dtype=torch.bool)
    is_junk[permutation[:n_junk]] = True
    junk_type = ["none"] * n
    kinds = (
        [params.junk_types[i % len(params.junk_types)] for i in range(n_junk)]
        if n_junk
        else []
    )
    kind_order = torch.randperm(max(n_junk, 1), generator=generator)[:n_junk]
    for slot, particle in enumerate(permutation[:n_junk].tolist()):
        junk_type[particle] = kinds[int(kind_order[slot])]
    angles = random_rotations(n, generator=generator).to(torch.float64)
    origin = (
        torch.randn((n, 2), generator=generator, dtype=torch.float64)
        * params.shift_sigma_px
    )
    micrograph = _micrograph_sizes(n, *params.particles_per_micrograph, generator)
    n_mics = int(micrograph.max()) + 1
    mic_defocus = _uniform(
        generator, params.defocus_min_um * 1e4, params.defocus_max_um * 1e4, n_mics
    )
    mic_astig = _uniform(generator, 0.0, params.astigmatism_max_angstrom, n_mics)
    mic_angle = _uniform(generator, 0.0, 180.0, n_mics)
    jitter = (
        torch.randn(n, generator=generator, dtype=torch.float64) * 50.0
    )  # Å per particle
    mean_defocus = mic_defocus[micrograph] + jitter
    defocus_u = mean_defocus + mic_astig[micrograph] / 2
    defocus_v = mean_defocus - mic_astig[micrograph] / 2
    defocus_angle = mic_angle[micrograph]
    angles[is_junk] = 0.0
    origin[is_junk] = 0.0

    # one junk "recipe" per junk particle, drawn now so results do not depend on chunking
    recipes = {
        i: _draw_junk_recipe(junk_type[i], size, radius, generator)
        for i in range(n)
        if is_junk[i]
    }

    images = torch.empty((n, size, size), dtype=torch.float32)
    uses_ctf = torch.full((n,), params.apply_ctf, dtype=torch.bool)
    for i in range(n):
        if junk_type[i] == "ice":
            uses_ctf[i] = False
    yy, xx = torch.meshgrid(
        torch.arange(canvas, dtype=torch.float32) - canvas // 2,
        torch.arange(canvas, dtype=torch.float32) - canvas // 2,
        indexing="ij",
    )
    # size junk features relative to the typical projection contrast
    signal_scale = (
        float(project_volume_2d(volume, angles.new_zeros((1, 3)).float()).std()) or 1.0
    )
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        rows = torch.arange(start, stop)
        frame = volume.new_zeros((stop - start, canvas, canvas))
        # every projected copy in this chunk (real particles, aggregates, off-centre junk)
        # is projected and shifted in one batched call
        owners, copy_angles, copy_shifts = [], [], []
        for i in rows.tolist():
            if not is_junk[i]:
                owners.append(torch.tensor([i]))
                copy_angles.append(angles[i : i + 1])
                copy_shifts.append(-origin[i : i + 1])
            elif junk_type[i] in ("aggregate", "offcentre"):
                recipe = recipes[i]
                owners.append(torch.full((len(recipe["angles"]),), i))
                copy_angles.append(recipe["angles"].to(torch.float64))
                copy_shifts.append(recipe["shifts"].to(torch.float64))
            else:
                frame[i - start] = _render_flat_junk(
                    recipes[i], canvas, signal_scale, yy, xx
                )
        if owners:
            owner = torch.cat(owners) - start
            projections = project_volume_2d(
                volume, torch.cat(copy_angles).to(torch.float32)
            )
            placed = shift_images_2d(
                _embed(projections, canvas), torch.cat(copy_shifts).to(torch.float32)
            )
            frame.index_add_(0, owner, placed)
        chunk_ctf = uses_ctf[rows]
        if bool(chunk_ctf.any()):
            ctf = ctf_2d(
                defocus_u_angstrom=defocus_u[rows].to(torch.float32),
                defocus_v_angstrom=defocus_v[rows].to(torch.float32),
                defocus_angle_degrees=defocus_angle[rows].to(torch.float32),
                voltage_kv=params.voltage_kv,
                cs_mm=params.cs_mm,
                amplitude_contrast=params.amplitude_contrast,
                bfactor_angstrom2=params.bfactor_angstrom2,
                pixel_size_angstrom=pixel,
                image_shape=(canvas, canvas),
                rfft=True,
                fftshift=False,
            )
            ctf = torch.where(chunk_ctf[:, None, None], ctf, torch.ones_like(ctf))
            frame = idft_2d(dft_2d(frame, rfft=True) * ctf, (canvas, canvas), rfft=True)
        images[start:stop] = _crop(frame, size)

    coords = torch.arange(size, dtype=torch.float32) - size // 2
    inside = (coords[:, None] ** 2 + coords[None, :] ** 2) <= radius**2
    good_all = (~is_junk).nonzero().flatten()
    if params.snr is None:
        noise_sigma = 0.0
    else:
        sample = images[good_all[:500]] if good_all.numel() else images[:500]
        signal_variance = float(sample[:, inside].var(dim=1).mean())
        noise_sigma = math.sqrt(max(signal_variance, 1e-20) / params.snr)
        noise = torch.randn(images.shape, generator=generator, dtype=torch.float32)
        images = images + noise_sigma * noise
    background = images[:, ~inside]
    mean = background.mean(dim=1)
    std = background.std(dim=1)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    if params.snr is not None:
        images = (images - mean[:, None, None]) / std[:, None, None]
    return SimulatedParticles(
        images=images.contiguous(),
        angles_degrees=angles.to(torch.float32),
        origin_px=origin.to(torch.float32),
        defocus_u_angstrom=defocus_u.to(torch.float32),
        defocus_v_angstrom=defocus_v.to(torch.float32),
        defocus_angle_degrees=defocus_angle.to(torch.float32),
        micrograph_index=micrograph,
        is_junk=is_junk,
        junk_type=junk_type,
        noise_sigma=noise_sigma,
        particle_radius_px=radius,
    )


def _draw_junk_recipe(
    kind: str, size: int, radius: float, generator: torch.Generator
) -> dict[str, object]:
    """Random parameters of one junk image (drawn up front for chunk-independent results)."""
    if kind == "noise":
        return {"kind": kind}
    if kind == "ice":
        n_discs = int(torch.randint(1, 4, (1,), generator=generator))
        return {
            "kind": kind,
            "centres": _uniform(generator, -0.5 * size, 0.5 * size, n_discs, 2),
            "radii": _uniform(generator, 0.2 * size, 0.5 * size, n_discs),
            "edges": _uniform(generator, 1.5, 4.0, n_discs),
            "amplitudes": (torch.randint(0, 2, (n_discs,), generator=generator) * 2 - 1)
            * _uniform(generator, 1.0, 3.0, n_discs),
        }
    if kind == "carbon":
        return {
            "kind": kind,
            "angle": float(_uniform(generator, 0.0, 2 * math.pi, 1)),
            "offset": float(_uniform(generator, -0.3 * size, 0.3 * size, 1)),
            "edge": float(_uniform(generator, 1.0, 3.0, 1)),
            "amplitude": float(_uniform(generator, 4.0, 10.0, 1)),
        }
    if kind == "aggregate":
        n_copies = int(torch.randint(2, 4, (1,), generator=generator))
        direction = _uniform(generator, 0.0, 2 * math.pi, n_copies)
        distance = _uniform(generator, 0.35, 0.7, n_copies) * 2 * radius
        distance[0] *= float(_uniform(generator, 0.0, 0.5, 1))
        return {
            "kind": kind,
            "angles": random_rotations(n_copies, generator=generator),
            "shifts": torch.stack(
                [distance * torch.sin(direction), distance * torch.cos(direction)], 1
            ),
        }
    if kind == "offcentre":
        direction = float(_uniform(generator, 0.0, 2 * math.pi, 1))
        distance = float(_uniform(generator, 0.35, 0.48, 1)) * size
        return {
            "kind": kind,
            "angles": random_rotations(1, generator=generator),
            "shifts": torch.tensor(
                [[distance * math.sin(direction), distance * math.cos(direction)]]
            ),
        }
    raise ConfigError(f"unknown junk type {kind!r}")


def _render_flat_junk(
    recipe: dict[str, object],
    canvas: int,
    signal_scale: float,
    yy: torch.Tensor,
    xx: torch.Tensor,
) -> torch.Tensor:
    """Noise-free signal of a junk image that needs no projection, ``(canvas, canvas)``."""
    kind = recipe["kind"]
    image = yy.new_zeros((canvas, canvas))
    if kind == "ice":
        for centre, disc_radius, edge, amplitude in zip(
            recipe["centres"],
            recipe["radii"],
            recipe["edges"],
            recipe["amplitudes"],
            strict=True,
        ):
            distance = torch.sqrt(
                (yy - float(centre[0])) ** 2 + (xx - float(centre[1])) ** 2
            )
            image += (
                float(amplitude)
                * signal_scale
                * 0.5
                * (1 - torch.tanh((distance - float(disc_radius)) / float(edge)))
            )
    elif kind == "carbon":
        along = math.cos(recipe["angle"]) * xx + math.sin(recipe["angle"]) * yy
        image = (
            recipe["amplitude"]
            * signal_scale
            * 0.5
            * (1 + torch.tanh((along - recipe["offset"]) / recipe["edge"]))
        )
    return image

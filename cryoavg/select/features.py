"""Hand-crafted features of 2D class averages for the class ranker (RELION §C.2 in spirit).

Everything here is a pure function of tensors / arrays (no I/O). The pipeline for one class
average of box ``N`` at pixel size ``p`` Å/px and particle diameter ``D`` Å:

1. **Resampling** to a uniform 4 Å/px by Fourier cropping / zero padding
   (:func:`resample_to_pixel_size`); the new box is ``round(N p / 4)`` made even.
2. **Normalisation** (our choice, documented here): the 4 Å image is shifted and scaled so
   that the pixels inside the particle circle have mean 0 and standard deviation 1
   (:func:`normalise_in_disc`). This makes every image feature independent of the arbitrary
   intensity scale of a class average (simulated, RELION-normalised or a bare real stack).
   The scale that was removed is kept, relative to the other classes of the same job, as the
   ``relative_contrast`` feature (:func:`job_relative_contrast`).
3. **Circle** of radius ``R = min(D / (2·4 Å), box / 2)``.
4. **Ring / low-pass / protein / solvent statistics**, **flood-fill masks** (4-connected
   islands of the 25 Å low-passed image above ``0.05·std``; an island seeded within ``0.6 R``
   is *protein* when more than ``0.1·π·(0.6 R)²`` of its pixels lie within ``0.6 R``, otherwise
   its pixels are *scattered*), **edge signal**, **relative signal intensity** and
   **granulometry** (grey opening with discs of radius 1…6 px, mean over the circle).
5. **Model features** (class distribution, particle counts, resolution, accuracies) with an
   explicit missing-indicator per group; missing values are filled with 0.

The 64×64 image for the CNN (:func:`cnn_window`) is the original-pixel-size image windowed
to a square of side ``ceil(D / p) + 1`` (made even) around the centre, Fourier-resized to
64×64 and normalised to mean 0 and standard deviation 1.
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from cryoavg.ops.fourier import lowpass_filter, resize_fourier_2d

#: uniform pixel size (Å/px) of the images the features are computed on
FEATURE_PIXEL_SIZE_ANGSTROM = 4.0
#: low-pass resolution (Å) used for the masks and the low-pass statistics
LOWPASS_ANGSTROM = 25.0
#: size of the CNN input image
CNN_SIZE = 64
#: radius ratio of the ring used for the ring moments
RING_RATIO = 0.95
#: accuracies above this are "unknown" (RELION writes 999)
ACCURACY_UNKNOWN = 99.0

IMAGE_FEATURES: tuple[str, ...] = (
    "ring_mean",
    "ring_std",
    "ring_skew",
    "ring_kurt",
    "lowpass_mean",
    "lowpass_std",
    "lowpass_min",
    "lowpass_max",
    "protein_mean",
    "protein_std",
    "protein_skew",
    "protein_kurt",
    "solvent_mean",
    "solvent_std",
    "solvent_skew",
    "solvent_kurt",
    "protein_fraction",
    "scattered_signal",
    "edge_signal",
    "relative_signal_intensity",
    "centre_offset",
    "granulo_1",
    "granulo_2",
    "granulo_3",
    "granulo_4",
    "granulo_5",
    "granulo_6",
)

#: model-derived feature groups: name -> (value names, missing-indicator name)
MODEL_GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "job": (("relative_contrast",), "job_missing"),
    "distribution": (("log_relative_distribution",), "distribution_missing"),
    "count": (("log10_particles",), "count_missing"),
    "resolution": (("nyquist_resolution", "relative_resolution"), "resolution_missing"),
    "accuracy": (
        ("log_accuracy_rotation", "log_accuracy_translation_px"),
        "accuracy_missing",
    ),
}


def feature_names() -> list[str]:
    """Names of the feature columns returned by :func:`compute_features`."""
    names = list(IMAGE_FEATURES)
    for values, missing in MODEL_GROUPS.values():
        names.extend(values)
        names.append(missing)
    return names


def group_columns() -> dict[str, list[int]]:
    """Column indices of each model feature group (values and indicator)."""
    names = feature_names()
    return {
        group: [names.index(n) for n in (*values, missing)]
        for group, (values, missing) in MODEL_GROUPS.items()
    }


def square_images(images: torch.Tensor) -> torch.Tensor:
    """Centre-crop ``(k, h, w)`` images to a square of side ``min(h, w)``."""
    h, w = images.shape[-2:]
    n = min(h, w)
    y0, x0 = (h - n) // 2, (w - n) // 2
    return images[..., y0 : y0 + n, x0 : x0 + n]


def resample_to_pixel_size(
    images: torch.Tensor,
    pixel_size_angstrom: float,
    target_pixel_size_angstrom: float = FEATURE_PIXEL_SIZE_ANGSTROM,
) -> torch.Tensor:
    """Fourier-resample square images to ``target_pixel_size_angstrom``.

    Parameters
    ----------
    images
        ``(k, N, N)`` images at ``pixel_size_angstrom``.
    pixel_size_angstrom, target_pixel_size_angstrom
        Current and wanted pixel sizes (Å/px).

    Returns
    -------
    torch.Tensor
        ``(k, M, M)`` with ``M = round(N p / target)`` made even (at least 8); the physical
        extent of the box is kept.
    """
    size = images.shape[-1]
    new_size = round(size * pixel_size_angstrom / target_pixel_size_angstrom)
    new_size = max(8, new_size + (new_size % 2))
    return resize_fourier_2d(images.to(torch.float64), new_size).to(torch.float32)


def radius_grid(size: int) -> np.ndarray:
    """``(size, size)`` distance (px) of each pixel from the centre ``size // 2``."""
    c = np.arange(size) - size // 2
    return np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)


def normalise_in_disc(image: np.ndarray, radius_px: float) -> np.ndarray:
    """Shift/scale ``image`` so that pixels within ``radius_px`` have mean 0 and std 1."""
    inside = radius_grid(image.shape[-1]) <= radius_px
    values = image[inside]
    std = float(values.std())
    if not np.isfinite(std) or std < 1e-12:
        return np.zeros_like(image)
    return (image - float(values.mean())) / std


def moments(values: np.ndarray) -> tuple[float, float, float, float]:
    """Mean, population std, skewness and kurtosis (RELION's formulas); zeros if empty."""
    n = values.size
    if n == 0:
        return 0.0, 0.0, 0.0, 0.0
    values = values.astype(np.float64)
    mean = float(values.mean())
    d = values - mean
    s2 = float((d**2).sum())
    std = math.sqrt(s2 / n)
    if s2 < 1e-20:
        return mean, std, 0.0, 0.0
    skew = float((d**3).sum()) * math.sqrt(n) / s2**1.5
    kurt = n * float((d**4).sum()) / s2**2
    return mean, std, skew, kurt


def protein_solvent_masks(
    lowpassed: np.ndarray, radius_px: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Flood-fill protein mask, solvent mask and the number of scattered pixels.

    Parameters
    ----------
    lowpassed
        ``(M, M)`` low-passed, normalised image.
    radius_px
        Circle radius ``R``.

    Returns
    -------
    protein, solvent : np.ndarray
        ``(M, M)`` bool masks; solvent = circle minus protein.
    n_scattered : int
        Pixels of islands seeded within ``0.6 R`` that are too small to be protein.
    """
    r = radius_grid(lowpassed.shape[-1])
    disc = r <= radius_px
    inner = r <= 0.6 * radius_px
    threshold = 0.05 * float(lowpassed.std())
    above = (lowpassed > threshold) & disc
    labels, n_labels = ndimage.label(above)  # 4-connected by default
    protein = np.zeros_like(disc)
    n_scattered = 0
    if n_labels:
        inner_counts = np.bincount(labels[inner].ravel(), minlength=n_labels + 1)
        all_counts = np.bincount(labels.ravel(), minlength=n_labels + 1)
        min_inner = 0.1 * math.pi * 0.36 * radius_px**2
        for label in range(1, n_labels + 1):
            if inner_counts[label] == 0:
                continue  # never seeded from the centre region
            if inner_counts[label] > min_inner:
                protein |= labels == label
            else:
                n_scattered += int(all_counts[label])
    solvent = disc & ~protein
    return protein, solvent, n_scattered


def disc_footprint(radius_px: int) -> np.ndarray:
    """Boolean disc structuring element of the given radius."""
    c = np.arange(-radius_px, radius_px + 1)
    return (c[:, None] ** 2 + c[None, :] ** 2) <= radius_px**2


def granulometry(
    image: np.ndarray, disc: np.ndarray, radii: Sequence[int] = range(1, 7)
) -> list[float]:
    """Mean over ``disc`` of the grey opening of ``image`` with discs of each radius."""
    area = max(int(disc.sum()), 1)
    out = []
    for radius in radii:
        opened = ndimage.grey_opening(
            image, footprint=disc_footprint(int(radius)), mode="nearest"
        )
        out.append(float(opened[disc].sum()) / area)
    return out


def image_features(
    image_4a: np.ndarray, radius_px: float, lowpassed: np.ndarray
) -> np.ndarray:
    """The :data:`IMAGE_FEATURES` of one normalised 4 Å/px image.

    Parameters
    ----------
    image_4a
        ``(M, M)`` normalised image (see :func:`normalise_in_disc`).
    radius_px
        Circle radius ``R`` (px at 4 Å/px).
    lowpassed
        ``(M, M)`` the same image low-passed at 25 Å.

    Returns
    -------
    np.ndarray
        ``(len(IMAGE_FEATURES),)`` float64.
    """
    r = radius_grid(image_4a.shape[-1])
    disc = r <= radius_px
    ring = (r >= RING_RATIO * radius_px) & disc
    if not ring.any():
        ring = np.abs(r - radius_px) <= 1.0
    ring_m = moments(image_4a[ring])
    lp = lowpassed[disc]
    lp_stats = (float(lp.mean()), float(lp.std()), float(lp.min()), float(lp.max()))
    protein, solvent, n_scattered = protein_solvent_masks(lowpassed, radius_px)
    n_protein = int(protein.sum())
    protein_m = moments(image_4a[protein])
    solvent_m = moments(image_4a[solvent])
    area = max(int(disc.sum()), 1)
    protein_fraction = n_protein / area
    scattered = n_scattered / (n_scattered + n_protein + 1)
    edge = np.round(r) == round(radius_px)
    edge_signal = float(protein[edge].mean()) if edge.any() else 0.0
    relative_signal = (float(image_4a[protein].sum()) - solvent_m[0] * n_protein) / area
    # centre of mass of the positive low-passed density, relative to R
    positive = np.clip(lowpassed, 0.0, None) * disc
    total = float(positive.sum())
    if total > 1e-12:
        c = np.arange(image_4a.shape[-1]) - image_4a.shape[-1] // 2
        cy = float((positive.sum(1) * c).sum()) / total
        cx = float((positive.sum(0) * c).sum()) / total
        centre_offset = math.hypot(cy, cx) / max(radius_px, 1.0)
    else:
        centre_offset = 1.0
    granulo = granulometry(image_4a, disc)
    return np.array(
        [
            *ring_m,
            *lp_stats,
            *protein_m,
            *solvent_m,
            protein_fraction,
            scattered,
            edge_signal,
            relative_signal,
            centre_offset,
            *granulo,
        ],
        dtype=np.float64,
    )


def cnn_window(
    images: torch.Tensor, pixel_size_angstrom: float, diameter_angstrom: float
) -> torch.Tensor:
    """64×64 CNN input: window of side ``ceil(D / p) + 1`` (even), resized, normalised.

    Parameters
    ----------
    images
        ``(k, N, N)`` class averages at the original pixel size.
    pixel_size_angstrom
        Their pixel size (Å/px).
    diameter_angstrom
        Particle diameter ``D`` (Å).

    Returns
    -------
    torch.Tensor
        ``(k, 64, 64)`` float32, each image mean 0 and std 1 (zeros if constant).
    """
    size = images.shape[-1]
    side = math.ceil(diameter_angstrom / pixel_size_angstrom) + 1
    side += side % 2
    x = images.to(torch.float64)
    if side < size:
        start = size // 2 - side // 2
        x = x[..., start : start + side, start : start + side]
    elif side > size:
        pad = side - size
        before = pad // 2
        x = torch.nn.functional.pad(x, (before, pad - before, before, pad - before))
    x = resize_fourier_2d(x, CNN_SIZE)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True)
    x = torch.where(std > 1e-12, (x - mean) / std.clamp_min(1e-12), torch.zeros_like(x))
    return x.to(torch.float32)


def job_relative_contrast(images: torch.Tensor, radius_px: float) -> np.ndarray:
    """Std inside the circle of each image over the median of the job (``(k,)``).

    Parameters
    ----------
    images
        ``(k, M, M)`` class averages (4 Å/px, before normalisation).
    radius_px
        Circle radius.
    """
    disc = torch.from_numpy(radius_grid(images.shape[-1]) <= radius_px)
    std = images[:, disc].to(torch.float64).std(dim=-1).numpy()
    median = float(np.median(std))
    if median < 1e-20:
        return np.zeros_like(std)
    return std / median


def _optional(values, k: int, name: str) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.shape[0] != k:
        raise ValueError(f"{name} must have {k} values, got {arr.shape[0]}")
    return arr


def model_features(
    k: int,
    *,
    box_size: int,
    pixel_size_angstrom: float,
    relative_contrast: np.ndarray | None,
    class_distribution=None,
    n_particles=None,
    accuracy_rotation_deg=None,
    accuracy_translation_angst=None,
    resolution_angstrom=None,
) -> np.ndarray:
    """``(k, n_model)`` model-derived features with missing indicators (fill value 0).

    Per-class groups (see :data:`MODEL_GROUPS`): job-relative contrast; the class
    distribution as ``log(k π)`` (π from ``n_particles`` if only counts are given);
    ``log10(1 + n)`` particle counts; resolution as ``2p / res`` (0 for ``inf``) and
    ``min(res / (N p), 1)``; accuracies as ``log(1 + rot°)`` and ``log(1 + trans / p)``.
    An accuracy > 99 (RELION's 999 "unknown") or non-finite marks the group missing for
    that class.
    """
    dist = _optional(class_distribution, k, "class_distribution")
    counts = _optional(n_particles, k, "n_particles")
    rot = _optional(accuracy_rotation_deg, k, "accuracy_rotation_deg")
    trans = _optional(accuracy_translation_angst, k, "accuracy_translation_angst")
    res = _optional(resolution_angstrom, k, "resolution_angstrom")
    if dist is None and counts is not None and counts.sum() > 0:
        dist = counts / counts.sum()
    columns: list[np.ndarray] = []

    def group(values: list[np.ndarray], valid: np.ndarray | None = None) -> None:
        ok = np.ones(k, dtype=bool) if valid is None else valid
        for v in values:
            columns.append(np.where(ok, np.nan_to_num(v), 0.0))
        columns.append((~ok).astype(np.float64))

    def missing(n_values: int) -> None:
        columns.extend([np.zeros(k)] * n_values)
        columns.append(np.ones(k))

    if relative_contrast is None or k < 3:
        missing(1)
    else:
        group([np.log(np.clip(relative_contrast, 1e-3, None))])
    if dist is None:
        missing(1)
    else:
        group([np.log(np.clip(dist * k, 1e-4, None))])
    if counts is None:
        missing(1)
    else:
        group([np.log10(1.0 + np.clip(counts, 0, None))])
    if res is None:
        missing(2)
    else:
        finite = np.isfinite(res) & (res > 0)
        safe = np.where(finite, res, 1.0)
        nyquist = np.where(finite, np.clip(2 * pixel_size_angstrom / safe, 0, 1), 0.0)
        relative = np.where(
            finite, np.clip(safe / (box_size * pixel_size_angstrom), 0, 1), 1.0
        )
        group([nyquist, relative])
    if rot is None or trans is None:
        missing(2)
    else:
        valid = (
            np.isfinite(rot)
            & np.isfinite(trans)
            & (rot <= ACCURACY_UNKNOWN)
            & (trans <= ACCURACY_UNKNOWN)
            & (rot >= 0)
            & (trans >= 0)
        )
        group(
            [
                np.log1p(np.where(valid, rot, 0.0)),
                np.log1p(np.where(valid, trans, 0.0) / pixel_size_angstrom),
            ],
            valid,
        )
    return np.stack(columns, axis=1)


#: the widest class image that is ranked (Å): 1024 px at 4 Å/px
MAX_BOX_ANGSTROM = 4096.0
#: the largest particle diameter, in box widths (the CNN window is padded beyond the box)
MAX_DIAMETER_BOXES = 4.0


def _check_geometry(size: int, pixel_size_angstrom: float, diameter: float) -> None:
    """Refuse images and diameters that cannot be ranked (ValueError, one line).

    The features need a particle disc of at least one pixel radius at 4 Å/px (a
    diameter of 8 Å); the 4 Å/px images and the CNN window are bounded so that an
    absurd pixel size or diameter cannot ask for gigabytes.
    """
    box = size * pixel_size_angstrom
    if not (math.isfinite(diameter) and diameter >= 2 * FEATURE_PIXEL_SIZE_ANGSTROM):
        raise ValueError(
            f"particle diameter {diameter:g} Å is below "
            f"{2 * FEATURE_PIXEL_SIZE_ANGSTROM:g} Å (2 pixels at "
            f"{FEATURE_PIXEL_SIZE_ANGSTROM:g} Å/px; {size} px of "
            f"{pixel_size_angstrom:g} Å)"
        )
    if not box <= MAX_BOX_ANGSTROM:
        raise ValueError(
            f"class images of {size} px at {pixel_size_angstrom:g} Å/px are {box:g} Å "
            f"wide; at most {MAX_BOX_ANGSTROM:g} Å can be ranked"
        )
    if not diameter <= MAX_DIAMETER_BOXES * box:
        raise ValueError(
            f"particle diameter {diameter:g} Å is more than {MAX_DIAMETER_BOXES:g} "
            f"times the box ({size} px of {pixel_size_angstrom:g} Å)"
        )


def compute_features(
    images: torch.Tensor,
    *,
    pixel_size_angstrom: float,
    particle_diameter_angstrom: float | None = None,
    class_distribution=None,
    n_particles=None,
    accuracy_rotation_deg=None,
    accuracy_translation_angst=None,
    resolution_angstrom=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features and CNN images of ``k`` class averages.

    Parameters
    ----------
    images
        ``(k, h, w)`` class averages (centre-cropped to a square if ``h != w``).
    pixel_size_angstrom
        Pixel size (Å/px).
    particle_diameter_angstrom
        Particle (mask) diameter ``D``; ``None`` = ``(N − 5 px)·p`` as Class2D's default.
    class_distribution, n_particles, accuracy_rotation_deg, accuracy_translation_angst, resolution_angstrom
        Optional ``(k,)`` per-class model values (see :func:`model_features`).

    Returns
    -------
    features : np.ndarray
        ``(k, F)`` float32 in the order of :func:`feature_names`.
    images64 : np.ndarray
        ``(k, 64, 64)`` float32 CNN inputs.

    Raises
    ------
    ValueError
        A particle diameter under 8 Å (or over 4 box widths), or images wider than
        :data:`MAX_BOX_ANGSTROM`.
    """
    if images.ndim == 2:
        images = images[None]
    images = square_images(images.detach().cpu().to(torch.float32))
    k, size = images.shape[0], images.shape[-1]
    p = float(pixel_size_angstrom)
    diameter = (
        float(particle_diameter_angstrom)
        if particle_diameter_angstrom is not None and particle_diameter_angstrom > 0
        else (size - 5) * p
    )
    _check_geometry(size, p, diameter)
    images = torch.nan_to_num(images)
    img4 = resample_to_pixel_size(images, p)
    m = img4.shape[-1]
    radius = min(diameter / (2 * FEATURE_PIXEL_SIZE_ANGSTROM), m / 2)
    contrast = job_relative_contrast(img4, radius)
    normalised = np.stack(
        [normalise_in_disc(img.numpy().astype(np.float64), radius) for img in img4]
    )
    lowpassed = lowpass_filter(
        torch.from_numpy(normalised), LOWPASS_ANGSTROM, FEATURE_PIXEL_SIZE_ANGSTROM
    ).numpy()
    image_feats = np.stack(
        [image_features(normalised[i], radius, lowpassed[i]) for i in range(k)]
    )
    model_feats = model_features(
        k,
        box_size=size,
        pixel_size_angstrom=p,
        relative_contrast=contrast,
        class_distribution=class_distribution,
        n_particles=n_particles,
        accuracy_rotation_deg=accuracy_rotation_deg,
        accuracy_translation_angst=accuracy_translation_angst,
        resolution_angstrom=resolution_angstrom,
    )
    features = np.concatenate([image_feats, model_feats], axis=1).astype(np.float32)
    images64 = cnn_window(images, p, diameter).numpy()
    return features, images64

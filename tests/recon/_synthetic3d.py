"""Small synthetic 3D test data: an asymmetric map of Gaussian blobs and its particles."""

import numpy as np
import torch

from cryoavg.ops.projection import project_volume_2d
from cryoavg.ops.rotations import random_rotations
from cryoavg.ops.shifts import shift_images_2d


def blob_map(box: int = 32, n_blobs: int = 8, sigma_px: float = 1.5, seed: int = 0):
    """``(box, box, box)`` asymmetric map: Gaussian blobs around the centre."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.arange(box, dtype=torch.float32) - box // 2
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    volume = torch.zeros((box,) * 3)
    centres = torch.randn(n_blobs, 3, generator=generator) * (box / 9)
    for x, y, z in centres:
        r2 = (xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2
        volume += torch.exp(-r2 / (2 * sigma_px**2))
    return volume


def particles(volume, n: int, *, noise_sigma: float, seed: int = 1, max_shift: int = 2):
    """Projections at random poses, shifted by −origin, plus white noise.

    Returns
    -------
    images, angles_degrees (n, 3), origins_px (n, 2) yx
    """
    generator = torch.Generator().manual_seed(seed)
    angles = random_rotations(n, generator, dtype=torch.float64)
    images = project_volume_2d(volume, angles)
    origins = torch.randint(
        -max_shift, max_shift + 1, (n, 2), generator=generator
    ).double()
    images = shift_images_2d(images, -origins)
    images = images + noise_sigma * torch.randn(images.shape, generator=generator)
    return images.float(), angles, origins


def in_memory_data(
    images: torch.Tensor,
    *,
    pixel_size_angstrom: float,
    halves=None,
    ctf_parameters=None,
):
    """``RefineData`` over images held in memory ``(n, box, box)``, one optics group.

    ``halves`` defaults to alternating 1, 2, 1, … (``rlnRandomSubset``).
    """
    from cryoavg.recon.refine import RefineData

    n, box = images.shape[0], images.shape[-1]
    if halves is None:
        halves = np.where(np.arange(n) % 2 == 0, 1, 2)
    return RefineData(
        read_images=lambda idx: images[torch.as_tensor(np.asarray(idx))],
        n_particles=n,
        box_size=box,
        pixel_size_angstrom=pixel_size_angstrom,
        halves=torch.as_tensor(halves),
        optics_group=torch.zeros(n, dtype=torch.long),
        group=torch.zeros(n, dtype=torch.long),
        ctf_parameters=ctf_parameters,
    )


def oracle_estep_batch(images, data, pixel_set, *, ctf_parameters=None, mask_edge_px):
    """E-step batch of all ``images`` of ``data`` before any alignment.

    Zero offsets, unit norm and scale, the initial noise spectrum of ``data``; the CTF
    of ``ctf_parameters`` (``None``: no CTF).
    """
    from cryoavg.class2d.preprocess import ctf_images, prepare_estep_batch
    from cryoavg.recon.refine import initial_noise_spectrum

    n, box = images.shape[0], images.shape[-1]
    return prepare_estep_batch(
        images,
        index=torch.arange(n),
        optics_group=data.optics_group,
        group=data.group,
        offset_px=torch.zeros(n, 2),
        norm_correction=torch.ones(n),
        ctf=None if ctf_parameters is None else ctf_images(ctf_parameters, box),
        sigma2_noise=initial_noise_spectrum(data),
        scale=torch.ones(1),
        avg_norm=1.0,
        pixel_set=pixel_set,
        mask_radius_px=box / 2 - 2,
        mask_edge_px=mask_edge_px,
        zero_mask=True,
        do_norm=False,
    )

"""cryoavg.recon: 3D reconstruction from particles with known poses.

Public API (stable; shapes and units in each docstring):

* :func:`insert_particles` / :class:`BackprojectionAccumulator`: CTF-weighted central
  slices into a padded 3D Fourier grid (``backproject``).
* :func:`wiener_reconstruct`: map from the accumulated grids, FSC-based Wiener term,
  gridding correction (``reconstruct``).
* :func:`fourier_shell_correlation`, :func:`resolution_at`, :func:`fsc_to_ssnr` (``fsc``).
* :func:`particle_poses`, :func:`half_sets` (``halves``).
"""

from cryoavg.recon.backproject import (
    BackprojectionAccumulator,
    ctf_for_images,
    empty_accumulators,
    insert_particles,
    padded_size,
)
from cryoavg.recon.fsc import (
    fourier_shell_correlation,
    fsc_to_ssnr,
    resolution_at,
    shell_resolution_angstrom,
)
from cryoavg.recon.halves import assign_random_halves, half_sets, particle_poses
from cryoavg.recon.reconstruct import (
    GoldStandardResult,
    ReconstructionSettings,
    reconstruct_gold_standard,
    soft_sphere_mask,
    wiener_reconstruct,
)

__all__ = [
    "BackprojectionAccumulator",
    "GoldStandardResult",
    "ReconstructionSettings",
    "assign_random_halves",
    "ctf_for_images",
    "empty_accumulators",
    "fourier_shell_correlation",
    "fsc_to_ssnr",
    "half_sets",
    "insert_particles",
    "padded_size",
    "particle_poses",
    "reconstruct_gold_standard",
    "resolution_at",
    "shell_resolution_angstrom",
    "soft_sphere_mask",
    "wiener_reconstruct",
]

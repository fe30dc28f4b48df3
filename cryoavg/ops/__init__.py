"""Stateless, batched, differentiable tensor operations in RELION's conventions.

No I/O, Hydra or Lightning here. Each module's docstring states the conventions it owns:

* :mod:`~cryoavg.ops.fourier`: RELION-normalised DFTs about the origin ``N // 2``,
  frequency grids, radial shells, FRC/FSC, low-pass filter, Fourier resizing.
* :mod:`~cryoavg.ops.ctf`: RELION's CTF.
* :mod:`~cryoavg.ops.rotations`: RELION ZYZ Euler matrices (xyz column vectors),
  in-plane ``Rz``, axis-angle / quaternion / 6D conversions.
* :mod:`~cryoavg.ops.shifts`: Fourier and integer translations (``yx`` / ``zyx``
  pixels), RELION's translation grid.
* :mod:`~cryoavg.ops.transforms`: ``grid_sample`` rotations of images and volumes
  (local-symmetry operators), rotations in Fourier space.
* :mod:`~cryoavg.ops.masks`: soft masks, background replacement, centres of mass.
* :mod:`~cryoavg.ops.projection`: projection / back-projection along RELION
  orientations.
* :mod:`~cryoavg.ops.indexing`: row gathers and scatter-adds that stay fast for complex
  tensors on a CPU.
"""

from cryoavg.ops.ctf import apply_ctf_2d, ctf_1d, ctf_2d, electron_wavelength_angstrom
from cryoavg.ops.fourier import (
    dft_2d,
    dft_3d,
    fftfreq_grid,
    fourier_ring_correlation,
    fourier_shell_correlation,
    idft_2d,
    idft_3d,
    lowpass_filter,
    lowpass_weights,
    power_spectrum_1d,
    resize_fourier_2d,
    resize_fourier_3d,
    resolution_at_threshold,
    shell_average,
    shell_index,
    shell_pixel_counts,
    shell_sum,
)
from cryoavg.ops.masks import (
    center_of_mass_2d,
    center_of_mass_3d,
    circular_mask_2d,
    soft_mask_outside_2d,
    soft_mask_outside_3d,
    spherical_mask_3d,
)
from cryoavg.ops.projection import (
    backproject_2d_to_3d,
    extract_central_slices_rfft_3d,
    insert_central_slices_rfft_3d,
    project_volume_2d,
    project_volume_rfft_2d,
)
from cryoavg.ops.rotations import (
    axis_angle_to_matrix,
    euler_angles_to_matrix,
    matrix_to_axis_angle,
    matrix_to_euler_angles,
    matrix_to_quaternion,
    matrix_to_rotation_6d,
    quaternion_to_matrix,
    random_rotations,
    rotation_6d_to_matrix,
    rotation_angle_degrees,
    rotation_matrix_2d,
    xyz_to_zyx_matrices,
)
from cryoavg.ops.shifts import (
    integer_shift_2d,
    phase_shift_dft_2d,
    phase_shift_dft_3d,
    shift_images_2d,
    shift_volumes_3d,
    translation_grid_2d,
)
from cryoavg.ops.transforms import (
    insert_rotated_dft_2d,
    padded_dft_2d,
    rotate_dft_2d,
    rotate_images_2d,
    sample_rotated_dft_2d,
    transform_images_2d,
    transform_volumes_3d,
)

__all__ = [
    "apply_ctf_2d",
    "axis_angle_to_matrix",
    "backproject_2d_to_3d",
    "center_of_mass_2d",
    "center_of_mass_3d",
    "circular_mask_2d",
    "ctf_1d",
    "ctf_2d",
    "dft_2d",
    "dft_3d",
    "electron_wavelength_angstrom",
    "euler_angles_to_matrix",
    "extract_central_slices_rfft_3d",
    "fftfreq_grid",
    "fourier_ring_correlation",
    "fourier_shell_correlation",
    "idft_2d",
    "idft_3d",
    "insert_central_slices_rfft_3d",
    "insert_rotated_dft_2d",
    "integer_shift_2d",
    "lowpass_filter",
    "lowpass_weights",
    "matrix_to_axis_angle",
    "matrix_to_euler_angles",
    "matrix_to_quaternion",
    "matrix_to_rotation_6d",
    "padded_dft_2d",
    "phase_shift_dft_2d",
    "phase_shift_dft_3d",
    "power_spectrum_1d",
    "project_volume_2d",
    "project_volume_rfft_2d",
    "quaternion_to_matrix",
    "random_rotations",
    "resize_fourier_2d",
    "resize_fourier_3d",
    "resolution_at_threshold",
    "rotate_dft_2d",
    "rotate_images_2d",
    "rotation_6d_to_matrix",
    "rotation_angle_degrees",
    "rotation_matrix_2d",
    "sample_rotated_dft_2d",
    "shell_average",
    "shell_index",
    "shell_pixel_counts",
    "shell_sum",
    "shift_images_2d",
    "shift_volumes_3d",
    "soft_mask_outside_2d",
    "soft_mask_outside_3d",
    "spherical_mask_3d",
    "transform_images_2d",
    "transform_volumes_3d",
    "translation_grid_2d",
    "xyz_to_zyx_matrices",
]

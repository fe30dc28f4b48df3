"""3D refinement: slice insertion round trip, gold-standard iterations, local symmetry."""

import numpy as np
import pytest
import torch

from cryoavg.class2d.sampling import PixelSet
from cryoavg.recon.backproject import empty_accumulators
from cryoavg.recon.estep3d import SliceProjector
from cryoavg.recon.fsc import fourier_shell_correlation
from cryoavg.recon.orientations import OrientationGrid
from cryoavg.recon.reconstruct import wiener_reconstruct
from cryoavg.recon.refine import (
    LocalSymmetry,
    RefineSettings,
    initial_state,
    insert_slices,
    refine_iteration,
)
from tests.recon._synthetic3d import blob_map, in_memory_data, particles

BOX = 32


def test_insert_slices_round_trip():
    volume = blob_map(BOX, sigma_px=1.2)
    pixel_set = PixelSet.for_size(BOX, BOX)
    grid = OrientationGrid.uniform(20.0)
    rows = SliceProjector(volume)(grid.angles_degrees, pixel_set)
    data, weights = empty_accumulators(BOX, 2.0)
    insert_slices(
        rows, torch.ones(rows.shape), grid.angles_degrees, pixel_set, data, weights
    )
    rebuilt = wiener_reconstruct(data, weights, BOX)
    assert float((rebuilt - volume).norm() / volume.norm()) < 0.06
    fsc = fourier_shell_correlation(rebuilt, volume)
    assert float(fsc[1 : BOX // 2 - 2].min()) > 0.98
    # two insertions add up (the kx = 0 plane is made Hermitian per call)
    data2, weights2 = empty_accumulators(BOX, 2.0)
    half = rows.shape[0] // 2
    insert_slices(
        rows[:half],
        torch.ones(half, rows.shape[1]),
        grid.angles_degrees[:half],
        pixel_set,
        data2,
        weights2,
    )
    insert_slices(
        rows[half:],
        torch.ones(rows.shape[0] - half, rows.shape[1]),
        grid.angles_degrees[half:],
        pixel_set,
        data2,
        weights2,
    )
    assert torch.allclose(data2, data, atol=1e-3 * float(data.abs().max()))
    assert torch.allclose(weights2, weights, atol=1e-3 * float(weights.max()))


@pytest.fixture(scope="module")
def dataset():
    volume = blob_map(BOX, sigma_px=1.5, seed=2)
    scale = float(volume.std())
    # SNR ~ 1 inside the particle, no CTF
    images, angles, origins = particles(volume, 160, noise_sigma=6 * scale, seed=5)
    halves = np.where(np.arange(160) % 2 == 0, 1, 2)
    return volume, images, angles, origins, halves


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["vdam", "em"])
def test_refinement_improves_map(dataset, algorithm):
    volume, images, _, _, halves = dataset
    settings = RefineSettings(
        n_iterations=3,
        algorithm=algorithm,
        angular_step_degrees=20.0,
        initial_lowpass_angstrom=60.0,
        particle_diameter_angstrom=220.0,
        do_ctf=False,
        offset_range_px=2.0,
        subset_size=120,
    )
    data = in_memory_data(images, pixel_size_angstrom=8.0, halves=halves)
    state = initial_state(volume * 7.0, data, settings)  # arbitrary greyscale
    start = fourier_shell_correlation(state.references[0], volume)
    history = []
    for _ in range(settings.n_iterations):
        refine_iteration(state, data, settings)
        history.append(state.resolution_angstrom)
    final = fourier_shell_correlation(state.final_map, volume)
    # the refined map correlates with the truth beyond the initial low-pass
    shell_60 = int(BOX * 8.0 / 60.0)
    assert float(final[shell_60 + 2 : shell_60 + 5].mean()) > 0.5
    assert (
        float(final[shell_60 + 2 : shell_60 + 5].mean())
        > float(start[shell_60 + 2 : shell_60 + 5].mean()) + 0.3
    )
    # greyscale recovered: the map is on the particles' scale, not 7x the truth
    ratio = float((state.final_map * volume).sum() / (volume * volume).sum())
    assert 0.6 < ratio < 1.4
    assert state.final_halves.shape == (2, BOX, BOX, BOX)
    assert state.resolution_angstrom < 45.0
    assert len(state.history) == 3


@pytest.mark.slow
def test_halves_are_independent(dataset):
    """Half 2's reference does not depend on half 1's images."""
    volume, images, _, _, halves = dataset
    settings = RefineSettings(
        n_iterations=3,
        algorithm="em",
        angular_step_degrees=30.0,
        initial_lowpass_angstrom=60.0,
        do_ctf=False,
        offset_range_px=1.0,
        firstiter_cc=False,
    )
    keep = torch.as_tensor(halves == 2)
    runs = []
    for corrupt in (False, True):
        stack = images.clone()
        if corrupt:
            stack[~keep] = torch.randn(
                stack[~keep].shape, generator=torch.Generator().manual_seed(0)
            )
        data = in_memory_data(stack, pixel_size_angstrom=8.0, halves=halves)
        state = initial_state(volume, data, settings)
        # the noise model is shared by the halves (as in RELION): fix it for both runs
        state.sigma2_noise.fill_(float(images.var()) / (2 * BOX * BOX))
        refine_iteration(state, data, settings)
        runs.append(state)
    # half 2 is scored against its own reference only: its poses are unchanged when
    # the images of half 1 are replaced by noise
    assert torch.equal(runs[0].angles_degrees[keep], runs[1].angles_degrees[keep])
    assert not torch.equal(runs[0].angles_degrees[~keep], runs[1].angles_degrees[~keep])


@pytest.mark.parametrize(
    ("algorithm", "oversampling", "tolerance"),
    [("em", 1, 1e-3), ("vdam", 1, 1e-3), ("em", 2, 0.02), ("vdam", 2, 0.02)],
)
def test_local_symmetry_is_imposed_on_each_half(
    dataset, algorithm, oversampling, tolerance
):
    """Each half-reference obeys the operator after every update (VDAM: also with
    momentum, where the symmetry is imposed on the targets and the initial map)."""
    volume, images, _, _, halves = dataset
    # a mask on the left half of the box and a 180° rotation about z (maps x<0 onto x>0)
    axis = torch.arange(BOX) - BOX // 2
    mask = (axis[None, None, :] < -1).float().expand(BOX, BOX, BOX).clone()
    rot = torch.tensor([[[-1.0, 0, 0], [0, -1, 0], [0, 0, 1]]])
    symmetry = LocalSymmetry(
        masks=[mask], operators=[(rot, torch.zeros(1, 3))], oversampling=oversampling
    )
    settings = RefineSettings(
        n_iterations=4,
        algorithm=algorithm,
        angular_step_degrees=30.0,
        initial_lowpass_angstrom=60.0,
        do_ctf=False,
        offset_range_px=1.0,
        subset_size=60,
    )
    data = in_memory_data(images, pixel_size_angstrom=8.0, halves=halves)
    state = initial_state(volume, data, settings)
    # the mask's hard edge rings after the 2× Fourier round trip: test 2 px away
    inner = (axis[None, None, :] < -3).expand(BOX, BOX, BOX)
    for _ in range(2):
        refine_iteration(state, data, settings, local_symmetry=symmetry)
        for h in range(2):
            ref = state.references[h]
            rotated = torch.flip(ref, dims=(1, 2))  # (x, y) -> (-x, -y) about N//2
            rotated = torch.roll(rotated, shifts=(1, 1), dims=(1, 2))
            region = (inner if oversampling > 1 else mask.bool()) & torch.roll(
                torch.flip(mask, (1, 2)), (1, 1), (1, 2)
            ).bool().logical_not()
            diff = (ref - rotated)[region].abs().max()
            assert float(diff) < tolerance * float(ref.abs().max())

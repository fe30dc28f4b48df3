"""Numerical guards: NaN/Inf named by particle or class, stable weights, empty classes."""

import pytest
import torch

from cryoavg.class2d.estep import expectation_step
from cryoavg.class2d.guards import (
    NumericalError,
    check_class_images,
    check_particle_values,
)
from cryoavg.class2d.projector import ClassProjector
from cryoavg.class2d.sampling import PixelSet, PsiGrid, TranslationGrid
from cryoavg.errors import CryoavgError
from tests.class2d.conftest import synthetic  # noqa: F401  (fixture)

N = 32


def test_nan_in_a_particle_value_names_the_particle_and_image():
    values = {"log-likelihood": torch.tensor([1.0, 2.0, float("nan")])}
    names = [f"{i:06d}@stack.mrcs" for i in range(1, 11)]
    with pytest.raises(NumericalError, match=r"particle 8 \(000008@stack.mrcs\)"):
        check_particle_values(values, torch.tensor([3, 5, 7]), names=lambda: names)
    assert issubclass(NumericalError, CryoavgError)  # one line at the command line


def test_inf_offset_names_the_particle_and_iteration():
    offsets = torch.zeros(4, 2)
    offsets[2, 1] = float("inf")
    with pytest.raises(NumericalError, match=r"offset of particle 3 is inf in iter"):
        check_particle_values({"offset": offsets}, torch.arange(4), iteration=5)


def test_finite_values_pass():
    check_particle_values({"x": torch.randn(5, 3)}, torch.arange(5))
    check_class_images(torch.randn(3, 8, 8))


def test_nan_class_is_named():
    images = torch.zeros(5, 8, 8)
    images[3, 2, 2] = float("nan")
    images[4, 0, 0] = float("-inf")
    with pytest.raises(NumericalError, match=r"classes 4, 5 became NaN/Inf") as err:
        check_class_images(images, iteration=7)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def grids():
    return PsiGrid.build(10.0), TranslationGrid.build(2.0, 1.0), PixelSet.for_size(N, N)


def _estep(syn, grids, class_prior=None):
    psi, trans, ps = grids
    k = syn.classes.shape[0]
    return expectation_step(
        syn.batch,
        ClassProjector(syn.classes),
        psi,
        trans,
        ps,
        class_prior=torch.full((k,), 1.0 / k) if class_prior is None else class_prior,
        class_offset_prior_angstrom=torch.zeros(k, 2),
        sigma2_offset_angstrom2=100.0,
        pixel_size=1.0,
        coarse_size=16,
    )


@pytest.mark.parametrize("scale", [1.0, 1e8, 1e-8])
def test_weights_are_normalised_whatever_the_scale(synthetic, grids, scale):  # noqa: F811
    """A log-sum-exp over diff2 - min(diff2): pmax in (0, 1], finite log-likelihood,
    at least one significant sample, for images 1e-8 to 1e8 times the noise."""
    syn = synthetic(*grids, n_particles=6, sigma2=1e-3, seed=2)
    syn.batch.images_masked_rfft *= scale
    result = _estep(syn, grids)
    assert torch.isfinite(result.log_likelihood).all()
    assert ((result.pmax > 0) & (result.pmax <= 1 + 1e-9)).all()
    assert (result.n_significant >= 1).all()
    check_particle_values(
        {"ll": result.log_likelihood, "offset": result.best_offset_px},
        torch.arange(6),
    )


def test_empty_class_gets_no_particle(synthetic, grids):  # noqa: F811
    """A class with prior 0 (emptied) is skipped, never chosen, and nothing is NaN."""
    syn = synthetic(*grids, n_particles=6, sigma2=1e-2, seed=3)
    k = syn.classes.shape[0]
    prior = torch.full((k,), 1.0 / (k - 1))
    prior[0] = 0.0
    result = _estep(syn, grids, class_prior=prior)
    assert (result.best_class != 0).all()
    assert torch.isfinite(result.log_likelihood).all()


def test_all_junk_batch_is_handled(synthetic, grids):  # noqa: F811
    """Pure-noise images (an all-junk batch): finite, normalised weights."""
    syn = synthetic(*grids, n_particles=6, sigma2=1.0, seed=4)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(
        syn.batch.images_masked_rfft.shape,
        generator=generator,
        dtype=syn.batch.images_masked_rfft.real.dtype,
    )
    syn.batch.images_masked_rfft = noise.to(syn.batch.images_masked_rfft.dtype) * 1e3
    result = _estep(syn, grids)
    assert torch.isfinite(result.log_likelihood).all()
    assert ((result.pmax > 0) & (result.pmax <= 1 + 1e-9)).all()

"""Expected per-class accuracies (rlnAccuracyRotations / rlnAccuracyTranslationsAngst)."""

import math

import pytest
import torch

from cryoavg.class2d.accuracy import (
    CONFIDENCE_THRESHOLD,
    UNKNOWN_ACCURACY,
    expected_accuracies,
    rotation_steps_degrees,
    translation_steps_px,
)
from cryoavg.class2d.projector import ClassProjector
from cryoavg.class2d.sampling import PixelSet
from tests.class2d.conftest import blob_image

N = 32


def _run(classes, *, sigma2=1.0, prior=None, n=4, along_x=None, ctf=None):
    projector = ClassProjector(classes, pad=2)
    pixel_set = PixelSet.for_size(N, N)
    k = classes.shape[0]
    return expected_accuracies(
        projector,
        pixel_set,
        psi_degrees=torch.linspace(0, 90, n),
        sigma2_noise=torch.full((n, N // 2 + 1), sigma2, dtype=torch.float64),
        ctf=ctf,
        shift_along_x=torch.ones(n, dtype=torch.bool) if along_x is None else along_x,
        class_prior=torch.full((k,), 1.0 / k) if prior is None else prior,
        pixel_size_angstrom=2.5,
    )


def test_steps_follow_relion_rules():
    rot = rotation_steps_degrees()
    assert rot[:4].tolist() == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert rot[4] == pytest.approx(0.3)
    assert rot[-3:].tolist() == pytest.approx([20.0, 25.0, 30.0])
    assert torch.all(rot.diff() > 0)
    trans = translation_steps_px()
    assert trans[:3].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert trans[-2:].tolist() == pytest.approx([9.0, 10.0])
    assert 1.2 in [round(v, 6) for v in trans.tolist()]


def test_stronger_signal_is_more_accurate_and_small_classes_unknown():
    image = blob_image(1, N).float()
    classes = torch.stack([image, 3 * image, 0.01 * image, image])
    prior = torch.tensor([0.4, 0.3, 0.295, 0.005])
    rot, trans = _run(classes, sigma2=1e-5, prior=prior)
    assert rot[1] < rot[0]
    assert trans[1] < trans[0]
    assert rot[2] == pytest.approx(30.0)
    assert trans[2] == pytest.approx(25.0)
    assert rot[3] == UNKNOWN_ACCURACY
    assert trans[3] == UNKNOWN_ACCURACY
    # noisier data: the same reference is harder to align
    rot_noisy, trans_noisy = _run(classes[:1], sigma2=1e-4)
    assert rot_noisy[0] > rot[0]
    assert trans_noisy[0] > trans[0]


def test_translation_accuracy_matches_a_direct_computation():
    """The found shift is the first one whose explicit |P − P_shifted|² energy passes."""
    image = blob_image(0, N).float()
    sigma2 = 2e-5
    _, trans = _run(image[None], sigma2=sigma2, n=1)
    found_px = float(trans[0]) / 2.5
    projector = ClassProjector(image[None], pad=2)
    pixel_set = PixelSet.for_size(N, N)
    ref = projector.rotated_references(torch.zeros(1), pixel_set)[0, 0, 1:]
    kx = pixel_set.kx[1:].double()

    def energy(d):
        shifted = ref * torch.exp(-2j * math.pi * kx * d / N).to(ref.dtype)
        return float((ref - shifted).abs().square().sum() / (2 * sigma2))

    steps = translation_steps_px().tolist()
    i = min(range(len(steps)), key=lambda j: abs(steps[j] - found_px))
    assert energy(steps[i]) > CONFIDENCE_THRESHOLD
    if i > 0:
        assert energy(steps[i - 1]) <= CONFIDENCE_THRESHOLD


def test_ctf_zero_means_nothing_is_detectable():
    image = blob_image(2, N).float()
    ctf = torch.zeros(2, N, N // 2 + 1)
    rot, trans = _run(image[None], sigma2=1e-4, n=2, ctf=ctf)
    assert rot[0] == pytest.approx(30.0)
    assert trans[0] == pytest.approx(25.0)

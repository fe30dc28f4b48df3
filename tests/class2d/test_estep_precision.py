"""Reduced-precision E-step (``estep_precision``): tolerances against fp32.

The coarse search's cross-term GEMM runs with TF32 operands (emulated off CUDA by rounding
the operands to a 10-bit mantissa) or bf16 operands; the fine pass, the norms, log-sum-exp
and the statistics stay fp32, and the coarse significance test keeps every sample within
twice the error bound of the best one (``cryoavg.class2d.estep``). The tolerances asserted
here are the ones stated in docs/scaleout.md ("Reduced precision"), measured on the blob
data of ``conftest`` (150 particles, 32 px, K = 3, 6°, ±3 px, coarse size 16, fp32 inputs)
at SNR 0.02 to 10 with and without a CTF.
"""

import numpy as np
import pytest
import torch

from cryoavg.class2d import estep
from cryoavg.class2d.estep import (
    GEMM_ERROR_BOUND,
    EStepBatch,
    expectation_step,
    phase_shifts,
    round_to_tf32,
    squared_differences,
)
from cryoavg.class2d.projector import ClassProjector
from cryoavg.class2d.sampling import PixelSet, PsiGrid, TranslationGrid
from cryoavg.class2d.settings import parse_estep_precision
from cryoavg.errors import ConfigError

N = 32
COARSE_SIZE = 16
REDUCED = ["tf32", "bf16"]

#: how much lower than fp32 a particle's log-likelihood may be (nats; measured ≥ −0.026),
#: and at SNR ≤ 0.1 how far from it either way (measured ≤ 0.032)
LL_TOLERANCE = 0.05
#: at SNR ≤ 0.1, |Δ Pmax| (measured ≤ 0.019)
PMAX_TOLERANCE = 0.05
#: largest error of the coarse diff2 relative to its spread over the poses of a particle
#: (measured ≤ 3.3e-4 TF32, ≤ 4.7e-3 bf16)
DIFF2_TOLERANCE = {"tf32": 5e-4, "bf16": 6e-3}
#: share of particles whose best pose may move (to a better one; measured ≤ 5.3 % at SNR
#: 0.5 to 10, where fp32's few significant coarse samples miss a better fine pose)
MOVED_TOLERANCE = 0.06
#: total significant coarse samples against fp32 (measured 0.993 to 1.25)
SIGNIFICANT_RATIO_TOLERANCE = 1.3


@pytest.fixture(scope="module")
def grids():
    return PsiGrid.build(6.0), TranslationGrid.build(3.0, 1.0), PixelSet.for_size(N, N)


def _single(batch: EStepBatch) -> EStepBatch:
    """The batch in single precision, as the Class2D job prepares it."""
    values = {}
    for name in batch.__dataclass_fields__:
        value = getattr(batch, name)
        if isinstance(value, torch.Tensor) and value.is_complex():
            value = value.to(torch.complex64)
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.to(torch.float32)
        values[name] = value
    return EStepBatch(**values)


def _run(batch, classes, grids, precision=None, **options):
    psi, trans, pixels = grids
    k = classes.shape[0]
    kwargs = {
        "class_prior": torch.full((k,), 1.0 / k),
        "class_offset_prior_angstrom": torch.zeros(k, 2),
        "sigma2_offset_angstrom2": 100.0,
        "pixel_size": 1.0,
        "coarse_size": COARSE_SIZE,
        **options,
    }
    if precision is not None:
        kwargs["precision"] = precision
    projector = ClassProjector(classes.to(torch.float32))
    return expectation_step(batch, projector, psi, trans, pixels, **kwargs)


def _moved(a, b) -> torch.Tensor:
    return (
        (a.best_class != b.best_class)
        | (a.best_psi_degrees != b.best_psi_degrees)
        | (a.best_offset_px != b.best_offset_px).any(1)
    )


# ------------------------------------------------------------------------------------
# the arithmetic


def test_round_to_tf32_keeps_ten_mantissa_bits():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10000, generator=gen) * torch.exp(
        torch.randn(10000, generator=gen) * 20
    )
    r = round_to_tf32(x)
    assert r.dtype == torch.float32
    assert bool((r.view(torch.int32) & ((1 << 13) - 1) == 0).all())
    rel = ((r - x).abs() / x.abs()).max()
    assert float(rel) <= 2.0**-11
    assert float(rel) > 2.0**-12  # really rounded, not a copy
    # round to nearest, ties away from zero; the sign is kept
    one = 1.0 + 2.0**-11
    assert round_to_tf32(torch.tensor([one, -one])).tolist() == [
        1.0 + 2.0**-10,
        -(1.0 + 2.0**-10),
    ]
    assert round_to_tf32(torch.tensor([1.0 + 2.0**-12])).item() == 1.0
    doubled = round_to_tf32(x.double())
    assert doubled.dtype == torch.float64
    assert torch.equal(doubled, r.double())


def test_cuda_tf32_is_allowed_only_inside_the_block():
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")

    def state():
        return matmul.fp32_precision if new_api else matmul.allow_tf32

    before = state()
    with estep._cuda_tf32_matmul():
        assert state() == ("tf32" if new_api else True)
    assert state() == before
    with pytest.raises(RuntimeError, match="boom"), estep._cuda_tf32_matmul():
        raise RuntimeError("boom")
    assert state() == before


def test_bf16_gemm_on_cpu_accumulates_in_fp32():
    """The bf16 GEMM's error is that of its rounded operands and result, not of bf16 sums."""
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(64, 4096, generator=gen)  # positive terms: errors cannot cancel
    b = torch.rand(4096, 8, generator=gen)
    exact = a.double() @ b.double()
    out = estep._scoring_matmul(
        estep._gemm_operand(a, "bf16"),
        estep._gemm_operand(b.T.contiguous(), "bf16").T,
        "bf16",
        torch.float32,
    )
    assert out.dtype == torch.float32
    rel = ((out.double() - exact).abs() / exact).max()
    # summing 4096 terms in bf16 would be off by ~1e-1; within the stated bound here
    assert float(rel) <= GEMM_ERROR_BOUND["bf16"]


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("snr", [0.1, 10.0])
def test_coarse_diff2_error_is_within_bound_and_tolerance(
    synthetic, grids, precision, snr
):
    psi, trans, pixels = grids
    syn = synthetic(psi, trans, pixels, n_particles=60, snr=snr, ctf_strength=40.0)
    batch = _single(syn.batch)
    n_coarse = pixels.count_within(COARSE_SIZE)
    sl = slice(1, n_coarse)
    refs = (
        ClassProjector(syn.classes.to(torch.float32))
        .rotated_references(psi.coarse_degrees, pixels, start=1, stop=n_coarse)
        .to(torch.complex64)
    )  # (k, r, p_c)
    phases = phase_shifts(trans.coarse_px, pixels, start=1, stop=n_coarse)
    args = (
        batch.images_masked_rfft[:, sl],
        batch.ctf[:, sl],
        batch.scale,
        batch.sigma2[:, sl],
        refs,
        phases,
    )
    fp32 = squared_differences(*args)
    reduced = squared_differences(*args, precision=precision)
    assert reduced.dtype == torch.float32
    error = (reduced.double() - fp32.double()).abs().flatten(1).amax(1)  # (b,)
    assert float(error.max()) > 0  # the reduced arithmetic was used
    # the bound the significance test widens by: u·‖Y‖·max‖P‖
    y = args[0] * (args[1] / args[3])
    bound = (
        GEMM_ERROR_BOUND[precision]
        * y.abs().double().pow(2).sum(1).sqrt()
        * refs.abs().double().pow(2).sum(-1).sqrt().max()
    )
    assert bool((error <= bound).all())
    spread = fp32.flatten(1).double()
    spread = spread.amax(1) - spread.amin(1)
    assert float((error / spread).max()) <= DIFF2_TOLERANCE[precision]


# ------------------------------------------------------------------------------------
# the E-step


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize(
    ("snr", "ctf_strength"), [(0.02, 0.0), (0.1, 40.0), (0.5, 0.0), (2.0, 40.0)]
)
def test_estep_agrees_with_fp32(synthetic, grids, precision, snr, ctf_strength):
    """Never worse than fp32; equal within tolerance at SNR ≤ 0.1; better poses beyond.

    The wider significant set can only add coarse samples that fp32 dropped, so where the
    results differ, the reduced-precision E-step found more probability mass (higher
    log-likelihood) or a better pose (lower diff2).
    """
    psi, trans, pixels = grids
    syn = synthetic(
        psi, trans, pixels, n_particles=150, snr=snr, ctf_strength=ctf_strength, seed=3
    )
    batch = _single(syn.batch)
    ref = _run(batch, syn.classes, grids, "fp32")
    out = _run(batch, syn.classes, grids, precision)
    d_ll = out.log_likelihood - ref.log_likelihood
    moved = _moved(out, ref)
    assert float(d_ll.min()) >= -LL_TOLERANCE
    # a moved best pose is a better one that the wider significant set reached
    assert bool((out.min_diff2[moved] < ref.min_diff2[moved]).all())
    assert float(moved.double().mean()) <= MOVED_TOLERANCE
    # (fewer only at the adaptive-fraction boundary, where samples hold < 0.1 % of the mass)
    ratio = out.n_significant.sum() / ref.n_significant.sum()
    assert 0.98 <= float(ratio) <= SIGNIFICANT_RATIO_TOLERANCE
    if snr <= 0.1:
        assert not bool(moved.any())
        assert float(d_ll.abs().max()) <= LL_TOLERANCE
        assert float((out.pmax - ref.pmax).abs().max()) <= PMAX_TOLERANCE


def test_fp32_is_the_default_and_unchanged(synthetic, grids):
    psi, trans, pixels = grids
    syn = synthetic(psi, trans, pixels, n_particles=30, snr=0.5, seed=2)
    batch = _single(syn.batch)
    default = _run(batch, syn.classes, grids)
    fp32 = _run(batch, syn.classes, grids, "fp32")
    for name in ("log_likelihood", "pmax", "best_offset_px", "min_diff2"):
        assert torch.equal(getattr(default, name), getattr(fp32, name)), name
    assert torch.equal(default.samples.weight, fp32.samples.weight)


def test_unknown_precision_is_refused(synthetic, grids):
    psi, trans, pixels = grids
    syn = synthetic(psi, trans, pixels, n_particles=6, snr=0.5)
    with pytest.raises(ValueError, match="precision"):
        _run(_single(syn.batch), syn.classes, grids, "fp16")
    assert parse_estep_precision(" BF16 ") == "bf16"
    for bad in ("fp16", "", None, 32):
        with pytest.raises(ConfigError, match="estep_precision"):
            parse_estep_precision(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", REDUCED)
def test_estep_on_cuda_agrees_with_fp32(synthetic, grids, precision):
    """The native CUDA paths (TF32 tensor cores, bf16 GEMM with fp32 output)."""
    psi, trans, pixels = grids
    syn = synthetic(psi, trans, pixels, n_particles=150, snr=0.1, ctf_strength=40.0)
    batch = _single(syn.batch).to("cuda")
    cuda_grids = (psi, trans, PixelSet.for_size(N, N, device="cuda"))
    k = syn.classes.shape[0]
    options = {
        "class_prior": torch.full((k,), 1.0 / k, device="cuda"),
        "class_offset_prior_angstrom": torch.zeros(k, 2, device="cuda"),
    }
    classes = syn.classes.to("cuda")
    before = torch.backends.cuda.matmul.allow_tf32
    ref = _run(batch, classes, cuda_grids, "fp32", **options)
    out = _run(batch, classes, cuda_grids, precision, **options)
    assert torch.backends.cuda.matmul.allow_tf32 == before
    d_ll = (out.log_likelihood - ref.log_likelihood).cpu()
    assert not bool(_moved(out, ref).any())
    assert float(d_ll.abs().max()) <= LL_TOLERANCE
    assert float((out.pmax - ref.pmax).abs().max()) <= PMAX_TOLERANCE


# ------------------------------------------------------------------------------------
# end to end


def test_bf16_class2d_run_gives_the_fp32_classes(two_views):
    from cryoavg.cli.class2d import run_class2d
    from tests.conftest import compose_job

    classes = {}
    for precision in ("fp32", "bf16"):
        cfg = compose_job(
            "class2d",
            [
                f"output={two_views.root / 'Class2D' / precision}",
                "logger=none",
                "trainer.enable_progress_bar=false",
                "trainer.accelerator=cpu",
                f"particles={two_views.star}",
                "algorithm=em",
                "classes=3",
                "iterations=4",
                "psi_step=10",
                "offset_range=3",
                f"estep_precision={precision}",
            ],
        )
        _, objects = run_class2d(cfg)
        assert objects["module"].estep_precision == precision
        classes[precision] = objects["module"].particle_class_index.numpy().copy()
    np.testing.assert_array_equal(classes["bf16"], classes["fp32"])
    # and the classes are the views (so the agreement is not trivial)
    majorities = set()
    for k in np.unique(classes["fp32"]):
        side_share = two_views.view[classes["fp32"] == k].mean()
        if (classes["fp32"] == k).sum() >= 12:
            assert max(side_share, 1 - side_share) >= 0.9
            majorities.add(bool(side_share > 0.5))
    assert majorities == {False, True}

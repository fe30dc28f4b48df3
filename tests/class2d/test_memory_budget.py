"""The E-step memory budget (``estep_memory_mib``) and the out-of-memory back-off.

(a) the budget arithmetic; (b) a tiny Class2D run with a very small budget (many chunks and
passes) gives the same result as the default budget; (c) out-of-memory errors injected into
the E-step and into the insertion of the statistics are survived by halving the budget and
redoing the failed step, with the same result as a run without them (nothing added twice);
(d) below the floor the run stops with one clear error line.
"""

import logging

import mrcfile
import numpy as np
import pytest
import torch

import cryoavg.class2d.module as module_mod
from cryoavg.class2d.estep import (
    StatisticsUpdate,
    accumulate_statistics,
    expectation_step,
    statistics_update,
)
from cryoavg.class2d.projector import ClassProjector
from cryoavg.class2d.sampling import PixelSet, PsiGrid, TranslationGrid
from cryoavg.class2d.settings import (
    CPU_ESTEP_MEMORY_BYTES,
    MAX_AUTO_ESTEP_MEMORY_BYTES,
    MIB,
    MIN_ESTEP_MEMORY_BYTES,
    EStepMemoryError,
    backed_off_budget,
    estep_bytes_per_particle,
    estep_memory_budget_bytes,
    parse_estep_memory_mib,
    particles_per_pass,
    prepare_bytes_per_particle,
)
from cryoavg.class2d.statistics import Class2DStatistics
from cryoavg.cli.class2d import run_class2d
from cryoavg.errors import ConfigError
from cryoavg.io.star import read_star
from tests.conftest import compose_job

OOM = module_mod.OutOfMemoryError

ARGS = [
    # re-centring shifts the class images by their rounded centre of mass: a sum taken in
    # another order (other chunks, other DDP ranks) can round the other way, which is not
    # what these tests compare
    "center_classes=false",
    "classes=3",
    "psi_step=15",
    "offset_range=2",
    "iterations=2",
    "write_every=2",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]


# ---------------------------------------------------------------- (a) the arithmetic


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", None), (None, None), (" AUTO ", None), (512, 512.0), ("0.0625", 0.0625)],
)
def test_parse_estep_memory(value, expected):
    assert parse_estep_memory_mib(value) == expected


@pytest.mark.parametrize("value", [0, -3, "lots", True, float("inf"), float("nan")])
def test_parse_estep_memory_rejects_bad_values(value):
    with pytest.raises(ConfigError, match="estep_memory_mib"):
        parse_estep_memory_mib(value)


def test_budget_explicit_cpu_and_gpu():
    # an explicit value is used as given, on any device
    assert estep_memory_budget_bytes(64, device_type="cuda", free_bytes=1 << 40) == (
        64 * MIB
    )
    assert estep_memory_budget_bytes(0.0625, device_type="cpu") == 64 * 1024
    # auto on CPU: the long-standing 256 MiB
    assert estep_memory_budget_bytes(None, device_type="cpu") == 256 * MIB
    assert CPU_ESTEP_MEMORY_BYTES == 256 * MIB
    assert estep_memory_budget_bytes(None, device_type="cpu", free_bytes=1 << 40) == (
        256 * MIB
    )
    # auto on CUDA: 60 % of the free memory ...
    assert estep_memory_budget_bytes(
        None, device_type="cuda", free_bytes=10 * 1000 * MIB
    ) == (6000 * MIB)
    # ... at most the cap, at least the floor; unknown free memory = the CPU default
    huge = estep_memory_budget_bytes(None, device_type="cuda", free_bytes=140 << 30)
    assert huge == MAX_AUTO_ESTEP_MEMORY_BYTES
    tiny = estep_memory_budget_bytes(None, device_type="cuda", free_bytes=1000)
    assert tiny == MIN_ESTEP_MEMORY_BYTES
    assert estep_memory_budget_bytes(None, device_type="cuda") == (256 * MIB)


def test_back_off_halves_down_to_the_floor():
    assert backed_off_budget(256 * MIB) == 128 * MIB
    assert backed_off_budget(3 * MIB) == 3 * MIB // 2
    assert backed_off_budget(2 * MIB) == MIN_ESTEP_MEMORY_BYTES
    assert backed_off_budget(MIN_ESTEP_MEMORY_BYTES) is None
    assert backed_off_budget(64 * 1024) is None


def test_particles_per_pass_splits_evenly():
    assert particles_per_pass(1000, 10, 50) == 50  # fits: one pass
    assert particles_per_pass(1000, 10, 100) == 100
    assert particles_per_pass(1000, 10, 101) == 51  # two even passes, not 100 + 1
    assert particles_per_pass(1000, 10, 250) == 84  # three passes of 84, 84, 82
    assert particles_per_pass(5, 10, 250) == 1  # at least one particle
    assert particles_per_pass(1000, 10, 0) == 1
    # the estimates grow with the box, the pixels and the significant samples
    assert prepare_bytes_per_particle(64) == 4 * prepare_bytes_per_particle(32)
    assert estep_bytes_per_particle(2000, 100) > estep_bytes_per_particle(1000, 100)
    assert estep_bytes_per_particle(1000, 200) > estep_bytes_per_particle(1000, 100)
    # the default CPU budget keeps a 256-particle chunk of 64 px boxes in one pass
    assert particles_per_pass(
        CPU_ESTEP_MEMORY_BYTES, prepare_bytes_per_particle(64), 256
    ) == (256)
    assert particles_per_pass(
        CPU_ESTEP_MEMORY_BYTES, estep_bytes_per_particle(3205, 100), 256
    ) == (256)


# ---------------------------------------------------------------- resumable insertion


@pytest.mark.parametrize("splat", ["pairs", "dense"])
def test_statistics_update_survives_a_failed_insertion(synthetic, monkeypatch, splat):
    """An allocation failure half-way through adding leaves nothing added twice or half."""
    n, k = 32, 3
    psi, trans = PsiGrid.build(6.0), TranslationGrid.build(3.0, 1.0)
    ps = PixelSet.for_size(n, n)
    syn = synthetic(psi, trans, ps, n_particles=24, snr=0.05, seed=4)
    proj = ClassProjector(syn.classes)
    options = {
        "class_offset_prior_angstrom": torch.zeros(k, 2),
        "pixel_size": 1.0,
        "mode": "vdam",
    }
    result = expectation_step(
        syn.batch,
        proj,
        psi,
        trans,
        ps,
        class_prior=torch.full((k,), 1.0 / k),
        class_offset_prior_angstrom=torch.zeros(k, 2),
        sigma2_offset_angstrom2=100.0,
        pixel_size=1.0,
        coarse_size=16,
    )
    small = 60_000  # several insertion steps
    expected = Class2DStatistics.zeros(k, n, dtype=torch.float64)
    accumulate_statistics(
        syn.batch,
        result,
        proj,
        psi,
        trans,
        ps,
        expected,
        max_chunk_bytes=small,
        **options,
    )
    stats = Class2DStatistics.zeros(k, n, dtype=torch.float64)
    update = statistics_update(
        syn.batch, result, proj, psi, trans, ps, stats, max_chunk_bytes=small, **options
    )
    assert isinstance(update, StatisticsUpdate)
    # computing the update adds nothing
    assert all(float(t.abs().sum()) == 0.0 for t in stats.as_dict().values())
    rows = int(update.target.shape[0])
    method = "backproject_pairs" if splat == "pairs" else "backproject_rows"
    original = getattr(ClassProjector, method)
    calls, done_before_failure = [], []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            done_before_failure.append(update.applied_rows)
            raise OOM("injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ClassProjector, method, failing)
    with pytest.raises(OOM):
        update.apply_to(stats, proj, max_chunk_bytes=small, splat=splat)
    # two steps were added, the failed one was not, and the rest is still to come
    assert 0 < done_before_failure[0] == update.applied_rows < rows
    assert not update.sums_applied
    update.apply_to(stats, proj, max_chunk_bytes=small, splat=splat)  # resumes
    update.apply_to(stats, proj, max_chunk_bytes=small, splat=splat)  # complete: no-op
    assert len(calls) > 4
    for name, value in expected.as_dict().items():
        torch.testing.assert_close(stats.as_dict()[name], value, msg=name)
    torch.testing.assert_close(stats.data, expected.data, rtol=0, atol=0)


# ---------------------------------------------------------------- runs


def _run(tiny_simulation, job, *overrides):
    cfg = compose_job(
        "class2d",
        [
            f"particles={tiny_simulation / 'particles.star'}",
            f"output={job}",
            *ARGS,
            *overrides,
        ],
    )
    _, objects = run_class2d(cfg)
    classes = np.array(mrcfile.read(job / "run_it002_classes.mrcs"), np.float64)
    data = read_star(job / "run_it002_data.star")["particles"]
    return classes, data, objects["module"]


@pytest.fixture(scope="module")
def reference_run(tiny_simulation, tmp_path_factory):
    """The same tiny run with the default budget (256 MiB on CPU)."""
    return _run(tiny_simulation, tmp_path_factory.mktemp("ref") / "job")


def _assert_same(run, reference, rtol):
    classes, data, _ = run
    ref_classes, ref_data, _ = reference
    scale = float(np.abs(ref_classes).max())
    np.testing.assert_allclose(classes, ref_classes, rtol=0, atol=rtol * scale)
    np.testing.assert_array_equal(data["rlnClassNumber"], ref_data["rlnClassNumber"])
    for label in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        np.testing.assert_allclose(data[label], ref_data[label], rtol=0, atol=1e-3)
    np.testing.assert_allclose(
        data["rlnNormCorrection"], ref_data["rlnNormCorrection"], rtol=1e-4
    )


@pytest.mark.parametrize(
    ("memory_mib", "chunk"),
    [
        (0.0625, 1),  # one particle per chunk, every E-step loop in many pieces
        (1, 20),  # chunks of 20 particles (48 KiB each to prepare), scored in passes
    ],
)
def test_small_budget_gives_the_same_result(
    tiny_simulation, tmp_path, reference_run, monkeypatch, memory_mib, chunk
):
    """A small budget splits the work finely and gives the default budget's result."""
    _, _, ref_module = reference_run
    assert ref_module.estep_memory_bytes == 256 * MIB
    assert ref_module.estep_memory_backoffs == 0
    calls = []
    original = module_mod.expectation_step

    def counting(*args, **kwargs):
        calls.append((args[0].n_particles, kwargs["max_chunk_bytes"]))
        return original(*args, **kwargs)

    prepared = []
    original_prepare = module_mod.prepare_estep_batch

    def preparing(images, **kwargs):
        prepared.append(int(images.shape[0]))
        return original_prepare(images, **kwargs)

    monkeypatch.setattr(module_mod, "expectation_step", counting)
    monkeypatch.setattr(module_mod, "prepare_estep_batch", preparing)
    run = _run(tiny_simulation, tmp_path / "job", f"estep_memory_mib={memory_mib}")
    budget = int(memory_mib * MIB)
    assert run[2].estep_memory_bytes == budget
    # the budget reaches the E-step, and the particles were split as expected
    assert {used for _, used in calls} == {budget}
    assert max(prepared) == chunk  # the chunks' images fit the budget
    largest = max(size for size, _ in calls)
    if chunk == 1:
        assert largest == 1
    else:
        assert 1 < largest < chunk  # a chunk was scored in several passes
    assert sum(size for size, _ in calls) == 240  # every particle once per iteration
    _assert_same(run, reference_run, rtol=1e-4)


def test_injected_oom_in_the_estep_halves_the_budget(
    tiny_simulation, tmp_path, reference_run, monkeypatch, caplog
):
    """The E-step fails above 64 MiB: the budget is halved twice and the run completes."""
    original = module_mod.expectation_step
    failures = []

    def limited(*args, **kwargs):
        if kwargs["max_chunk_bytes"] > 64 * MIB:
            failures.append(kwargs["max_chunk_bytes"])
            # a realistic failure: part of the chunk's work is done when it happens
            original(*args, **kwargs)
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB. (injected)")
        return original(*args, **kwargs)

    monkeypatch.setattr(module_mod, "expectation_step", limited)
    with caplog.at_level(logging.WARNING, logger="cryoavg"):
        run = _run(tiny_simulation, tmp_path / "job")
    module = run[2]
    assert failures == [256 * MIB, 128 * MIB]  # then the halved budget persists
    assert module.estep_memory_backoffs == 2
    assert module.estep_memory_bytes == 64 * MIB
    warnings = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 2
    assert "256.00 MiB" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    _assert_same(run, reference_run, rtol=1e-6)


@pytest.mark.parametrize("fill", [2.0, 0.0], ids=["pairs", "dense"])
def test_injected_oom_while_adding_statistics(
    tiny_simulation, tmp_path, monkeypatch, fill
):
    """A failure half-way through adding one pass's statistics is resumed, not redone."""
    import cryoavg.class2d.estep as estep_mod

    monkeypatch.setattr(estep_mod, "DENSE_SPLAT_FILL", fill)  # one way of inserting
    original_apply = StatisticsUpdate.apply_to
    resumed = []
    steps = []  # insertion steps of each apply_to call
    failures = []

    def apply_to(self, *args, **kwargs):
        if self.applied_rows > 0:
            resumed.append(self.applied_rows)
        steps.append(0)
        return original_apply(self, *args, **kwargs)

    def failing(original):
        # fails the first step of the second call (nothing added yet), then the second
        # step of a later call (rows already added)
        def insert(self, *args, **kwargs):
            steps[-1] += 1
            if (not failures and len(steps) == 2 and steps[-1] == 1) or (
                len(failures) == 1 and steps[-1] == 2
            ):
                failures.append(len(steps))
                raise OOM("injected")
            return original(self, *args, **kwargs)

        return insert

    monkeypatch.setattr(StatisticsUpdate, "apply_to", apply_to)
    for method in ("backproject_pairs", "backproject_rows"):
        original = getattr(ClassProjector, method)
        monkeypatch.setattr(ClassProjector, method, failing(original))
    run = _run(tiny_simulation, tmp_path / "a", "estep_memory_mib=4")
    monkeypatch.undo()
    assert run[2].estep_memory_backoffs == len(failures)
    if fill > 1.0:
        # row by row, a pass takes several steps: the second failure hits a pass with
        # rows already added (the dense insertion takes one step per pass here at 4 and
        # 2 MiB; its resumption is tested in test_statistics_update_survives_...)
        assert len(failures) == 2
        assert run[2].estep_memory_bytes == MIB
        assert resumed  # a retry started with rows already added
    else:
        assert len(failures) >= 1
    # the same run without failures, at the budget the injected run started with
    monkeypatch.setattr(estep_mod, "DENSE_SPLAT_FILL", fill)
    reference = _run(tiny_simulation, tmp_path / "b", "estep_memory_mib=4")
    assert reference[2].estep_memory_backoffs == 0
    _assert_same(run, reference, rtol=1e-4)


def test_injected_oom_while_preparing_redraws_the_same_noise(
    tiny_simulation, tmp_path, monkeypatch
):
    """zero_mask=false: a prepared chunk that failed is redone with the same background."""
    reference = _run(tiny_simulation, tmp_path / "a", "zero_mask=false")
    original = module_mod.prepare_estep_batch
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        prepared = original(*args, **kwargs)  # the noise is drawn, then it fails
        if len(calls) in (1, 3):
            raise OOM("injected")
        return prepared

    monkeypatch.setattr(module_mod, "prepare_estep_batch", failing)
    run = _run(tiny_simulation, tmp_path / "b", "zero_mask=false")
    assert run[2].estep_memory_backoffs == 2
    _assert_same(run, reference, rtol=1e-6)


def test_out_of_memory_below_the_floor_is_one_clear_error(
    tiny_simulation, tmp_path, monkeypatch, caplog
):
    def always(*args, **kwargs):
        raise OOM("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has ...")

    monkeypatch.setattr(module_mod, "expectation_step", always)
    job = tmp_path / "job"
    with (
        caplog.at_level(logging.WARNING, logger="cryoavg"),
        pytest.raises(EStepMemoryError) as error,
    ):
        _run(tiny_simulation, job, "estep_memory_mib=4")
    message = str(error.value)
    assert "\n" not in message
    assert "out of memory in the Class2D E-step" in message
    assert "1.00 MiB" in message  # the last budget tried
    assert "Tried to allocate 20.00 MiB" in message
    # 4 → 2 → 1 MiB, then below the floor
    warnings = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 2
    # iteration 0 (the initial model) stays, for continue_from; nothing of iteration 1
    assert not list(job.glob("run_it001_*"))


def test_bad_budget_is_a_config_error_before_the_run(tiny_simulation, tmp_path):
    job = tmp_path / "job"
    with pytest.raises(ConfigError, match="estep_memory_mib"):
        _run(tiny_simulation, job, "estep_memory_mib=-1")
    assert not job.exists()

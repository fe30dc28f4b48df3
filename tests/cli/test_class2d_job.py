"""The ``cryoavg class2d`` job end to end: configs, RELION files, recovery of known views,
continuation, DDP, bad input on the command line and interrupted writes.

Runs are tiny (``tiny_simulation``: 120 particles of 32 px, K = 4, a few iterations, a coarser
search than the default) so that the whole module stays within about a minute on 2 CPU cores.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mrcfile
import numpy as np
import pytest

from cryoavg.class2d import export
from cryoavg.class2d.callbacks import RelionWriter
from cryoavg.cli._configs import config_dir
from cryoavg.cli.class2d import read_checkpoint_info, run_class2d
from cryoavg.errors import ConfigError, InputError, OutputError
from cryoavg.io.atomic import atomic_write
from cryoavg.io.star import read_star, write_star
from tests.conftest import compose_job

K = 4
#: a coarser search than the defaults (6°/5 px/1 px) keeps the runs short
FAST = [f"classes={K}", "psi_step=10", "offset_range=3"]

#: the keys of the command line in the issue / README (RELION Class2D job)
ISSUE_KEYS = [
    "particles",
    "output",
    "classes",
    "tau2_fudge",
    "iterations",
    "algorithm",
    "mask_diameter",
    "zero_mask",
    "highres_limit",
    "center_classes",
    "psi_step",
    "offset_range",
    "offset_step",
    "ctf",
    "seed",
    "continue_from",
]


def _run(output: Path, *overrides: str, logger: str = "none"):
    cfg = compose_job(
        "class2d",
        [
            f"output={output}",
            f"logger={logger}",
            "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu",
            *overrides,
        ],
    )
    return run_class2d(cfg)


def _iteration_files(job: Path) -> dict[int, set[str]]:
    """``{iteration: {suffix, ...}}`` of the ``run_itNNN_<suffix>`` files in ``job``."""
    found: dict[int, set[str]] = {}
    for path in job.glob("run_it*_*"):
        number, suffix = path.name[len("run_it") :].split("_", 1)
        found.setdefault(int(number), set()).add(suffix)
    return found


def _classes(job: Path, iteration: int) -> np.ndarray:
    return mrcfile.read(job / f"run_it{iteration:03d}_classes.mrcs").astype(np.float64)


def _particles(path: Path):
    return read_star(path)["particles"]


def _no_temp_files(job: Path) -> bool:
    return not [p for p in job.rglob("*") if p.name.endswith(".tmp")]


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest pixel difference relative to the largest pixel of ``a``."""
    return float(np.abs(a - b).max() / np.abs(a).max())


# ---------------------------------------------------------------- 1. configs


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [f"experiment={name}" for name in _group_options("experiment")]
    + [f"debug={name}" for name in _group_options("debug")]
    + [f"trainer={name}" for name in _group_options("trainer")]
    + [f"logger={name}" for name in _group_options("logger")],
)
def test_every_config_group_option_composes_with_class2d(override):
    cfg = compose_job("class2d", [override])
    for key in ISSUE_KEYS:
        assert key in cfg, key
    assert {"accelerator", "devices", "strategy"} <= set(cfg.trainer)


def test_experiment_and_debug_together():
    cfg = compose_job("class2d", ["experiment=relion_tutorial", "debug=default"])
    assert cfg.classes == 4  # debug comes after experiment in the defaults list
    assert cfg.mask_diameter == 200
    assert cfg.logger.enabled is False


def test_issue_command_line_keys_exist_exactly():
    """The issue's command line composes without '+' (every key exists under that name)."""
    values = {
        "particles": "Extract/job012/particles.star",
        "output": "Class2D/job013",
        "classes": 100,
        "tau2_fudge": 2,
        "iterations": 100,
        "algorithm": "vdam",
        "mask_diameter": 200,
        "zero_mask": True,
        "highres_limit": -1,
        "center_classes": True,
        "psi_step": 6,
        "offset_range": 5,
        "offset_step": 1,
        "ctf": True,
        "seed": 1,
        "continue_from": "Class2D/job013/run_it050_optimiser.star",
    }
    assert sorted(values) == sorted(ISSUE_KEYS)
    overrides = [
        f"{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in values.items()
    ]
    cfg = compose_job("class2d", overrides)
    for key, value in values.items():
        assert cfg[key] == value, key
    with pytest.raises(Exception, match="nr_classes"):
        compose_job("class2d", ["nr_classes=3"])  # a misspelt key is not silently added


# ---------------------------------------------------------------- 2. full runs


@pytest.fixture(scope="module")
def vdam_run(tiny_simulation, tmp_path_factory):
    """VDAM, 4 iterations, files every 2; ``last.ckpt`` is also copied after iteration 2."""
    job = tmp_path_factory.mktemp("vdam") / "Class2D" / "job001"
    snapshot = job.parent / "it002.ckpt"
    original = RelionWriter._write

    def write_and_snapshot(self, trainer, pl_module, iteration):
        original(self, trainer, pl_module, iteration)
        if iteration == 2:
            shutil.copy(self.checkpoint_path, snapshot)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RelionWriter, "_write", write_and_snapshot)
        metrics, objects = _run(
            job,
            f"particles={tiny_simulation / 'particles.star'}",
            "iterations=4",
            "write_every=2",
            *FAST,
        )
    return SimpleNamespace(job=job, metrics=metrics, snapshot=snapshot, **objects)


@pytest.fixture(scope="module")
def em_run(tiny_simulation, tmp_path_factory):
    job = tmp_path_factory.mktemp("em") / "Class2D" / "job001"
    metrics, objects = _run(
        job,
        f"particles={tiny_simulation / 'particles.star'}",
        "algorithm=em",
        "iterations=2",
        "write_every=1",
        *FAST,
        logger="tensorboard",  # the default
    )
    return SimpleNamespace(job=job, metrics=metrics, **objects)


def _check_data_star(path: Path, input_star: Path) -> None:
    data = _particles(path)
    given = _particles(input_star)
    assert len(data) == len(given) == 120  # one row per input particle, input order
    assert list(data["rlnImageName"]) == list(given["rlnImageName"])
    classes = data["rlnClassNumber"].to_numpy()
    assert classes.min() >= 1
    assert classes.max() <= K
    for label in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        assert np.isfinite(data[label].to_numpy()).all()
    assert "rlnGroupNumber" in data


def test_vdam_run_writes_the_relion_file_set(vdam_run, tiny_simulation):
    job = vdam_run.job
    base = {"classes.mrcs", "model.star", "data.star", "optimiser.star"}
    moments = {"1moment.mrcs", "2moment.mrcs"}
    assert _iteration_files(job) == {
        0: base | moments,  # no sampling.star for it000
        2: base | moments | {"sampling.star"},
        4: base | moments | {"sampling.star"},
    }
    assert not (job / "run_unmasked_classes.mrcs").exists()  # EM only
    for name in ("classes_gallery.png", "last.ckpt", "note.txt", "config.yaml"):
        assert (job / name).is_file(), name
    assert _no_temp_files(job)
    assert vdam_run.metrics["iterations"] == 4

    classes = mrcfile.read(job / "run_it004_classes.mrcs")
    assert classes.shape == (K, 32, 32)
    assert np.isfinite(classes).all()
    padded = 2 * 32
    assert mrcfile.read(job / "run_it004_1moment.mrcs").shape == (
        2 * K,
        padded,
        2 * (padded // 2 + 1),
    )
    assert mrcfile.read(job / "run_it004_2moment.mrcs").shape == (
        K,
        padded,
        2 * (padded // 2 + 1),
    )
    model = read_star(job / "run_it004_model.star")
    rows = model["model_classes"]
    assert {"rlnGradMoment1", "rlnGradMoment2"} <= set(rows.columns)
    assert rows["rlnReferenceImage"].iloc[0].endswith("run_it004_classes.mrcs")
    assert rows["rlnClassDistribution"].sum() == pytest.approx(1.0, abs=1e-4)
    optimiser = read_star(job / "run_it004_optimiser.star")["optimiser_general"]
    assert int(optimiser["rlnDoGradientRefine"]) == 1
    assert int(optimiser["rlnCurrentIteration"]) == 4
    assert int(optimiser["rlnNumberOfIterations"]) == 4
    _check_data_star(job / "run_it004_data.star", tiny_simulation / "particles.star")
    assert (_particles(job / "run_it000_data.star")["rlnClassNumber"] == 0).all()


def test_em_run_writes_the_relion_file_set(em_run, tiny_simulation):
    job = em_run.job
    base = {"classes.mrcs", "model.star", "data.star", "optimiser.star"}
    assert _iteration_files(job) == {
        0: base,  # no moments in EM
        1: base | {"sampling.star"},
        2: base | {"sampling.star"},
    }
    for name in ("classes_gallery.png", "last.ckpt"):
        assert (job / name).is_file(), name
    assert list((job / "tensorboard").glob("events.out.tfevents.*"))
    assert _no_temp_files(job)
    # RELION's EM extra: the class images before solvent flattening, overwritten each time
    unmasked = mrcfile.read(job / "run_unmasked_classes.mrcs")
    masked = mrcfile.read(job / "run_it002_classes.mrcs")
    assert unmasked.shape == masked.shape == (K, 32, 32)
    corner = (slice(None), slice(0, 3), slice(0, 3))
    assert np.abs(masked[corner]).max() < np.abs(unmasked[corner]).max()

    model = read_star(job / "run_it002_model.star")
    assert "rlnGradMoment1" not in model["model_classes"]
    assert float(model["model_general"]["rlnTau2FudgeFactor"]) == pytest.approx(2.0)
    optimiser = read_star(job / "run_it002_optimiser.star")["optimiser_general"]
    assert int(optimiser["rlnDoGradientRefine"]) == 0
    _check_data_star(job / "run_it002_data.star", tiny_simulation / "particles.star")
    # EM: every particle is processed in every iteration
    data = _particles(job / "run_it001_data.star")
    assert (data["rlnNrOfSignificantSamples"] >= 1).all()
    assert (data["rlnMaxValueProbDistribution"] > 0).all()


# ---------------------------------------------------------------- 3. recovery of known views


def _assert_views_recovered(classes: np.ndarray, view: np.ndarray) -> None:
    majorities = set()
    for k in np.unique(classes):
        members = view[classes == k]
        if len(members) < 0.1 * len(view):
            continue  # a small class may hold anything
        counts = np.bincount(members, minlength=2)
        assert counts.max() / counts.sum() >= 0.8, (k, counts)
        majorities.add(int(counts.argmax()))
    assert majorities == {0, 1}  # both views have a class of their own


def test_em_separates_two_clear_views(two_views):
    """Fast variant: EM, 4 iterations, coarse search."""
    _, objects = _run(
        two_views.root / "Class2D" / "fast",
        f"particles={two_views.star}",
        "algorithm=em",
        "classes=3",
        "iterations=4",
        "psi_step=10",
        "offset_range=3",
    )
    _assert_views_recovered(
        objects["module"].particle_class_index.numpy(), two_views.view
    )


@pytest.mark.parametrize(
    ("algorithm", "iterations"),
    # VDAM's small early steps and T ramp need more iterations than EM on 120 particles
    # (with 12-15 it still mixes the views; 30 separates them)
    [("em", 12), ("vdam", 30)],
)
def test_default_search_separates_two_clear_views(two_views, algorithm, iterations):
    _, objects = _run(
        two_views.root / "Class2D" / algorithm,
        f"particles={two_views.star}",
        f"algorithm={algorithm}",
        "classes=3",
        f"iterations={iterations}",
        "write_every=100",
    )
    _assert_views_recovered(
        objects["module"].particle_class_index.numpy(), two_views.view
    )


# ---------------------------------------------------------------- 4. continuation

#: A continuation from the files is not bitwise: they are RELION's text format, and %12.6f keeps
#: only 3-4 significant digits of the noise spectrum σ² (~1e-3 for these images) and ~1e-6 of
#: offsets, norms, priors and the perturbation (class images and moments are float32 MRC, exact).
#: Measured (seeds 1-3, this set-up): 4e-7 to 9.4e-5 (VDAM, 2 iterations on) and 4.3e-5 to
#: 1.1e-4 (EM, 1 iteration on) of the largest class pixel; restoring σ² exactly brings VDAM to
#: 5e-7 and restoring every value exactly to 0. A Lightning checkpoint restores bitwise.
CONTINUE_RTOL = 1e-3


def test_iteration_zero_optimiser_header_keeps_the_sampling(vdam_run):
    # no run_it000_sampling.star: the steps come from the relion_refine arguments on the
    # header's second line (§B.5); with cryoavg's own command line there they fell back
    # to the defaults and a continuation from it000 drifted (tests/reliability)
    from cryoavg.class2d.continuation import read_iteration

    continuation = read_iteration(vdam_run.job / "run_it000_optimiser.star")
    assert continuation.sampling is None
    settings = continuation.settings
    assert settings.psi_step_degrees == 10.0  # FAST, not the default 6
    assert settings.offset_range_px == 3.0  # not the default 5
    assert settings.seed == vdam_run.module.settings.seed


def test_continue_from_optimiser_star_follows_the_same_path(vdam_run, tmp_path):
    job = tmp_path / "Class2D" / "job002"
    metrics, objects = _run(
        job,
        f"continue_from={vdam_run.job / 'run_it002_optimiser.star'}",
        "iterations=4",
        "write_every=2",
    )
    assert metrics["iterations"] == 4
    assert objects["module"].settings.n_classes == K  # from the files, not the config
    base = {
        "classes.mrcs",
        "model.star",
        "data.star",
        "optimiser.star",
        "sampling.star",
    }
    assert _iteration_files(job) == {4: base | {"1moment.mrcs", "2moment.mrcs"}}
    difference = _relative_difference(_classes(vdam_run.job, 4), _classes(job, 4))
    assert difference < CONTINUE_RTOL, difference
    same = (
        _particles(job / "run_it004_data.star")["rlnClassNumber"].to_numpy()
        == _particles(vdam_run.job / "run_it004_data.star")["rlnClassNumber"].to_numpy()
    )
    assert same.mean() >= 0.95


def test_em_continue_from_optimiser_star(em_run, tmp_path):
    job = tmp_path / "Class2D" / "job002"
    _run(
        job,
        f"continue_from={em_run.job / 'run_it001_optimiser.star'}",
        "iterations=2",
        "write_every=1",
    )
    difference = _relative_difference(_classes(em_run.job, 2), _classes(job, 2))
    assert difference < CONTINUE_RTOL, difference
    assert (job / "run_unmasked_classes.mrcs").is_file()


def test_continue_from_lightning_checkpoint_is_exact(vdam_run, tmp_path):
    info = read_checkpoint_info(vdam_run.snapshot)
    assert info["completed_iteration"] == 2
    job = tmp_path / "Class2D" / "job003"
    # no particles= : the checkpoint knows where they are
    metrics, _ = _run(
        job, f"continue_from={vdam_run.snapshot}", "iterations=4", "write_every=2"
    )
    assert metrics["iterations"] == 4
    assert set(_iteration_files(job)) == {4}
    np.testing.assert_array_equal(_classes(job, 4), _classes(vdam_run.job, 4))
    np.testing.assert_array_equal(
        _particles(job / "run_it004_data.star")["rlnClassNumber"],
        _particles(vdam_run.job / "run_it004_data.star")["rlnClassNumber"],
    )
    # nothing left to do: a one-line config error, and no job directory
    with pytest.raises(ConfigError, match="iterations=2"):
        _run(
            tmp_path / "Class2D" / "job004",
            f"continue_from={vdam_run.snapshot}",
            "iterations=2",
        )
    assert not (tmp_path / "Class2D" / "job004").exists()


def test_not_a_checkpoint_is_an_input_error(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"last\.ckpt"):
        read_checkpoint_info(bad)


# ---------------------------------------------------------------- 5. DDP

#: Measured: ≤ 6e-7 of the largest class pixel after 4 iterations. The statistics are sums,
#: so only the summation order (two ranks, one thread each) differs.
DDP_RTOL = 1e-4


def test_ddp_spawn_matches_a_single_process(vdam_run, tiny_simulation, tmp_path):
    job = tmp_path / "Class2D" / "ddp"
    metrics, objects = _run(
        job,
        f"particles={tiny_simulation / 'particles.star'}",
        "iterations=4",
        "write_every=2",
        *FAST,
        "trainer=ddp_spawn",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
    )
    assert objects["trainer"].world_size == 2
    assert metrics["iterations"] == 4
    assert _iteration_files(job) == _iteration_files(vdam_run.job)
    assert _no_temp_files(job)
    for iteration in (0, 2, 4):
        difference = _relative_difference(
            _classes(vdam_run.job, iteration), _classes(job, iteration)
        )
        assert difference < DDP_RTOL, (iteration, difference)
    single = _particles(vdam_run.job / "run_it004_data.star")
    both = _particles(job / "run_it004_data.star")
    assert len(both) == 120
    same = both["rlnClassNumber"].to_numpy() == single["rlnClassNumber"].to_numpy()
    assert same.mean() >= 0.95
    # the results came back to the main process
    np.testing.assert_array_equal(
        objects["module"].particle_class_index.numpy() + 1,
        both["rlnClassNumber"].to_numpy(),
    )


def test_ddp_from_the_command_line_matches_a_single_process(
    vdam_run, tiny_simulation, tmp_path
):
    """``trainer=ddp``: Lightning starts rank 1 by running the command line again."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cryoavg.cli.main",
            "class2d",
            f"particles={tiny_simulation / 'particles.star'}",
            "iterations=4",
            "write_every=2",
            *FAST,
            "trainer=ddp",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            "logger=none",
            "trainer.enable_progress_bar=false",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    # one job directory (rank 1 did not number its own), written once, by rank 0
    assert [p.name for p in (tmp_path / "Class2D").iterdir()] == ["job001"]
    job = tmp_path / "Class2D" / "job001"
    assert (job / "note.txt").read_text().count(" ++++ ") == 1
    assert _iteration_files(job) == _iteration_files(vdam_run.job)
    assert _no_temp_files(job)
    difference = _relative_difference(_classes(vdam_run.job, 4), _classes(job, 4))
    assert difference < DDP_RTOL, difference
    # Lightning's chatter is silenced in both processes
    for noise in (
        "Tip",
        "GPU available",
        "LeafSpec",
        "Initializing distributed",
        "sync_dist",
    ):
        assert noise not in out.stderr + out.stdout, noise
    assert (out.stdout + out.stderr).count("Class2D finished iteration 4") == 1


# ---------------------------------------------------------------- 6. bad input on the command line


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cryoavg.cli.main", "class2d", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def _write_particles(path: Path, source: Path, change) -> Path:
    blocks = read_star(source)
    optics, particles = change(blocks["optics"].copy(), blocks["particles"].copy())
    write_star(path, {"optics": optics, "particles": particles})
    return path


def _empty_table(tmp_path: Path, sim: Path) -> Path:
    """A particles loop with its labels but no rows."""
    text = (sim / "particles.star").read_text()
    head, block, rows = text.partition("data_particles")
    keep = [line for line in rows.splitlines() if not line.strip()[:1].isdigit()]
    path = tmp_path / "empty.star"
    path.write_text(head + block + "\n".join(keep) + "\n")
    return path


def _mixed_pixel_sizes(tmp_path: Path, sim: Path) -> Path:
    def change(optics, particles):
        second = optics.copy()
        second["rlnOpticsGroup"] = 2
        second["rlnOpticsGroupName"] = "opticsGroup2"
        second["rlnImagePixelSize"] = 10.0
        particles.loc[particles.index[60:], "rlnOpticsGroup"] = 2
        import pandas as pd

        return pd.concat([optics, second], ignore_index=True), particles

    return _write_particles(tmp_path / "mixed.star", sim / "particles.star", change)


def _no_ctf_columns(tmp_path: Path, sim: Path) -> Path:
    def change(optics, particles):
        ctf = [c for c in particles if c.startswith(("rlnDefocus", "rlnCtf"))]
        return optics, particles.drop(columns=[*ctf, "rlnPhaseShift"])

    return _write_particles(tmp_path / "noctf.star", sim / "particles.star", change)


def _nan_image(tmp_path: Path, sim: Path) -> Path:
    stacks = tmp_path / "Particles"
    shutil.copytree(sim / "Particles", stacks)
    with mrcfile.open(stacks / "mic00002.mrcs", "r+") as handle:
        handle.data[3, 5, 5] = np.nan

    def change(optics, particles):
        particles["rlnImageName"] = particles["rlnImageName"].str.replace(
            str(sim / "Particles"), str(stacks), regex=False
        )
        return optics, particles

    return _write_particles(tmp_path / "nan.star", sim / "particles.star", change)


def _ten_particles(tmp_path: Path, sim: Path) -> Path:
    return _write_particles(
        tmp_path / "ten.star", sim / "particles.star", lambda o, p: (o, p.iloc[:10])
    )


BAD_INPUT = {
    # case: (make the input, extra arguments, text the error line must contain)
    "missing particles": (None, ["particles=nothere.star"], "nothere.star"),
    "zero particles": (_empty_table, [], "empty.star"),
    "more classes than particles": (_ten_particles, ["classes=20"], "classes=20"),
    "mask larger than the box": (None, ["mask_diameter=1000"], "mask_diameter"),
    "unknown expand_class": (None, ["expand_class=random"], "expand_class"),
    "unknown estep_precision": (None, ["estep_precision=fp16"], "estep_precision"),
    "mixed pixel sizes": (_mixed_pixel_sizes, [], "mixed.star"),
    "NaN image": (_nan_image, [], "mic00002.mrcs"),
    "ctf without CTF columns": (_no_ctf_columns, ["ctf=true"], "noctf.star"),
    "missing continue_from": (
        None,
        ["continue_from=Class2D/job009/run_it010_optimiser.star"],
        "run_it010_optimiser.star",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_error_and_no_job_directory(
    case, tiny_simulation, tmp_path
):
    make, extra, fragment = BAD_INPUT[case]
    star = (
        make(tmp_path, tiny_simulation) if make else tiny_simulation / "particles.star"
    )
    out = _cli(
        f"particles={star}",
        "output=Class2D/job001",
        "classes=4",
        "iterations=2",
        "logger=none",
        "trainer.enable_progress_bar=false",
        *extra,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "Class2D").exists()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_is_one_line_error(tiny_simulation, tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cryoavg.cli.main",
            "class2d",
            f"particles={tiny_simulation / 'particles.star'}",
            "output=Class2D/job001",
            *FAST,
            "iterations=50",
            "logger=none",
            "trainer.enable_progress_bar=false",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        # a child inherits an ignored SIGINT (pytest started in the background by a
        # non-interactive shell), and Python then installs no Ctrl-C handler
        preexec_fn=_default_sigint,
    )
    marker = tmp_path / "Class2D" / "job001" / "run_it000_optimiser.star"
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists()
    os.kill(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    written = sorted(p.name for p in marker.parent.glob("run_it*_optimiser.star"))
    assert process.returncode == 2, (
        f"exit status {process.returncode}; written: {written[-3:]}\n"
        f"stderr: {stderr[-2000:]}\nstdout: {stdout[-2000:]}"
    )
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
    assert "Traceback" not in stderr


# ---------------------------------------------------------------- 7. interrupted writes


def test_failed_write_leaves_only_complete_files(
    tiny_simulation, tmp_path, monkeypatch
):
    job = tmp_path / "Class2D" / "job001"
    job.mkdir(parents=True)  # an existing directory is kept when the job fails
    real_write_star = export.write_star

    def write_star_then_fail(path, blocks, **options):
        if str(path).endswith("run_it002_data.star"):
            # half of the file, then the disk is full
            with atomic_write(path) as handle:
                handle.write("\n# version 50001\n\ndata_optics\n")
                raise OSError(28, "No space left on device")
        return real_write_star(path, blocks, **options)

    monkeypatch.setattr(export, "write_star", write_star_then_fail)
    with pytest.raises(OutputError, match=r"run_it002_data\.star"):
        _run(
            job,
            f"particles={tiny_simulation / 'particles.star'}",
            "iterations=3",
            "write_every=1",
            *FAST,
        )
    files = _iteration_files(job)
    assert "optimiser.star" in files[1]
    # the optimiser.star is written last: iteration 2 is visibly incomplete
    assert "optimiser.star" not in files[2]
    assert "data.star" not in files[2]
    assert 3 not in files
    assert _no_temp_files(job)
    # whatever iteration 2 did write is complete
    assert mrcfile.read(job / "run_it002_classes.mrcs").shape == (K, 32, 32)
    assert "model_classes" in read_star(job / "run_it002_model.star")

    # and the run goes on from the last complete iteration
    monkeypatch.setattr(export, "write_star", real_write_star)
    metrics, _ = _run(
        job,
        f"continue_from={job / 'run_it001_optimiser.star'}",
        "iterations=2",
        "write_every=1",
    )
    assert metrics["iterations"] == 2
    # continuing in place writes RELION's run_ct001_itNNN_* names (§B.7)
    assert (job / "run_ct001_it002_optimiser.star").is_file()


def test_continue_into_the_same_directory_uses_relion_ct_names(
    tiny_simulation, tmp_path
):
    from cryoavg.cli.class2d import run_class2d

    job = tmp_path / "Class2D" / "job001"
    base = [
        f"particles={tiny_simulation / 'particles.star'}",
        f"project_dir={tiny_simulation.parents[1]}",
        "classes=2",
        "write_every=1",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "psi_step=30",
        "offset_range=2",
        "offset_step=2",
    ]
    run_class2d(compose_job("class2d", [*base, f"output={job}", "iterations=2"]))
    first = (job / "run_it002_classes.mrcs").read_bytes()
    run_class2d(
        compose_job(
            "class2d",
            [
                *base,
                f"continue_from={job / 'run_it002_optimiser.star'}",
                "iterations=3",
            ],
        )
    )
    assert (job / "run_ct002_it003_optimiser.star").is_file()
    assert (job / "run_it002_classes.mrcs").read_bytes() == first


def test_interrupted_run_keeps_its_completed_iterations(tmp_path, monkeypatch):
    from cryoavg.cli import _jobs

    job = tmp_path / "Class2D" / "job001"
    keep = "*_it[0-9][0-9][0-9]_optimiser.star"
    with (  # noqa: PT012
        pytest.raises(KeyboardInterrupt),
        _jobs.job_directory(str(job), "Class2D", keep_if=keep),
    ):
        (job / "run_it000_optimiser.star").write_text("done\n")
        raise KeyboardInterrupt
    assert (job / "run_it000_optimiser.star").is_file()
    other = tmp_path / "Class2D" / "job002"
    with (
        pytest.raises(KeyboardInterrupt),
        _jobs.job_directory(str(other), "Class2D", keep_if="*_optimiser.star"),
    ):
        raise KeyboardInterrupt
    assert not other.exists()

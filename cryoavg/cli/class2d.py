r"""``cryoavg class2d``: reference-free 2D class averaging (RELION Class2D, VDAM or EM).

Example (the RELION tutorial's settings)::

    cryoavg class2d particles=Extract/job012/particles.star output=Class2D/job013 classes=100 \\
        tau2_fudge=2 iterations=100 algorithm=vdam mask_diameter=200 zero_mask=true \\
        highres_limit=-1 center_classes=true psi_step=6 offset_range=5 offset_step=1 ctf=true seed=1

Continue: ``cryoavg class2d continue_from=Class2D/job003/run_it050_optimiser.star iterations=100``
(or a Lightning ``.ckpt``). Without ``particles``, the job simulates the built-in demo data set
(HSP60, 20 % junk) into its directory and classifies it. Multi-process: ``trainer=ddp
trainer.devices=N`` (``trainer=ddp_spawn`` in notebooks / tests).
"""

import contextlib
import inspect
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cryoavg.cli._configs import config_dir
from cryoavg.cli._jobs import (
    check_config_types,
    job_directory,
    run_job,
)
from cryoavg.errors import ConfigError, InputError
from cryoavg.io.particles import ParticleTable, read_particles
from cryoavg.io.stack import ImageSource

log = logging.getLogger("cryoavg")

#: the type of every scalar key (checked first: one clear line for classes=abc)
CONFIG_TYPES: dict[str, type] = {
    **dict.fromkeys(
        ("classes", "iterations", "seed", "write_every", "max_significant"), int
    ),
    **dict.fromkeys(("grad_ini_subset", "grad_fin_subset", "data.chunk_size"), int),
    **dict.fromkeys(("data.num_workers",), int),
    **dict.fromkeys(
        (
            "tau2_fudge",
            "mask_diameter",
            "highres_limit",
            "psi_step",
            "offset_range",
            "offset_step",
            "class_inactivity_threshold",
            "pixel_size",
        ),
        float,
    ),
    **dict.fromkeys(
        (
            "zero_mask",
            "flatten_solvent",
            "center_classes",
            "ctf",
            "ctf_intact_first_peak",
            "norm",
            "scale",
            "preread",
            "logger.enabled",
        ),
        bool,
    ),
    **dict.fromkeys(
        (
            "algorithm",
            "expand_class",
            "particles",
            "output",
            "continue_from",
            "project_dir",
            "scratch_dir",
        ),
        str,
    ),
}
OPTIONAL_KEYS = (
    "max_significant",
    "grad_ini_subset",
    "grad_fin_subset",
    "mask_diameter",
    "pixel_size",
    "particles",
    "output",
    "continue_from",
    "project_dir",
    "scratch_dir",
)

DEMO = {"n_particles": 2000, "box": 64, "junk_fraction": 0.2, "snr": 0.1, "seed": 1}


def settings_from_config(cfg: DictConfig):
    """Build :class:`~cryoavg.class2d.settings.Class2DSettings` from the job config."""
    from cryoavg.class2d.settings import Class2DSettings

    check_config_types(cfg, CONFIG_TYPES, optional=OPTIONAL_KEYS)

    def optional_int(value: Any) -> int | None:
        return None if value is None else int(value)

    return Class2DSettings(
        n_classes=int(cfg.classes),
        tau2_fudge=float(cfg.tau2_fudge),
        n_iterations=int(cfg.iterations),
        algorithm=str(cfg.algorithm).lower(),
        particle_diameter_angstrom=None
        if cfg.mask_diameter is None
        else float(cfg.mask_diameter),
        zero_mask=bool(cfg.zero_mask),
        flatten_solvent=bool(cfg.flatten_solvent),
        highres_limit_angstrom=float(cfg.highres_limit),
        center_classes=bool(cfg.center_classes),
        psi_step_degrees=float(cfg.psi_step),
        offset_range_px=float(cfg.offset_range),
        offset_step_px=float(cfg.offset_step),
        do_ctf=bool(cfg.ctf),
        ctf_intact_first_peak=bool(cfg.ctf_intact_first_peak),
        do_norm=bool(cfg.norm),
        do_scale=bool(cfg.scale),
        class_inactivity_threshold=float(cfg.class_inactivity_threshold),
        expand_class=str(cfg.expand_class),
        seed=int(cfg.seed),
        write_every=int(cfg.write_every),
        preread_images=bool(cfg.preread),
        max_significant=optional_int(cfg.max_significant),
        grad_ini_subset=optional_int(cfg.grad_ini_subset),
        grad_fin_subset=optional_int(cfg.grad_fin_subset),
    )


def data_info(table: ParticleTable, source: ImageSource, settings) -> Any:
    """Check the particle set against the settings and summarise it for the module."""
    if table.has_mixed_pixel_sizes:
        raise InputError(
            table.path,
            "optics groups have different pixel sizes; Class2D needs one pixel size "
            "(rescale the particles to a common pixel size first)",
        )
    box = int(source.box_size)
    pixel = float(np.asarray(table.pixel_size_angstrom)[0])
    settings.validate(
        box_size=box, pixel_size_angstrom=pixel, n_particles=table.n_particles
    )
    if settings.do_ctf and not table.has_ctf:
        raise InputError(
            table.path,
            "ctf=true but the STAR file has no CTF columns (rlnDefocusU/V, ...); "
            "use ctf=false for CTF-free data",
        )
    if settings.do_ctf:
        table.check_ctf()
    # imported only now: Lightning takes seconds to import, and bad input is reported first
    from cryoavg.class2d.module import DataInfo

    premultiplied = torch.as_tensor(
        np.asarray(table.ctf_premultiplied, dtype=bool)
    ).reshape(-1)
    return DataInfo(
        n_particles=table.n_particles,
        box_size=box,
        pixel_size_angstrom=pixel,
        n_optics_groups=table.n_optics_groups,
        n_groups=table.n_groups,
        optics_group=torch.as_tensor(
            np.asarray(table.optics_group_index), dtype=torch.int64
        ),
        group=torch.as_tensor(
            np.asarray(table.micrograph_group_index), dtype=torch.int64
        ),
        ctf_premultiplied=premultiplied,
        has_ctf=bool(table.has_ctf),
    )


def initial_particle_values(
    table: ParticleTable, *, with_classes: bool = False
) -> dict[str, np.ndarray]:
    """Starting offsets / norms / psi (and classes when continuing) from the STAR columns."""
    frame = table.particles
    pixel = np.asarray(table.pixel_size_angstrom, dtype=np.float64)
    values: dict[str, np.ndarray] = {}
    if "rlnOriginXAngst" in frame and "rlnOriginYAngst" in frame:
        values["offset_x_px"] = frame["rlnOriginXAngst"].to_numpy(np.float64) / pixel
        values["offset_y_px"] = frame["rlnOriginYAngst"].to_numpy(np.float64) / pixel
    elif "rlnOriginX" in frame and "rlnOriginY" in frame:
        values["offset_x_px"] = frame["rlnOriginX"].to_numpy(np.float64)
        values["offset_y_px"] = frame["rlnOriginY"].to_numpy(np.float64)
    if "rlnNormCorrection" in frame:
        values["norm_correction"] = frame["rlnNormCorrection"].to_numpy(np.float64)
    if "rlnAnglePsi" in frame:
        values["psi_degrees"] = frame["rlnAnglePsi"].to_numpy(np.float64)
    if with_classes:
        # a continuation: the written per-particle results (kept for the particles
        # outside the next mini-batches, as RELION's data.star does)
        for label, name, dtype in (
            ("rlnClassNumber", "class_index", np.int64),
            ("rlnLogLikeliContribution", "log_likelihood", np.float64),
            ("rlnMaxValueProbDistribution", "pmax", np.float64),
            ("rlnNrOfSignificantSamples", "n_significant", np.int64),
        ):
            if label in frame:
                values[name] = frame[label].to_numpy(dtype)
        if "class_index" in values:
            values["class_index"] = values["class_index"] - 1
    for name, array in values.items():
        if not np.all(np.isfinite(array)):
            raise InputError(
                table.path, f"non-finite values in the input column for {name}"
            )
    return values


def _strategy(cfg_trainer: DictConfig) -> Any:
    name = str(cfg_trainer.get("strategy", "auto"))
    if name in ("ddp", "ddp_spawn", "ddp_fork"):
        from cryoavg.class2d.strategy import StatisticsDDPStrategy

        start = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork"}[name]
        return StatisticsDDPStrategy(start_method=start, process_group_backend=None)
    return name


def _secondary_rank() -> bool:
    """Whether a DDP launcher started this process as a rank other than global rank 0."""

    def value(name: str) -> int:
        try:
            return int(os.environ.get(name, "0") or 0)
        except ValueError:
            return 0

    return any(value(name) > 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _override(key: str, value: str) -> str:
    """``key=value`` for a Hydra command line (quoted unless plainly safe)."""
    if re.fullmatch(r"[\w./:+-]+", value):
        return f"{key}={value}"
    return f"{key}='" + value.replace("'", "\\'") + "'"


@contextlib.contextmanager
def ddp_child_command(
    cfg: DictConfig, job_dir: Path, demo_particles: Path | None
) -> Iterator[None]:
    """Let Lightning's ``ddp`` launcher start the other ranks with this job's command line.

    Lightning starts ranks 1…N−1 by running ``sys.argv`` again. ``cryoavg <job>`` has
    replaced ``sys.argv`` by ``["cryoavg <job>", key=value, ...]`` (see
    :mod:`cryoavg.cli.main`), which is not runnable; for the duration of the block it is
    a runnable command again, with the job directory (and the demo data) of this process
    pinned, so the other ranks neither number a new job directory nor simulate again.
    Outside the ``cryoavg`` command (tests, notebooks) nothing changes.
    """
    import __main__

    saved = list(sys.argv)
    prog = os.environ.get("CRYOAVG_PROG", "")
    if (
        str(cfg.trainer.get("strategy", "auto")) != "ddp"
        or not prog
        or saved[0] != prog
    ):
        yield
        return
    pinned = {"output": str(job_dir.resolve())}
    if demo_particles is not None:
        pinned["particles"] = str(demo_particles.resolve())
    keep = [a for a in saved[1:] if a.split("=", 1)[0].lstrip("+~") not in pinned]
    script = getattr(__main__, "__file__", None) or saved[0]
    job = prog.split()[-1]
    sys.argv = [script, job, *keep, *(_override(k, v) for k, v in pinned.items())]
    try:
        yield
    finally:
        sys.argv = saved


def make_demo_particles(job_dir: Path) -> Path:
    """Simulate the built-in demo data set into ``<job>/demo_data`` and return its STAR."""
    from cryoavg.cli.simulate import demo_map_path, prepare_volume
    from cryoavg.simulate.particles import SimulationParameters, simulate_particles
    from cryoavg.simulate.writer import write_simulation

    volume, pixel = prepare_volume(demo_map_path(), DEMO["box"], None, None)
    params = SimulationParameters(
        n_particles=DEMO["n_particles"],
        box_size=DEMO["box"],
        pixel_size_angstrom=pixel,
        junk_fraction=DEMO["junk_fraction"],
        snr=DEMO["snr"],
        seed=DEMO["seed"],
    )
    out = job_dir / "demo_data"
    out.mkdir(parents=True, exist_ok=True)
    write_simulation(
        out, simulate_particles(volume, params), params, map_path=str(demo_map_path())
    )
    log.info(
        "simulated the demo data set (%d HSP60 particles, 20%% junk) in %s",
        params.n_particles,
        out,
    )
    return out / "particles.star"


def read_checkpoint_info(path: Path) -> dict[str, Any]:
    """The cryoavg run information stored in a Class2D Lightning checkpoint.

    Raises
    ------
    InputError
        The file is not a readable checkpoint written by ``cryoavg class2d``.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # a truncated zip, not a torch file, ...
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(path, f"not a readable checkpoint ({first})") from err
    info = checkpoint.get("cryoavg_class2d") if isinstance(checkpoint, dict) else None
    if not isinstance(info, dict) or "settings" not in info:
        raise InputError(path, "not a checkpoint written by cryoavg class2d")
    return info


def run_class2d(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a Class2D job (testable entry point).

    Lightning's own messages and the deprecation warnings of its dependencies are silenced
    while it runs (:func:`~cryoavg.class2d.strategy.quiet_lightning`). Lightning is imported
    only after the input has been checked, so bad input is reported within a second or two.

    Returns
    -------
    tuple
        ``(metrics, objects)``: final figures and the job directory, module and trainer.
    """
    from cryoavg.class2d.settings import Class2DSettings

    settings = settings_from_config(cfg)
    settings.validate()
    from cryoavg.class2d.settings import parse_estep_memory_mib, parse_estep_precision

    estep_memory_mib = parse_estep_memory_mib(cfg.get("estep_memory_mib", "auto"))
    estep_precision = parse_estep_precision(cfg.get("estep_precision", "fp32"))
    continue_from = Path(cfg.continue_from) if cfg.continue_from else None
    ckpt_path = None
    ckpt_info: dict[str, Any] | None = None
    continuation = None
    particles_star = cfg.particles
    project_dir = cfg.project_dir
    if continue_from is not None:
        if not continue_from.is_file():
            raise InputError(continue_from, "file not found (continue_from)")
        if continue_from.suffix == ".ckpt":
            ckpt_path = str(continue_from)
            ckpt_info = read_checkpoint_info(continue_from)
            # as for an optimiser.star: the run's settings come from the checkpoint except
            # the number of iterations and how often files are written
            settings = Class2DSettings.from_dict(ckpt_info["settings"])
            if particles_star is None:
                particles_star = ckpt_info.get("particles")
                if project_dir is None:
                    project_dir = ckpt_info.get("project_dir")
        else:
            from cryoavg.class2d.continuation import read_iteration

            continuation = read_iteration(continue_from, project_dir=cfg.project_dir)
            # as RELION's --continue: everything comes from the optimiser.star except the
            # number of iterations and how often files are written
            settings = continuation.settings
        settings.n_iterations = int(cfg.iterations)
        settings.write_every = int(cfg.write_every)
        # cryoavg's own option, not stored in RELION's files
        settings.expand_class = str(cfg.expand_class)
        settings.validate()
    if continuation is None and particles_star is not None:
        # validation at the door: every problem of the STAR file and the stack headers
        # in one error, before the job directory exists
        from cryoavg.io.validate import validate_particles

        validate_particles(
            particles_star,
            ctf=settings.do_ctf,
            pixel_size_angstrom=None
            if cfg.pixel_size is None
            else float(cfg.pixel_size),
            project_dir=project_dir,
        )
    output = cfg.output
    if output is None and continue_from is not None:
        output = str(continue_from.parent)
    started = time.perf_counter()
    demo_particles: Path | None = None
    with contextlib.ExitStack() as context:
        job_dir = context.enter_context(
            job_directory(
                output,
                "Class2D",
                cfg,
                record=not _secondary_rank(),
                keep_if="*_it[0-9][0-9][0-9]_optimiser.star",
            )
        )
        if continuation is not None:
            table = continuation.particles
        else:
            if particles_star is None:
                demo_particles = make_demo_particles(job_dir)
                particles_star = str(demo_particles)
            table = read_particles(
                particles_star,
                pixel_size_angstrom=None
                if cfg.pixel_size is None
                else float(cfg.pixel_size),
                project_dir=project_dir,
            )
        if ckpt_info is not None and int(ckpt_info.get("n_particles", -1)) not in (
            -1,
            table.n_particles,
        ):
            raise InputError(
                continue_from,
                f"the checkpoint has {ckpt_info['n_particles']} particles but "
                f"{table.path} has {table.n_particles}",
            )
        source = ImageSource.from_table(table, preread=settings.preread_images)
        if cfg.get("scratch_dir") and not settings.preread_images:
            from cryoavg.io.scratch import scratch_copies

            source.relocate(
                context.enter_context(
                    scratch_copies(source.stack_paths, cfg.scratch_dir)
                )
            )
        info = data_info(table, source, settings)

        import lightning

        from cryoavg.class2d.callbacks import RelionWriter
        from cryoavg.class2d.module import Class2DModule
        from cryoavg.class2d.strategy import quiet_lightning
        from cryoavg.io.dataset import ParticleDataset

        dataset = ParticleDataset(table, source)

        context.enter_context(quiet_lightning())
        module = Class2DModule(
            settings,
            info,
            dataset,
            initial_particle_values=initial_particle_values(
                table, with_classes=continuation is not None
            ),
            start_iteration=continuation.iteration if continuation is not None else 0,
            chunk_size=int(cfg.data.chunk_size),
            num_workers=int(cfg.data.num_workers),
            estep_memory_mib=estep_memory_mib,
            estep_precision=estep_precision,
        )
        module.run_info = {
            "particles": str(Path(table.path).resolve()),
            "project_dir": str(Path(project_dir or ".").resolve()),
            "n_particles": int(table.n_particles),
        }
        if continuation is not None:
            from cryoavg.class2d.continuation import restore_state

            restore_state(module.state, continuation)
            module.initialised.fill_(True)
            module.completed_iteration.fill_(continuation.iteration)
            if continuation.sampling is not None:
                # the next iteration's perturbation continues from this one (§A.6.2)
                module.perturbation.fill_(float(continuation.sampling.perturbation))
        start_iteration = module.start_iteration
        completed = (
            int(ckpt_info.get("completed_iteration", 0))
            if ckpt_info is not None
            else start_iteration
        )
        if settings.n_iterations <= completed:
            raise ConfigError(
                f"iterations={settings.n_iterations} but the run is already at iteration "
                f"{completed}; ask for more iterations"
            )
        root = job_dir / "run"
        if (
            continuation is not None
            and job_dir.resolve() == continue_from.parent.resolve()
        ):
            # RELION §B.7: continuing into the same directory writes run_ctCCC_itNNN_*
            # so the files of the first run are never overwritten
            root = job_dir / f"run_ct{start_iteration:03d}"
        from cryoavg.class2d.export import relion_command_line

        # the optimiser.star header holds the relion_refine arguments (§B.5): RELION and
        # read_iteration take the sampling steps (and --offset, --preread_images) from it
        # when there is no _sampling.star, as after iteration 0
        relion_args = relion_command_line(
            settings,
            output_root=str(root),
            input_star=None if continuation is not None else str(table.path),
            continue_from=None if continuation is None else str(continue_from),
        )
        writer = RelionWriter(
            root,
            table,
            " ".join(relion_args) + " ",
            write_tensorboard=bool(cfg.logger.enabled),
            checkpoint_path=job_dir / "last.ckpt",
        )
        logger: Any = False
        if cfg.logger.enabled:
            logger = lightning.pytorch.loggers.TensorBoardLogger(
                str(job_dir), name="tensorboard", version="", default_hp_metric=False
            )
        callbacks: list[Any] = [writer]
        trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
        progress = bool(trainer_cfg.pop("enable_progress_bar", True))
        if progress:
            callbacks.append(lightning.pytorch.callbacks.RichProgressBar(leave=True))
        trainer_cfg["strategy"] = _strategy(cfg.trainer)
        trainer = lightning.Trainer(
            **trainer_cfg,
            max_epochs=settings.n_iterations - start_iteration,
            reload_dataloaders_every_n_epochs=1,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            logger=logger,
            callbacks=callbacks,
            enable_checkpointing=True,
            enable_progress_bar=progress,
            enable_model_summary=False,
            default_root_dir=str(job_dir),
            log_every_n_steps=1,
        )
        fit_options: dict[str, Any] = {}
        if "weights_only" in inspect.signature(trainer.fit).parameters:
            fit_options["weights_only"] = False  # our own checkpoint (not only tensors)
        context.enter_context(ddp_child_command(cfg, job_dir, demo_particles))
        try:
            trainer.fit(module, ckpt_path=ckpt_path, **fit_options)
        except SystemExit:
            # Lightning turns Ctrl-C into sys.exit(1); report it as cryoavg does
            if trainer.interrupted:
                raise KeyboardInterrupt from None
            raise
    elapsed = time.perf_counter() - started
    counts = torch.bincount(
        module.particle_class_index.clamp_min(0), minlength=settings.n_classes
    )
    metrics = {
        "iterations": int(module.completed_iteration),
        "wall_seconds": elapsed,
        "log_likelihood": float(module.state.log_likelihood),
        "nonempty_classes": int((counts > 0).sum()),
    }
    if not _secondary_rank():
        log.info(
            "Class2D finished iteration %d in %.1f s: %s",
            metrics["iterations"],
            elapsed,
            job_dir / f"run_it{metrics['iterations']:03d}_optimiser.star",
        )
    return metrics, {
        "job_dir": job_dir,
        "module": module,
        "trainer": trainer,
        "table": table,
    }


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="class2d")
def main(cfg: DictConfig) -> None:
    """Hydra entry point of ``cryoavg class2d``."""
    run_job(run_class2d, cfg)

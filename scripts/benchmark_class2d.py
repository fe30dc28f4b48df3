#!/usr/bin/env python
"""Class2D benchmark: quality and speed on the public case, plus E-step throughput.

Four parts, each printing a JSON summary (and writing it to ``--out``):

1. ``case``: runs ``cryoavg class2d`` on the public benchmark case of ``../shared/bench``
   (70S ribosome, 4000 particles + 1000 junk, 64 px; generated with ``make_case.sh`` if absent)
   with exactly RELION's settings from the kit's README (K=20, T=2, 100 VDAM iterations, mask
   300 Å, zero mask, centre classes, 6° / 1 px), measures CPU time (user+sys of the job process),
   wall time and peak RSS, scores the result with the kit's ``metrics2d.py`` and prints the ratios
   against RELION 5's figures from the kit's README (same kind of 2-core machine). The job runs
   under ``scripts/estep_probe.py``, which times every E-step and statistics call of the run;
   the E-step's GEMM rate over the whole run is then compared with ``torch.matmul`` of the same
   shapes, timed in this process afterwards (``estep_fraction_of_matmul_same_shapes``), and
   with ``torch.matmul`` timed inside the run right after every 10th E-step call
   (``estep_fraction_of_matmul_sampled_in_run``, robust to a machine whose speed drifts).
   Both fractions count the FLOPs of the direct formulation of the coarse scoring; the
   ``*_executed_*`` ones count the GEMMs the E-step runs (half of them where the ψ grid
   has half turns; see ``estep_gemm_seconds``).
2. ``estep``: E-step throughput. Times ``expectation_step`` on a realistic batch and counts the
   floating-point work of its scoring GEMMs; compares the achieved FLOP/s with ``torch.matmul`` of
   the same shape measured in the same run on the same device (and the E-step's time with
   ``torch.matmul`` on the GEMMs it executes), and reports peak memory. With
   ``--precision fp32 tf32 bf16`` it does so for each arithmetic of the coarse-search GEMMs
   (``estep_precision``; the matmul reference in the same arithmetic) and reports how far the
   results of the reduced precisions are from fp32 (log-likelihood, best pose, Pmax). On a CPU
   ``tf32`` is an emulation (rounded operands, fp32 GEMM), so it is not faster there.
3. ``splat``: the two ways of inserting the statistics' rows, timed at several fills (it
   calibrates ``DENSE_SPLAT_FILL`` on a device).
4. ``tutorial``: the tutorial-sized job of #7 (10k simulated particles of 64 px, K = 100,
   100 VDAM iterations, ``experiment=relion_tutorial``) end to end on one device: wall, CPU
   and peak memory of the job process, and the E-step's GEMM rate over the run as in ``case``.

Usage::

    python scripts/benchmark_class2d.py estep [--device cuda] [--precision fp32 bf16]
    python scripts/benchmark_class2d.py splat [--device cuda] [--classes 100]
    python scripts/benchmark_class2d.py case [--algorithm em] [--case-dir bench_out/ribosome70S]
    python scripts/benchmark_class2d.py tutorial [--device cuda] [--override key=value ...]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CRYOAVG_SHARED", REPO.parent / "shared"))

#: RELION 5.0.1 VDAM on the public case (../shared/bench/README.md)
RELION = {
    "view_error_deg": 70.8,
    "inplane_spread_deg": 47.6,
    "junk_isolation": 0.389,
    "good_in_junk_classes": 0.0003,
    "class_fidelity_ncc_median": 0.815,
    "class_fidelity_frc05_A_median": 27.8,
    "distinct_views": 11,
    "cpu_seconds": 1275.0,
    "peak_memory_mb": 198.0,
}
LOWER_IS_BETTER = {
    "view_error_deg",
    "inplane_spread_deg",
    "good_in_junk_classes",
    "class_fidelity_frc05_A_median",
    "cpu_seconds",
    "peak_memory_mb",
}


# ------------------------------------------------------------------------------ E-step
def _time(fn, repeats: int = 3) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _matmul_in(precision: str, a: torch.Tensor, m: torch.Tensor):
    """``a @ m`` as the E-step's coarse GEMM computes it in ``precision`` (a closure)."""
    from cryoavg.class2d.estep import _gemm_operand, _scoring_matmul

    lhs, rhs = _gemm_operand(a, precision), _gemm_operand(m.T.contiguous(), precision).T
    return lambda: _scoring_matmul(lhs, rhs, precision, torch.float32)


def benchmark_estep(args: argparse.Namespace) -> dict:
    """Time the E-step and compare its GEMM FLOP/s with torch.matmul on the same device."""
    from cryoavg.class2d.estep import (
        EStepBatch,
        _half_turn_grid,
        accumulate_statistics,
        expectation_step,
    )
    from cryoavg.class2d.projector import ClassProjector
    from cryoavg.class2d.sampling import PixelSet, PsiGrid, TranslationGrid
    from cryoavg.class2d.statistics import Class2DStatistics

    device = torch.device(args.device)
    torch.manual_seed(0)
    box, k, b = args.box, args.classes, args.batch
    psi = PsiGrid.build(args.psi_step)
    trans = TranslationGrid.build(args.offset_range, args.offset_step)
    current = args.current_size or box
    pixels = PixelSet.for_size(box, current, device=device)
    p = pixels.n_pixels
    # smooth random class images and particles made from them (converged-like regime)
    images = torch.nn.functional.avg_pool2d(torch.randn(k, 1, box, box), 5, 1, 2)[:, 0]
    projector = ClassProjector(images.to(device), r_max=current / 2)
    refs = projector.rotated_references(
        psi.fine_degrees[::2].to(device), pixels
    )  # (k, r, p)
    pick = torch.randint(0, k, (b,))
    rot = torch.randint(0, refs.shape[1], (b,))
    data = refs[pick.to(device), rot.to(device)] + 0.3 * torch.randn(
        b, p, dtype=refs.dtype, device=device
    )
    batch = EStepBatch(
        images_masked_rfft=data,
        images_unmasked_rfft=data.clone(),
        ctf=torch.ones(b, p, device=device),
        scale=torch.ones(b, device=device),
        sigma2=torch.full((b, p), args.sigma2, device=device),
        offset_px=torch.zeros(b, 2, device=device),
        index=torch.arange(b, device=device),
        optics_group=torch.zeros(b, dtype=torch.int64, device=device),
        group=torch.zeros(b, dtype=torch.int64, device=device),
        masked_power_beyond=torch.zeros(b, device=device),
        masked_shell_power_beyond=torch.zeros(b, box // 2 + 1, device=device),
    )
    prior = torch.full((k,), 1.0 / k, device=device)

    def run_estep(precision: str = "fp32"):
        return expectation_step(
            batch,
            projector,
            psi,
            trans,
            pixels,
            class_prior=prior,
            class_offset_prior_angstrom=torch.zeros(k, 2, device=device),
            sigma2_offset_angstrom2=100.0,
            pixel_size=args.pixel_size,
            coarse_size=args.coarse_size or current,
            max_significant=args.max_significant or 5 * k,
            precision=precision,
        )

    coarse_pixels = pixels.count_within(args.coarse_size or current) - 1
    r_c, t_c = psi.n_coarse, trans.n_coarse
    executed_shape = (
        b,
        t_c,
        coarse_pixels,
        k,
        r_c,
        _half_turn_grid(psi.coarse_degrees),
    )
    # real-arithmetic FLOPs of the direct formulation of the scoring GEMMs: cross term
    # (b·t, 2p)×(2p, k·r) and the |P|² term (b, p)×(p, k·r), coarse pass (the E-step runs
    # half of it where the ψ grid has half turns: estep_fraction_of_matmul_executed); the
    # fine pass is a gather over the significant set
    gemm_flops = 2.0 * (b * t_c) * (2 * coarse_pixels) * (
        k * r_c
    ) + 2.0 * b * coarse_pixels * (k * r_c)
    a = torch.randn(b * t_c, 2 * coarse_pixels, device=device)
    m = torch.randn(2 * coarse_pixels, k * r_c, device=device)
    same_shape_flops = 2.0 * a.shape[0] * a.shape[1] * m.shape[1]
    square = torch.randn(4096, 4096, device=device)
    precisions = list(dict.fromkeys(args.precision))
    by_precision, outputs = {}, {}
    for precision in precisions:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = _time(lambda precision=precision: run_estep(precision))
        out = run_estep(precision)
        same_shape = _time(_matmul_in(precision, a, m))
        dense = _time(_matmul_in(precision, square, square))
        executed = estep_gemm_seconds(
            executed_shape, device, precision=precision, executed=True
        )
        entry = {
            "estep_seconds_per_batch": seconds,
            "particles_per_second": b / seconds,
            "estep_gemm_gflops": gemm_flops / seconds / 1e9,
            "matmul_same_shape_gflops": same_shape_flops / same_shape / 1e9,
            "estep_fraction_of_matmul_executed": executed / seconds,
            "matmul_dense_4096_gflops": 2.0 * 4096**3 / dense / 1e9,
            "mean_significant": float(out.n_significant.float().mean()),
            "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20)
            if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
        by_precision[precision] = entry
        outputs[precision] = out
    reference = outputs.get("fp32")
    for precision, out in outputs.items():
        entry = by_precision[precision]
        if reference is not None and precision != "fp32":
            # agreement with fp32 on the same batch (docs/scaleout.md, "Reduced precision")
            d_ll = (out.log_likelihood - reference.log_likelihood).double()
            moved = (
                (out.best_class != reference.best_class)
                | (out.best_psi_degrees != reference.best_psi_degrees)
                | (out.best_offset_px != reference.best_offset_px).any(1)
            )
            entry.update(
                {
                    "max_abs_delta_log_likelihood": float(d_ll.abs().max()),
                    "min_delta_log_likelihood": float(d_ll.min()),
                    "max_abs_delta_log_likelihood_same_pose": float(
                        d_ll[~moved].abs().max()
                    )
                    if bool((~moved).any())
                    else 0.0,
                    "fraction_best_pose_changed": float(moved.double().mean()),
                    "max_abs_delta_pmax": float(
                        (out.pmax - reference.pmax).abs().max()
                    ),
                    "significant_ratio": float(
                        out.n_significant.sum() / reference.n_significant.sum()
                    ),
                }
            )
    first = by_precision[precisions[0]]
    if "fp32" in by_precision:
        for entry in by_precision.values():
            entry["speedup_vs_fp32"] = (
                by_precision["fp32"]["estep_seconds_per_batch"]
                / entry["estep_seconds_per_batch"]
            )
    result = run_estep(precisions[0])
    estep_seconds = first["estep_seconds_per_batch"]
    estep_flops = gemm_flops / estep_seconds
    matmul_flops = first["matmul_same_shape_gflops"] * 1e9
    dense_flops = first["matmul_dense_4096_gflops"] * 1e9
    peak = first["peak_memory_mb"]

    def run_statistics(dense_threshold):
        stats = Class2DStatistics.zeros(
            n_classes=k, box_size=box, n_optics_groups=1, n_groups=1, device=device
        )
        accumulate_statistics(
            batch,
            result,
            projector,
            psi,
            trans,
            pixels,
            stats,
            mode="vdam",
            class_offset_prior_angstrom=torch.zeros(k, 2, device=device),
            pixel_size=args.pixel_size,
            dense_threshold=dense_threshold,
        )

    # M-step statistics: per weighted row vs dense GEMMs, on the same E-step result
    rows_seconds = _time(lambda: run_statistics(None), repeats=2)
    dense_seconds_stats = _time(lambda: run_statistics(0.0), repeats=2)
    samples = result.samples
    groups = torch.unique(
        (samples.particle_row * k + samples.class_index) * psi.n_fine
        + samples.psi_fine_index
    ).numel()
    return {
        "device": str(device)
        if device.type == "cpu"
        else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "batch": b,
        "classes": k,
        "box": box,
        "coarse_psi": r_c,
        "coarse_translations": t_c,
        "coarse_pixels": coarse_pixels,
        "mean_significant": float(result.n_significant.float().mean()),
        "estep_seconds_per_batch": estep_seconds,
        "particles_per_second": b / estep_seconds,
        "estep_gemm_gflops": estep_flops / 1e9,
        "matmul_same_shape_gflops": matmul_flops / 1e9,
        "matmul_dense_4096_gflops": dense_flops / 1e9,
        "estep_fraction_of_matmul_same_shape": estep_flops / matmul_flops,
        "estep_fraction_of_matmul_executed": first["estep_fraction_of_matmul_executed"],
        "estep_fraction_of_dense_matmul": estep_flops / dense_flops,
        "peak_memory_mb": peak,
        "statistics_density": groups / (b * k * psi.n_fine),
        "statistics_rows_seconds": rows_seconds,
        "statistics_dense_seconds": dense_seconds_stats,
        "statistics_dense_speedup": rows_seconds / dense_seconds_stats,
        "precision": precisions[0],
        "by_precision": by_precision,
    }


# ------------------------------------------------------------------------------ case
def estep_gemm_seconds(
    shape, device, repeats: int = 3, precision: str = "fp32", executed: bool = False
) -> float:
    """Best time of ``torch.matmul`` on one E-step call's GEMMs (after a warm-up).

    ``shape = (b, t_c, p_c, k, r_c)`` or ``(b, t_c, p_c, k, r_c, half_turn)``.

    * ``executed=False``: the direct formulation of the coarse pass, the scoring GEMM
      ``(b·t_c, 2p_c) × (2p_c, k·r_c)`` in the E-step's ``precision``
      (``estep_precision``) and the fp32 ``|P|²`` GEMM ``(b, p_c) × (p_c, k·r_c)``.
      Compared with the E-step's time, this is its throughput in FLOP/s of the direct
      formulation (every coarse score computed by its own ``2p_c``-term dot product).
    * ``executed=True``: the GEMMs the E-step runs. With ``half_turn`` (an even number of
      coarse ψ, the second half the first turned by 180°) they are two
      ``(b·t_c, p_c) × (p_c, k·r_c/2)`` (real and imaginary parts) and
      ``(b, p_c) × (p_c, k·r_c/2)``: half the arithmetic (see ``_coarse_block``). Without,
      two ``(b·t_c, p_c) × (p_c, k·r_c)`` and the ``|P|²`` GEMM.

    Also used inside the run by ``estep_probe.py``.
    """
    b, t_c, p_c, n = _coarse_gemm_dims(shape, executed)
    # executed: real and imaginary parts, two GEMMs over p_c; direct: one over 2·p_c
    depth, count = (p_c, 2) if executed else (2 * p_c, 1)
    parts = [
        _matmul_in(
            precision,
            torch.randn(b * t_c, depth, device=device),
            torch.randn(depth, n, device=device),
        )
        for _ in range(count)
    ]
    power_a = torch.randn(b, p_c, device=device)
    power_b = torch.randn(p_c, n, device=device)
    return _time(lambda: ([f() for f in parts], power_a @ power_b), repeats)


def _coarse_gemm_dims(shape, executed: bool) -> tuple[int, int, int, int]:
    """``(b, t_c, p_c, n)`` of a call's coarse GEMMs.

    ``n`` is their number of columns: ``k·r_c``, or ``k·r_c/2`` for the GEMMs executed on
    a half-turn grid.
    """
    b, t_c, p_c, k, r_c = shape[:5]
    half_turn = len(shape) > 5 and bool(shape[5])
    return b, t_c, p_c, (k * r_c // 2 if (executed and half_turn) else k * r_c)


def estep_gemm_flops(shape, executed: bool = False) -> float:
    """FLOPs of :func:`estep_gemm_seconds`'s GEMMs for one call."""
    b, t_c, p_c, n = _coarse_gemm_dims(shape, executed)
    return 2.0 * b * t_c * 2 * p_c * n + 2.0 * b * p_c * n


def run_estep_rate(probe: dict, device: str = "cpu") -> dict:
    """E-step GEMM throughput over a whole run, from ``estep_probe.py``'s record.

    Here ``torch.matmul`` of every distinct call shape is timed in this process (same
    device and threads, the coarse GEMMs in the run's ``estep_precision``), and a
    fraction is the time those GEMMs take at ``torch.matmul``'s rate over the time the
    E-step calls took, for two sets of GEMMs (:func:`estep_gemm_seconds`):

    * ``estep_fraction_of_matmul_*``: the direct formulation, one scoring GEMM
      ``(b·t_c, 2p) × (2p, k·r_c)`` plus the ``|P|²`` GEMM: the E-step's throughput in
      FLOP/s of that formulation, as a fraction of ``torch.matmul``'s. It can exceed
      1.0, since the E-step computes the same scores with half the arithmetic where
      the ψ grid has half turns.
    * ``estep_fraction_of_matmul_executed_*``: the GEMMs the E-step actually runs:
      1.0 would be an E-step that is nothing but its GEMMs at full speed.
    """
    calls = probe.get("estep", [])
    if not calls:
        return {}
    by_shape: dict[tuple, list[float]] = {}
    for seconds, *shape in calls:
        by_shape.setdefault(tuple(shape), []).append(seconds)
    precision = probe.get("precision", "fp32")
    matmul_seconds = {False: 0.0, True: 0.0}
    flops = {False: 0.0, True: 0.0}
    for shape, times in by_shape.items():
        for executed in (False, True):
            matmul_seconds[executed] += estep_gemm_seconds(
                shape, device, precision=precision, executed=executed
            ) * len(times)
            flops[executed] += estep_gemm_flops(shape, executed) * len(times)
    estep_seconds = sum(c[0] for c in calls)
    statistics_seconds = sum(probe.get("statistics_seconds", []))
    figures = {
        "estep_precision": precision,
        "estep_calls": len(calls),
        "estep_half_turn_calls": sum(1 for c in calls if len(c) > 6 and c[6]),
        "estep_seconds_total": estep_seconds,
        "statistics_seconds_total": statistics_seconds,
        "estep_gemm_gflops": flops[False] / estep_seconds / 1e9,
        "matmul_same_shapes_gflops": flops[False] / matmul_seconds[False] / 1e9,
        "estep_fraction_of_matmul_same_shapes": matmul_seconds[False] / estep_seconds,
        "estep_executed_gemm_gflops": flops[True] / estep_seconds / 1e9,
        "estep_fraction_of_matmul_executed_same_shapes": matmul_seconds[True]
        / estep_seconds,
    }
    sampled = probe.get("sampled", [])
    if sampled:
        # the same ratios from every 10th call, its matmuls timed right after it
        estep_sampled = sum(s[0] for s in sampled)
        figures["estep_fraction_of_matmul_sampled_in_run"] = (
            sum(s[1] for s in sampled) / estep_sampled
        )
        if all(len(s) > 2 for s in sampled):
            figures["estep_fraction_of_matmul_executed_sampled_in_run"] = (
                sum(s[2] for s in sampled) / estep_sampled
            )
        figures["estep_fraction_sampled_calls"] = len(sampled)
        figures["probe_seconds"] = probe.get("probe_seconds", 0.0)
    return figures


# ------------------------------------------------------------------------------ insertion
def benchmark_splat(args: argparse.Namespace) -> dict:
    """Time the two ways of inserting a batch's rows, at several fills of the tables.

    ``StatisticsUpdate.apply_to`` inserts ``u`` rows (distinct (half, class, ψ)) either
    row by row (``pairs``) or by sparse products over whole (target, ψ) tables
    (``dense``); it picks dense from a fill ``u / (targets · r_f)`` of
    ``DENSE_SPLAT_FILL``. This prints both times and their ratio per fill, measured in
    the same run, to calibrate that threshold on a device.
    """
    from cryoavg.class2d.estep import DENSE_SPLAT_FILL, StatisticsUpdate
    from cryoavg.class2d.projector import ClassProjector
    from cryoavg.class2d.sampling import PixelSet, PsiGrid
    from cryoavg.class2d.statistics import Class2DStatistics

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    k, box = args.classes, args.box
    pixel_set = PixelSet.for_size(box, args.current_size or box).to(device)
    psi = PsiGrid.build(args.psi_step).fine_degrees.to(device)
    r_f, p = int(psi.shape[0]), pixel_set.n_pixels
    projector = ClassProjector(torch.randn(k, box, box, generator=gen).to(device))
    rows = []
    for fill in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0):
        u = max(1, round(fill * 2 * k * r_f))
        keys = torch.randperm(2 * k * r_f, generator=gen)[:u].sort().values.to(device)
        data = torch.randn(u, p, generator=gen, dtype=torch.complex64).to(device)
        weight = torch.rand(u, p, generator=gen).to(device)
        seconds = {}
        for splat in ("pairs", "dense"):

            def insert(splat=splat, data=data, weight=weight, keys=keys):
                update = StatisticsUpdate(
                    sums={},
                    data_rows=data,
                    weight_rows=weight,
                    target=keys // r_f,
                    psi_index=keys % r_f,
                    psi_degrees=psi,
                    pixel_set=pixel_set,
                )
                stats = Class2DStatistics.zeros(k, box, device=device)
                update.apply_to(stats, projector, splat=splat)

            seconds[splat] = _time(insert)
        rows.append(
            {
                "fill": round(u / (2 * k * r_f), 3),
                "rows": u,
                "pairs_ms": 1e3 * seconds["pairs"],
                "dense_ms": 1e3 * seconds["dense"],
                "dense_over_pairs": seconds["dense"] / seconds["pairs"],
            }
        )
    return {
        "device": str(device),
        "classes": k,
        "box": box,
        "pixels": p,
        "fine_psi": r_f,
        "dense_splat_fill": DENSE_SPLAT_FILL,
        "by_fill": rows,
    }


def _probed_class2d(out: Path, device: str) -> tuple[Path, list[str]]:
    """The probe's record file for run folder ``out``, and the start of its command line.

    The job runs on ``device`` (``trainer=gpu`` for CUDA, else ``trainer=cpu``) with no
    progress bar and no logger.
    """
    probe = out.parent / f"{out.name}_estep_probe.json"
    return probe, [
        sys.executable,
        str(REPO / "scripts" / "estep_probe.py"),
        str(probe),
        "class2d",
        f"trainer={'gpu' if torch.device(device).type == 'cuda' else 'cpu'}",
        "trainer.enable_progress_bar=false",
        "logger=none",
    ]


def _run_job(command: list[str]) -> dict:
    """Run one job process; its wall time, CPU time (user + sys) and peak RSS.

    The figures are that process's own (``os.wait4``), not those of every child this
    process has run (``RUSAGE_CHILDREN`` would report the peak RSS of an earlier
    ``cryoavg simulate`` as the job's).
    """
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise subprocess.CalledProcessError(code, command)
    return {
        "wall_seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_memory_mb": usage.ru_maxrss / 1024,
    }


def ensure_case(case_dir: Path) -> Path:
    """Generate the public case with the kit's make_case.sh if it is not there yet."""
    if (case_dir / "particles.star").is_file():
        return case_dir
    kit = SHARED / "bench" / "make_case.sh"
    if not kit.is_file():
        sys.exit(f"error: {kit}: benchmark kit not found (set CRYOAVG_SHARED)")
    case_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PY": sys.executable}
    subprocess.run(
        ["bash", str(kit), str(case_dir.resolve())], check=True, env=env, cwd=kit.parent
    )
    return case_dir


def benchmark_case(args: argparse.Namespace) -> dict:
    """Run cryoavg class2d on the public case and score it against RELION's figures."""
    case = ensure_case(Path(args.case_dir))
    out = Path(args.run_dir or f"bench_out/class2d_{args.algorithm}")
    if out.exists() and not args.reuse:
        sys.exit(
            f"error: {out}: exists (use --reuse to score it, or another --run-dir)"
        )
    iterations = args.iterations or (100 if args.algorithm == "vdam" else 25)
    probe, command = _probed_class2d(out, args.device)
    command += [
        f"particles={case / 'particles.star'}",
        f"output={out}",
        "classes=20",
        "tau2_fudge=2",
        f"iterations={iterations}",
        f"algorithm={args.algorithm}",
        "mask_diameter=300",
        "zero_mask=true",
        "highres_limit=-1",
        "center_classes=true",
        "psi_step=6",
        "offset_range=5",
        "offset_step=1",
        "ctf=true",
        f"seed={args.seed}",
    ]
    run = {}
    if not (out / f"run_it{iterations:03d}_optimiser.star").is_file():
        run = _run_job(command)
    metrics_script = SHARED / "bench" / "metrics2d.py"
    scored = subprocess.run(
        [
            sys.executable,
            str(metrics_script),
            "--case",
            str(case),
            "--data",
            str(out / f"run_it{iterations:03d}_data.star"),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=metrics_script.parent,
    )
    metrics = json.loads(scored.stdout)
    fidelity = metrics.get("class_fidelity", {})
    figures = {
        "view_error_deg": metrics.get("view_error_deg"),
        "inplane_spread_deg": metrics.get("inplane_spread_deg"),
        "junk_isolation": metrics.get("junk_isolation"),
        "good_in_junk_classes": metrics.get("good_in_junk_classes"),
        "class_fidelity_ncc_median": fidelity.get("ncc_median"),
        "class_fidelity_frc05_A_median": fidelity.get("frc05_A_median"),
        "distinct_views": metrics.get("distinct_views", fidelity.get("distinct_views")),
        **run,
    }
    if probe.is_file():
        figures.update(run_estep_rate(json.loads(probe.read_text()), args.device))
    comparison = {}
    for key, relion in RELION.items():
        ours = figures.get(key)
        if ours is None:
            continue
        better = ours <= relion if key in LOWER_IS_BETTER else ours >= relion
        comparison[key] = {
            "cryoavg": ours,
            "relion": relion,
            "ratio": ours / relion if relion else None,
            "at_least_as_good": bool(better),
        }
    return {
        "algorithm": args.algorithm,
        "iterations": iterations,
        "figures": figures,
        "vs_relion": comparison,
        "metrics2d": metrics,
    }


# ------------------------------------------------------------------------------ tutorial
#: the RELION-5 tutorial's Class2D job size (#7): 10k particles of 64 px, K = 100, 100 VDAM
#: iterations; RELION 5 takes just over 3 min on 4 GPUs and 13 min on 1 GPU
TUTORIAL_TARGET_SECONDS_H100 = 30.0


def ensure_tutorial_data(data_dir: Path, n_particles: int) -> Path:
    """Simulate a tutorial-sized data set with ``cryoavg simulate`` if it is not there.

    The bundled HSP60 map at 3.54 Å/px in 64 px boxes (the tutorial's β-galactosidase
    particles are 64 px at 3.54 Å/px, inside its 200 Å mask), CTF, SNR 0.05, 20 % junk.
    """
    if (data_dir / "particles.star").is_file():
        return data_dir
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    # run in the parent folder: the STAR file names its stacks relative to it
    command = [
        sys.executable,
        "-m",
        "cryoavg.cli.main",
        "simulate",
        f"output={data_dir.name}",
        f"n_particles={n_particles}",
        "box=64",
        "pixel_size=3.54",
        "seed=1",
    ]
    subprocess.run(command, check=True, cwd=data_dir.parent)
    return data_dir


def benchmark_tutorial(args: argparse.Namespace) -> dict:
    """Time the tutorial-sized Class2D job end to end (``experiment=relion_tutorial``).

    The wall time is that of the whole ``cryoavg class2d`` process: start-up, reading,
    all iterations and the written outputs. The job runs under ``estep_probe.py``, so the
    E-step's GEMM rate over the run is compared with ``torch.matmul`` of the same shapes
    on the same device (timed afterwards, and sampled inside the run).
    """
    device = torch.device(args.device)
    data = ensure_tutorial_data(Path(args.data_dir).resolve(), args.particles)
    out = Path(args.run_dir or f"bench_out/tutorial_{device.type}")
    if out.exists():
        sys.exit(f"error: {out}: exists (choose another --run-dir)")
    probe, command = _probed_class2d(out, args.device)
    command += [
        "experiment=relion_tutorial",
        f"particles={data / 'particles.star'}",
        f"project_dir={data.parent}",
        f"output={out}",
        f"iterations={args.iterations}",
        *args.override,
    ]
    figures = _run_job(command)
    figures.update(run_estep_rate(json.loads(probe.read_text()), str(device)))
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "particles": args.particles,
        "iterations": args.iterations,
        "overrides": args.override,
        "figures": figures,
    }
    if device.type == "cuda":
        result["target_seconds_h100"] = TUTORIAL_TARGET_SECONDS_H100
        result["meets_target_if_h100"] = (
            figures["wall_seconds"] <= TUTORIAL_TARGET_SECONDS_H100
        )
    return result


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="part", required=True)
    estep = sub.add_parser("estep")
    estep.add_argument("--box", type=int, default=64)
    estep.add_argument("--classes", type=int, default=20)
    estep.add_argument("--batch", type=int, default=256)
    estep.add_argument("--psi-step", type=float, default=6.0)
    estep.add_argument("--offset-range", type=float, default=5.0)
    estep.add_argument("--offset-step", type=float, default=1.0)
    estep.add_argument("--pixel-size", type=float, default=5.0)
    estep.add_argument("--current-size", type=int, default=0)
    estep.add_argument("--coarse-size", type=int, default=0)
    estep.add_argument(
        "--sigma2",
        type=float,
        default=0.05,
        help="noise variance: small = converged (few significant poses), large = early",
    )
    estep.add_argument(
        "--precision",
        nargs="+",
        choices=["fp32", "tf32", "bf16"],
        default=["fp32"],
        help="arithmetic of the coarse-search GEMMs (estep_precision), one or more; the "
        "top-level figures are those of the first, each is in by_precision",
    )
    estep.add_argument(
        "--max-significant",
        type=int,
        default=0,
        help="cap on significant samples per particle (0 = 5·k, -1 = none)",
    )
    splat = sub.add_parser("splat")
    splat.add_argument("--box", type=int, default=64)
    splat.add_argument("--current-size", type=int, default=46)
    splat.add_argument("--classes", type=int, default=20)
    splat.add_argument("--psi-step", type=float, default=6.0)
    case = sub.add_parser("case")
    case.add_argument("--algorithm", choices=["vdam", "em"], default="vdam")
    case.add_argument("--iterations", type=int, default=0)
    case.add_argument("--seed", type=int, default=1)
    case.add_argument("--case-dir", default="bench_out/ribosome70S")
    case.add_argument("--run-dir", default=None)
    case.add_argument("--reuse", action="store_true")
    tutorial = sub.add_parser("tutorial")
    tutorial.add_argument("--particles", type=int, default=10000)
    tutorial.add_argument("--iterations", type=int, default=100)
    tutorial.add_argument("--data-dir", default="bench_out/tutorial_sim")
    tutorial.add_argument("--run-dir", default=None)
    tutorial.add_argument(
        "--override",
        nargs="*",
        default=[],
        help="more key=value overrides for the class2d job (e.g. estep_precision=bf16)",
    )
    for p in (estep, splat, case, tutorial):
        p.add_argument(
            "--device", default="cuda" if torch.cuda.is_available() else "cpu"
        )
        p.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    parts = {
        "estep": benchmark_estep,
        "splat": benchmark_splat,
        "case": benchmark_case,
        "tutorial": benchmark_tutorial,
    }
    result = parts[args.part](args)
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Run ``cryoavg`` with the Class2D E-step and statistics timed (used by benchmark_class2d).

Usage: ``python scripts/estep_probe.py OUT.json class2d key=value ...``

Wraps the two hot functions that :mod:`cryoavg.class2d.module` calls,
``expectation_step`` and ``statistics_update``, records the wall time of each call and
the shape of its coarse pass, then runs the ordinary command line. On exit (also on an
error) it writes OUT.json:
``{"estep": [[seconds, b, t_c, p_c, k, r_c, half_turn], ...], "statistics_seconds":
[...], "precision": estep_precision}`` (``half_turn``: 1 where the coarse ψ grid lets the
E-step score half the angles by GEMMs and the rest by their 180° turns).
The benchmark turns these into the E-step's GEMM FLOP/s over a real run and compares
them with ``torch.matmul`` on the same shapes (``benchmark_class2d.estep_gemm_seconds``:
the direct formulation's GEMMs and those actually executed).

Every ``SAMPLE_EVERY``-th call is also followed at once by ``torch.matmul`` on that
call's GEMM shapes, timed (``"sampled": [[estep_seconds, direct_matmul_seconds,
executed_matmul_seconds], ...]``): a reference taken at the same moment of the run as
the E-step it is compared with, so a machine whose speed drifts (shared cores, clock
changes) does not bias the fraction.
These matmuls add a second or two to the job (``"probe_seconds"``).
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
import time
from pathlib import Path

import torch
from benchmark_class2d import estep_gemm_seconds  # this script's folder

import cryoavg.class2d.module as module
from cryoavg.class2d.estep import _half_turn_grid

RECORD: dict = {
    "estep": [],
    "statistics_seconds": [],
    "sampled": [],
    "probe_seconds": 0,
    "precision": "fp32",
}

#: every this many E-step calls, time torch.matmul on the call's shapes right after it
SAMPLE_EVERY = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_estep(function):
    def wrapper(batch, projector, psi_grid, translation_grid, pixel_set, **kwargs):
        device = batch.images_masked_rfft.device
        _sync(device)
        start = time.perf_counter()
        result = function(
            batch, projector, psi_grid, translation_grid, pixel_set, **kwargs
        )
        _sync(device)
        seconds = time.perf_counter() - start
        coarse = min(int(kwargs["coarse_size"]), pixel_set.image_size)
        shape = [
            batch.n_particles,
            int(translation_grid.coarse_px.shape[0]),
            pixel_set.count_within(coarse) - 1,
            projector.n_classes,
            psi_grid.n_coarse,
            int(_half_turn_grid(psi_grid.coarse_degrees)),
        ]
        precision = kwargs.get("precision", "fp32")
        RECORD["precision"] = precision
        RECORD["estep"].append([seconds, *shape])
        if len(RECORD["estep"]) % SAMPLE_EVERY == 0:
            probe_start = time.perf_counter()
            RECORD["sampled"].append(
                [
                    seconds,
                    estep_gemm_seconds(shape, device, 1, precision),
                    estep_gemm_seconds(shape, device, 1, precision, executed=True),
                ]
            )
            RECORD["probe_seconds"] += time.perf_counter() - probe_start
        return result

    return wrapper


def _timed_statistics(function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        RECORD["statistics_seconds"].append(time.perf_counter() - start)
        return result

    return wrapper


def _write(path: Path) -> None:
    path.write_text(json.dumps(RECORD))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    module.expectation_step = _timed_estep(module.expectation_step)
    module.statistics_update = _timed_statistics(module.statistics_update)
    atexit.register(_write, out)
    sys.argv = ["cryoavg", *sys.argv[2:]]
    runpy.run_module("cryoavg.cli.main", run_name="__main__")

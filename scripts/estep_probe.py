"""Run ``cryoavg`` with the Class2D E-step and statistics timed (used by benchmark_class2d).

Usage: ``python scripts/estep_probe.py OUT.json class2d key=value ...``

Wraps the two hot functions that :mod:`cryoavg.class2d.module` calls,
``expectation_step`` and ``statistics_update``, records the wall time of each call and
the shape of the coarse scoring GEMM it did, ``(b·t_c, 2·p_c) × (2·p_c, k·r_c)``, then
runs the ordinary command line. On exit (also on an error) it writes OUT.json:
``{"estep": [[seconds, b, t_c, p_c, k, r_c], ...], "statistics_seconds": [...]}``.
The benchmark turns these into the E-step's GEMM FLOP/s over a real run and compares
them with ``torch.matmul`` on the same shapes.
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
import time
from pathlib import Path

import torch

import cryoavg.class2d.module as module

RECORD: dict[str, list] = {"estep": [], "statistics_seconds": []}


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
        RECORD["estep"].append(
            [
                seconds,
                batch.n_particles,
                int(translation_grid.coarse_px.shape[0]),
                pixel_set.count_within(coarse) - 1,
                projector.n_classes,
                psi_grid.n_coarse,
            ]
        )
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

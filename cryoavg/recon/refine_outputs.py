"""RELION Refine3D-style output files of ``cryoavg refine3d`` (and continuation).

Per written iteration ``NNN`` (root ``<job>/run``):

* ``run_itNNN_half1_class001.mrc``, ``run_itNNN_half2_class001.mrc``: the
  half-references after the iteration (solvent-flattened, local symmetry imposed);
* ``run_itNNN_model.star``: ``data_model_general`` (resolution, image size, T, LL,
  ⟨Pmax⟩), ``data_model_classes``, ``data_model_class_1`` (per shell: resolution and
  the gold-standard FSC ``rlnGoldStandardFsc``), ``data_model_optics_group_N`` (noise
  spectra);
* ``run_itNNN_data.star``: the particles with their poses (``rlnAngleRot/Tilt/Psi``,
  ``rlnOriginX/YAngst``), ``rlnRandomSubset``, ``rlnMaxValueProbDistribution``,
  ``rlnNrOfSignificantSamples``, ``rlnLogLikeliContribution``;
* ``run_itNNN_state.pt`` (the full :class:`~cryoavg.recon.refine.RefineState`) and,
  written last, ``run_itNNN_optimiser.star`` (what ``continue_from`` reads).

After the final iteration also ``run_half1_class001_unfil.mrc``,
``run_half2_class001_unfil.mrc`` (unfiltered half maps, no local symmetry),
``run_class001.mrc`` (Wiener-filtered map from both halves), ``run_model.star`` and
``run_data.star``. Every file is written atomically.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cryoavg.errors import InputError
from cryoavg.io.atomic import atomic_path
from cryoavg.io.mrc import write_mrc
from cryoavg.io.particles import ParticleTable, write_particles
from cryoavg.io.star import read_star, write_star
from cryoavg.recon.fsc import shell_resolution_angstrom
from cryoavg.recon.refine import RefineSettings, RefineState

__all__ = ["read_continuation", "write_final", "write_iteration"]


def _model_blocks(
    state: RefineState,
    settings: RefineSettings,
    pixel: float,
    box: int,
    reference_names: list[str],
) -> dict[str, Any]:
    n_shells = box // 2 + 1
    shells = np.arange(n_shells)
    resolution = shell_resolution_angstrom(n_shells, pixel).numpy()
    inv = np.where(shells > 0, shells / (box * pixel), 0.0)
    general = {
        "rlnReferenceDimensionality": 3,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": box,
        "rlnCurrentResolution": float(state.resolution_angstrom),
        "rlnCurrentImageSize": int(state.current_size),
        "rlnPaddingFactor": 2,
        "rlnPixelSize": float(pixel),
        "rlnNrClasses": 1,
        "rlnNrBodies": 1,
        "rlnNrGroups": int(state.scale.numel()),
        "rlnNrOpticsGroups": int(state.sigma2_noise.shape[0]),
        "rlnTau2FudgeFactor": float(settings.tau2_fudge),
        "rlnLogLikelihood": float(state.log_likelihood_total),
        "rlnAveragePmax": float(state.ave_pmax),
        "rlnSigmaOffsetsAngst": float(np.sqrt(state.sigma2_offset_px)) * pixel,
    }
    classes = pd.DataFrame(
        {
            "rlnReferenceImage": reference_names,
            "rlnClassDistribution": [1.0] * len(reference_names),
            "rlnEstimatedResolution": [float(state.resolution_angstrom)]
            * len(reference_names),
        }
    )
    per_class = pd.DataFrame(
        {
            "rlnSpectralIndex": shells,
            "rlnResolution": inv,
            "rlnAngstromResolution": np.where(shells > 0, resolution, 999.0),
            "rlnGoldStandardFsc": state.fsc.numpy().astype(np.float64),
        }
    )
    blocks: dict[str, Any] = {
        "model_general": general,
        "model_classes": classes,
        "model_class_1": per_class,
    }
    for g in range(state.sigma2_noise.shape[0]):
        blocks[f"model_optics_group_{g + 1}"] = pd.DataFrame(
            {
                "rlnSpectralIndex": shells,
                "rlnResolution": inv,
                "rlnSigma2Noise": state.sigma2_noise[g].double().numpy(),
            }
        )
    return blocks


def _data_table(
    table: ParticleTable, state: RefineState, halves: np.ndarray, pixel: float
) -> pd.DataFrame:
    frame = table.particles_table_relion31().copy()
    angles = state.angles_degrees.numpy()
    offsets = state.offsets_px.numpy() * pixel  # yx Å
    frame["rlnAngleRot"] = angles[:, 0]
    frame["rlnAngleTilt"] = angles[:, 1]
    frame["rlnAnglePsi"] = angles[:, 2]
    frame["rlnOriginXAngst"] = offsets[:, 1]
    frame["rlnOriginYAngst"] = offsets[:, 0]
    frame["rlnClassNumber"] = np.ones(len(frame), dtype=np.int64)
    frame["rlnRandomSubset"] = np.asarray(halves, dtype=np.int64)
    frame["rlnMaxValueProbDistribution"] = state.pmax.numpy()
    frame["rlnNrOfSignificantSamples"] = state.n_significant.numpy().astype(np.int64)
    frame["rlnLogLikeliContribution"] = state.log_likelihood.numpy()
    for label in ("rlnOriginX", "rlnOriginY"):
        if label in frame:
            frame = frame.drop(columns=label)
    return frame


def write_iteration(
    root: Path,
    state: RefineState,
    settings: RefineSettings,
    table: ParticleTable,
    halves: np.ndarray,
    pixel: float,
    *,
    extra: dict[str, Any],
) -> dict[str, Path]:
    """Write the files of iteration ``state.iteration`` (module docstring).

    Parameters
    ----------
    root
        Output root, e.g. ``<job>/run``.
    state, settings
        The refinement after the iteration.
    table
        The input particles (their columns are kept in the data.star).
    halves
        ``(n,)`` half set of each particle.
    pixel
        Pixel size in Å.
    extra
        Run information stored in the state file and the optimiser.star (input paths,
        local-symmetry file, ...).

    Returns
    -------
    dict
        Written paths by kind.
    """
    it = state.iteration
    stem = f"{root}_it{it:03d}"
    box = int(state.references.shape[-1])
    paths = {
        "half1": Path(f"{stem}_half1_class001.mrc"),
        "half2": Path(f"{stem}_half2_class001.mrc"),
        "model": Path(f"{stem}_model.star"),
        "data": Path(f"{stem}_data.star"),
        "state": Path(f"{stem}_state.pt"),
        "optimiser": Path(f"{stem}_optimiser.star"),
    }
    write_mrc(paths["half1"], state.references[0].numpy(), pixel)
    write_mrc(paths["half2"], state.references[1].numpy(), pixel)
    write_star(
        paths["model"],
        _model_blocks(state, settings, pixel, box, [paths["half1"].name]),
    )
    write_particles(
        paths["data"], _data_table(table, state, halves, pixel), table.optics_table()
    )
    buffer = io.BytesIO()
    torch.save(
        {
            "state": state.to_dict(),
            "settings": asdict(settings),
            "halves": np.asarray(halves),
            "extra": extra,
        },
        buffer,
    )
    with atomic_path(paths["state"]) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())
    optimiser = {
        "rlnOutputRootName": str(root),
        "rlnModelStarFile": paths["model"].name,
        "rlnExperimentalDataStarFile": paths["data"].name,
        "rlnCurrentIteration": it,
        "rlnNumberOfIterations": int(settings.n_iterations),
        "rlnTau2FudgeFactor": float(settings.tau2_fudge),
        "rlnLocalSymmetryFile": str(extra.get("local_symmetry") or ""),
        "rlnParticleDiameter": float(settings.particle_diameter_angstrom or -1.0),
        "rlnDoGradientRefine": int(settings.algorithm == "vdam"),
        "rlnHasConverged": int(it >= settings.n_iterations),
    }
    write_star(paths["optimiser"], {"optimiser_general": optimiser})
    return paths


def write_final(
    root: Path,
    state: RefineState,
    settings: RefineSettings,
    table: ParticleTable,
    halves: np.ndarray,
    pixel: float,
) -> dict[str, Path]:
    """Write the converged files (``run_class001.mrc``, unfiltered halves, ...)."""
    if state.final_map is None or state.final_halves is None:
        raise ValueError("the final iteration has not been run")
    paths = {
        "half1_unfil": Path(f"{root}_half1_class001_unfil.mrc"),
        "half2_unfil": Path(f"{root}_half2_class001_unfil.mrc"),
        "map": Path(f"{root}_class001.mrc"),
        "model": Path(f"{root}_model.star"),
        "data": Path(f"{root}_data.star"),
    }
    write_mrc(paths["half1_unfil"], state.final_halves[0].numpy(), pixel)
    write_mrc(paths["half2_unfil"], state.final_halves[1].numpy(), pixel)
    write_mrc(paths["map"], state.final_map.numpy(), pixel)
    box = int(state.final_map.shape[-1])
    write_star(
        paths["model"], _model_blocks(state, settings, pixel, box, [paths["map"].name])
    )
    write_particles(
        paths["data"], _data_table(table, state, halves, pixel), table.optics_table()
    )
    return paths


def read_continuation(path: Path) -> dict[str, Any]:
    """Read the state saved beside a ``run_itNNN_optimiser.star``.

    Returns
    -------
    dict
        ``state`` (:class:`RefineState`), ``settings`` (dict), ``halves``, ``extra``.

    Raises
    ------
    InputError
        Not an optimiser.star of cryoavg refine3d, or its state file is missing or
        unreadable.
    """
    path = Path(path)
    if not path.name.endswith("_optimiser.star"):
        raise InputError(path, "continue_from must be a run_itNNN_optimiser.star")
    read_star(path)  # a malformed file is reported here
    state_path = path.with_name(path.name.replace("_optimiser.star", "_state.pt"))
    if not state_path.is_file():
        raise InputError(state_path, "state file not found beside the optimiser.star")
    try:
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        state = RefineState.from_dict(saved["state"])
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(
            state_path, f"not a readable refine3d state ({first})"
        ) from err
    return {
        "state": state,
        "settings": saved["settings"],
        "halves": np.asarray(saved["halves"]),
        "extra": saved.get("extra", {}),
    }

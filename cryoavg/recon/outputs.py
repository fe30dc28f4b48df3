"""Output files of a reconstruction, named and laid out like RELION's Refine3D.

Files in a job directory (``root`` = ``run``, class 1)::

    run_half1_class001_unfil.mrc   half map 1 (masked, not low-pass filtered)
    run_half2_class001_unfil.mrc   half map 2
    run_class001.mrc               map from all particles
    run_fsc.star                   data_general + data_fsc (FSC curve, resolution)
    run_data.star                  particles with the rlnRandomSubset used

The FSC table has one row per shell ``i = 0 .. n // 2``: ``rlnSpectralIndex`` (i),
``rlnResolution`` (``i / (n pixel)`` 1/Å), ``rlnAngstromResolution`` (``n pixel / i`` Å;
999 for shell 0, as RELION writes), ``rlnFourierShellCorrelation`` (final half maps),
``rlnFourierShellCorrelationUnregularised`` (the FSC that set the Wiener term; a cryoavg
label) and ``rlnSsnrMap`` (``f / (1 - f)`` of the full-set FSC).
"""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryoavg.io.mrc import write_mrc
from cryoavg.io.star import write_star
from cryoavg.recon.fsc import fsc_to_ssnr

__all__ = ["MapNames", "fsc_table", "map_names", "write_fsc_star", "write_maps"]


class MapNames:
    """Paths of the maps of one class in a job directory."""

    def __init__(self, directory: Path, root: str = "run", class_number: int = 1):
        stem = f"{root}_class{class_number:03d}"
        self.half1 = directory / f"{root}_half1_class{class_number:03d}_unfil.mrc"
        self.half2 = directory / f"{root}_half2_class{class_number:03d}_unfil.mrc"
        self.full = directory / f"{stem}.mrc"
        self.fsc_star = directory / f"{root}_fsc.star"
        self.data_star = directory / f"{root}_data.star"


def map_names(
    directory: str | os.PathLike[str], root: str = "run", class_number: int = 1
) -> MapNames:
    """File names of :class:`MapNames` in ``directory``."""
    return MapNames(Path(directory), root, class_number)


def fsc_table(
    fsc: torch.Tensor,
    pixel_size_angstrom: float,
    fsc_unregularised: torch.Tensor | None = None,
) -> pd.DataFrame:
    """The ``data_fsc`` loop (columns in the module docstring).

    Parameters
    ----------
    fsc
        ``(n // 2 + 1,)`` FSC of the final half maps.
    pixel_size_angstrom
        Pixel size in Å.
    fsc_unregularised
        ``(n // 2 + 1,)`` FSC of the unregularised half maps, or ``None``.

    Returns
    -------
    pandas.DataFrame
        One row per shell.
    """
    n_shells = int(fsc.shape[0])
    box = 2 * (n_shells - 1)
    shells = np.arange(n_shells)
    frequency = shells / (box * pixel_size_angstrom)
    angstrom = np.where(
        shells > 0, box * pixel_size_angstrom / np.maximum(shells, 1), 999.0
    )
    curve = fsc.detach().cpu().double()
    table = {
        "rlnSpectralIndex": shells.astype(np.int64),
        "rlnResolution": frequency,
        "rlnAngstromResolution": angstrom,
        "rlnFourierShellCorrelation": curve.numpy(),
    }
    if fsc_unregularised is not None:
        table["rlnFourierShellCorrelationUnregularised"] = (
            fsc_unregularised.detach().cpu().double().numpy()
        )
    ssnr = fsc_to_ssnr(curve, whole=True).numpy()
    table["rlnSsnrMap"] = np.where(curve.numpy() > 0, ssnr, 0.0)
    return pd.DataFrame(table)


def write_fsc_star(
    path: str | os.PathLike[str],
    fsc: torch.Tensor,
    pixel_size_angstrom: float,
    resolution_angstrom: float,
    *,
    fsc_unregularised: torch.Tensor | None = None,
    general: dict[str, object] | None = None,
) -> None:
    """Write ``data_general`` (resolution, sizes) and ``data_fsc`` atomically.

    Parameters
    ----------
    path
        Output STAR file.
    fsc, fsc_unregularised
        Curves as in :func:`fsc_table`.
    pixel_size_angstrom
        Pixel size in Å.
    resolution_angstrom
        Resolution at FSC = 0.143.
    general
        Further ``data_general`` entries (RELION labels).
    """
    box = 2 * (int(fsc.shape[0]) - 1)
    header: dict[str, object] = {
        "rlnFinalResolution": float(resolution_angstrom),
        "rlnPixelSize": float(pixel_size_angstrom),
        "rlnOriginalImageSize": int(box),
        "rlnResolutionThreshold": 0.143,
    }
    header.update(general or {})
    write_star(
        path,
        {
            "general": header,
            "fsc": fsc_table(fsc, pixel_size_angstrom, fsc_unregularised),
        },
    )


def write_maps(
    names: MapNames,
    pixel_size_angstrom: float,
    *,
    half1: torch.Tensor | None = None,
    half2: torch.Tensor | None = None,
    full: torch.Tensor | None = None,
) -> list[Path]:
    """Write the maps that are given (each atomically); return the paths written."""
    written = []
    for path, volume in (
        (names.half1, half1),
        (names.half2, half2),
        (names.full, full),
    ):
        if volume is not None:
            write_mrc(path, volume.detach().cpu().float(), pixel_size_angstrom)
            written.append(path)
    return written

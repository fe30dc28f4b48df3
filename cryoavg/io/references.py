"""Files named inside RELION STAR files: locating them, reading class images.

RELION writes names relative to the project directory (where the job ran). Moved or
copied jobs are still found: :func:`locate_relion_file` also tries the naming file's
directory and its parents, and finally the bare name beside it.
"""

import os
from pathlib import Path

import numpy as np

from cryoavg.errors import InputError
from cryoavg.io.mrc import read_image_stack
from cryoavg.io.particles import parse_image_name

__all__ = ["locate_relion_file", "read_reference_images"]


def locate_relion_file(
    name: str,
    anchor: str | os.PathLike[str],
    project_dir: str | os.PathLike[str] | None,
    what: str,
) -> tuple[Path, Path]:
    """Find the file ``name`` written inside the RELION file ``anchor``.

    Parameters
    ----------
    name
        The name as written (absolute, or relative to the project directory).
    anchor
        The file that names it (used for the fallbacks and the error message).
    project_dir
        The project directory (default: the current directory).
    what
        What the file is, for the error message (``"model"``, ``"class stack"``).

    Returns
    -------
    path : Path
        The existing file.
    base : Path
        The directory a relative name was relative to (the project directory);
        ``project_dir`` (or the current directory) for absolute names and bare names
        found beside ``anchor``.

    Raises
    ------
    InputError
        No name, or nothing found; the message names ``anchor`` and the places tried.
    """
    anchor_path = Path(anchor)
    text = str(name).strip()
    if not text or text in ("None", '""'):
        raise InputError(anchor_path, f"no {what} file is named")
    relative = Path(text)
    base = Path(project_dir) if project_dir is not None else Path.cwd()
    if relative.is_absolute():
        if relative.is_file():
            return relative, base
        raise InputError(anchor_path, f"{what} file '{text}' not found")
    directory = anchor_path.absolute().parent
    for candidate_base in dict.fromkeys([base, directory, *directory.parents]):
        candidate = candidate_base / relative
        if candidate.is_file():
            return candidate, candidate_base
    beside = directory / relative.name
    if beside.is_file():
        return beside, base
    raise InputError(
        anchor_path,
        f"{what} file '{text}' not found (looked in {base}, in {directory} and its "
        "parent directories)",
    )


def read_reference_images(
    names: list[str],
    model_path: str | os.PathLike[str],
    project_dir: str | os.PathLike[str] | None,
    box_size: int | None = None,
) -> tuple[np.ndarray, float | None]:
    """Class images named by a model's ``rlnReferenceImage`` (``NNNNNN@stack.mrcs``).

    Parameters
    ----------
    names
        ``k`` image names, in class order.
    model_path
        The model STAR file (named in errors, anchor of relative names).
    project_dir
        The project directory (see :func:`locate_relion_file`).
    box_size
        Expected box ``N``; ``None`` = that of the first stack.

    Returns
    -------
    images : numpy.ndarray
        ``float32 (k, N, N)``.
    header_pixel_angstrom : float or None
        The first pixel size set in a stack header (``None`` when none is).

    Raises
    ------
    InputError
        A bad name, a missing stack, a box mismatch, an index beyond a stack, or a
        single stack whose image count differs from ``k``.
    """
    model_path = Path(model_path)
    k = len(names)
    header_pixel: float | None = None
    stacks: dict[str, tuple[Path, np.ndarray]] = {}
    images: list[np.ndarray] = []
    for i, name in enumerate(names):
        try:
            index0, stack_name = parse_image_name(str(name))
        except ValueError as err:
            raise InputError(model_path, f"class {i + 1}: {err}") from err
        if stack_name not in stacks:
            stack_path, _ = locate_relion_file(
                stack_name, model_path, project_dir, "class stack"
            )
            data, stack_pixel = read_image_stack(stack_path)
            if header_pixel is None:
                header_pixel = stack_pixel
            expected = box_size if box_size is not None else data.shape[-1]
            if data.shape[-2:] != (expected, expected):
                raise InputError(
                    stack_path,
                    f"class images are {data.shape[-1]}x{data.shape[-2]} px but the "
                    f"model's box is {expected} px",
                )
            box_size = expected
            stacks[stack_name] = (stack_path, data)
        stack_path, data = stacks[stack_name]
        if index0 >= data.shape[0]:
            raise InputError(
                stack_path,
                f"has {data.shape[0]} images but class {i + 1} refers to {name}",
            )
        images.append(data[index0])
    if len(stacks) == 1:
        stack_path, data = next(iter(stacks.values()))
        if data.shape[0] != k:
            raise InputError(
                stack_path,
                f"has {data.shape[0]} class images but the model has {k} classes",
            )
    size = box_size or 0
    result = np.stack(images) if images else np.zeros((0, size, size))
    return result.astype(np.float32), header_pixel

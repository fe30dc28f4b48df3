"""MRC images, stacks and maps through :mod:`mrcfile`, with clear errors.

Conventions
-----------
* Arrays are NumPy, C order: a single image is ``(h, w)`` = ``(ny, nx)``, a stack
  ``(n, h, w)``, a map ``(d, h, w)`` = ``(nz, ny, nx)``. Reads return ``float32``.
* A particle stack is any MRC file whose sections are images: ``.mrcs`` with
  ``ispg = 0`` as well as ``.mrc`` with ``ispg = 1`` (RELION reads ``N@file.mrc`` as
  section N of the file regardless of the header's space group).
* Pixel (voxel) sizes are in Å. MRC headers often carry 0 or 1.0 instead of the real
  value; :func:`read_mrc` returns the header value (``None`` when it is not positive)
  and the caller decides (for particles the STAR file wins).
* Headers are validated before any data is mapped: missing file, not an MRC file,
  unsupported (complex) mode and truncated data each raise one
  :class:`~cryoavg.errors.InputError`. The map ID ``MAP`` may be missing (some
  programs do not write it) as long as the header is otherwise consistent with the
  file size. mrcfile's warnings about damaged headers are never passed on.
* Writes are atomic (:func:`cryoavg.io.atomic.atomic_path`) and set the voxel size and
  the header statistics (min, max, mean, rms).

Example
-------
>>> stack = open_stack("Extract/job007/Movies/mic001.mrcs")  # doctest: +SKIP
>>> stack.shape  # doctest: +SKIP
(112, 256, 256)
>>> image = np.asarray(stack[5], dtype=np.float32)  # doctest: +SKIP
>>> write_mrc("classes.mrcs", averages, 1.34, is_stack=True)  # doctest: +SKIP
"""

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mrcfile
import mrcfile.mrcfile
import mrcfile.utils
import numpy as np

from cryoavg.errors import InputError
from cryoavg.io.atomic import atomic_path

__all__ = [
    "MrcHeaderInfo",
    "header_pixel_size",
    "open_stack",
    "read_image_stack",
    "read_map_3d",
    "read_mrc",
    "read_mrc_header",
    "write_mrc",
]

_HEADER_BYTES = 1024
_COMPLEX_MODES = (3, 4)


@contextlib.contextmanager
def _quiet_mrcfile() -> Iterator[None]:
    """Silence mrcfile's header RuntimeWarnings; headers are validated here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


class _HeaderReader(mrcfile.mrcfile.MrcFile):
    """``MrcFile`` that never reads (allocates) more bytes than the file holds.

    mrcfile allocates the extended header size written in the header before reading
    it; in a damaged or non-MRC file that field can claim gigabytes.
    """

    def _read_bytearray_from_stream(
        self, number_of_bytes: int
    ) -> tuple[bytearray, int]:
        remaining = max(0, self._get_file_size() - self._iostream.tell())
        return super()._read_bytearray_from_stream(min(int(number_of_bytes), remaining))


@dataclass(frozen=True)
class MrcHeaderInfo:
    """What an MRC header says about a file, checked against the file size.

    Attributes
    ----------
    path
        The file.
    nx, ny, nz
        Columns, rows and sections (``nz`` images for a stack).
    mode
        MRC data mode (0 int8, 1 int16, 2 float32, 6 uint16, 12 float16).
    space_group
        ``ispg`` (0 for image stacks, 1 for volumes, >= 401 volume stacks).
    dtype
        NumPy dtype of the stored data (with byte order).
    data_offset_bytes
        Offset of the first data byte (1024 + extended header).
    voxel_size_angstrom
        Header voxel size along x, ``None`` when the header value is not positive.
    has_map_id
        Whether the header carries the ``MAP`` identifier.
    """

    path: Path
    nx: int
    ny: int
    nz: int
    mode: int
    space_group: int
    dtype: np.dtype
    data_offset_bytes: int
    voxel_size_angstrom: float | None
    has_map_id: bool

    @property
    def n_sections(self) -> int:
        """Number of 2D sections (images of a stack, slices of a map)."""
        return self.nz

    @property
    def image_shape(self) -> tuple[int, int]:
        """Shape ``(h, w)`` of one section."""
        return (self.ny, self.nx)


def _positive_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None


def read_mrc_header(path: str | os.PathLike[str]) -> MrcHeaderInfo:
    """Read and validate an MRC header without reading the data.

    Parameters
    ----------
    path
        An MRC file (``.mrc``, ``.mrcs``, ``.map`` ...).

    Returns
    -------
    MrcHeaderInfo
        Dimensions, mode, dtype, data offset and header voxel size (Å).

    Raises
    ------
    InputError
        The file is missing, not an MRC file, uses an unsupported (complex) mode, or is
        shorter than its header says (truncated).
    """
    mrc_path = Path(path)
    if not mrc_path.exists():
        raise InputError(mrc_path, "file not found")
    if mrc_path.is_dir():
        raise InputError(mrc_path, "is a directory, not an MRC file")
    if not os.access(mrc_path, os.R_OK):
        raise InputError(mrc_path, "permission denied")
    file_bytes = mrc_path.stat().st_size
    if file_bytes < _HEADER_BYTES:
        raise InputError(
            mrc_path,
            f"not an MRC file ({file_bytes} bytes, shorter than an MRC header)",
        )
    try:
        with (
            _quiet_mrcfile(),
            _HeaderReader(mrc_path, mode="r", permissive=True, header_only=True) as mrc,
        ):
            header = mrc.header.copy()
            voxel_size = mrc.voxel_size.x
    except Exception as err:  # mrcfile raises ValueError/OSError on damaged headers
        raise InputError(mrc_path, f"not an MRC file ({err})") from err
    has_map_id = bytes(header.map)[:3] == b"MAP"
    mode = int(header.mode)
    try:
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except ValueError as err:
        if mode in _COMPLEX_MODES:
            raise InputError(
                mrc_path,
                f"unsupported MRC mode {mode} (complex data, expected real images)",
            ) from err
        if has_map_id:
            raise InputError(mrc_path, f"unsupported MRC mode {mode}") from err
        raise InputError(mrc_path, f"not an MRC file (invalid mode {mode})") from err
    if mode in _COMPLEX_MODES or dtype.kind == "c":
        raise InputError(
            mrc_path,
            f"unsupported MRC mode {mode} (complex data, expected real images)",
        )
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    extended_bytes = int(header.nsymbt)
    if min(nx, ny, nz) <= 0 or extended_bytes < 0:
        what = "not an MRC file" if not has_map_id else "invalid MRC header"
        raise InputError(
            mrc_path,
            f"{what} (dimensions {nx}x{ny}x{nz}, extended header {extended_bytes})",
        )
    data_offset = _HEADER_BYTES + extended_bytes
    expected_bytes = data_offset + nx * ny * nz * dtype.itemsize
    if file_bytes < expected_bytes:
        if not has_map_id:
            raise InputError(
                mrc_path, "not an MRC file (no MAP identifier and sizes do not match)"
            )
        section_bytes = nx * ny * dtype.itemsize
        complete = max(0, (file_bytes - data_offset) // section_bytes)
        raise InputError(
            mrc_path,
            f"truncated file: header says {nz} sections of {nx}x{ny} "
            f"({expected_bytes} bytes) but the file has {file_bytes} bytes "
            f"({complete} complete sections)",
        )
    return MrcHeaderInfo(
        path=mrc_path,
        nx=nx,
        ny=ny,
        nz=nz,
        mode=mode,
        space_group=int(header.ispg),
        dtype=dtype,
        data_offset_bytes=data_offset,
        voxel_size_angstrom=_positive_or_none(voxel_size),
        has_map_id=has_map_id,
    )


def header_pixel_size(path: str | os.PathLike[str]) -> float | None:
    """Return the pixel (voxel) size in Å written in an MRC header.

    Parameters
    ----------
    path
        An MRC file.

    Returns
    -------
    float or None
        The header's x voxel size in Å, or ``None`` when it is 0 or negative (unset).
        A value of exactly 1.0 is returned as is, although it is often a placeholder.

    Raises
    ------
    InputError
        The file is missing or not a valid MRC file.
    """
    return read_mrc_header(path).voxel_size_angstrom


def _mmap_sections(info: MrcHeaderInfo) -> np.ndarray:
    """Memory-map a validated file's data as ``(n_sections, ny, nx)``, read-only."""
    try:
        with (
            _quiet_mrcfile(),
            mrcfile.mmap(info.path, mode="r", permissive=True) as mrc,
        ):
            data = mrc.data
    except Exception as err:  # OSError, ValueError, mmap errors
        raise InputError(info.path, f"cannot read MRC data ({err})") from err
    if data is None:
        raise InputError(info.path, "cannot read MRC data (mrcfile could not map it)")
    if data.size != info.nz * info.ny * info.nx:
        # e.g. a volume stack (ispg 401) whose nz is not a multiple of mz: mrcfile
        # maps only whole volumes
        raise InputError(
            info.path,
            f"invalid MRC header: {info.nz} sections of {info.nx}x{info.ny} but the "
            f"data map as {'x'.join(str(n) for n in data.shape)} "
            f"(space group {info.space_group})",
        )
    # The memmap keeps its own reference to the mapping after mrcfile closes the file.
    return data.reshape(info.nz, info.ny, info.nx)


def open_stack(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map an MRC file as a read-only stack of 2D images.

    Parameters
    ----------
    path
        An image stack (``.mrcs``; also ``.mrc`` files used as stacks) or a single
        image.

    Returns
    -------
    numpy.ndarray
        Read-only memory-mapped array ``(n, h, w)`` in the file's own dtype (a single
        image gives ``n = 1``, a 3D file gives its ``nz`` sections). Nothing is read
        from disk until the array is indexed.

    Raises
    ------
    InputError
        Missing file, not an MRC file, unsupported mode, truncated data.
    """
    return _mmap_sections(read_mrc_header(path))


def read_mrc(path: str | os.PathLike[str]) -> tuple[np.ndarray, float | None]:
    """Read a whole MRC file into memory.

    Parameters
    ----------
    path
        An MRC image, stack or map.

    Returns
    -------
    data : numpy.ndarray
        ``float32`` array with the file's shape: ``(h, w)`` for a single image,
        ``(n, h, w)`` for a stack or ``(d, h, w)`` for a map.
    voxel_size_angstrom : float or None
        The header's voxel size in Å (``None`` when the header value is not positive).

    Raises
    ------
    InputError
        Missing file, not an MRC file, unsupported mode, truncated data.
    """
    info = read_mrc_header(path)
    sections = _mmap_sections(info)
    data = np.array(sections, dtype=np.float32)
    if info.nz == 1:
        data = data[0]
    return data, info.voxel_size_angstrom


def read_image_stack(path: str | os.PathLike[str]) -> tuple[np.ndarray, float | None]:
    """Read all images of a stack (or a single image) into memory.

    Parameters
    ----------
    path
        An MRC image or image stack.

    Returns
    -------
    images : numpy.ndarray
        ``float32`` array ``(n, h, w)``; a single image gives ``n = 1``.
    pixel_size_angstrom : float or None
        The header's pixel size in Å (``None`` when not positive).

    Raises
    ------
    InputError
        Missing file, not an MRC file, unsupported mode, truncated data.
    """
    info = read_mrc_header(path)
    return np.array(_mmap_sections(info), dtype=np.float32), info.voxel_size_angstrom


def read_map_3d(path: str | os.PathLike[str]) -> tuple[np.ndarray, float | None]:
    """Read a 3D map.

    Parameters
    ----------
    path
        An MRC volume.

    Returns
    -------
    volume : numpy.ndarray
        ``float32`` array ``(d, h, w)``.
    voxel_size_angstrom : float or None
        The header's voxel size in Å (``None`` when not positive).

    Raises
    ------
    InputError
        Missing or invalid file, or the file holds a single 2D image (``nz = 1``)
        or a stack of volumes (``ispg >= 401``). Files with ``nz > 1`` are read as
        maps whatever their space group (many maps carry ``ispg = 0``).
    """
    info = read_mrc_header(path)
    if info.nz < 2:
        raise InputError(
            info.path, f"expected a 3D map, found a 2D image ({info.nx}x{info.ny})"
        )
    if info.space_group >= 401:
        raise InputError(
            info.path, "expected a single 3D map, found a stack of volumes"
        )
    return np.array(_mmap_sections(info), dtype=np.float32), info.voxel_size_angstrom


def _as_numpy(data: Any) -> np.ndarray:
    if hasattr(data, "detach"):  # torch.Tensor without importing torch here
        data = data.detach().cpu().numpy()
    return np.asarray(data)


def _set_header_stats(mrc: Any, array: np.ndarray) -> None:
    """Header min, max, mean and RMS of ``array`` (computed in float64; inf if too big)."""
    with np.errstate(over="ignore", invalid="ignore"):
        mrc.header.dmin = array.min()
        mrc.header.dmax = array.max()
        mrc.header.dmean = np.float32(array.mean(dtype=np.float64))
        mrc.header.rms = np.float32(array.std(dtype=np.float64))


def write_mrc(
    path: str | os.PathLike[str],
    data: Any,
    pixel_size_angstrom: float,
    *,
    is_stack: bool = False,
) -> None:
    """Write an image, image stack or map to an MRC file (mode 2, float32), atomically.

    Parameters
    ----------
    path
        Output file (``.mrc`` for images/maps, ``.mrcs`` for stacks by RELION habit).
    data
        Array-like (NumPy array or CPU/GPU torch tensor) ``(h, w)``, ``(n, h, w)`` or
        ``(d, h, w)``; converted to ``float32``.
    pixel_size_angstrom
        Pixel/voxel size in Å written to the header (must be positive).
    is_stack
        For 3D data: write an image stack (``ispg = 0``, ``mz = 1``, as RELION does for
        ``.mrcs``) instead of a volume (``ispg = 1``).

    Raises
    ------
    ValueError
        ``data`` is not 2D or 3D, is empty, or the pixel size is not positive.
    OutputError
        The file could not be written.
    """
    array = np.ascontiguousarray(_as_numpy(data), dtype=np.float32)
    if array.ndim not in (2, 3) or array.size == 0:
        raise ValueError(
            f"write_mrc needs a non-empty 2D or 3D array, got shape {array.shape}"
        )
    pixel = float(pixel_size_angstrom)
    if not (math.isfinite(pixel) and pixel > 0):
        raise ValueError(
            f"pixel_size_angstrom must be positive, got {pixel_size_angstrom}"
        )
    with atomic_path(path) as temp, mrcfile.new(temp, overwrite=True) as mrc:
        # mrcfile's float32 header statistics overflow for |values| > ~1e19 (a finite
        # map): they are set again below in float64
        with np.errstate(over="ignore"):
            mrc.set_data(array)
        if array.ndim == 3:
            if is_stack:
                mrc.set_image_stack()
            else:
                mrc.set_volume()
        mrc.voxel_size = pixel
        _set_header_stats(mrc, array)

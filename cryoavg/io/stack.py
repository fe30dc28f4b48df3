"""Lazy access to the particle images of many MRC stacks (positioned reads).

Conventions
-----------
* An :class:`ImageSource` maps particle index ``i`` (0-based, the row of the particle
  table) to image ``section[i]`` of stack ``stack[i]``. Images come back as ``float32``
  arrays ``(h, w)`` (one index) or ``(b, h, w)`` (a slice or an index array), in the
  requested order.
* Every stack header is read and validated when the source is built (existence, MRC
  validity, truncation, one common square box size, indices within the stack,
  ``rlnImageSize`` of the optics groups). Image data is read only when indexed, stack
  by stack, with positioned reads (``os.pread``) of runs of nearby images — not
  memory maps, whose pages would stay resident and make the process grow with the
  amount of data read. At most ``max_open_stacks`` files are kept open at a time
  (least recently used are closed), so projects with thousands of micrograph stacks
  do not run out of file handles.
* Every read is checked for NaN/Inf (one ``np.isfinite`` pass over the batch).
* ``preread=True`` reads all images into RAM up front (n·h·w·4 bytes).
* Sources pickle without their open maps, so DataLoader workers (fork or spawn) work.

Example
-------
>>> table = read_particles("particles.star")  # doctest: +SKIP
>>> source = ImageSource.from_table(table)  # doctest: +SKIP
>>> batch = source[np.array([10, 3, 7])]  # (3, box, box) float32  # doctest: +SKIP
"""

import contextlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryoavg.errors import InputError
from cryoavg.io.mrc import MrcHeaderInfo, read_mrc_header
from cryoavg.io.particles import ParticleTable

__all__ = ["ImageSource"]

DEFAULT_MAX_OPEN_STACKS = 256
#: Sections skipped inside one read rather than issuing a second read.
MAX_READ_GAP = 8


class ImageSource:
    """Particle images from one or many MRC stacks, read lazily, batch by batch.

    Parameters
    ----------
    stack_paths
        The distinct stack files.
    stack_index
        ``(n,)`` index into ``stack_paths`` of each particle's stack.
    section_index
        ``(n,)`` 0-based image index of each particle within its stack.
    image_names
        ``(n,)`` names used in error messages (e.g. ``rlnImageName``); default
        ``"<k+1>@<stack>"``.
    star_path
        The STAR file the particles came from, named in error messages.
    preread
        Read all images into memory now.
    max_open_stacks
        Maximum number of stack files kept open at the same time.

    Raises
    ------
    InputError
        A stack is missing, invalid or truncated; stacks have different or non-square
        box sizes; an image index lies beyond the end of its stack; (with ``preread``)
        an image contains NaN or Inf.
    """

    def __init__(
        self,
        stack_paths: Sequence[str | os.PathLike[str]],
        stack_index: np.ndarray | Sequence[int],
        section_index: np.ndarray | Sequence[int],
        *,
        image_names: Sequence[str] | np.ndarray | None = None,
        star_path: str | os.PathLike[str] | None = None,
        preread: bool = False,
        max_open_stacks: int = DEFAULT_MAX_OPEN_STACKS,
    ) -> None:
        self._paths = [Path(p) for p in stack_paths]
        self._stack_index = np.asarray(stack_index, dtype=np.int64).reshape(-1)
        self._section_index = np.asarray(section_index, dtype=np.int64).reshape(-1)
        if self._stack_index.shape != self._section_index.shape:
            raise ValueError("stack_index and section_index must have the same length")
        if self._stack_index.size and (
            self._stack_index.min() < 0 or self._stack_index.max() >= len(self._paths)
        ):
            raise ValueError("stack_index refers to a stack that is not in stack_paths")
        self._image_names = (
            None if image_names is None else np.asarray(image_names, dtype=object)
        )
        self._star_path = None if star_path is None else Path(star_path)
        self._max_open = max(1, int(max_open_stacks))
        self._open: OrderedDict[int, int] = OrderedDict()  # stack -> file descriptor
        self._headers = [read_mrc_header(p) for p in self._paths]
        self._box = self._check_box_sizes()
        self._check_sections()
        self._preread: np.ndarray | None = None
        if preread:
            self._preread = self._read(np.arange(len(self)))
            self.close()

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_table(
        cls,
        table: ParticleTable,
        *,
        preread: bool = False,
        max_open_stacks: int = DEFAULT_MAX_OPEN_STACKS,
    ) -> "ImageSource":
        """Build the source for all particles of a table.

        Parameters
        ----------
        table
            Particles (stack paths are resolved as in
            :meth:`ParticleTable.stack_paths`).
        preread
            Read all images into memory now.
        max_open_stacks
            Maximum number of stack files kept open at the same time.

        Returns
        -------
        ImageSource
            Particle ``i`` of the source is row ``i`` of the table.

        Raises
        ------
        InputError
            As for the constructor, and when an optics group's ``rlnImageSize``
            differs from the stacks' box size.
        """
        paths, stack_index = table.stack_paths()
        source = cls(
            paths,
            stack_index,
            table.image_index0,
            image_names=table.image_names,
            star_path=table.path,
            preread=False,
            max_open_stacks=max_open_stacks,
        )
        sizes = table.image_size_per_optics_group_px
        if sizes is not None:
            used = np.unique(table.optics_group_index)
            wrong = [g for g in used if sizes[g] != source.box_size]
            if wrong:
                group = int(wrong[0])
                raise InputError(
                    table.path,
                    f"optics group {table.optics_group_names[group]} has rlnImageSize "
                    f"{sizes[group]} but the stacks hold {source.box_size}x"
                    f"{source.box_size} images (e.g. {paths[0]})",
                )
        if preread:
            source.preread()
        return source

    @classmethod
    def from_stack(
        cls, path: str | os.PathLike[str], *, preread: bool = False
    ) -> "ImageSource":
        """Build the source for all images of a single stack file.

        Parameters
        ----------
        path
            An MRC stack (or single image).
        preread
            Read all images into memory now.

        Returns
        -------
        ImageSource
            Image ``k`` of the source is image ``k`` of the file.
        """
        n_images = read_mrc_header(path).n_sections
        return cls(
            [path],
            np.zeros(n_images, dtype=np.int64),
            np.arange(n_images),
            preread=preread,
        )

    def _name(self, particle: int) -> str:
        if self._image_names is not None:
            return str(self._image_names[particle])
        stack = self._paths[int(self._stack_index[particle])]
        return f"{int(self._section_index[particle]) + 1}@{stack}"

    def _check_box_sizes(self) -> int:
        if not self._headers:
            return 0
        first = self._headers[0]
        for header in self._headers:
            if header.nx != header.ny:
                raise InputError(
                    header.path,
                    f"images are not square ({header.nx}x{header.ny} pixels)",
                )
            if header.nx != first.nx:
                raise InputError(
                    self._star_path or header.path,
                    f"stacks have different box sizes: {first.path} holds "
                    f"{first.nx}x{first.ny} images, {header.path} holds "
                    f"{header.nx}x{header.ny}",
                )
        return first.nx

    def _check_sections(self) -> None:
        if not self._stack_index.size:
            return
        lengths = np.array([h.n_sections for h in self._headers], dtype=np.int64)
        beyond = (self._section_index < 0) | (
            self._section_index >= lengths[self._stack_index]
        )
        if beyond.any():
            particle = int(np.flatnonzero(beyond)[0])
            header: MrcHeaderInfo = self._headers[int(self._stack_index[particle])]
            where = (
                f" (particle {particle + 1} of {self._star_path})"
                if self._star_path
                else ""
            )
            raise InputError(
                header.path,
                f"image '{self._name(particle)}'{where} is beyond the end of "
                f"the stack, "
                f"which holds {header.n_sections} images",
            )

    # ---------------------------------------------------------------- properties

    def __len__(self) -> int:
        return int(self._stack_index.size)

    @property
    def box_size(self) -> int:
        """Box size in pixels (images are ``box_size x box_size``)."""
        return self._box

    @property
    def image_shape(self) -> tuple[int, int]:
        """Shape ``(h, w)`` of one image."""
        return (self._box, self._box)

    @property
    def stack_paths(self) -> list[Path]:
        """The distinct stack files."""
        return list(self._paths)

    @property
    def is_preread(self) -> bool:
        """Whether all images are held in memory."""
        return self._preread is not None

    @property
    def header_pixel_sizes_angstrom(self) -> list[float | None]:
        """Pixel size in each stack header (Å; often wrong, the STAR file wins)."""
        return [h.voxel_size_angstrom for h in self._headers]

    # ---------------------------------------------------------------- reading

    def preread(self) -> None:
        """Read all images into memory (no-op when already done)."""
        if self._preread is None:
            self._preread = self._read(np.arange(len(self)))
            self.close()

    def _file(self, stack: int) -> int:
        """An open file descriptor of a stack (LRU-bounded)."""
        fd = self._open.get(stack)
        if fd is not None:
            self._open.move_to_end(stack)
            return fd
        try:
            fd = os.open(self._paths[stack], os.O_RDONLY)
        except OSError as err:
            raise InputError(
                self._paths[stack], f"cannot open the stack ({err.strerror})"
            ) from err
        self._open[stack] = fd
        while len(self._open) > self._max_open:
            _, old = self._open.popitem(last=False)
            os.close(old)
        return fd

    def _read_sections(self, stack: int, sections: np.ndarray) -> np.ndarray:
        """Sections of one stack, in the given order, by positioned reads.

        Runs of nearby sections (gaps of up to :data:`MAX_READ_GAP` images) are read
        with one ``pread`` each. Unlike a memory map, nothing stays resident after the
        call, so the process memory is bounded by the batch, not by the data read.
        """
        header = self._headers[stack]
        per_image = header.ny * header.nx * header.dtype.itemsize
        wanted, inverse = np.unique(sections, return_inverse=True)
        out = np.empty((wanted.size, header.ny, header.nx), dtype=np.float32)
        breaks = np.flatnonzero(np.diff(wanted) > MAX_READ_GAP + 1) + 1
        fd = self._file(stack)
        for run in np.split(np.arange(wanted.size), breaks):
            first, last = int(wanted[run[0]]), int(wanted[run[-1]])
            n_bytes = (last - first + 1) * per_image
            offset = header.data_offset_bytes + first * per_image
            data = os.pread(fd, n_bytes, offset)
            if len(data) != n_bytes:
                raise InputError(
                    self._paths[stack],
                    f"file ended while reading images {first + 1}-{last + 1} "
                    "(truncated since it was opened?)",
                )
            block = np.frombuffer(data, dtype=header.dtype).reshape(
                last - first + 1, header.ny, header.nx
            )
            out[run] = block[wanted[run] - first]
        return out[inverse]

    def _read(self, particles: np.ndarray) -> np.ndarray:
        """Read images of the given particle indices into a new float32 array."""
        out = np.empty((particles.size, self._box, self._box), dtype=np.float32)
        if particles.size == 0:
            return out
        stacks = self._stack_index[particles]
        sections = self._section_index[particles]
        order = np.argsort(stacks, kind="stable")
        boundaries = np.flatnonzero(np.diff(stacks[order])) + 1
        for positions in np.split(order, boundaries):
            stack = int(stacks[positions[0]])
            wanted = sections[positions]
            try:
                out[positions] = self._read_sections(stack, wanted)
            except OSError as err:  # I/O error on a network file system, etc.
                raise InputError(
                    self._paths[stack], f"cannot read images ({err})"
                ) from err
        finite = np.isfinite(out).reshape(out.shape[0], -1).all(axis=1)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            particle = int(particles[bad])
            stack = self._paths[int(self._stack_index[particle])]
            raise InputError(
                stack,
                f"image {int(self._section_index[particle]) + 1} "
                f"('{self._name(particle)}') "
                "contains NaN or infinite values",
            )
        return out

    def _normalise_indices(self, key: Any) -> tuple[np.ndarray, bool]:
        """Return (indices, is_scalar) for an int, slice or index array key."""
        n = len(self)
        if isinstance(key, int | np.integer):
            index = int(key)
            if not -n <= index < n:
                raise IndexError(
                    f"particle index {index} out of range for {n} particles"
                )
            return np.array([index % n], dtype=np.int64), True
        if isinstance(key, slice):
            return np.arange(n, dtype=np.int64)[key], False
        indices = np.asarray(key)
        if indices.dtype == bool:
            if indices.shape != (n,):
                raise IndexError(
                    f"boolean mask of shape {indices.shape} for {n} particles"
                )
            return np.flatnonzero(indices), False
        if indices.size == 0:
            return np.zeros(0, dtype=np.int64), False
        if not np.issubdtype(indices.dtype, np.integer):
            raise IndexError(f"particle indices must be integers, got {indices.dtype}")
        indices = indices.astype(np.int64).reshape(-1)
        if indices.min() < -n or indices.max() >= n:
            raise IndexError(f"particle index out of range for {n} particles")
        return np.where(indices < 0, indices + n, indices), False

    def images(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Read the images of the given particles.

        Parameters
        ----------
        indices
            0-based particle indices (any order, repeats allowed).

        Returns
        -------
        numpy.ndarray
            ``float32 (b, h, w)`` in the order of ``indices``.

        Raises
        ------
        InputError
            An image contains NaN/Inf, or a stack cannot be read.
        """
        particles, _ = self._normalise_indices(np.asarray(indices))
        if self._preread is not None:
            return self._preread[particles]
        return self._read(particles)

    def __getitem__(self, key: int | slice | np.ndarray | Sequence[int]) -> np.ndarray:
        """Read images like a NumPy array of shape ``(n, h, w)``.

        Parameters
        ----------
        key
            An integer (returns ``(h, w)``), a slice or an integer/boolean index array
            (returns ``(b, h, w)`` in the requested order).

        Returns
        -------
        numpy.ndarray
            ``float32`` image(s), a new array (never a view of the file).
        """
        particles, scalar = self._normalise_indices(key)
        if self._preread is not None:
            batch = self._preread[particles]
        else:
            batch = self._read(particles)
        return batch[0] if scalar else batch

    def relocate(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        """Read the stacks from other files with the same content (e.g. scratch copies).

        Parameters
        ----------
        paths
            One path per stack of :attr:`stack_paths`, in the same order.

        Raises
        ------
        InputError
            A new file's header differs from the original's (size, mode, sections).
        """
        new_paths = [Path(p) for p in paths]
        if len(new_paths) != len(self._paths):
            raise ValueError(
                f"relocate needs {len(self._paths)} paths, got {len(new_paths)}"
            )
        headers = [read_mrc_header(p) for p in new_paths]
        for old, new in zip(self._headers, headers, strict=True):
            same = (old.nx, old.ny, old.nz, old.mode, old.data_offset_bytes) == (
                new.nx,
                new.ny,
                new.nz,
                new.mode,
                new.data_offset_bytes,
            )
            if not same:
                raise InputError(new.path, f"is not a copy of {old.path}")
        self.close()
        self._paths = new_paths
        self._headers = headers

    # ---------------------------------------------------------------- resources

    def close(self) -> None:
        """Close all open stack files (they are reopened on the next read)."""
        while self._open:
            _, fd = self._open.popitem()
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return (
            f"ImageSource(n={len(self)}, box_size={self._box}, "
            f"stacks={len(self._paths)}, preread={self.is_preread})"
        )

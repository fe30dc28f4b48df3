"""Padded Fourier "projector" of 2D class images: rotated references and their adjoint.

For 2D data the "projection" of class ``k`` at in-plane angle ψ is the class transform
sampled in a rotated frame (spec §0.3, §A.3)::

    P_kψ(q) = F_k(Rz(ψ) q),     Rz(ψ) = [[cos ψ, −sin ψ], [sin ψ, cos ψ]]  on (x, y)

i.e. the class image actively rotated by ``Rz(−ψ)`` about pixel ``N//2``. ``F_k`` is
held on a ``pad``-times finer Fourier grid (``P = pad·N``) and sampled with bilinear
interpolation at ``pad·Rz(ψ) q``; before padding the real-space image is divided by
``sinc²(r / P)`` (gridding pre-correction, §A.6.4) so that the blur of linear
interpolation is compensated on average.

Layout: the padded transform is the un-shifted ``rfft`` half plane ``(P, P//2+1)`` with
RELION normalisation (see ``docs/class2d-design.md``), scaled by ``pad²`` so that the
padded grid at ``pad·(kx, ky)`` equals the ``N``-grid coefficient of the (corrected)
image. Points with a negative rotated ``kx`` are read from the Hermitian mirror
``(−x, −y)`` and conjugated. Rows wrap modulo ``P`` (the transform is periodic). Query
points with ``|q| > r_max`` give zero, and the padded data are zero beyond
``pad·r_max`` (as RELION's projector built with ``current_size = 2·r_max``).

:meth:`ClassProjector.backproject` is the exact (real-linear) adjoint of
:meth:`ClassProjector.rotated_references` (and :meth:`ClassProjector.backproject_pairs`
of :meth:`ClassProjector.sample`): bilinear splatting onto the padded half plane.
"""

from __future__ import annotations

import warnings

import torch

from cryoavg.class2d.sampling import PixelSet
from cryoavg.ops import indexing
from cryoavg.ops.fourier import dft_2d

__all__ = [
    "ClassProjector",
    "bilinear_plan",
    "gridding_correction_map",
    "interpolate_rows",
]


def gridding_correction_map(
    box_size: int,
    pad: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Real-space gridding pre-correction ``sinc²(r / (pad·N))``.

    Parameters
    ----------
    box_size
        ``N``.
    pad
        Padding factor.
    dtype, device
        Of the result.

    Returns
    -------
    torch.Tensor
        ``(N, N)``; ``r`` is the distance (px) from pixel ``(N//2, N//2)`` and
        ``sinc(x) = sin(πx)/(πx)``. Divide the image by it before padding.
    """
    n = int(box_size)
    c = torch.arange(n, dtype=torch.float64, device=device) - n // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)  # (N, N) px
    x = r / (pad * n)
    return (torch.sinc(x) ** 2).to(dtype)


def bilinear_plan(
    psi_degrees: torch.Tensor,
    pixel_set: PixelSet,
    *,
    pad: int,
    r_max: float,
    start: int = 0,
    stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corner indices and weights of ``F(pad·Rz(ψ) q)`` on the padded half plane.

    Parameters
    ----------
    psi_degrees
        ``(r,)`` angles (degrees).
    pixel_set
        Pixels ``q = (ky, kx)`` (``N``-grid frequencies).
    pad
        Padding factor; the padded grid is ``(P, P//2+1)``, ``P = pad·N``.
    r_max
        Radius (``N``-grid units) beyond which the reference is zero.
    start, stop
        Optional slice of the pixel set.

    Returns
    -------
    index : torch.Tensor
        ``(r, p, 4)`` int64 indices into the flattened ``(P, P//2+1)`` grid.
    weight : torch.Tensor
        ``(r, p, 4)`` bilinear weights (float64; zero outside ``r_max``).
    conjugate : torch.Tensor
        ``(r, p)`` bool, True where the Hermitian mirror is read (value conjugated).
    """
    device = pixel_set.ky.device
    big = pad * pixel_set.box_size
    ncol = big // 2 + 1
    ky = pixel_set.ky[start:stop].to(torch.float64)  # (p,)
    kx = pixel_set.kx[start:stop].to(torch.float64)  # (p,)
    psi = torch.deg2rad(psi_degrees.to(device=device, dtype=torch.float64))  # (r,)
    c, s = torch.cos(psi)[:, None], torch.sin(psi)[:, None]  # (r, 1)
    # Rz(ψ) q on (x, y), scaled to the padded grid: (r, p)
    x = pad * (c * kx[None, :] - s * ky[None, :])
    y = pad * (s * kx[None, :] + c * ky[None, :])
    conjugate = x < 0
    x = torch.where(conjugate, -x, x)
    y = torch.where(conjugate, -y, y)
    inside = (x * x + y * y) <= (pad * r_max) ** 2 + 1e-9  # (r, p)
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx = x - x0
    fy = y - y0
    x0 = x0.long()
    y0 = y0.long()
    # corners (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1): (r, p, 4)
    cy = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=-1)
    cx = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=-1)
    weight = torch.stack(
        [(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], dim=-1
    )
    # a corner beyond the last column can only carry zero weight (x == P/2); clamp it
    valid = (cx < ncol) & inside[..., None]
    weight = torch.where(
        valid, weight, torch.zeros((), dtype=weight.dtype, device=device)
    )
    cx = cx.clamp(max=ncol - 1)
    index = torch.remainder(cy, big) * ncol + cx
    return index, weight, conjugate


def interpolate_rows(
    table: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    sparse: bool | None = None,
) -> torch.Tensor:
    """Weighted sums of table rows: ``out[n] = Σ_c weight[n, c]·table[index[n, c]]``.

    The bilinear interpolation of :class:`ClassProjector` with the classes innermost
    (one gathered row holds every class). On a CPU the rows go through one sparse CSR
    product (``c`` entries per output row), which reads each table row once per use
    without materialising the ``(n, c, w)`` corners: about 3× faster than a gather and
    a weighted sum. Elsewhere, the gather and the sum.

    Parameters
    ----------
    table
        ``(m, w)`` real.
    index
        ``(n, c)`` int64 rows of ``table`` (repeats allowed, e.g. a zero-weight corner).
    weight
        ``(n, c)`` real, the dtype of ``table``.
    sparse
        Use the sparse product (default: on a CPU).

    Returns
    -------
    torch.Tensor
        ``(n, w)``.
    """
    n, c = index.shape
    if n == 0:
        return table.new_zeros((0, table.shape[1]))
    if sparse is None:
        sparse = table.device.type == "cpu"
    if sparse:
        crow = torch.arange(0, n * c + 1, c, device=table.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "CSR support is beta"
            matrix = torch.sparse_csr_tensor(
                crow,
                index.reshape(-1),
                weight.reshape(-1),
                (n, table.shape[0]),
                check_invariants=False,
            )
        return matrix @ table
    corners = table.index_select(0, index.reshape(-1)).view(n, c, -1)
    return (corners * weight[..., None]).sum(1)


class ClassProjector:
    """Padded Fourier transforms of ``k`` class images, sampled at rotated frequencies.

    Parameters
    ----------
    images
        ``(k, N, N)`` real class images (real space, origin at ``N//2``).
    pad
        Padding factor (2, as RELION).
    r_max
        Fourier radius (``N``-grid units) kept; default ``N/2``. RELION uses
        ``current_size / 2``.
    gridding_correction
        Divide by ``sinc²(r/P)`` in real space before padding (§A.6.4).

    Attributes
    ----------
    data
        ``(k, P, P//2+1)`` complex padded transform (``pad²``-scaled, see module doc).
    box_size, pad, r_max
        As given (``r_max`` resolved).
    """

    def __init__(
        self,
        images: torch.Tensor,
        *,
        pad: int = 2,
        r_max: float | None = None,
        gridding_correction: bool = True,
    ) -> None:
        k, n = int(images.shape[0]), int(images.shape[-1])
        self.box_size = n
        self.pad = int(pad)
        self.r_max = float(n // 2 if r_max is None else min(float(r_max), n / 2))
        big = self.pad * n
        work = images
        if gridding_correction:
            corr = gridding_correction_map(
                n, self.pad, dtype=images.dtype, device=images.device
            )
            work = images / corr  # (k, N, N)
        padded = images.new_zeros((k, big, big))  # (k, P, P)
        o = big // 2 - n // 2
        padded[:, o : o + n, o : o + n] = work
        data = dft_2d(padded) * float(self.pad**2)  # (k, P, P//2+1)
        ky = torch.fft.fftfreq(big, 1.0 / big, device=images.device).round()  # (P,)
        kx = torch.arange(big // 2 + 1, device=images.device, dtype=ky.dtype)
        r2 = ky[:, None] ** 2 + kx[None, :] ** 2  # (P, P//2+1)
        keep = r2 <= (self.pad * self.r_max) ** 2 + 1e-9
        self.data = data * keep
        self._memo: dict = {}

    def memoised(self, name: str, objects: tuple, extra: tuple, build):
        """Per-projector cache of values derived from it and some (immutable) inputs.

        A projector lives for one iteration, so plans and reference tables that are the
        same for every chunk of the iteration (grids, pixel sets) are built once.
        ``objects`` are compared by identity (and kept alive by the cache), ``extra`` by
        value. :attr:`data` must not be modified after the first call.

        Parameters
        ----------
        name
            Kind of value.
        objects
            Inputs compared by identity (e.g. the ψ grid tensor, the pixel set).
        extra
            Hashable inputs compared by value.
        build
            Zero-argument callable computing the value on a miss.

        Returns
        -------
        Any
            The cached or newly built value.
        """
        memo = self.__dict__.setdefault("_memo", {})
        key = (name, tuple(id(o) for o in objects), extra)
        entry = memo.get(key)
        if entry is not None and all(
            a is b for a, b in zip(entry[0], objects, strict=False)
        ):
            return entry[1]
        if len(memo) >= 32:
            memo.clear()
        value = build()
        memo[key] = (objects, value)
        return value

    @property
    def n_classes(self) -> int:
        """Number of classes ``k``."""
        return int(self.data.shape[0])

    @property
    def padded_size(self) -> int:
        """``P = pad·N``."""
        return self.pad * self.box_size

    def _chunk(self, n_rows: int, n_psi: int, n_pix: int, max_chunk_bytes: int) -> int:
        per_psi = max(1, n_rows * n_pix * 4 * self.data.element_size() * 3)
        return max(1, min(n_psi, max_chunk_bytes // per_psi))

    def pair_rows_per_step(self, n_pixels: int, max_chunk_bytes: int) -> int:
        """Rows inserted per step by :meth:`backproject_pairs` (its chunk size).

        The steps are small (temporaries of at most ~4 MiB stay cache-sized and are
        recycled by the allocator) and each allocates all its temporaries before adding
        anything, so a caller can insert row blocks of this size one call at a time and
        resume after an out-of-memory error without adding a row twice.

        Parameters
        ----------
        n_pixels
            ``p``, pixels per row.
        max_chunk_bytes
            The caller's bound on temporary memory.
        """
        return self._chunk(1, 1 << 62, n_pixels, min(max_chunk_bytes, 1 << 22))

    def rotated_references(
        self,
        psi_degrees: torch.Tensor,
        pixel_set: PixelSet,
        *,
        start: int = 0,
        stop: int | None = None,
        max_chunk_bytes: int = 1 << 28,
    ) -> torch.Tensor:
        """Reference transforms ``F_k(Rz(ψ) q)`` on a pixel set.

        Parameters
        ----------
        psi_degrees
            ``(r,)`` in-plane angles (degrees).
        pixel_set
            Frequencies ``q`` (``p`` pixels, or the slice ``[start:stop]``).
        start, stop
            Optional slice of the pixel set.
        max_chunk_bytes
            Bound on temporary memory (chunks over ``r``).

        Returns
        -------
        torch.Tensor
            ``(k, r, p)`` complex, dtype of :attr:`data`.
        """
        k = self.n_classes
        n_psi = int(psi_degrees.shape[0])
        p = int(pixel_set.indices[start:stop].shape[0])
        out = self.data.new_empty((k, n_psi, p))
        # the grid with the classes innermost: (M, 2k) real, a row per grid point
        table = torch.view_as_real(self.data.reshape(k, -1)).transpose(0, 1)
        table = table.reshape(-1, 2 * k)
        real_dtype = self.data.real.dtype
        step = self._chunk(k, n_psi, p, max_chunk_bytes)
        for i in range(0, n_psi, step):
            psi = psi_degrees[i : i + step]
            index, weight, conj = bilinear_plan(
                psi, pixel_set, pad=self.pad, r_max=self.r_max, start=start, stop=stop
            )
            rr = int(psi.shape[0])
            vals = interpolate_rows(
                table, index.view(-1, 4), weight.view(-1, 4).to(real_dtype)
            ).view(rr, p, k, 2)
            vals[..., 1].mul_(1.0 - 2.0 * conj.to(real_dtype)[..., None])
            out[:, i : i + rr] = torch.view_as_complex(vals.permute(2, 0, 1, 3))
        return out

    def backproject(
        self,
        values: torch.Tensor | None,
        psi_degrees: torch.Tensor,
        pixel_set: PixelSet,
        out_data: torch.Tensor | None,
        *,
        weights: torch.Tensor | None = None,
        out_weight: torch.Tensor | None = None,
        start: int = 0,
        stop: int | None = None,
        max_chunk_bytes: int = 1 << 28,
    ) -> None:
        """Adjoint of :meth:`rotated_references`: splat values onto the padded grid.

        ``out_data += Aᵀ values`` in the real inner product ``Re⟨·,·⟩`` (conjugated
        where the Hermitian mirror was read), and ``out_weight += |A|ᵀ weights``
        (bilinear weights, no conjugation). Accumulates in place.

        Parameters
        ----------
        values
            ``(k, r, p)`` complex values at ``(ψ_r, q_p)``, or ``None``.
        psi_degrees
            ``(r,)`` angles (degrees).
        pixel_set
            Pixels (or slice ``[start:stop]``), ``p`` of them.
        out_data
            ``(k, P, P//2+1)`` complex accumulator (contiguous), or ``None``.
        weights
            ``(k, r, p)`` real values for ``out_weight``, or ``None``.
        out_weight
            ``(k, P, P//2+1)`` real accumulator (contiguous), or ``None``.
        start, stop
            Optional slice of the pixel set.
        max_chunk_bytes
            Bound on temporary memory (chunks over ``r``).
        """
        k = self.n_classes
        n_psi = int(psi_degrees.shape[0])
        p = int(pixel_set.indices[start:stop].shape[0])
        step = self._chunk(k, n_psi, p, max_chunk_bytes)
        data_flat = out_data.view(k, -1) if out_data is not None else None
        weight_flat = out_weight.view(k, -1) if out_weight is not None else None
        for i in range(0, n_psi, step):
            psi = psi_degrees[i : i + step]
            rr = int(psi.shape[0])
            index, weight, conj = bilinear_plan(
                psi, pixel_set, pad=self.pad, r_max=self.r_max, start=start, stop=stop
            )
            flat_index = index.reshape(-1)  # (rr·p·4,)
            if values is not None and data_flat is not None:
                v = values[:, i : i + rr]  # (k, rr, p)
                v = torch.where(conj, v.conj(), v)
                contrib = v[..., None] * weight.to(v.real.dtype)  # (k, rr, p, 4)
                indexing.index_add_(
                    data_flat,
                    1,
                    flat_index,
                    contrib.reshape(k, -1).to(data_flat.dtype),
                )
            if weights is not None and weight_flat is not None:
                wv = weights[:, i : i + rr, :, None] * weight.to(
                    weights.dtype
                )  # (k, rr, p, 4)
                weight_flat.index_add_(
                    1, flat_index, wv.reshape(k, -1).to(weight_flat.dtype)
                )

    def splat_matrix(
        self, psi_degrees: torch.Tensor, pixel_set: PixelSet, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear splatting of every (ψ, pixel) as one sparse matrix (memoised).

        Parameters
        ----------
        psi_degrees
            ``(r,)`` angle table (degrees); pass the same tensor object to reuse it.
        pixel_set
            ``p`` pixels.
        dtype
            Real dtype of the matrix.

        Returns
        -------
        matrix : torch.Tensor
            ``(M, r·p)`` sparse CSR, ``M = P·(P//2+1)``: column ``ψ·p + q`` holds the
            (non-zero) bilinear weights of ``Rz(ψ) q``'s corners on the padded grid.
        sign : torch.Tensor
            ``(r, p)`` ``−1`` where the Hermitian mirror is read (the imaginary part of
            a value is negated there), else ``1``.
        """

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            index, weight, conj = self._plan(psi_degrees, pixel_set, 0, None)
            r, p, _ = index.shape
            m = self.padded_size * (self.padded_size // 2 + 1)
            row = index.reshape(-1)
            col = torch.arange(r * p, device=row.device).repeat_interleave(4)
            value = weight.reshape(-1).to(dtype)
            keep = value != 0  # the 4 corners of a pixel are distinct grid points
            row, col, value = row[keep], col[keep], value[keep]
            order = torch.argsort(row * (r * p) + col)
            crow = torch.zeros(m + 1, dtype=torch.int64, device=row.device)
            crow[1:] = torch.cumsum(torch.bincount(row, minlength=m), 0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "CSR support is beta"
                matrix = torch.sparse_csr_tensor(
                    crow,
                    col[order],
                    value[order],
                    (m, r * p),
                    check_invariants=False,
                )
            sign = 1.0 - 2.0 * conj.to(dtype)
            return matrix, sign

        return self.memoised("splat", (psi_degrees, pixel_set), (dtype,), build)

    def splat_rows_per_target(self, n_psi: int, n_pixels: int, elem: int) -> int:
        """Bytes of the temporaries of :meth:`backproject_rows` per target."""
        m = self.padded_size * (self.padded_size // 2 + 1)
        return elem * (3 * n_psi * n_pixels + 5 * m)

    def backproject_rows(
        self,
        values: torch.Tensor,
        weights: torch.Tensor,
        target: torch.Tensor,
        angle_index: torch.Tensor,
        psi_degrees: torch.Tensor,
        pixel_set: PixelSet,
        out_data: torch.Tensor,
        out_weight: torch.Tensor,
    ) -> None:
        """:meth:`backproject_pairs` of rows on an angle table, as one sparse product.

        The rows are laid out densely over (target, ψ, pixel) (zero where a target has
        no row at an angle) and splatted by :meth:`splat_matrix` in one sparse × dense
        product, columns being the targets' real parts, imaginary parts and weights.
        Faster than the per-row scatter-adds of :meth:`backproject_pairs` when the rows
        fill a good part of the (target, ψ) table; the caller chooses. Only the targets
        that have rows are laid out. All temporaries are allocated before anything is
        added (about :meth:`splat_rows_per_target` bytes per target that has rows).

        Parameters
        ----------
        values
            ``(n, p)`` complex rows.
        weights
            ``(n, p)`` real rows.
        target
            ``(n,)`` int64 accumulator of each row (into ``out_data``'s first axis); at
            most one row per (target, angle).
        angle_index
            ``(n,)`` int64 row of ``psi_degrees`` of each row.
        psi_degrees
            ``(r,)`` the angle table (pass the same tensor object each time).
        pixel_set
            The ``p`` pixels of the rows (the whole set).
        out_data
            ``(c, P, P//2+1)`` complex accumulator (contiguous).
        out_weight
            ``(c, P, P//2+1)`` real accumulator (contiguous).
        """
        rdtype = values.real.dtype
        matrix, sign = self.splat_matrix(psi_degrees, pixel_set, rdtype)
        r, p = sign.shape
        m = matrix.shape[0]
        present, local = torch.unique(target, return_inverse=True)  # (c,), (n,)
        c = int(present.shape[0])
        planes = values.real.new_zeros((3, c * r, p))  # re, im, weight
        slot = local * r + angle_index  # (n,)
        planes[0].index_copy_(0, slot, values.real)
        planes[1].index_copy_(0, slot, values.imag * sign.index_select(0, angle_index))
        planes[2].index_copy_(0, slot, weights.to(rdtype))
        out = matrix @ planes.view(3 * c, r * p).T  # (M, 3c)
        data_add = torch.stack([out[:, :c].T, out[:, c : 2 * c].T], dim=-1)  # (c, M, 2)
        weight_add = out[:, 2 * c :].T.to(out_weight.dtype)  # (c, M)
        n_out = out_data.shape[0]
        data_ri = torch.view_as_real(out_data.view(n_out, m))
        data_ri.index_add_(0, present, data_add.to(data_ri.dtype))
        out_weight.view(n_out, m).index_add_(0, present, weight_add)

    def _unique_plan(
        self,
        psi_degrees: torch.Tensor,
        pixel_set: PixelSet,
        start: int,
        stop: int | None,
        angle_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bilinear plan of the distinct angles; ``inverse (n,)`` maps rows to them.

        With ``angle_index`` the angles are the table ``psi_degrees`` itself (its plan
        is memoised) and ``inverse = angle_index``.
        """
        if angle_index is not None:
            index, weight, conj = self.memoised(
                "plan",
                (psi_degrees, pixel_set),
                (start, stop),
                lambda: self._plan(psi_degrees, pixel_set, start, stop),
            )
            return index, weight, conj, angle_index
        angles, inverse = torch.unique(psi_degrees, return_inverse=True)
        index, weight, conj = self._plan(angles, pixel_set, start, stop)
        return index, weight, conj, inverse

    def _plan(
        self,
        angles: torch.Tensor,
        pixel_set: PixelSet,
        start: int,
        stop: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, weight, conj = bilinear_plan(
            angles, pixel_set, pad=self.pad, r_max=self.r_max, start=start, stop=stop
        )
        return index, weight.to(self.data.real.dtype), conj

    def sample(
        self,
        class_index: torch.Tensor,
        psi_degrees: torch.Tensor,
        pixel_set: PixelSet,
        *,
        start: int = 0,
        stop: int | None = None,
        max_chunk_bytes: int = 1 << 28,
        angle_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """References ``F_k(Rz(ψ) q)`` for a list of (class, angle) pairs.

        Parameters
        ----------
        class_index
            ``(n,)`` int64 classes.
        psi_degrees
            ``(n,)`` angles (degrees), or with ``angle_index`` a table ``(r,)`` of angles.
        pixel_set
            Frequencies (or slice ``[start:stop]``), ``p`` pixels.
        start, stop
            Optional slice of the pixel set.
        max_chunk_bytes
            Bound on temporary memory (chunks over ``n``).
        angle_index
            Optional ``(n,)`` int64 rows of the angle table ``psi_degrees`` (the plan of
            the table is then memoised on the projector: pass the same tensor object).

        Returns
        -------
        torch.Tensor
            ``(n, p)`` complex.
        """
        flat = self.data.reshape(-1)  # (k·M,)
        m = self.data.shape[-2] * self.data.shape[-1]
        n = int(class_index.shape[0])
        p = int(pixel_set.indices[start:stop].shape[0])
        out = self.data.new_empty((n, p))
        index, weight, conj, inverse = self._unique_plan(
            psi_degrees, pixel_set, start, stop, angle_index
        )
        offset = class_index.to(index.device) * m  # (n,)
        step = self._chunk(1, n, p, max_chunk_bytes)
        for i in range(0, n, step):
            sel = inverse[i : i + step]
            idx = index[sel] + offset[i : i + step, None, None]  # (c, p, 4)
            vals = (flat[idx] * weight[sel]).sum(-1)  # (c, p)
            out[i : i + step] = torch.where(conj[sel], vals.conj(), vals)
        return out

    def backproject_pairs(
        self,
        values: torch.Tensor | None,
        class_index: torch.Tensor,
        psi_degrees: torch.Tensor,
        pixel_set: PixelSet,
        out_data: torch.Tensor | None,
        *,
        weights: torch.Tensor | None = None,
        out_weight: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
        start: int = 0,
        stop: int | None = None,
        max_chunk_bytes: int = 1 << 28,
        angle_index: torch.Tensor | None = None,
    ) -> None:
        """Adjoint of :meth:`sample`: splat ``(n, p)`` rows onto padded grids, in place.

        Parameters
        ----------
        values
            ``(n, p)`` complex, or ``None``.
        class_index
            ``(n,)`` int64 classes (unused when ``target_index`` is given).
        psi_degrees
            ``(n,)`` angles (degrees).
        pixel_set
            Frequencies (or slice ``[start:stop]``), ``p`` pixels.
        out_data
            ``(c, P, P//2+1)`` complex accumulator (contiguous), or ``None``.
        weights
            ``(n, p)`` real values for ``out_weight``, or ``None``.
        out_weight
            ``(c, P, P//2+1)`` real accumulator (contiguous), or ``None``.
        target_index
            ``(n,)`` int64 slice of the accumulators receiving each row (default
            ``class_index``); lets several accumulators (e.g. half sets) share one call.
        start, stop
            Optional slice of the pixel set.
        max_chunk_bytes
            Bound on temporary memory (chunks over ``n``).
        angle_index
            Optional ``(n,)`` rows of the angle table ``psi_degrees`` (as in
            :meth:`sample`).
        """
        target = class_index if target_index is None else target_index
        m = self.padded_size * (self.padded_size // 2 + 1)
        n = int(target.shape[0])
        p = int(pixel_set.indices[start:stop].shape[0])
        index, weight, conj, inverse = self._unique_plan(
            psi_degrees, pixel_set, start, stop, angle_index
        )
        offset = target.to(index.device) * m  # (n,)
        # small chunks: the temporaries stay cache-sized (and are recycled by malloc)
        step = min(max(1, n), self.pair_rows_per_step(p, max_chunk_bytes))
        data_flat = out_data.view(-1) if out_data is not None else None
        weight_flat = out_weight.view(-1) if out_weight is not None else None
        for i in range(0, n, step):
            sel = inverse[i : i + step]
            flat_index = (index[sel] + offset[i : i + step, None, None]).reshape(-1)
            bw = weight[sel]  # (c, p, 4)
            # every temporary of the step first, then the additions (see
            # pair_rows_per_step: an allocation failure leaves the accumulators as
            # they were)
            contrib = wv = None
            if values is not None and data_flat is not None:
                v = values[i : i + step]  # (c, p)
                v = torch.where(conj[sel], v.conj(), v)
                contrib = (v[..., None] * bw.to(v.real.dtype)).reshape(-1)  # (c·p·4,)
                contrib = contrib.to(data_flat.dtype)
            if weights is not None and weight_flat is not None:
                wv = (weights[i : i + step, :, None] * bw.to(weights.dtype)).reshape(-1)
                wv = wv.to(weight_flat.dtype)
            if contrib is not None:
                indexing.index_add_(data_flat, 0, flat_index, contrib)
            if wv is not None:
                weight_flat.index_add_(0, flat_index, wv)

"""Row gathers and scatter-adds that are fast for complex tensors too.

On a CPU, ``torch.index_select`` and ``Tensor.index_add_`` on complex tensors take a
slow element-by-element path: about 7–10× slower than the same operation on the
tensors' real views (``torch.view_as_real``), which move the same bytes. These helpers
route complex tensors through their real views and leave real ones as they are; the
results are bitwise the same as the plain calls.

:func:`sparse_rows_matmul` multiplies a matrix whose rows have only a few non-zero
entries (per-pose translation weights) by a dense table without touching the zeros.
"""

from __future__ import annotations

import torch

__all__ = ["index_add_", "index_select", "sparse_rows_matmul"]


def _real_view(x: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(x.resolve_conj())


def index_select(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``torch.index_select(x, dim, index)``, through the real view when complex.

    Parameters
    ----------
    x
        Any tensor.
    dim
        Dimension to gather along (may be negative).
    index
        ``(n,)`` int64 positions along ``dim``.

    Returns
    -------
    torch.Tensor
        ``x`` with ``dim`` of length ``n``, contiguous.
    """
    if not x.is_complex():
        return x.index_select(dim, index)
    d = dim % x.ndim
    return torch.view_as_complex(_real_view(x).index_select(d, index))


def index_add_(
    acc: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor
) -> torch.Tensor:
    """``acc.index_add_(dim, index, source)``, through the real views when complex.

    Parameters
    ----------
    acc
        Accumulator, updated in place.
    dim
        Dimension to add along (may be negative).
    index
        ``(n,)`` int64 positions along ``dim`` of ``acc``.
    source
        ``acc``'s shape with ``dim`` of length ``n``; same dtype as ``acc``.

    Returns
    -------
    torch.Tensor
        ``acc``.
    """
    if not acc.is_complex():
        return acc.index_add_(dim, index, source)
    d = dim % acc.ndim
    torch.view_as_real(acc).index_add_(d, index, _real_view(source))
    return acc


#: :func:`sparse_rows_matmul` uses the dense product above this fraction of non-zeros.
SPARSE_MATMUL_MAX_DENSITY = 0.2


def sparse_rows_matmul(
    weights: torch.Tensor,
    table: torch.Tensor,
    max_density: float = SPARSE_MATMUL_MAX_DENSITY,
) -> torch.Tensor:
    """``weights @ table`` for a ``weights`` matrix that is mostly zeros.

    Below ``max_density`` non-zeros the product goes through a sparse COO matrix, so
    the work scales with the non-zeros, not with ``n·m``. Each output element is then
    the sum of the same non-zero terms as the dense product's (the zeros add nothing),
    so the results agree to rounding (on CPU they are usually bitwise equal).

    Parameters
    ----------
    weights
        ``(n, m)`` real, most entries zero (e.g. ~4 of 84 translation weights per row).
    table
        ``(m, q)`` real, same dtype and device.
    max_density
        Largest fraction of non-zero ``weights`` at which the sparse product is used.

    Returns
    -------
    torch.Tensor
        ``(n, q)`` dense.
    """
    n, m = weights.shape
    if n == 0 or m == 0:
        return weights.new_zeros((n, table.shape[1]))
    nnz = int(torch.count_nonzero(weights))
    if nnz > max_density * n * m:
        return weights @ table
    return torch.sparse.mm(weights.to_sparse(), table)

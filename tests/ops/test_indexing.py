import pytest
import torch

from cryoavg.ops import indexing


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.complex128])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_index_select_matches_torch(dtype, dim):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 7, generator=gen, dtype=dtype)
    index = torch.tensor([3, 0, 3, 1])
    out = indexing.index_select(x, dim, index)
    assert out.dtype == dtype
    assert torch.equal(out, torch.index_select(x, dim, index))
    # a lazily conjugated input is resolved, not misread
    if dtype.is_complex:
        got = indexing.index_select(x.conj(), dim, index)
        assert torch.equal(got, torch.index_select(x.conj(), dim, index))


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
@pytest.mark.parametrize("dim", [0, -2])
def test_index_add_matches_torch(dtype, dim):
    gen = torch.Generator().manual_seed(1)
    acc = torch.randn(4, 6, generator=gen, dtype=dtype)
    index = torch.tensor([2, 0, 2])  # a repeated index accumulates
    source = torch.randn(3, 6, generator=gen, dtype=dtype)
    expected = acc.clone().index_add_(dim, index, source)
    out = indexing.index_add_(acc, dim, index, source)
    assert out is acc
    torch.testing.assert_close(acc, expected, rtol=0, atol=1e-12)
    if dtype.is_complex:
        acc2 = torch.zeros_like(acc)
        indexing.index_add_(acc2, dim, index, source.conj())
        torch.testing.assert_close(
            acc2, torch.zeros_like(acc).index_add_(dim, index, source.conj())
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5])
def test_sparse_rows_matmul_matches_dense(monkeypatch, dtype, density):
    gen = torch.Generator().manual_seed(2)
    weights = torch.rand(300, 84, generator=gen, dtype=dtype)
    weights[torch.rand(300, 84, generator=gen) >= density] = 0.0
    weights[7] = 0.0  # a row without weight
    table = torch.randn(84, 50, generator=gen, dtype=dtype)
    calls = []
    sparse_mm = torch.sparse.mm
    monkeypatch.setattr(
        torch.sparse, "mm", lambda a, b: calls.append(a.layout) or sparse_mm(a, b)
    )
    out = indexing.sparse_rows_matmul(weights, table)
    assert out.shape == (300, 50)
    assert out.dtype == dtype
    assert out.layout == torch.strided
    torch.testing.assert_close(out, weights @ table)
    assert not bool(out[7].any())
    # the sparse product below the density bound, the dense one above it
    assert calls == ([torch.sparse_coo] if density <= 0.05 else [])


def test_sparse_rows_matmul_empty():
    out = indexing.sparse_rows_matmul(torch.zeros(0, 84), torch.randn(84, 6))
    assert out.shape == (0, 6)

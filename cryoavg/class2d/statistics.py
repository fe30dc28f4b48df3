"""Sufficient statistics of one Class2D iteration (sums over particles, batches, ranks).

Every field is a plain sum, so statistics of several batches or DDP ranks combine by
addition (:meth:`Class2DStatistics.add_`, :meth:`Class2DStatistics.all_reduce`). See
``docs/class2d-design.md`` and spec §A.6.6 for what is accumulated.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

__all__ = ["Class2DStatistics"]


@dataclass
class Class2DStatistics:
    """Sufficient statistics accumulated by the E-step (spec §A.6.6).

    Attributes
    ----------
    data
        ``(2, k, P, P//2+1)`` complex: back-projected ``w·(s·CTF/σ²)·X`` (EM) or
        ``w·(s·CTF/σ²)·(X − s·CTF·P)`` (VDAM) per pseudo half-set (index % 2), on the
        padded un-shifted half plane.
    weight
        ``(2, k, P, P//2+1)`` real: back-projected ``w·(s·CTF)²/σ²``.
    class_weight
        ``(k,)`` Σ w.
    offset_sum_angstrom
        ``(k, 2)`` Σ w·o_abs (yx, Å), ``o_abs = p·(round(o) + t)``.
    sigma2_offset_sum
        ``()`` Σ w·|μ_k − o_abs|² (Å²).
    noise_power
        ``(g, f)`` Σ w·|s·CTF·P − X_masked|² per shell (incl. DC) plus the masked
        shell power beyond the current size (once per particle).
    noise_weight
        ``(g,)`` Σ w per optics group.
    scale_xa, scale_aa
        ``(m,)`` per micrograph group, over pixels whose shell has SSNR_k > 3:
        ``Σ w·Re(conj(CTF·P)·X_masked·φ_t)`` and ``Σ w·|CTF·P|²``, i.e. RELION's XA and
        AA (computed with ``s·CTF·P``) already divided by ``s`` resp. ``s²``.
    norm_sum
        ``()`` Σ of the new per-particle norm corrections.
    weight_sum
        ``()`` Σ w over all contributing samples.
    log_likelihood
        ``()`` Σ per-particle log-likelihood contributions.
    pmax_sum
        ``()`` Σ Pmax.
    n_particles
        ``()`` number of particles accumulated.
    """

    data: torch.Tensor
    weight: torch.Tensor
    class_weight: torch.Tensor
    offset_sum_angstrom: torch.Tensor
    sigma2_offset_sum: torch.Tensor
    noise_power: torch.Tensor
    noise_weight: torch.Tensor
    scale_xa: torch.Tensor
    scale_aa: torch.Tensor
    norm_sum: torch.Tensor
    weight_sum: torch.Tensor
    log_likelihood: torch.Tensor
    pmax_sum: torch.Tensor
    n_particles: torch.Tensor

    @classmethod
    def zeros(
        cls,
        n_classes: int,
        box_size: int,
        *,
        n_optics_groups: int = 1,
        n_groups: int = 1,
        pad: int = 2,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Class2DStatistics:
        """All-zero statistics.

        Parameters
        ----------
        n_classes
            ``k``.
        box_size
            ``N`` (the padded grid is ``P = pad·N``; ``f = N//2 + 1`` shells).
        n_optics_groups
            ``g``.
        n_groups
            ``m`` (micrograph / scale groups).
        pad
            Padding factor.
        dtype
            Real dtype (the complex ``data`` uses the matching complex dtype). The
            scalar sums use float64.
        device
            Device.

        Returns
        -------
        Class2DStatistics
        """
        big = pad * box_size
        f = box_size // 2 + 1
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        kw = {"device": device}
        acc = torch.float64
        return cls(
            data=torch.zeros((2, n_classes, big, big // 2 + 1), dtype=cdtype, **kw),
            weight=torch.zeros((2, n_classes, big, big // 2 + 1), dtype=dtype, **kw),
            class_weight=torch.zeros((n_classes,), dtype=acc, **kw),
            offset_sum_angstrom=torch.zeros((n_classes, 2), dtype=acc, **kw),
            sigma2_offset_sum=torch.zeros((), dtype=acc, **kw),
            noise_power=torch.zeros((n_optics_groups, f), dtype=acc, **kw),
            noise_weight=torch.zeros((n_optics_groups,), dtype=acc, **kw),
            scale_xa=torch.zeros((n_groups,), dtype=acc, **kw),
            scale_aa=torch.zeros((n_groups,), dtype=acc, **kw),
            norm_sum=torch.zeros((), dtype=acc, **kw),
            weight_sum=torch.zeros((), dtype=acc, **kw),
            log_likelihood=torch.zeros((), dtype=acc, **kw),
            pmax_sum=torch.zeros((), dtype=acc, **kw),
            n_particles=torch.zeros((), dtype=acc, **kw),
        )

    def _tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]

    def add_(self, other: Class2DStatistics) -> Class2DStatistics:
        """In-place sum with ``other`` (same shapes). Returns ``self``."""
        for name, tensor in self._tensors():
            tensor.add_(
                getattr(other, name).to(device=tensor.device, dtype=tensor.dtype)
            )
        return self

    def __add__(self, other: Class2DStatistics) -> Class2DStatistics:
        out = self.clone()
        return out.add_(other)

    def clone(self) -> Class2DStatistics:
        """Deep copy."""
        return type(self)(**{name: t.clone() for name, t in self._tensors()})

    def zero_(self) -> Class2DStatistics:
        """Reset all sums to zero in place. Returns ``self``."""
        for _, tensor in self._tensors():
            tensor.zero_()
        return self

    def all_reduce(self, group=None) -> Class2DStatistics:
        """Sum over DDP ranks in place (no-op without an initialised process group).

        Parameters
        ----------
        group
            Optional process group.

        Returns
        -------
        Class2DStatistics
            ``self``.
        """
        if dist.is_available() and dist.is_initialized():
            for _, tensor in self._tensors():
                if tensor.is_complex():
                    dist.all_reduce(
                        torch.view_as_real(tensor), op=dist.ReduceOp.SUM, group=group
                    )
                else:
                    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return self

    def to(self, device: torch.device | str) -> Class2DStatistics:
        """Copy on ``device`` (or ``self`` if already there)."""
        return type(self)(**{name: t.to(device) for name, t in self._tensors()})

    def as_dict(self) -> dict[str, torch.Tensor]:
        """``{field name: tensor}`` (like a ``state_dict``; tensors are not copied)."""
        return dict(self._tensors())

    @classmethod
    def from_dict(cls, state: dict[str, torch.Tensor]) -> Class2DStatistics:
        """Inverse of :meth:`as_dict`."""
        return cls(**{f.name: state[f.name] for f in fields(cls)})

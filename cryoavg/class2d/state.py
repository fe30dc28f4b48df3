"""Model state of reference-free 2D classification (``Class2DState``).

The state holds everything RELION keeps in its ``MlModel`` for a 2D run (spec §A.3,
§A.4, §A.7, §A.8): the class images, the noise spectra, the scale factors, the priors
and the VDAM moments. It is a :class:`torch.nn.Module` so that it moves between
devices, takes part in Lightning checkpoints (``state_dict``) and is broadcast by DDP
like any model.

Conventions
-----------
* ``k`` classes, ``N`` box size (pixels), ``f = N // 2 + 1`` shells, ``g`` optics
  groups, ``m`` scale (micrograph) groups, ``P = pad · N`` padded box (pad = 2).
* Class images are real-space ``(k, N, N)`` with the origin at pixel ``N // 2``.
* Fourier quantities follow the design doc: RELION normalisation (forward transform
  divided by the number of real-space pixels), half-plane (``rfft``) layout, not
  fftshifted. Padded-grid arrays ``(…, P, P // 2 + 1)`` hold coefficients scaled to the
  ``N``-grid convention (the value at ``pad · q`` is the ``N``-grid coefficient at
  ``q``).
* Spectra (``tau2``, ``ssnr``, ``sigma2_noise``…) are indexed by the shell
  ``ires = round(|q|)`` on the ``N`` grid. ``sigma2_noise`` and ``tau2`` are variances
  per real/imaginary component.
* The image, noise and scale tensors are ``nn.Parameter`` with ``requires_grad=False``:
  they are updated in place by the M-step (:mod:`cryoavg.class2d.mstep`), not by
  autograd. Everything else is a (persistent) buffer.
* The complex VDAM first moment is stored as a real buffer ``moment1_ri`` with a
  trailing ``(re, im)`` axis (robust in checkpoints and collective communication); the
  property :attr:`Class2DState.moment1` is a complex *view* of it, so in-place writes
  to the view update the buffer.
"""

import torch
from torch import nn

__all__ = ["Class2DState"]


class Class2DState(nn.Module):
    """Parameters of a 2D classification model.

    Parameters
    ----------
    n_classes
        ``k``, number of classes.
    box_size
        ``N``, image box size in pixels (even).
    n_optics_groups
        ``g``, number of optics groups (one noise spectrum each).
    n_scale_groups
        ``m``, number of intensity-scale groups (RELION "groups", one per micrograph by
        default).
    pad
        Padding factor of the Fourier accumulators and moments (RELION ``--pad``, 2).
    sigma2_offset_angstrom2
        Initial variance of the offset prior in Å² (RELION ``--offset 10`` → 100 Å²).
    dtype
        Floating dtype of the real tensors (the complex moment view matches it).
    device
        Device of all tensors.

    Attributes
    ----------
    class_images : nn.Parameter
        ``(k, N, N)`` real-space class averages.
    sigma2_noise : nn.Parameter
        ``(g, f)`` noise spectra σ²_o(ires), variance per real/imaginary component.
    scale : nn.Parameter
        ``(m,)`` intensity scale factor s_g of each scale group.
    tau2 : torch.Tensor
        ``(k, f)`` prior signal spectra τ²_k (per component, before the fudge factor T).
    ssnr : torch.Tensor
        ``(k, f)`` spectral signal-to-noise ratios ("data vs prior").
    fourier_completeness : torch.Tensor
        ``(k, f)`` fraction of padded Fourier voxels per shell with SSNR ≥ 1.
    sigma2_class : torch.Tensor
        ``(k, f)`` RELION's ``rlnReferenceSigma2`` (voxels per shell / summed weight).
    class_prior : torch.Tensor
        ``(k,)`` class distribution π_k (sums to 1).
    class_offset_prior_angstrom : torch.Tensor
        ``(k, 2)`` mean offset μ_k of each class, ``(y, x)`` in Å.
    sigma2_offset_angstrom2 : torch.Tensor
        ``()`` variance σ²_off of the offset prior, Å².
    avg_norm : torch.Tensor
        ``()`` average norm-correction factor.
    moment1_ri : torch.Tensor
        ``(2, k, P, P // 2 + 1, 2)`` VDAM first moments of the two pseudo half-sets, as
        (re, im) pairs. See :attr:`moment1`.
    moment2 : torch.Tensor
        ``(k, P, P // 2 + 1)`` VDAM second moment (initialised to 1).
    class_age : torch.Tensor
        ``(k,)`` accumulated particle weight of each class ("age"; bookkeeping of
        class replacement).
    scale_group_particle_count : torch.Tensor
        ``(m,)`` number of particles in each scale group (whole data set), used to
        weight the mean-one normalisation of ``scale``.
    current_size : torch.Tensor
        ``()`` int64, current Fourier image size in pixels (even, ≤ N).
    current_resolution_shell : torch.Tensor
        ``()`` int64, ``maxres`` shell of the current resolution (§A.9.3).
    step_size : torch.Tensor
        ``()`` VDAM step size of the last iteration.
    tau2_fudge : torch.Tensor
        ``()`` regularisation parameter T of the last iteration.
    log_likelihood : torch.Tensor
        ``()`` summed log-likelihood of the last E-step.
    average_pmax : torch.Tensor
        ``()`` average of the particles' maximum normalised weight.
    accuracy_rotations_degrees : torch.Tensor
        ``(k,)`` expected in-plane angular accuracy of each class (degrees; 999 =
        unknown), see :mod:`cryoavg.class2d.accuracy`.
    accuracy_translations_angstrom : torch.Tensor
        ``(k,)`` expected translational accuracy of each class (Å; 999 = unknown).
    """

    class_images: nn.Parameter
    sigma2_noise: nn.Parameter
    scale: nn.Parameter
    tau2: torch.Tensor
    ssnr: torch.Tensor
    fourier_completeness: torch.Tensor
    sigma2_class: torch.Tensor
    class_prior: torch.Tensor
    class_offset_prior_angstrom: torch.Tensor
    sigma2_offset_angstrom2: torch.Tensor
    avg_norm: torch.Tensor
    moment1_ri: torch.Tensor
    moment2: torch.Tensor
    class_age: torch.Tensor
    scale_group_particle_count: torch.Tensor
    current_size: torch.Tensor
    current_resolution_shell: torch.Tensor
    step_size: torch.Tensor
    tau2_fudge: torch.Tensor
    log_likelihood: torch.Tensor
    average_pmax: torch.Tensor
    accuracy_rotations_degrees: torch.Tensor
    accuracy_translations_angstrom: torch.Tensor

    def __init__(
        self,
        n_classes: int,
        box_size: int,
        n_optics_groups: int = 1,
        n_scale_groups: int = 1,
        *,
        pad: int = 2,
        sigma2_offset_angstrom2: float = 100.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        if box_size < 2 or box_size % 2:
            raise ValueError(f"box_size must be even and >= 2, got {box_size}")
        if n_optics_groups < 1 or n_scale_groups < 1:
            raise ValueError("n_optics_groups and n_scale_groups must be >= 1")
        if pad < 1:
            raise ValueError(f"pad must be >= 1, got {pad}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a real floating dtype, got {dtype}")
        self.pad = int(pad)
        k, n, f = int(n_classes), int(box_size), int(box_size) // 2 + 1
        p = self.pad * n
        kw = {"dtype": dtype, "device": device}

        def frozen(tensor: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(tensor, requires_grad=False)

        self.class_images = frozen(torch.zeros(k, n, n, **kw))
        self.sigma2_noise = frozen(torch.ones(n_optics_groups, f, **kw))
        self.scale = frozen(torch.ones(n_scale_groups, **kw))

        self.register_buffer("tau2", torch.zeros(k, f, **kw))
        self.register_buffer("ssnr", torch.zeros(k, f, **kw))
        self.register_buffer("fourier_completeness", torch.zeros(k, f, **kw))
        self.register_buffer("sigma2_class", torch.zeros(k, f, **kw))
        self.register_buffer("class_prior", torch.full((k,), 1.0 / k, **kw))
        self.register_buffer("class_offset_prior_angstrom", torch.zeros(k, 2, **kw))
        self.register_buffer(
            "sigma2_offset_angstrom2",
            torch.tensor(float(sigma2_offset_angstrom2), **kw),
        )
        self.register_buffer("avg_norm", torch.tensor(1.0, **kw))
        self.register_buffer("moment1_ri", torch.zeros(2, k, p, p // 2 + 1, 2, **kw))
        self.register_buffer("moment2", torch.ones(k, p, p // 2 + 1, **kw))
        self.register_buffer("class_age", torch.zeros(k, **kw))
        self.register_buffer(
            "scale_group_particle_count", torch.ones(n_scale_groups, **kw)
        )
        self.register_buffer(
            "current_size", torch.tensor(n, dtype=torch.int64, device=device)
        )
        self.register_buffer(
            "current_resolution_shell",
            torch.tensor(n // 2, dtype=torch.int64, device=device),
        )
        self.register_buffer("step_size", torch.tensor(0.0, **kw))
        self.register_buffer("tau2_fudge", torch.tensor(1.0, **kw))
        self.register_buffer("log_likelihood", torch.tensor(0.0, **kw))
        self.register_buffer("average_pmax", torch.tensor(0.0, **kw))
        self.register_buffer(
            "accuracy_rotations_degrees", torch.full((k,), 999.0, **kw)
        )
        self.register_buffer(
            "accuracy_translations_angstrom", torch.full((k,), 999.0, **kw)
        )

    # ------------------------------------------------------------------ sizes
    @property
    def n_classes(self) -> int:
        """``k``, the number of classes."""
        return int(self.class_images.shape[0])

    @property
    def box_size(self) -> int:
        """``N``, the box size in pixels."""
        return int(self.class_images.shape[-1])

    @property
    def padded_size(self) -> int:
        """``P = pad · N``, the padded box size of accumulators and moments."""
        return self.pad * self.box_size

    @property
    def n_shells(self) -> int:
        """``f = N // 2 + 1``, the length of the 1D spectra."""
        return self.box_size // 2 + 1

    @property
    def n_optics_groups(self) -> int:
        """``g``, the number of optics groups."""
        return int(self.sigma2_noise.shape[0])

    @property
    def n_scale_groups(self) -> int:
        """``m``, the number of scale groups."""
        return int(self.scale.shape[0])

    # ---------------------------------------------------------------- moments
    @property
    def moment1(self) -> torch.Tensor:
        """Complex view ``(2, k, P, P // 2 + 1)`` of :attr:`moment1_ri` (shared)."""
        return torch.view_as_complex(self.moment1_ri)

    def extra_repr(self) -> str:
        """Sizes shown by ``repr``."""
        return (
            f"n_classes={self.n_classes}, box_size={self.box_size}, pad={self.pad}, "
            f"n_optics_groups={self.n_optics_groups}, "
            f"n_scale_groups={self.n_scale_groups}"
        )

"""The M-step as ``torch.optim.Optimizer`` classes of their own (VDAM and classic EM).

Class averages, noise spectra and scale factors are ``nn.Parameter``s of
:class:`~cryoavg.class2d.state.Class2DState`. They are not updated from autograd gradients but
from the sufficient statistics of the E-step (:class:`~cryoavg.class2d.statistics.Class2DStatistics`,
summed over the mini-batch and over DDP ranks), so ``step`` takes those statistics:

* :class:`VdamOptimizer`: RELION's variable-metric gradient descent with adaptive moments
  (§A.8): moment updates, pseudo-half-set shrinkage, class replacement, step-size and T
  schedules, momentum for the other parameters;
* :class:`EmOptimizer`: the classic regularised-likelihood M-step (§A.7) over all particles.

Both then apply the post-M-step operations of §A.5: class centring, solvent flattening and the
update of the current resolution / image size.
"""

from dataclasses import dataclass

import torch

from cryoavg.class2d.mstep import (
    center_classes,
    em_update,
    solvent_flatten,
    update_resolution,
    vdam_update,
)
from cryoavg.class2d.schedule import VdamSchedule
from cryoavg.class2d.settings import Class2DSettings
from cryoavg.class2d.state import Class2DState
from cryoavg.class2d.statistics import Class2DStatistics


@dataclass
class StepReport:
    """What one M-step did (for logging)."""

    iteration: int
    step_size: float
    tau2_fudge: float
    current_size: int
    replaced_class: int | None = None
    expanded_class: int | None = None
    centred_classes: int = 0
    #: EM: the class images before solvent flattening (RELION's ``run_unmasked_classes.mrcs``)
    unmasked_class_images: torch.Tensor | None = None


class _Class2DOptimizer(torch.optim.Optimizer):
    """Shared set-up: parameter groups by role (class images, noise spectra, scales)."""

    def __init__(
        self,
        state: Class2DState,
        settings: Class2DSettings,
        *,
        mask_radius_px: float,
        schedule: VdamSchedule | None = None,
    ) -> None:
        groups = [
            {"params": [state.class_images], "role": "class_images"},
            {"params": [state.sigma2_noise], "role": "sigma2_noise"},
            {"params": [state.scale], "role": "scale"},
        ]
        super().__init__(groups, defaults={})
        self.model_state = state
        self.settings = settings
        self.mask_radius_px = float(mask_radius_px)
        self.schedule = schedule

    def _post_update(self, iteration: int, report: StepReport) -> StepReport:
        settings, state = self.settings, self.model_state
        do_center = settings.center_classes and (
            self.schedule.do_centering(iteration) if self.schedule is not None else True
        )
        if do_center:
            min_shift = 0.0
            if settings.is_vdam:
                # §A.8.8: ignore small centre-of-mass shifts (< max(0.01·D/p, 2) px)
                min_shift = max(0.01 * 2.0 * self.mask_radius_px, 2.0)
            shifts = center_classes(
                state,
                settings.offset_range_px,
                min_shift_px=min_shift,
                shift_moments=settings.is_vdam,
            )
            report.centred_classes = int((shifts.abs().sum(-1) > 0).sum())
        if not settings.is_vdam:
            report.unmasked_class_images = state.class_images.detach().clone()
        if settings.flatten_solvent:
            solvent_flatten(state, self.mask_radius_px, settings.mask_edge_px)
        update_resolution(state)
        report.current_size = int(state.current_size)
        return report


class VdamOptimizer(_Class2DOptimizer):
    """Gradient-driven M-step (VDAM, RELION ``--grad``), one mini-batch per ``step``.

    Parameters
    ----------
    state
        The model whose parameters are updated in place.
    settings
        Run options (class inactivity threshold, norm/scale corrections, centring, ...).
    mask_radius_px
        Radius of the circular mask (px), for solvent flattening and centring.
    schedule
        Step size, T, momentum and replacement window per iteration.
    """

    def __init__(
        self,
        state: Class2DState,
        settings: Class2DSettings,
        *,
        mask_radius_px: float,
        schedule: VdamSchedule,
    ) -> None:
        super().__init__(
            state, settings, mask_radius_px=mask_radius_px, schedule=schedule
        )

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: object = None, *, stats: Class2DStatistics, iteration: int
    ) -> StepReport:
        """Apply the VDAM update of ``iteration`` from the mini-batch statistics."""
        schedule = self.schedule
        if schedule is None:  # pragma: no cover - set in __init__
            raise RuntimeError("VdamOptimizer needs a schedule")
        step = schedule.step_size(iteration)
        tau2_fudge = schedule.tau2_fudge(iteration)
        result = vdam_update(
            self.model_state,
            stats,
            step,
            tau2_fudge,
            schedule.momentum(iteration),
            allow_class_replacement=schedule.in_replacement_window(iteration),
            class_inactivity_threshold=self.settings.class_inactivity_threshold,
            expand_class=self.settings.expand_class,
            do_norm=self.settings.do_norm,
            do_scale=self.settings.do_scale,
        )
        report = StepReport(
            iteration=iteration,
            step_size=step,
            tau2_fudge=tau2_fudge,
            current_size=int(self.model_state.current_size),
            replaced_class=result.replaced_class,
            expanded_class=result.expanded_class,
        )
        return self._post_update(iteration, report)


def em_replacement_window(iteration: int, n_iterations: int) -> bool:
    """Whether EM iteration ``iteration`` (1-based) may re-seed an inactive class.

    From the second iteration to 80 % of the run (2–20 of 25), so that the last
    iterations refine a stable set of classes.
    """
    return 1 < iteration <= int(0.8 * n_iterations)


class EmOptimizer(_Class2DOptimizer):
    """Classic expectation-maximisation M-step (all particles every iteration)."""

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: object = None, *, stats: Class2DStatistics, iteration: int
    ) -> StepReport:
        """Apply the EM update of ``iteration``."""
        tau2_fudge = self.settings.tau2_fudge
        result = em_update(
            self.model_state,
            stats,
            tau2_fudge,
            do_norm=self.settings.do_norm,
            do_scale=self.settings.do_scale,
            allow_class_replacement=em_replacement_window(
                iteration, self.settings.n_iterations
            ),
            class_inactivity_threshold=self.settings.class_inactivity_threshold,
        )
        self.model_state.tau2_fudge.fill_(tau2_fudge)
        report = StepReport(
            iteration=iteration,
            step_size=1.0,
            tau2_fudge=tau2_fudge,
            current_size=int(self.model_state.current_size),
            replaced_class=result.replaced_class,
            expanded_class=result.expanded_class,
        )
        return self._post_update(iteration, report)

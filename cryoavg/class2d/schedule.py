"""Iteration schedules of VDAM (RELION ``--grad``) 2D classification.

Implements spec §A.8.1–§A.8.4 and the per-iteration switches of §A.5 and §A.8.8–§A.8.9:
phase lengths, mini-batch ("subset") size, step size, the regularisation parameter T,
momentum of the "other" parameters, the class-replacement window, when to centre the
classes and when to write output.

Conventions
-----------
* Iterations are numbered as in RELION: ``1 … n_iterations`` (iteration 0 is the
  initialisation). Every method accepts any integer; values outside that range follow
  the same formulas.
* ``subset_size`` returns ``-1`` for "all particles", exactly as RELION stores it.
"""

import math
import re

__all__ = ["VdamSchedule", "parse_step_scheme"]

_STEP_SCHEME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)-step\s*$")


def parse_step_scheme(scheme: str) -> float | None:
    """Parse a RELION schedule scheme string.

    Parameters
    ----------
    scheme
        ``"plain"`` or ``"<x>-step"`` with a positive number ``x`` (e.g. ``"3-step"``).

    Returns
    -------
    float or None
        ``x`` for ``"<x>-step"``, None for ``"plain"``.

    Raises
    ------
    ValueError
        For any other string or a non-positive ``x``.
    """
    if scheme.strip() == "plain":
        return None
    match = _STEP_SCHEME.match(scheme)
    if match is None:
        raise ValueError(f"scheme must be 'plain' or '<x>-step', got {scheme!r}")
    value = float(match.group(1))
    if value <= 0.0:
        raise ValueError(
            f"the factor of a '<x>-step' scheme must be > 0, got {scheme!r}"
        )
    return value


def _relion_round(value: float) -> int:
    """Round half away from zero (RELION's ``ROUND``), not to even."""
    if value >= 0:
        return math.floor(value + 0.5)
    return -math.floor(-value + 0.5)


def _sigmoid_down(iteration: int, start: int, width: int) -> float:
    """RELION's schedule sigmoid: ≈1 well before ``start + width/2``, ≈0 well after.

    ``σ(x) = 1 / (10^((x − start − width/2) / (width/4)) + 1)``. A zero ``width``
    degenerates to a step at ``start`` (1 before, ½ at, 0 after).
    """
    centre = start + width / 2.0
    if width <= 0:
        if iteration == centre:
            return 0.5
        return 1.0 if iteration < centre else 0.0
    exponent = (iteration - centre) / (width / 4.0)
    if exponent > 300.0:  # 10**exponent would overflow a float
        return 0.0
    return 1.0 / (10.0**exponent + 1.0)


class VdamSchedule:
    """Per-iteration schedules of a VDAM 2D classification run.

    Parameters
    ----------
    n_iterations
        Total number of iterations (RELION ``--iter``); must be ≥ 1.
    n_particles
        ``N_p``, number of particles in the data set.
    n_classes
        ``K``, number of classes.
    ini_frac, fin_frac
        Fractions of the iterations in the initial and final phase
        (``--grad_ini_frac`` 0.3, ``--grad_fin_frac`` 0.2). If their sum exceeds 0.9,
        both are divided by ``sum + 0.1`` (§A.8.1).
    stepsize
        Base step size s₀ (``--grad_stepsize``; 0.3 for 2D).
    stepsize_scheme
        ``"plain"`` or ``"<x>-step"``; None → ``"<0.9/s₀>-step"`` (0.9 → s₀).
    tau2_fudge
        Final regularisation parameter T (``--tau2_fudge``); values ≤ 0 mean RELION's
        VDAM default 4.
    tau2_scheme
        ``"plain"`` or ``"<x>-step"``; None → ``"<T>-step"`` (T rises from 1 to T).
    ini_subset, fin_subset
        Mini-batch sizes of the initial and final phase; None (or ≤ 0) → the 2D defaults
        ``max(min(0.005·N_p, 10000), 200)`` and ``max(min(0.05·N_p, 100000), 1000)``.
    em_iters
        Number of final iterations run as plain EM (``--grad_em_iters``, 0).
    mu
        Momentum of the "other" parameters (``--mu``, 0.9).

    Raises
    ------
    ValueError
        For non-positive iteration, particle or class counts, a negative ``em_iters``,
        ``mu`` outside ``[0, 1)``, or an unparsable scheme.
    """

    def __init__(
        self,
        n_iterations: int,
        n_particles: int,
        n_classes: int,
        *,
        ini_frac: float = 0.3,
        fin_frac: float = 0.2,
        stepsize: float = 0.3,
        stepsize_scheme: str | None = None,
        tau2_fudge: float = 4.0,
        tau2_scheme: str | None = None,
        ini_subset: int | None = None,
        fin_subset: int | None = None,
        em_iters: int = 0,
        mu: float = 0.9,
    ) -> None:
        if n_iterations < 1:
            raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
        if n_particles < 1:
            raise ValueError(f"n_particles must be >= 1, got {n_particles}")
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        if em_iters < 0:
            raise ValueError(f"em_iters must be >= 0, got {em_iters}")
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"mu must be in [0, 1), got {mu}")
        if stepsize <= 0.0:
            raise ValueError(f"stepsize must be > 0, got {stepsize}")
        if ini_frac < 0.0 or fin_frac < 0.0:
            raise ValueError("ini_frac and fin_frac must be >= 0")
        self.n_iterations = int(n_iterations)
        self.n_particles = int(n_particles)
        self.n_classes = int(n_classes)
        self.em_iters = int(em_iters)
        self.mu = float(mu)

        # §A.8.1 phase lengths
        if ini_frac + fin_frac > 0.9:
            total = ini_frac + fin_frac + 0.1
            ini_frac, fin_frac = ini_frac / total, fin_frac / total
        self.ini_iter = int(self.n_iterations * ini_frac)
        self.fin_iter = int(self.n_iterations * fin_frac)
        self.inbetween_iter = self.n_iterations - self.ini_iter - self.fin_iter

        # §A.8.2 mini-batch sizes (2D defaults)
        n_p = self.n_particles
        self.ini_subset = (
            int(ini_subset)
            if ini_subset is not None and ini_subset > 0
            else int(max(min(0.005 * n_p, 10000), 200))
        )
        self.fin_subset = (
            int(fin_subset)
            if fin_subset is not None and fin_subset > 0
            else int(max(min(0.05 * n_p, 100000), 1000))
        )

        # §A.8.3 step size
        self.stepsize = float(stepsize)
        self.stepsize_scheme = (
            stepsize_scheme
            if stepsize_scheme is not None
            else f"{0.9 / self.stepsize:g}-step"
        )
        self._step_inflate = parse_step_scheme(self.stepsize_scheme)

        # §A.8.4 regularisation parameter T
        self.tau2_fudge_final = float(tau2_fudge) if tau2_fudge > 0 else 4.0
        self.tau2_scheme = (
            tau2_scheme
            if tau2_scheme is not None
            else f"{self.tau2_fudge_final:g}-step"
        )
        self._tau2_deflate = parse_step_scheme(self.tau2_scheme)

    # --------------------------------------------------------------- phases
    @classmethod
    def from_settings(cls, settings, n_particles: int) -> "VdamSchedule":
        """The schedule of a run's :class:`~cryoavg.class2d.settings.Class2DSettings`.

        Parameters
        ----------
        settings
            Run options (iterations, classes, VDAM fractions, step size, T, subsets, μ).
        n_particles
            Size of the data set.
        """
        return cls(
            settings.n_iterations,
            max(int(n_particles), 1),
            settings.n_classes,
            ini_frac=settings.grad_ini_frac,
            fin_frac=settings.grad_fin_frac,
            stepsize=settings.grad_stepsize if settings.grad_stepsize > 0 else 0.3,
            tau2_fudge=settings.tau2_fudge,
            ini_subset=settings.grad_ini_subset,
            fin_subset=settings.grad_fin_subset,
            mu=settings.mu,
        )

    @property
    def max_significant(self) -> int:
        """Cap on significant coarse samples per particle (2D VDAM: ``5·K``, §A.5)."""
        return 5 * self.n_classes

    def do_grad(self, iteration: int) -> bool:
        """Whether ``iteration`` is a gradient (VDAM) iteration (not a final EM one)."""
        return iteration <= self.n_iterations - self.em_iters

    def subset_size(self, iteration: int) -> int:
        """Mini-batch size of ``iteration``; ``-1`` means all particles (§A.8.2).

        All particles are used when the scheduled size reaches ``N_p``, in the last
        iteration when ``K > 1``, and in the final ``em_iters`` (EM) iterations.
        """
        if iteration < self.ini_iter:
            size = self.ini_subset
        elif iteration < self.ini_iter + self.inbetween_iter:
            fraction = (iteration - self.ini_iter) / self.inbetween_iter
            size = self.ini_subset + _relion_round(
                fraction * (self.fin_subset - self.ini_subset)
            )
        else:
            size = self.fin_subset
        if (
            size >= self.n_particles
            or (iteration == self.n_iterations and self.n_classes > 1)
            or not self.do_grad(iteration)
        ):
            return -1
        return int(size)

    def batch_size(self, iteration: int) -> int:
        """Number of particles processed in ``iteration`` (``N_p`` for "all")."""
        size = self.subset_size(iteration)
        return self.n_particles if size < 0 else min(size, self.n_particles)

    def is_full_pass(self, iteration: int) -> bool:
        """Whether ``iteration`` processes all particles."""
        return self.subset_size(iteration) < 0

    def step_size(self, iteration: int) -> float:
        """Step size of ``iteration`` (§A.8.3).

        ``"plain"``: s₀. ``"<x>-step"``: ``s₀·x·σ + s₀·(1 − σ)`` with RELION's sigmoid
        centred at ``ini_iter + a/2``, ``a = int(inbetween_iter / 2)``.
        """
        if self._step_inflate is None:
            return self.stepsize
        width = int(self.inbetween_iter / 2)
        sigma = _sigmoid_down(iteration, self.ini_iter, width)
        return self.stepsize * self._step_inflate * sigma + self.stepsize * (
            1.0 - sigma
        )

    def tau2_fudge(self, iteration: int) -> float:
        """Regularisation parameter T of ``iteration`` (§A.8.4).

        ``"plain"``: T. ``"<x>-step"``: ``(T/x)·σ + T·(1 − σ)`` with the sigmoid centred
        at ``ini_iter + a/2``, ``a = int(inbetween_iter / 4)``.
        """
        final = self.tau2_fudge_final
        if self._tau2_deflate is None:
            return final
        width = int(self.inbetween_iter / 4)
        sigma = _sigmoid_down(iteration, self.ini_iter, width)
        return (final / self._tau2_deflate) * sigma + final * (1.0 - sigma)

    def momentum(self, iteration: int) -> float:
        """Momentum μ of the "other" parameters: 0 when all particles are processed."""
        return 0.0 if self.is_full_pass(iteration) else self.mu

    def in_replacement_window(self, iteration: int) -> bool:
        """Whether classes may be replaced: ``ini < it < ini + inbetween`` (§A.8.5)."""
        return self.ini_iter < iteration < self.ini_iter + self.inbetween_iter

    def do_centering(self, iteration: int) -> bool:
        """Whether classes are centred after the M-step of ``iteration`` (§A.5 step 9).

        Centring is skipped while the *next* iteration is still a gradient iteration and
        ``iteration`` lies in the final phase; i.e. it happens in the initial and
        in-between phases and in the last (or final EM) iterations.
        """
        do_grad_next = (
            self.do_grad(iteration + 1) and iteration + 1 <= self.n_iterations
        )
        return (not do_grad_next) or iteration < self.ini_iter + self.inbetween_iter

    def is_write_iteration(self, iteration: int, write_every: int = 10) -> bool:
        """Whether output is written after ``iteration`` (§A.8.9).

        True for multiples of ``write_every`` (``--grad_write_iter``, including 0), the
        last iteration and every iteration that processes all particles.
        """
        if write_every < 1:
            raise ValueError(f"write_every must be >= 1, got {write_every}")
        return (
            iteration % write_every == 0
            or iteration == self.n_iterations
            or (iteration >= 1 and self.is_full_pass(iteration))
        )

    def __repr__(self) -> str:
        return (
            f"VdamSchedule(n_iterations={self.n_iterations}, "
            f"n_particles={self.n_particles}, n_classes={self.n_classes}, "
            f"phases={self.ini_iter}/{self.inbetween_iter}/{self.fin_iter}, "
            f"subsets={self.ini_subset}->{self.fin_subset}, "
            f"step={self.stepsize} ({self.stepsize_scheme}), "
            f"T={self.tau2_fudge_final} ({self.tau2_scheme}), mu={self.mu})"
        )

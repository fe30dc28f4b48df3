"""Data-parallel Class2D over torch.distributed without the DDP gradient wrapper.

Class2D parameters are updated from *sufficient statistics* summed over ranks (an all-reduce of
:class:`~cryoavg.class2d.statistics.Class2DStatistics` at the end of every iteration), not from
autograd gradients, so wrapping the module in ``DistributedDataParallel`` (which needs
parameters that require gradients and a backward pass) is unnecessary. This strategy keeps
everything else of Lightning's DDP: process launch (``ddp`` under torchrun/SLURM, ``ddp_spawn``),
the process group, device placement, barriers and rank-zero-only logging.

:func:`quiet_lightning` silences Lightning's chatter (tips, accelerator banners, deprecation
warnings of its dependencies) so that a job prints cryoavg's own log lines and the progress
bar; the strategy applies it in every process it starts.
"""

import contextlib
import logging
import warnings
from collections.abc import Iterator

from lightning.pytorch.strategies import DDPStrategy

#: Lightning loggers whose INFO messages (tips, "GPU available", "Initializing distributed",
#: "Restoring states from the checkpoint", "`Trainer.fit` stopped") are noise in a job
LIGHTNING_LOGGERS = (
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
)

#: (message regex, category) of warnings that a user cannot act on
NOISY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # torch deprecation triggered inside lightning.pytorch.utilities._pytree
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # num_workers=0 is the default on purpose: the E-step, not image reading, dominates
    (r".*does not have many workers.*", Warning),
)


def install_quiet_filters() -> None:
    """Raise Lightning's loggers to WARNING and ignore :data:`NOISY_WARNINGS` (process-wide)."""
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message, category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """:func:`install_quiet_filters` for the duration of a block, then restore."""
    levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
    try:
        with warnings.catch_warnings():
            install_quiet_filters()
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


class StatisticsDDPStrategy(DDPStrategy):
    """Lightning DDP whose ranks share work by all-reducing sufficient statistics."""

    strategy_name = "cryoavg_ddp"

    def setup_environment(self) -> None:
        """Silence Lightning in this process (a spawned rank starts afresh), then set up."""
        install_quiet_filters()
        super().setup_environment()

    def configure_ddp(self) -> None:
        """Keep the module unwrapped: there is no gradient to synchronise."""

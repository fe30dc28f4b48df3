"""Data-parallel Class2D over torch.distributed without the DDP gradient wrapper.

Class2D parameters are updated from *sufficient statistics* summed over ranks (an all-reduce of
:class:`~cryoavg.class2d.statistics.Class2DStatistics` at the end of every iteration), not from
autograd gradients, so wrapping the module in ``DistributedDataParallel`` (which needs
parameters that require gradients and a backward pass) is unnecessary. This strategy keeps
everything else of Lightning's DDP: process launch (``ddp`` under torchrun/SLURM, ``ddp_spawn``),
the process group, device placement, barriers and rank-zero-only logging.
"""

from lightning.pytorch.strategies import DDPStrategy


class StatisticsDDPStrategy(DDPStrategy):
    """Lightning DDP whose ranks share work by all-reducing sufficient statistics."""

    strategy_name = "cryoavg_ddp"

    def configure_ddp(self) -> None:
        """Keep the module unwrapped: there is no gradient to synchronise."""

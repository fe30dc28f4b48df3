"""cryoavg.select: rank 2D class averages and select their particles (RELION Select, §C).

Modules: :mod:`~cryoavg.select.inputs` (Class2D optimiser/model/data files, bare class
stacks), :mod:`~cryoavg.select.ranker` (scores in [0, 1]; with ``features`` and
``network``), :mod:`~cryoavg.select.selection` (thresholds, guards, manual selection),
:mod:`~cryoavg.select.regroup` (``--regroup``), :mod:`~cryoavg.select.outputs` (the job's
STAR / npy files) and :mod:`~cryoavg.select.gallery` (PNG and HTML pictures). The
command is ``cryoavg select`` (:mod:`cryoavg.cli.select`).
"""

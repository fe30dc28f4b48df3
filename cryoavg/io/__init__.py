"""cryoavg.io: RELION-exact STAR/MRC input and output, particle tables, image stacks.

Modules
-------
``star``
    :func:`read_star`, :func:`write_star`, :func:`format_star` and the RELION label
    constants (``star.IMAGE_NAME`` ...).
``mrc``
    :func:`read_mrc`, :func:`write_mrc`, :func:`open_stack` (memory-mapped stacks).
``particles``
    :class:`ParticleTable`, :func:`read_particles`, :func:`write_particles`.
``stack``
    :class:`ImageSource`: lazy images of many stacks.
``dataset``
    ``ParticleDataset`` and ``ParticleDataModule`` (imports torch and lightning, so it
    is not imported here: use ``from cryoavg.io.dataset import ...``).
``atomic``
    :func:`atomic_write`, :func:`atomic_path`: all writes go through these.
"""

from cryoavg.io.atomic import atomic_path, atomic_write
from cryoavg.io.mrc import (
    MrcHeaderInfo,
    header_pixel_size,
    open_stack,
    read_image_stack,
    read_map_3d,
    read_mrc,
    read_mrc_header,
    write_mrc,
)
from cryoavg.io.particles import (
    CTF_KEYS,
    ParticleTable,
    format_image_name,
    parse_image_name,
    read_particles,
    resolve_stack_path,
    strip_pipeline_prefix,
    write_particles,
)
from cryoavg.io.stack import ImageSource
from cryoavg.io.star import format_star, format_value, read_star, write_star

__all__ = [
    "CTF_KEYS",
    "ImageSource",
    "MrcHeaderInfo",
    "ParticleTable",
    "atomic_path",
    "atomic_write",
    "format_image_name",
    "format_star",
    "format_value",
    "header_pixel_size",
    "open_stack",
    "parse_image_name",
    "read_image_stack",
    "read_map_3d",
    "read_mrc",
    "read_mrc_header",
    "read_particles",
    "read_star",
    "resolve_stack_path",
    "strip_pipeline_prefix",
    "write_mrc",
    "write_particles",
    "write_star",
]

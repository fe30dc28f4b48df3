"""cryoavg: RELION-compatible cryo-EM 2D class averaging, class selection and local symmetry in PyTorch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cryoavg")
except PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "uninstalled"

__all__ = ["__version__"]

"""Locate the Hydra config directory: the checkout's ``configs/`` or the copy inside the wheel."""

from pathlib import Path


def config_dir() -> str:
    """Absolute path of the directory holding the primary job configs.

    A source checkout (editable install) uses the top-level ``configs/`` next to the
    package; an installed wheel carries a copy at ``cryoavg/configs`` (hatch force-include).

    Returns
    -------
    str
        Absolute directory path, suitable for ``hydra.main(config_path=...)``.
    """
    package_dir = Path(__file__).resolve().parents[1]
    for candidate in (package_dir.parent / "configs", package_dir / "configs"):
        if (candidate / "hydra").is_dir():
            return str(candidate)
    raise FileNotFoundError(f"cryoavg configs not found next to {package_dir}")

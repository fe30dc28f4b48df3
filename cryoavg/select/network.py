"""The class-ranker network: a small CNN over the 64×64 class image plus an MLP over features.

Architecture (≈ 50 k parameters, ~0.2 MB as float32):

* image branch: 2×2 average pooling (64 → 32 px), then 3 stages
  ``conv3×3 → BatchNorm → ReLU → conv3×3 stride 2 → ReLU`` with 12/24/48 channels
  (32 → 4 px), global average + max pooling → 96 values;
* feature branch: standardisation with the training-set mean/std (stored as buffers),
  ``Linear(F, 64) → ReLU``;
* head: ``Linear(160, 64) → ReLU → Dropout → Linear(64, 1)`` and a sigmoid: a score in [0, 1].

Weights are stored with :func:`save_checkpoint` as a plain ``torch.save`` dictionary (tensors,
lists, strings: loadable with ``weights_only=True``) next to a ``.sha256`` file holding its
checksum; :func:`load_checkpoint` refuses a file whose checksum does not match.
"""

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cryoavg.errors import CryoavgError

CHECKPOINT_FORMAT = "cryoavg-class-ranker-1"


class ClassRankerNet(nn.Module):
    """CNN (64×64 image) + MLP (features) → score in [0, 1].

    Parameters
    ----------
    n_features
        Number of feature columns ``F``.
    widths
        Channels of the four convolution stages.
    hidden
        Width of the feature branch and of the head.
    dropout
        Dropout probability in the head (training only).
    """

    def __init__(
        self,
        n_features: int,
        widths: tuple[int, ...] = (12, 24, 48),
        hidden: int = 64,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.n_features = int(n_features)
        self.widths = tuple(int(w) for w in widths)
        self.hidden = int(hidden)
        layers: list[nn.Module] = [nn.AvgPool2d(2)]  # 64 -> 32 px (CPU cost)
        channels = 1
        for width in self.widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, stride=2, padding=1),
                nn.ReLU(),
            ]
            channels = width
        self.cnn = nn.Sequential(*layers)
        self.register_buffer("feature_mean", torch.zeros(self.n_features))
        self.register_buffer("feature_std", torch.ones(self.n_features))
        self.mlp = nn.Sequential(nn.Linear(self.n_features, hidden), nn.ReLU())
        self.head = nn.Sequential(
            nn.Linear(2 * channels + hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def logits(self, images64: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Unbounded scores.

        Parameters
        ----------
        images64
            ``(b, 64, 64)`` or ``(b, 1, 64, 64)`` normalised class images.
        features
            ``(b, F)`` raw features (standardised inside).

        Returns
        -------
        torch.Tensor
            ``(b,)`` logits.
        """
        if images64.ndim == 3:
            images64 = images64[:, None]
        x = self.cnn(images64)
        pooled = torch.cat([x.mean(dim=(-2, -1)), x.amax(dim=(-2, -1))], dim=1)
        f = (features - self.feature_mean) / self.feature_std
        f = self.mlp(f.clamp(-10.0, 10.0))
        return self.head(torch.cat([pooled, f], dim=1))[:, 0]

    def forward(self, images64: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Scores in [0, 1], shape ``(b,)``."""
        return torch.sigmoid(self.logits(images64, features))

    def config(self) -> dict[str, Any]:
        """Constructor arguments (stored in the checkpoint)."""
        return {
            "n_features": self.n_features,
            "widths": list(self.widths),
            "hidden": self.hidden,
        }


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: Path) -> Path:
    """The ``.sha256`` file stored next to a weights file."""
    return path.with_name(path.name + ".sha256")


def save_checkpoint(
    path: Path, model: ClassRankerNet, feature_names: list[str], meta: dict[str, Any]
) -> str:
    """Write the weights (float32) and their ``.sha256``; returns the checksum."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config(),
        "feature_names": list(feature_names),
        "state_dict": {
            k: v.detach().cpu().clone() for k, v in model.state_dict().items()
        },
        "meta": meta,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    digest = file_sha256(path)
    checksum_path(path).write_text(f"{digest}  {path.name}\n")
    return digest


def load_checkpoint(path: Path) -> tuple[ClassRankerNet, list[str], dict[str, Any]]:
    """Verify the checksum and load a ranker checkpoint (CPU, eval mode).

    Raises
    ------
    CryoavgError
        The file or its ``.sha256`` is missing, the checksum does not match, or the file is
        not a class-ranker checkpoint. The message names the file.
    """
    path = Path(path)
    sums = checksum_path(path)
    if not path.is_file():
        raise CryoavgError(
            f"class ranker weights {path} not found; train them with "
            "scripts/train_ranker.py (no weights are downloaded)"
        )
    if not sums.is_file():
        raise CryoavgError(f"class ranker weights {path}: checksum file {sums} missing")
    tokens = sums.read_text().split()
    expected = tokens[0].strip().lower() if tokens else ""
    actual = file_sha256(path)
    if actual != expected:
        raise CryoavgError(
            f"class ranker weights {path}: sha256 mismatch (expected {expected[:12]}…, "
            f"got {actual[:12]}…); the file is corrupt or was modified"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt pickle despite matching checksum
        raise CryoavgError(
            f"class ranker weights {path}: cannot be read ({err})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CryoavgError(
            f"class ranker weights {path}: not a {CHECKPOINT_FORMAT} file"
        )
    config = payload["config"]
    model = ClassRankerNet(
        n_features=int(config["n_features"]),
        widths=tuple(config["widths"]),
        hidden=int(config["hidden"]),
    )
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, list(payload["feature_names"]), dict(payload.get("meta", {}))

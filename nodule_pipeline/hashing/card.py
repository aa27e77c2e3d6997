"""A trained model together with its card: what it was trained on, how, and how well it did.

The card travels with the weights (``model.json``), so every index and report built from the
model can name the data version, split and settings behind it.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from nodule_pipeline.hashing.training import TrainedModel

LIBRARIES = ("torch", "numpy", "pandas", "pydicom", "scikit-image", "dagster")


@dataclass
class ModelArtefact:
    """What the ``hash_model`` asset stores: the trained network and its card."""

    model: TrainedModel
    card: dict[str, Any]

    @property
    def model_version(self) -> str:
        return str(self.card["model_version"])

    @property
    def measured(self) -> bool:
        """Whether the model was measured on a test split (a data set too small has none)."""
        return bool(self.card.get("test_metrics"))


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Content hash (16 hex digits) of the weights: the model version every index records."""
    digest = hashlib.sha256(b"nodule_pipeline.hash_model\0")
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + b"\0")
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found

"""Where a saved hash model's files are and how its card is read, without torch: a search by a
library nodule needs the model's version (from the card), not its weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS_FILE = "weights.pt"
META_FILE = "model.json"
FORMAT = "nodule_pipeline.hash_model/1"


def read_model_card(folder: Path) -> dict[str, Any]:
    """The ``model.json`` of a saved model (no weights loaded)."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved hash model here")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta

"""Where repablate's own files live, for the entry points (train, inspect) that hand them to Hydra."""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def conf_dir() -> Path:
    """conf/ of a source checkout or editable install, else the copy shipped in the package (repablate.conf)."""
    checkout = Path(__file__).resolve().parent.parent / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    return Path(str(importlib.resources.files("repablate") / "conf"))

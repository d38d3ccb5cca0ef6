"""seediff: Stable Diffusion images with SeeDiff label maps, generated on Ray and written as WebDataset shards.

The public names below are imported on first use, so ``import seediff`` stays light (no torch, Ray or diffusers
until a name that needs them is touched). The source folders map to subpackages: ``schemas/`` is
``seediff.schemas``, ``pipeline/`` (the driver side) is ``seediff.pipeline``, ``workers/`` (the GPU side) is
``seediff.workers``; ``seediff.storage`` is the storage both sides share."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# An installed seediff holds its subpackages inside this folder. A source checkout keeps them beside it (pyproject
# maps them under seediff. at install time), and a checkout that is run as it is must import its own copies: `ray
# job submit --working-dir .` uploads the checkout next to an installed seediff, and a second checkout (a git
# worktree) must not import the first one's files through an editable install.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "pipeline" / "cli.py").is_file():
    __path__.append(str(_checkout))

# public name -> the module that defines it
_EXPORTS = {
    "segmentation_dataset": "seediff.pipeline.readers",
    "wids_dataset": "seediff.pipeline.readers",
    "QualityFilter": "seediff.pipeline.readers",
    "decode_mask": "seediff.schemas.records",
    "RunConfig": "seediff.schemas.config",
    "MaskConfig": "seediff.schemas.config",
    "RuntimeOptions": "seediff.schemas.config",
    "AnnotateConfig": "seediff.schemas.config",
    "generate": "seediff.api",
    "dry_run": "seediff.api",
    "resume": "seediff.api",
    "annotate": "seediff.api",
    "inspect": "seediff.api",
    "verify": "seediff.api",
    "repair": "seediff.api",
    "preview": "seediff.api",
    "export": "seediff.api",
    "evaluate": "seediff.api",
    "report": "seediff.api",
    "RunSummary": "seediff.api",
    "InputError": "seediff.api",
    "ManifestError": "seediff.api",
    "ConfigError": "seediff.api",
    "RunConfigMismatch": "seediff.api",
    "NotAnOutputError": "seediff.api",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'seediff' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

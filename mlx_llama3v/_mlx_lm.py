"""The private mlx-lm names this package uses, in one place.

mlx-lm does not promise these (leading underscore, or keyword arguments it may
change); pyproject.toml pins the mlx-lm range they are tested with. Everything else
from mlx-lm is imported where it is used, from its public modules.
"""

from __future__ import annotations

from pathlib import Path

from mlx_lm.generate import TextStateMachine  # stop strings held back while they may start
from mlx_lm.utils import _download
from mlx_lm.utils import save_config as _save_config

__all__ = ["TextStateMachine", "download", "save_config"]


def download(repo: str) -> Path:
    """A Hugging Face repo's local snapshot (mlx-lm's ``_download``: the model files only)."""
    return Path(_download(repo))


def save_config(config: dict, path: Path) -> None:
    """mlx-lm's ``save_config``, keeping ``vision_config`` (mlx-lm drops it by default)."""
    _save_config(config, path, keep_vision_config=True)

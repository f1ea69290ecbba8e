"""What the ``generate`` and ``chat`` commands share besides ``GenerationOptions``:
the model, image, system and adapter options, the prompt file, and model loading
with every way it fails on bad input as one ``UserError``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..cli import one_line
from ..errors import UserError


Model = Annotated[
    str,
    typer.Option(
        "--model",
        help="Converted model folder, or a Hugging Face repo id / checkpoint folder (converted once into a cache).",
    ),
]
Images = Annotated[
    Optional[List[Path]], typer.Option("--image", help="Image file; repeat for several images.")
]
System = Annotated[Optional[str], typer.Option("--system", help="System message.")]
AdapterPath = Annotated[
    Optional[str],
    typer.Option(
        "--adapter-path",
        help="Fine-tuning output to apply: mlx-lm LoRA adapters (adapter_config.json + "
        "adapters.safetensors) and/or projector.safetensors.",
    ),
]
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Print statistics to stderr: prompt and generation tokens/s, image tiles, peak memory.",
    ),
]


def check_images(paths) -> None:
    """Fail early, before the (slow) model load, on an image that cannot be read."""
    from ..processing import load_image

    for path in paths or []:
        load_image(path)


def read_prompt(prompt: str, prompt_file: Optional[Path]) -> str:
    """The ``--prompt``, or the text of ``--prompt-file`` (``-``: standard input)."""
    if prompt_file is None:
        return prompt
    if str(prompt_file) == "-":
        return sys.stdin.read()
    try:
        return Path(prompt_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{prompt_file}: prompt file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{prompt_file}: the prompt file is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"{prompt_file}: cannot read the prompt file ({e.strerror})") from None


def load_model(name: str, adapter_path: Optional[str] = None):
    """``loading.load`` with every way it can fail on bad input as one ``UserError``."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    from ..loading import load

    path = Path(name).expanduser()
    if not path.exists():
        try:
            validate_repo_id(name)
        except HFValidationError:
            raise UserError(f"model folder not found: {name}") from None
    elif not path.is_dir():
        raise UserError(f"{name}: not a folder (give a model folder or a Hugging Face repo id)")
    try:
        return load(name, adapter_path=adapter_path)
    except UserError:
        raise
    except RepositoryNotFoundError:
        raise UserError(
            f"{name}: no such local folder, and no such model on the Hugging Face Hub "
            "(or it is private or gated: log in with `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"{name}: no such local folder, and the Hugging Face Hub cannot be reached to "
            "download it (no network, or HF_HUB_OFFLINE is set); give a local folder"
        ) from None
    except HfHubHTTPError as e:
        raise UserError(f"{name}: no such local folder, and the download failed ({_short(e)})") from None
    except (OSError, ValueError) as e:
        where = "no such local folder, and " if not path.exists() else ""
        raise UserError(f"{name}: {where}cannot load the model ({_short(e)})") from None


def _short(e: BaseException) -> str:
    return one_line(e).split(". ")[0][:200]

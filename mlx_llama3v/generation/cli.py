"""What the ``generate`` and ``chat`` commands share: options, model loading, errors.

Bad input ends the command with one ``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, NoReturn, Optional

import typer

KV_BITS = (2, 3, 4, 5, 6, 8)
SAMPLING_HELP = (
    "Published sampling of MiniCPM-Llama3-V 2.5: --temp 0.7 --top-p 0.8 --top-k 100 "
    "--repetition-penalty 1.05."
)

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
MaxTokens = Annotated[
    int,
    typer.Option(
        "--max-tokens",
        "-m",
        help="Most tokens to generate per answer (-1: up to the context length).",
    ),
]
Temp = Annotated[float, typer.Option("--temp", help="Sampling temperature; 0 is greedy.")]
TopP = Annotated[
    float,
    typer.Option(
        "--top-p",
        help="Nucleus sampling: keep the most likely tokens up to this probability (1: off).",
    ),
]
TopK = Annotated[
    int, typer.Option("--top-k", help="Sample among the k most likely tokens (0: off).")
]
MinP = Annotated[
    float,
    typer.Option(
        "--min-p", help="Drop tokens below this fraction of the top token's probability (0: off)."
    ),
]
RepetitionPenalty = Annotated[
    Optional[float],
    typer.Option("--repetition-penalty", help="Penalty for repeating recent tokens (1.0: off)."),
]
RepetitionContext = Annotated[
    int,
    typer.Option(
        "--repetition-context-size", help="How many recent tokens the repetition penalty looks at."
    ),
]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.")]
Stop = Annotated[
    Optional[List[str]],
    typer.Option(
        "--stop", help="Stop when the text contains this string (not printed); repeatable."
    ),
]
KvBits = Annotated[
    Optional[int],
    typer.Option(
        "--kv-bits",
        help="Quantize the KV cache to this many bits (2-8), from --quantized-kv-start tokens on.",
    ),
]
KvGroupSize = Annotated[
    int, typer.Option("--kv-group-size", help="Group size of the KV cache quantization.")
]
QuantizedKvStart = Annotated[
    int,
    typer.Option(
        "--quantized-kv-start", help="Cache length at which --kv-bits quantization starts."
    ),
]
MaxKvSize = Annotated[
    Optional[int],
    typer.Option("--max-kv-size", help="Keep at most this many tokens in the KV cache (rotating)."),
]
PrefillStepSize = Annotated[
    int, typer.Option("--prefill-step-size", help="Prompt tokens per prefill step.")
]
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help="Print statistics to stderr: prompt and generation tokens/s, image tiles, peak memory.",
    ),
]


def fail(message) -> NoReturn:
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(2)


def one_line(message) -> str:
    text = " ".join(str(message).split())
    return text or type(message).__name__


def check_options(max_tokens: int, kv_bits: Optional[int], max_kv_size: Optional[int]) -> None:
    if max_tokens == 0 or max_tokens < -1:
        fail(f"--max-tokens must be positive, or -1 for no limit; got {max_tokens}")
    if kv_bits is not None and kv_bits not in KV_BITS:
        fail(f"--kv-bits must be one of {', '.join(map(str, KV_BITS))}; got {kv_bits}")
    if kv_bits is not None and max_kv_size is not None:
        fail(
            "--kv-bits cannot be combined with --max-kv-size (a rotating KV cache cannot be quantized)"
        )
    if max_kv_size is not None and max_kv_size < 1:
        fail(f"--max-kv-size must be positive; got {max_kv_size}")


def check_images(paths) -> None:
    """Fail early, before the (slow) model load, on an image that cannot be read."""
    from ..processing import ImageError, load_image

    for path in paths or []:
        try:
            load_image(path)
        except ImageError as e:
            fail(e)


def load_model(name: str, adapter_path: Optional[str] = None):
    """``loading.load`` with every way it can fail on bad input as one line."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.utils import validate_repo_id

    from ..convert import ConvertError
    from ..loading import AdapterError, load

    path = Path(name).expanduser()
    if not path.exists():
        try:
            validate_repo_id(name)
        except HFValidationError:
            fail(f"model folder not found: {name}")
    elif not path.is_dir():
        fail(f"{name}: not a folder (give a model folder or a Hugging Face repo id)")
    try:
        return load(name, adapter_path=adapter_path)
    except AdapterError as e:
        fail(e)
    except RepositoryNotFoundError:
        fail(
            f"{name}: no such local folder, and no such model on the Hugging Face Hub "
            "(or it is private or gated: log in with `hf auth login`)"
        )
    except LocalEntryNotFoundError:
        fail(
            f"{name}: no such local folder, and the Hugging Face Hub cannot be reached to "
            "download it (no network, or HF_HUB_OFFLINE is set); give a local folder"
        )
    except HfHubHTTPError as e:
        fail(f"{name}: no such local folder, and the download failed ({_short(e)})")
    except ConvertError as e:
        fail(f"{name}: {e}")
    except (OSError, ValueError) as e:
        fail(f"{name}: cannot load the model ({_short(e)})")


def _short(e: BaseException) -> str:
    return one_line(e).split(". ")[0][:200]

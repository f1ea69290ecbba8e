"""Command line for ``mlx_llama3v.convert`` (typer); the work is done by ``convert()``.

Input problems print one ``error: ...`` line on stderr and exit with status 2.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..cli import command, new_app, run_app
from ..errors import UserError
from . import convert

app = new_app()


class DType(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


@command(
    app,
    help="Convert a Hugging Face checkpoint (MiniCPM-Llama3-V 2.5 / Llama 3-V, Bunny-Llama-3-V), "
    "or a SigLIP + Llama 3 pair (--vision, --llm), into an MLX model folder.",
)
def run(
    hf_path: Optional[str] = typer.Option(
        None, "--hf-path", help="Hugging Face repo id or local folder."
    ),
    mlx_path: Path = typer.Option(Path("mlx_model"), "--mlx-path", help="Output folder."),
    vision: Optional[str] = typer.Option(
        None, "--vision", help="SigLIP checkpoint to compose (with --llm)."
    ),
    llm: Optional[str] = typer.Option(
        None, "--llm", help="Llama 3 checkpoint to compose (with --vision)."
    ),
    dtype: DType = typer.Option(DType.float16, "--dtype", help="Type of the unquantized weights."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize the language model."),
    q_bits: Optional[int] = typer.Option(None, "--q-bits", help="Bits per weight: 4 or 8 (default 4)."),
    q_group_size: Optional[int] = typer.Option(
        None, "--q-group-size", help="Quantization group size: 32, 64 or 128 (default 64)."
    ),
    quantize_vision: bool = typer.Option(
        False, "--quantize-vision", help="Also quantize the vision tower."
    ),
    quantize_projector: bool = typer.Option(
        False, "--quantize-projector", help="Also quantize the projector."
    ),
    projector_layers: int = typer.Option(
        2, "--projector-layers", help="Blocks in a composed model's new projector."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of a composed model's new projector."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    upload_repo: Optional[str] = typer.Option(
        None, "--upload-repo", help="Hugging Face repo to upload to."
    ),
) -> None:
    given = {
        "--q-bits": q_bits is not None,
        "--q-group-size": q_group_size is not None,
        "--quantize-vision": quantize_vision,
        "--quantize-projector": quantize_projector,
    }
    for name, used in given.items():
        if used and not quantize:
            raise UserError(f"{name} needs -q/--quantize (it would be ignored without it)")
    if projector_layers < 1:
        raise UserError(f"--projector-layers must be at least 1; got {projector_layers}")
    out = convert(
        hf_path,
        mlx_path,
        vision=vision,
        llm=llm,
        dtype=dtype.value,
        quantize=quantize,
        q_bits=4 if q_bits is None else q_bits,
        q_group_size=64 if q_group_size is None else q_group_size,
        quantize_vision=quantize_vision,
        quantize_projector=quantize_projector,
        projector_layers=projector_layers,
        seed=seed,
        force=force,
        upload_repo=upload_repo,
    )
    typer.echo(f"Saved to {out}")


def main() -> None:
    run_app(app, "mlx_llama3v.convert")


if __name__ == "__main__":
    main()

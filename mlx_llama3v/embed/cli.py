"""Command line for ``mlx_llama3v.embed`` (typer); the work is done by ``runner.embed``.

Exit status: 0 done; 1 ``--verify`` found bad shards; 2 bad input (missing model or
image source, settings that do not match the cache, an unreadable image with
``--strict``), reported as one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..cli import command, fail, new_app, run_app

app = new_app()


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


@command(
    app,
    help="Encode images with a model's vision tower (features before the projector) into a "
    "resumable, sharded safetensors feature cache. Run it under mlx.launch to split the work "
    "over ranks.",
)
def run(
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Converted model folder (or repo id)."
    ),
    images: Optional[Path] = typer.Option(
        None,
        "--images",
        "-i",
        help="A folder (recursive), a text file of paths, a LLaVA / MiniCPM-V .json/.jsonl, "
        "a saved datasets folder or a .parquet file.",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Cache folder (created or resumed)."
    ),
    image_root: Optional[Path] = typer.Option(
        None,
        "--image-root",
        help="Folder relative paths in a list or dataset start from "
        "(default: the list's folder).",
    ),
    dtype: str = typer.Option(
        "float16",
        "--dtype",
        help="Stored type: float16, bfloat16, float32, or int8 (per-row absmax).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Tiles per tower forward pass."),
    workers: Optional[int] = typer.Option(
        None, "--workers", help="Image decoding threads (default: cores)."
    ),
    shard_size: float = typer.Option(512.0, "--shard-size", help="Target shard size in MB."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable image."),
    verify: bool = typer.Option(
        False, "--verify", help="Check every shard of --out against its checksum."
    ),
    progress: Optional[bool] = typer.Option(
        None, "--progress/--no-progress", help="Progress bar (default: when stderr is a terminal)."
    ),
) -> None:
    if out is None:
        fail("--out is required")
    if verify:
        return _verify(out)
    if model is None:
        fail("--model is required")
    if images is None:
        fail("--images is required")
    if batch_size < 1:
        fail(f"--batch-size must be at least 1; got {batch_size}")
    if workers is not None and workers < 1:
        fail(f"--workers must be at least 1; got {workers}")
    if not shard_size > 0 or shard_size == float("inf"):
        fail(f"--shard-size must be a positive number of MB; got {shard_size}")
    from .runner import embed

    show = sys.stderr.isatty() if progress is None else progress
    summary = embed(
        model,
        images,
        out,
        image_root=image_root,
        dtype=dtype,
        batch_size=batch_size,
        workers=workers,
        shard_size_mb=shard_size,
        strict=strict,
        progress=show,
        log=typer.echo,
    )
    if summary.report is None:  # ranks other than 0 print nothing
        return
    _print_summary(summary)


def _print_summary(s) -> None:
    typer.echo(
        f"encoded {s.encoded} images in {s.work_seconds:.1f} s ({s.images_per_second:.2f} images/s)"
        + (f" over {s.ranks} ranks" if s.ranks > 1 else "")
        + f", tower busy {100 * s.tower_busy:.0f}% of the time"
        + f"; {s.cached} already cached, {s.duplicates} duplicates, {s.failed} skipped"
    )
    if s.failed:
        typer.echo(f"skipped images are listed in {s.report}")
    err = s.error
    typer.echo(
        f"cache: {s.cache_images} images in {s.cache_shards} shards, {_size(s.cache_bytes)}, "
        f"{_size(s.bytes_per_image)} per image ({s.dtype}); stored vs float32 features: "
        f"relative RMS error {err.get('relative_rms', 0):.2e}, max {err.get('relative_max', 0):.2e} of max |x|"
    )


def _verify(out: Path) -> None:
    from .cache import verify

    checked, bad = verify(out)
    for name, problem in bad:
        typer.echo(f"BAD {name}: {problem}")
    if bad:
        typer.echo(f"{len(bad)} bad file(s) in {checked} shards of {out}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{checked} shards OK")


def main() -> None:
    # SIGTERM unwinds like Ctrl-C (run_app), so finished images are committed before exiting
    run_app(app, "mlx_llama3v.embed")


if __name__ == "__main__":
    main()

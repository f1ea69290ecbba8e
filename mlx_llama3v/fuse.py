"""Merge trained adapters into a standalone model folder: ``mlx_llama3v.fuse``.

Reads a converted model and an adapter folder written by ``mlx_llama3v.train``
(mlx-lm's format: ``adapter_config.json`` + ``adapters.safetensors`` for the
language model, and/or ``projector.safetensors``), applies them, folds each LoRA /
DoRA layer into its base linear with mlx-lm's ``fuse`` (a quantized base is
re-quantized unless ``dequantize``), and writes a folder that ``load()`` opens
like any converted model: weights, ``config.json`` (its ``quantization`` dropped
when de-quantized), tokenizer files and a model card. Like the converter, it writes
into a hidden staging folder renamed at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .cli import command, new_app, run_app
from .errors import UserError, one_line

ADAPTER_FILES = ("adapter_config.json", "projector.safetensors")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class FuseError(UserError, ValueError):
    """The model or adapters cannot be fused; the message is one line."""


def fuse(
    model: str,
    adapter_path: str,
    save_path: str,
    *,
    dequantize: bool = False,
    force: bool = False,
) -> Path:
    """Fuse ``adapter_path`` into ``model`` and save the result at ``save_path``."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, save_model

    from .convert import ConvertError
    from .convert.common import check_target, copy_if_present, record_checksums, staging, write_config
    from .loading import AdapterError, converted_folder, load

    adapters = Path(adapter_path).expanduser()
    if not any((adapters / f).is_file() for f in ADAPTER_FILES):
        raise FuseError(
            f"{adapter_path}: no adapter_config.json or projector.safetensors (not an "
            "adapter folder from mlx_llama3v.train)"
        )
    target = Path(save_path).expanduser()
    try:
        check_target(target, force)
    except Exception as e:
        raise FuseError(str(e)) from None
    try:
        # the converted folder (a checkpoint or hub id is converted into the cache): its
        # tokenizer and config are the ones to copy, not the raw download's
        source = converted_folder(model)
        net, processor = load(source, adapter_path=str(adapters))
    except (AdapterError, ConvertError, ValueError, FileNotFoundError) as e:
        raise FuseError(one_line(e)) from None
    fused = [(n, m.fuse(dequantize=dequantize)) for n, m in net.named_modules() if hasattr(m, "fuse")]
    if fused:
        net.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(net)
        net.config.quantization = None
    mx.eval(net.parameters())
    extra = _extra_config(source)
    with staging(target, force) as tmp:
        save_model(tmp, net, donate_model=True)
        record_checksums(tmp)
        write_config(net.config, extra, tmp)
        copy_if_present(source, tmp, TOKENIZER_FILES)
        _write_card(tmp, model, adapters, dequantize)
    return target


def _extra_config(source: Path) -> dict:
    """config.json keys the model config does not hold (the source's eos ids)."""
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    return {k: config[k] for k in ("eos_token_id",) if k in config}


CARD = """# {name}

{model} with the adapters of `{adapters}` fused in{dequantized}, by `mlx_llama3v.fuse`.

```python
from mlx_llama3v import load

model, processor = load("{name}")
```
"""


def _write_card(folder: Path, model: str, adapters: Path, dequantize: bool) -> None:
    text = CARD.format(
        name=folder.name.split(".partial")[0].lstrip("."),
        model=f"`{Path(model).name}`",
        adapters=adapters.name,
        dequantized=" (de-quantized)" if dequantize else "",
    )
    (folder / "README.md").write_text(text, encoding="utf-8")


# ------------------------------------------------------------------ command line
app = new_app()


@command(
    app,
    help="Fuse adapters from mlx_llama3v.train (LoRA/DoRA/full adapters and a retrained "
    "projector) into a standalone model folder that load() opens.",
)
def run(
    model: str = typer.Option(..., "--model", "-m", help="The converted base model folder."),
    adapter_path: Path = typer.Option(Path("adapters"), "--adapter-path", help="Adapter folder from training."),
    save_path: Path = typer.Option(Path("fused_model"), "--save-path", help="Output folder."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Write float weights (de-quantize a QLoRA base)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    out = fuse(model, str(adapter_path), str(save_path), dequantize=dequantize, force=force)
    typer.echo(f"Saved to {out}")


def main() -> None:
    run_app(app, "mlx_llama3v.fuse")


if __name__ == "__main__":
    main()

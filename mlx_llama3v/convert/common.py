"""Pieces every source family shares: reading checkpoints, checking them against the
config, tokenizer fixes, dtype and quantization, and writing the output folder.

A family module (``minicpm``, ``bunny``, ``compose``) turns its source into a
``Source``: the project's ``ModelConfig`` plus the weights renamed onto the model's
parts (``vision_tower.``, ``projector.``, ``language_model.``). Everything after that
is common. Problems with the input raise ``ConvertError`` with a one-line message.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.utils import quantize_model
from transformers import PreTrainedTokenizerFast

from ..config import ModelConfig, normalize_text_config
from ..models.llama3v import Model
from ..processing import PromptError, special_token_id
from .._mlx_lm import download, save_config
from ..errors import UserError, one_line
from .. import files
from ..files import check_safetensors, write_checksums, writing

DTYPES = ("float16", "bfloat16", "float32")
Q_BITS = (4, 8)
Q_GROUP_SIZES = (32, 64, 128)
INDEX_FILE = "model.safetensors.index.json"
# copied as they are; transformers >= 5 keeps the chat template in its own file
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
RESERVED = re.compile(r"<\|reserved_special_token_\d+\|>")
class ConvertError(UserError):
    """The input cannot be converted; the message is one line for the user."""


@dataclass
class Source:
    """A checkpoint read and renamed onto the model's parts, ready to be built.

    ``renames`` lists (source prefix, model prefix) pairs, used to name tensors in
    error messages as the checkpoint names them. ``rename_reserved`` allows Llama 3
    reserved special tokens to be renamed for missing image/text tokens; it is False
    where the model was trained with its own tokens (MiniCPM).
    """

    config: ModelConfig
    weights: Dict[str, mx.array]
    tokenizer_dir: Path
    rename_reserved: bool
    origin: List[str]
    renames: List[Tuple[str, str]] = field(default_factory=list)
    extra_config: Dict = field(default_factory=dict)

    def source_name(self, key: str) -> str:
        for src, dst in self.renames:
            if key.startswith(dst):
                return src + key[len(dst) :]
        return key


# ------------------------------------------------------------------ reading
@dataclass
class Checkpoint:
    """A Hugging Face checkpoint folder: its config, weight files and tensor names."""

    origin: str
    folder: Path
    config: dict
    files: List[Path]
    keys: List[str]
    _weights: Optional[Dict[str, mx.array]] = None

    def weights(self) -> Dict[str, mx.array]:
        if self._weights is None:
            self._weights = load_weights(self.files)
        return self._weights


def read_checkpoint(path_or_repo: str) -> Checkpoint:
    """Resolve, read config.json and check every weight file (not yet loaded)."""
    folder = resolve(path_or_repo)
    config = read_json(folder / "config.json", "the checkpoint's config")
    files, keys = checkpoint_keys(folder)
    return Checkpoint(str(path_or_repo), folder, config, files, keys)


def resolve(path_or_repo: str) -> Path:
    """A local folder, or a Hugging Face repo id downloaded with mlx-lm's helper."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConvertError(f"{path_or_repo}: not a folder")
        return path
    if path_or_repo.startswith((".", "/", "~")) or path_or_repo.count("/") != 1:
        raise ConvertError(f"{path_or_repo}: no such folder (and not a Hugging Face repo id)")
    try:
        return download(path_or_repo)
    except Exception as e:  # hub errors come in many types
        raise ConvertError(f"{path_or_repo}: cannot download ({one_line(e)})") from None


def read_json(path: Path, what: str = "") -> dict:
    try:
        data = files.read_json(path, ConvertError)
    except ConvertError as e:
        if what and not Path(path).exists():
            raise ConvertError(f"{path}: missing ({what})") from None
        raise e from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


def read_optional_json(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def weight_files(folder: Path) -> List[Path]:
    """The checkpoint's safetensors files: those its index names, else all of them."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                raise ConvertError(f"{folder}: missing shard {name} (listed in {INDEX_FILE})")
        return [folder / name for name in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = list(folder.glob("*.bin"))
        hint = (
            "; PyTorch .bin checkpoints are not supported, save it as safetensors" if bins else ""
        )
        raise ConvertError(f"{folder}: no .safetensors weights{hint}")
    return files


def safetensors_keys(path: Path) -> List[str]:
    """Tensor names in a safetensors file, after checking the file is complete."""
    return [k for k in check_safetensors(path) if k != "__metadata__"]


def checkpoint_keys(folder: Path) -> Tuple[List[Path], List[str]]:
    """The weight files and all tensor names, every file checked and indexed names found."""
    files = weight_files(folder)
    keys = {}
    for path in files:
        for k in safetensors_keys(path):
            keys[k] = path.name
    index = folder / INDEX_FILE
    if index.exists():
        for k, name in read_json(index)["weight_map"].items():
            if keys.get(k) != name:
                raise ConvertError(f"{folder / name}: lacks tensor {k} that {INDEX_FILE} lists")
    return files, list(keys)


def load_weights(files: Sequence[Path]) -> Dict[str, mx.array]:
    weights = {}
    for path in files:
        try:
            weights.update(mx.load(str(path)))
        except Exception as e:
            raise ConvertError(f"{path}: cannot read ({one_line(e)})") from None
    return weights


def rename(weights: Dict[str, mx.array], renames: Sequence[Tuple[str, str]]) -> Dict[str, mx.array]:
    """Keys moved from source prefixes to model prefixes; others dropped."""
    out = {}
    for k, v in weights.items():
        for src, dst in renames:
            if k.startswith(src):
                out[dst + k[len(src) :]] = v
                break
    return out


def layer_count(weights: Dict[str, mx.array], prefix: str) -> int:
    """How many ``{prefix}N.`` blocks the weights hold."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in weights if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def vision_shapes(weights: Dict[str, mx.array], prefix: str) -> Dict:
    """What a SigLIP tower's tensors say about its config (all but the head count)."""
    try:
        conv = weights[prefix + "embeddings.patch_embedding.weight"]
        pos = weights[prefix + "embeddings.position_embedding.weight"]
        fc1 = weights[prefix + "encoder.layers.0.mlp.fc1.weight"]
    except KeyError as e:
        raise ConvertError(f"the checkpoint has no vision tensor {e.args[0]}") from None
    patch = conv.shape[-1]
    side = int(round(pos.shape[0] ** 0.5))
    if side * side != pos.shape[0]:
        raise ConvertError(
            f"{prefix}embeddings.position_embedding.weight has {pos.shape[0]} rows, "
            "not a square grid"
        )
    return dict(
        hidden_size=conv.shape[0],
        num_channels=conv.shape[1],
        patch_size=patch,
        image_size=side * patch,
        intermediate_size=fc1.shape[0],
        num_hidden_layers=layer_count(weights, prefix + "encoder.layers."),
    )


def text_config(
    config: dict, weights: Dict[str, mx.array], prefix: str = "", published: Optional[dict] = None
) -> dict:
    """The language model's config, normalised first (``normalize_text_config``).

    ``config`` is the source's config.json (MiniCPM and Bunny keep the Llama fields
    at its top level, beside their own); ``prefix`` is where the Llama's tensors sit
    (``llm.`` or none). Fields config.json leaves out are read off the tensors where
    they say it (vocabulary, tied embeddings, key/value heads), then taken from
    ``published`` (the family's published values); anything else missing is an error.
    """
    fields = {k: v for k, v in config.items() if not isinstance(v, dict)}
    fields["model_type"] = "llama"
    for k in ("rope_scaling", "rope_parameters"):
        if k in config:
            fields[k] = config[k]
    try:
        return normalize_text_config(fields, derived=_text_shapes(fields, weights, prefix), published=published)
    except ValueError as e:
        raise ConvertError(f"language model config: {one_line(e)}") from None


def _text_shapes(config: dict, weights: Dict[str, mx.array], prefix: str) -> dict:
    out = {"tie_word_embeddings": prefix + "lm_head.weight" not in weights}
    embed = weights.get(prefix + "model.embed_tokens.weight")
    if embed is not None:
        out["vocab_size"] = embed.shape[0]
    k_proj = weights.get(prefix + "model.layers.0.self_attn.k_proj.weight")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if k_proj is not None and heads and hidden:
        head_dim = config.get("head_dim") or hidden // heads
        if k_proj.shape[0] % head_dim == 0:
            out["num_key_value_heads"] = k_proj.shape[0] // head_dim
    return out


def eos_config(config: dict) -> dict:
    """The source's end-of-sequence ids, kept in config.json for generation."""
    return {"eos_token_id": config["eos_token_id"]} if "eos_token_id" in config else {}


# Llama-3-8B(-Instruct)'s published values, for MiniCPM-Llama3-V 2.5 / Llama 3-V and
# Bunny-Llama-3-8B-V configs that leave them out (model cards and the released
# config.json files; shared/reference/checkpoints.md). Only values the tensors cannot
# show; head counts and sizes must come from the source.
LLAMA3_8B = dict(rope_theta=500000.0, rms_norm_eps=1e-5)


# ------------------------------------------------------------------ checking
def make_config(**kwargs) -> ModelConfig:
    try:
        return ModelConfig.from_dict(kwargs)
    except (ValueError, TypeError) as e:
        raise ConvertError(f"inconsistent config: {one_line(e)}") from None


def checkpoint_source(
    ckpt: "Checkpoint",
    family: str,
    renames: List[Tuple[str, str]],
    parts: Dict[str, dict],
    rename_reserved: bool,
) -> Source:
    """A one-checkpoint source: the model config from ``parts`` (vision, projector, text,
    processor configs) and the checkpoint's weights renamed onto the model's parts."""
    processor = parts["processor"]
    config = make_config(
        family=family,
        vision_config=parts["vision"],
        projector_config=parts["projector"],
        text_config=parts["text"],
        image_token=processor["image_token"],
        processor_config=processor,
    )
    return Source(
        config=config,
        weights=rename(ckpt.weights(), renames),
        tokenizer_dir=ckpt.folder,
        rename_reserved=rename_reserved,
        origin=[ckpt.origin],
        renames=renames,
        extra_config=eos_config(ckpt.config),
    )


def build_model(source: Source) -> Model:
    """The model with the source's weights, each tensor checked against the config."""
    try:
        model = Model(source.config)
        weights = model.sanitize(source.weights)
    except ValueError as e:
        raise ConvertError(one_line(e)) from None
    expected = dict(tree_flatten(model.parameters()))
    missing = [k for k in expected if k not in weights]
    if missing:
        raise ConvertError(
            f"the checkpoint lacks tensor {source.source_name(missing[0])}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            + " that the config implies"
        )
    extra = [k for k in weights if k not in expected]
    if extra:
        raise ConvertError(
            f"the checkpoint has tensor {source.source_name(extra[0])} that the config does not use"
        )
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise ConvertError(
                f"tensor {source.source_name(k)} has shape {tuple(v.shape)} but the config "
                f"implies {tuple(expected[k].shape)}"
            )
    model.load_weights(list(weights.items()), strict=True)
    return model


# ------------------------------------------------------------------ tokenizer
def needed_tokens(processor_config: dict) -> List[str]:
    """The special tokens the processor config names, image placeholder first."""
    keys = (
        "image_token",
        "image_start",
        "image_end",
        "slice_start",
        "slice_end",
        "text_start",
        "text_end",
    )
    out = []
    for k in keys:
        t = processor_config.get(k)
        if t is not None and t not in out:
            out.append(t)
    return out


def write_tokenizer(source: Source, dst: Path):
    """Copy the tokenizer into ``dst``, fixed to load as a plain fast tokenizer.

    Missing special tokens are made by renaming Llama 3 reserved ones (the vocabulary
    does not grow) when the source allows it. Returns the loaded tokenizer.
    """
    src = source.tokenizer_dir
    if not (src / "tokenizer.json").exists():
        raise ConvertError(f"{src}: no tokenizer.json (a fast tokenizer is required)")
    tok = read_json(src / "tokenizer.json")
    tok_config = read_optional_json(src / "tokenizer_config.json")
    special_map = read_optional_json(src / "special_tokens_map.json")
    needed = needed_tokens(source.config.processor_config)
    renames = _reserved_renames(tok, needed, source.rename_reserved)
    tok, tok_config, special_map = (
        _rename_strings(d, renames) for d in (tok, tok_config, special_map)
    )
    if isinstance(tok.get("model", {}).get("vocab"), dict):
        tok["model"]["vocab"] = {renames.get(k, k): v for k, v in tok["model"]["vocab"].items()}
    # MiniCPM names a remote-code tokenizer class; the tokenizer itself is plain BPE
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.pop("auto_map", None)
    files.write_json(dst / "tokenizer.json", tok)
    files.write_json(dst / "tokenizer_config.json", tok_config)
    if special_map:
        files.write_json(dst / "special_tokens_map.json", special_map)
    copy_if_present(src, dst, CHAT_TEMPLATE_FILES)
    return _check_tokenizer(dst, needed, source.config.text_config.vocab_size)


def _reserved_renames(tok: dict, needed: List[str], allowed: bool) -> Dict[str, str]:
    added = sorted(tok.get("added_tokens", []), key=lambda t: t["id"])
    have = {t["content"] for t in added}
    missing = [t for t in needed if t not in have]
    if not missing:
        return {}
    names = ", ".join(repr(t) for t in missing)
    if not allowed:
        raise ConvertError(
            f"the tokenizer lacks the special tokens {names} that this model was trained with"
        )
    free = [
        t["content"]
        for t in added
        if RESERVED.fullmatch(t["content"]) and t["content"] not in needed
    ]
    if len(free) < len(missing):
        raise ConvertError(
            f"the tokenizer lacks the special tokens {names} and has only {len(free)} "
            "Llama 3 reserved special tokens to rename for them"
        )
    return dict(zip(free, missing))


def _rename_strings(obj, renames: Dict[str, str]):
    if not renames:
        return obj
    if isinstance(obj, str):
        return renames.get(obj, obj)
    if isinstance(obj, list):
        return [_rename_strings(v, renames) for v in obj]
    if isinstance(obj, dict):
        return {k: _rename_strings(v, renames) for k, v in obj.items()}
    return obj


def _check_tokenizer(folder: Path, needed: List[str], vocab_size: int):
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as e:
        raise ConvertError(f"the tokenizer does not load ({one_line(e)})") from None
    for token in needed:
        try:
            tid = special_token_id(tokenizer, token)
        except PromptError as e:
            raise ConvertError(f"tokenizer: {one_line(e)}") from None
        if tid >= vocab_size:
            raise ConvertError(
                f"tokenizer: {token!r} has id {tid}, beyond the model's {vocab_size} embeddings"
            )
    return tokenizer


# ------------------------------------------------------------------ dtype, quantization
def cast(model: nn.Module, dtype: str) -> None:
    """Floating-point parameters to ``dtype`` (mlx-lm's convert does the same)."""
    target = getattr(mx, dtype)
    model.update(
        tree_map_with_path(
            lambda _, v: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters(),
        )
    )


def quantize_parts(model: nn.Module, bits: int, group_size: int, parts: Sequence[str]) -> dict:
    """Quantize the layers of ``parts`` with mlx-lm; returns the config's quantization.

    Layers whose input width is not a multiple of ``group_size`` stay as they are.
    """
    prefixes = tuple(p + "." for p in parts)
    _, config = quantize_model(
        model, {}, group_size, bits, quant_predicate=lambda path, _: path.startswith(prefixes)
    )
    return config["quantization"]


# ------------------------------------------------------------------ output
def check_target(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise ConvertError(f"{target}: already exists (pass --force to replace it)")


@contextmanager
def staging(target: Path, force: bool) -> Iterator[Path]:
    """A temporary folder next to ``target``, renamed onto it when the block succeeds.

    An error or interruption removes the temporary folder; a killed process leaves it
    behind under a hidden name, removed by the next conversion to the same target.
    """
    target = target.absolute()
    check_target(target, force)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(target)
        tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        with writing(target):
            yield tmp
        check_target(target, force)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(target: Path) -> None:
    for path in target.parent.glob(f".{target.name}.partial-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_config(config: ModelConfig, extra: dict, folder: Path) -> None:
    out = {**extra, **config.to_dict()}
    if out.get("quantization") is None:
        out.pop("quantization", None)
    save_config(out, folder / "config.json")


def record_checksums(folder: Path) -> None:
    """``checksums.json`` for the weight files, so ``load(verify=True)`` can check them."""
    write_checksums(folder, [f.name for f in folder.glob("model*.safetensors")])


def copy_if_present(src: Path, dst: Path, names: Sequence[str]) -> None:
    for name in names:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)

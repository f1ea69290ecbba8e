"""Conversion of every source family, checked end to end against PyTorch.

Each family's tiny Hugging Face checkpoint (``hf_checkpoints``, real on-disk layout)
is converted, loaded with ``loading.load`` and run on an image + question prepared by
the processing module; the logits must match the published pipeline computed in
PyTorch from the same weights (transformers' towers and Llama, the reference
resampler/projectors). Also: the output format, quantization, interruption, and
the one-line errors of the command line.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from hf_checkpoints import (
    ROPE_31,
    SCHEMAS,
    VOCAB,
    attention_projector_from,
    make_bunny,
    make_composed,
    make_llama,
    make_minicpm,
    make_siglip,
    write_json,
)
from mlx_llama3v.convert import convert
from mlx_llama3v.convert.cli import app
from mlx_llama3v.convert.compose import init_projector
from mlx_llama3v.config import ProjectorConfig
from mlx_llama3v.loading import load
from references import assert_close
from tiny_tokenizer import make_llama3_tokenizer, special_id

QUESTION = [{"role": "user", "content": "What is in this image?"}]
# 40 x 28 px: larger than MiniCPM's tiny 16 px scale resolution, so it is sliced
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 40, 3), dtype=np.uint8))
FAMILIES = ["minicpm", "llama3v", "bunny", "compose"]


class Tiny:
    """Tiny checkpoints, built once per module; conversions cached by their options."""

    def __init__(self, root: Path):
        self.root = root
        self.checkpoints = {}
        self.outputs = {}

    def checkpoint(self, name, schema="4", rope=None):
        """``name``'s checkpoint with its Llama fields in ``schema`` ("4" or "5"); ``rope``
        "plain" or "llama3" (None: the family's usual, llama3 for the composed Llama 3.1)."""
        usual = "llama3" if name == "compose" else "plain"
        key = (name, schema, rope or usual)
        if key not in self.checkpoints:
            path = self.root / (name if key == (name, "4", usual) else "-".join(key))
            kw = dict(schema=schema, rope_scaling=ROPE_31 if key[2] == "llama3" else None)
            if name == "compose":
                self.checkpoints[key] = make_composed(path, **kw)
            elif name == "bunny":
                self.checkpoints[key] = make_bunny(path, **kw)
            else:
                self.checkpoints[key] = make_minicpm(path, variant=name, **kw)
        return self.checkpoints[key]

    def source(self, name, schema="4", rope=None) -> dict:
        ckpt = self.checkpoint(name, schema, rope)
        if name == "compose":
            return dict(vision=str(ckpt.extra["vision"]), llm=str(ckpt.extra["llm"]))
        return dict(hf_path=str(ckpt.path))

    def cli_source(self, name) -> list:
        return [a for k, v in self.source(name).items() for a in ("--" + k.replace("_", "-"), v)]

    def converted(self, name, schema="4", rope=None, **options) -> Path:
        options.setdefault("dtype", "float32")
        key = (self.checkpoint(name, schema, rope).path, tuple(sorted(options.items())))
        if key not in self.outputs:
            out = self.root / "out" / f"{name}-{len(self.outputs)}"
            self.outputs[key] = convert(mlx_path=out, **self.source(name, schema, rope), **options)
        return self.outputs[key]

    def reference(self, name, schema="4", rope=None):
        """The checkpoint's PyTorch pipeline; a composed model's projector is the converted one."""
        ckpt = self.checkpoint(name, schema, rope)
        if name == "compose" and ckpt.projector is None:
            ckpt.projector = attention_projector_from(
                mx.load(str(self.converted(name, schema, rope) / "model.safetensors"))
            )
        return ckpt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("tiny"))


def run_model(path, image=IMAGE):
    model, processor = load(path)
    inputs = processor(QUESTION, images=[image])
    return model(inputs.input_ids[None], tiles=inputs.tiles), inputs


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", FAMILIES)
def test_converted_model_matches_the_published_pipeline(tiny, name):
    logits, inputs = run_model(tiny.converted(name))
    if name in ("minicpm", "llama3v"):
        assert len(inputs.tiles) > 2, "the image should be sliced"
    ref = tiny.reference(name).logits(inputs.input_ids, inputs.tiles, inputs.image_token_id)
    assert_close(logits, ref)


@pytest.mark.parametrize("rope", ["plain", "llama3"])
@pytest.mark.parametrize("name", FAMILIES)
def test_both_config_schemas_give_the_same_model(tiny, name, rope):
    """transformers 4.x (top-level rope_theta / rope_scaling) and 5.x (rope_parameters)
    configs of one checkpoint: the same MLX config, logits equal to its PyTorch model."""
    configs = {}
    for schema in SCHEMAS:
        out = tiny.converted(name, schema, rope)
        configs[schema] = json.loads((out / "config.json").read_text())
        logits, inputs = run_model(out)
        ref = tiny.reference(name, schema, rope)
        assert_close(logits, ref.logits(inputs.input_ids, inputs.tiles, inputs.image_token_id))
    assert configs["4"]["text_config"] == configs["5"]["text_config"]
    assert configs["4"] == configs["5"]
    text = configs["4"]["text_config"]
    assert text["rope_theta"] == 500000.0 and text["rms_norm_eps"] == 1e-5
    assert text.get("rope_scaling") == (ROPE_31 if rope == "llama3" else None)


@pytest.mark.parametrize("name", FAMILIES)
def test_rope_scaling_reaches_the_logits(tiny, name):
    # guards the test above: the prompt runs past original_max_position_embeddings (16)
    a, _ = run_model(tiny.converted(name, "5", "plain"))
    b, _ = run_model(tiny.converted(name, "5", "llama3"))
    assert np.abs(np.array(a) - np.array(b)).max() > 1e-3 * np.abs(np.array(a)).max()


def test_images_reach_the_logits(tiny):
    # guards the parity test: a different image must change the logits
    a, _ = run_model(tiny.converted("minicpm"))
    b, _ = run_model(tiny.converted("minicpm"), IMAGE.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert np.abs(np.array(a) - np.array(b)).max() > 1e-3 * np.abs(np.array(a)).max()


# ------------------------------------------------------------------ output format
def test_output_folder_layout(tiny):
    out = tiny.converted("minicpm")
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    } <= names
    assert not any(n.endswith(".py") for n in names), "remote code must not be copied"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    on_disk = {}
    for shard in set(index["weight_map"].values()):
        on_disk.update({k: shard for k in mx.load(str(out / shard))})
    assert on_disk == index["weight_map"]
    assert {k.split(".")[0] for k in on_disk} == {"vision_tower", "projector", "language_model"}
    assert not list(out.parent.glob(".*partial*")), "no temporary folder is left"


def test_config_holds_everything_loading_needs(tiny):
    config = json.loads((tiny.converted("minicpm") / "config.json").read_text())
    assert config["family"] == "minicpm_v2_5"
    assert config["image_token"] == "<unk>" and config["image_token_id"] == special_id("<unk>")
    assert config["vision_config"]["num_attention_heads"] == 4  # declared in vision_config
    assert config["projector_config"]["num_queries"] == 8
    proc = config["processor_config"]
    assert (
        proc["image_size"],
        proc["patch_size"],
        proc["tokens_per_tile"],
        proc["max_slices"],
    ) == (16, 4, 8, 9)
    assert "quantization" not in config


def test_minicpm_tokenizer_loads_without_remote_code(tiny):
    tok_config = json.loads((tiny.converted("minicpm") / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "auto_map" not in tok_config
    source = json.loads((tiny.checkpoint("minicpm").path / "tokenizer_config.json").read_text())
    assert source["tokenizer_class"] == "MiniCPMVTokenizerFast"


def test_llama3v_config_is_filled_from_shapes_and_minicpm_defaults(tiny):
    config = json.loads((tiny.converted("llama3v") / "config.json").read_text())
    vision = config["vision_config"]
    assert (vision["variant"], vision["strip_positions"], vision["feature_layer"]) == (
        "navit",
        True,
        None,
    )
    assert (vision["image_size"], vision["patch_size"], vision["num_hidden_layers"]) == (40, 4, 3)
    assert vision["num_attention_heads"] == 16
    assert config["projector_config"]["num_queries"] == 8
    assert (
        config["processor_config"]["max_slices"] == 9
        and config["processor_config"]["image_size"] == 16
    )


def test_bunny_reads_vocab_and_layers_off_the_tensors(tiny):
    config = json.loads((tiny.converted("bunny") / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == VOCAB + 1  # config.json says VOCAB
    assert config["vision_config"]["num_hidden_layers"] == 3  # 2 stored + the removed one
    assert config["vision_config"]["feature_layer"] == -2
    assert config["processor_config"]["pad_color"] == [127, 127, 127]


def test_compose_renames_reserved_tokens_without_growing_the_vocabulary(tiny):
    out = tiny.converted("compose")
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    assert len(tok) == VOCAB
    new = [
        tok.convert_tokens_to_ids(t) for t in ("<unk>", "<image>", "</image>", "<text>", "</text>")
    ]
    assert len(set(new)) == 5 and all(special_id("<|begin_of_text|>") < i < VOCAB for i in new)
    assert tok.convert_tokens_to_ids("<|eot_id|>") == special_id("<|eot_id|>")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["rope_scaling"]["rope_type"] == "llama3"
    assert config["eos_token_id"] == [special_id("<|end_of_text|>"), special_id("<|eot_id|>")]
    assert "siglip" not in " ".join(mx.load(str(out / "model.safetensors")))  # no text tower


def test_chat_template_kept_in_its_own_file_is_copied(tiny, tmp_path):
    llm = Path(shutil.copytree(tiny.checkpoint("compose").extra["llm"], tmp_path / "llm"))
    tok_config = json.loads((llm / "tokenizer_config.json").read_text())
    (llm / "chat_template.jinja").write_text(tok_config.pop("chat_template"))  # transformers >= 5
    write_json(llm / "tokenizer_config.json", tok_config)
    out = convert(
        vision=str(tiny.checkpoint("compose").extra["vision"]),
        llm=str(llm),
        mlx_path=tmp_path / "out",
    )
    _, processor = load(out)
    assert "<|start_header_id|>user" in processor(QUESTION, images=[IMAGE]).prompt


def test_new_projector_init_is_seeded_and_documented():
    cfg = ProjectorConfig(
        kind="attention",
        vision_hidden_size=64,
        text_hidden_size=128,
        num_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    a, b, c = init_projector(cfg, 0, 0.5), init_projector(cfg, 0, 0.5), init_projector(cfg, 1, 0.5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["proj.weight"], c["proj.weight"])
    assert np.all(np.array(a["layers.0.layer_norm1.weight"]) == 1) and np.all(
        np.array(a["norm.bias"]) == 0
    )
    assert np.all(np.array(a["layers.1.self_attn.q_proj.bias"]) == 0)
    std = lambda k: float(np.array(a[k]).std())
    assert std("layers.0.self_attn.q_proj.weight") == pytest.approx(
        0.02 * 0.88, rel=0.1
    )  # cut at 2 sigma
    assert std("layers.0.mlp.fc2.weight") == pytest.approx(0.02 * 0.88 / 2, rel=0.1)
    assert std("proj.weight") == pytest.approx(0.5 / 8 * 0.88, rel=0.1)
    assert all(np.abs(np.array(v)).max() <= 2 * 0.5 / 8 + 1e-6 for v in a.values() if v.ndim == 2)


def test_dtype_sets_the_stored_type(tiny):
    out = tiny.converted("bunny", dtype="bfloat16")
    dtypes = {v.dtype for v in mx.load(str(out / "model.safetensors")).values()}
    assert dtypes == {mx.bfloat16}


# ------------------------------------------------------------------ quantization
# max |logits - float logits| / max |float logits| seen on this tiny random model:
# 8 bits about 0.015-0.02, 4 bits about 0.26-0.32 (group size 64)
@pytest.mark.parametrize("bits,bound", [(8, 0.05), (4, 0.5)])
def test_quantized_logits_stay_close_to_float(tiny, bits, bound):
    ref, _ = run_model(tiny.converted("minicpm"))
    out = tiny.converted("minicpm", quantize=True, q_bits=bits, q_group_size=64)
    logits, _ = run_model(out)
    err = float(np.abs(np.array(logits) - np.array(ref)).max() / np.abs(np.array(ref)).max())
    print(f"{bits}-bit max error / max |float logits|: {err:.4f}")
    assert 0 < err <= bound
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}


def test_quantization_touches_only_the_chosen_parts(tiny):
    model, _ = load(tiny.converted("minicpm", quantize=True, q_bits=8))
    assert isinstance(model.language_model.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert isinstance(model.language_model.lm_head, nn.QuantizedLinear)
    assert type(model.vision_tower.encoder.layers[0].mlp.fc2) is nn.Linear
    assert type(model.projector.kv_proj) is nn.Linear


def test_vision_quantization_skips_widths_the_group_does_not_divide(tiny):
    out = tiny.converted(
        "minicpm", quantize=True, q_bits=8, quantize_vision=True, quantize_projector=True
    )
    model, _ = load(out)
    mlp = model.vision_tower.encoder.layers[0].mlp
    assert type(mlp.fc1) is nn.Linear  # input width 32, group size 64
    assert isinstance(mlp.fc2, nn.QuantizedLinear)  # input width 64
    assert isinstance(model.projector.attn.out_proj, nn.QuantizedLinear)  # 256 wide


# ------------------------------------------------------------------ interruption
def start_cli(args, pause: float):
    hook = str(Path(__file__).with_name("run_with_hook.py"))
    cmd = [sys.executable, hook, "convert-pause", str(pause), "mlx_llama3v.convert", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_weights(parent: Path, name: str, proc, timeout: float = 60.0) -> Path:
    """The temporary folder, once the weights are in it (the converter then pauses)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in parent.glob(f".{name}.partial-*"):
            if (tmp / "model.safetensors.index.json").exists():
                return tmp
        if proc.poll() is not None:
            raise AssertionError(f"converter exited early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the converter never wrote its weights")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_conversion_leaves_no_output_folder(tiny, tmp_path, sig):
    target = tmp_path / "out"
    proc = start_cli([*tiny.cli_source("bunny"), "--mlx-path", str(target)], pause=60)
    tmp = wait_for_weights(tmp_path, "out", proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=30) != 0
    assert not target.exists()
    if sig == signal.SIGTERM:
        assert not tmp.exists(), "a terminated conversion removes its temporary folder"
    else:
        assert tmp.exists()  # killed mid-write: nothing could clean up
        convert(mlx_path=target, **tiny.source("bunny"))
        assert not tmp.exists(), "the next conversion removes the stale temporary folder"
        assert (target / "config.json").exists()


# ------------------------------------------------------------------ bad input
def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr.strip()


def assert_error(args, *fragments):
    code, err = cli(*args)
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def copy_checkpoint(tiny, name, tmp_path) -> Path:
    return Path(shutil.copytree(tiny.checkpoint(name).path, tmp_path / "src"))


def test_unknown_architecture(tmp_path):
    src = tmp_path / "gpt2"
    src.mkdir()
    write_json(src / "config.json", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    mx.save_safetensors(
        str(src / "model.safetensors"), {"transformer.wte.weight": mx.zeros((4, 4))}
    )
    assert_error(["--hf-path", src, "--mlx-path", tmp_path / "out"], "unknown architecture", "gpt2")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_from_the_real_command_line(tmp_path):
    src = tmp_path / "gpt2"
    src.mkdir()
    write_json(src / "config.json", {"model_type": "gpt2"})
    mx.save_safetensors(str(src / "model.safetensors"), {"w": mx.zeros((2,))})
    cmd = [
        sys.executable,
        "-m",
        "mlx_llama3v.convert",
        "--hf-path",
        str(src),
        "--mlx-path",
        str(tmp_path / "o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().startswith("error: unknown architecture")
        and "Traceback" not in proc.stderr
    )


def test_other_minicpm_versions_are_refused(tiny, tmp_path):
    src = copy_checkpoint(tiny, "minicpm", tmp_path)
    config = json.loads((src / "config.json").read_text())
    write_json(src / "config.json", dict(config, version=2.6))
    assert_error(
        ["--hf-path", src, "--mlx-path", tmp_path / "out"], "unknown architecture", "version 2.6"
    )


def test_bunny_input_size_comes_from_the_tower_name():
    from mlx_llama3v.convert.bunny import _tower_image_size

    assert _tower_image_size("google/siglip-so400m-patch14-384", 14, 27) == 384
    assert _tower_image_size("google/siglip-so400m-patch14-384", 4, 6) is None  # disagrees: unused
    assert _tower_image_size(None, 14, 27) is None


def test_missing_shard(tiny, tmp_path):
    src = copy_checkpoint(tiny, "minicpm", tmp_path)
    (src / "model-00002-of-00003.safetensors").unlink()
    assert_error(
        ["--hf-path", src, "--mlx-path", tmp_path / "out"],
        "missing shard model-00002-of-00003.safetensors",
    )


@pytest.mark.parametrize("keep", [0.5, 0.0001], ids=["data-cut", "header-cut"])
def test_truncated_safetensors(tiny, tmp_path, keep):
    src = copy_checkpoint(tiny, "minicpm", tmp_path)
    shard = src / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    assert_error(
        ["--hf-path", src, "--mlx-path", tmp_path / "out"],
        "model-00003-of-00003.safetensors",
        "truncated",
    )


def test_tensor_shape_not_matching_the_config(tiny, tmp_path):
    src = copy_checkpoint(tiny, "minicpm", tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 320
    write_json(src / "config.json", config)
    assert_error(
        ["--hf-path", src, "--mlx-path", tmp_path / "out"],
        "tensor llm.model.layers.",
        "has shape",
        "(256, 384)",
        "the config implies",
        "(256, 320)",
    )


def test_tokenizer_without_the_trained_special_tokens(tiny, tmp_path):
    src = copy_checkpoint(tiny, "minicpm", tmp_path)
    make_llama3_tokenizer(src, extra=())  # a plain Llama 3 tokenizer: no <image>, <slice>...
    assert_error(["--hf-path", src, "--mlx-path", tmp_path / "out"], "tokenizer lacks", "'<image>'")


def test_tokenizer_without_reserved_tokens_to_rename(tiny, tmp_path):
    llm = Path(shutil.copytree(tiny.checkpoint("compose").extra["llm"], tmp_path / "llm"))
    text = (llm / "tokenizer.json").read_text().replace("reserved_special_token", "custom_token")
    (llm / "tokenizer.json").write_text(text)
    args = [
        "--vision",
        tiny.checkpoint("compose").extra["vision"],
        "--llm",
        llm,
        "--mlx-path",
        tmp_path / "out",
    ]
    assert_error(args, "tokenizer lacks", "'<image>'", "reserved")


def test_existing_output_is_refused_unless_forced(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_error([*tiny.cli_source("bunny"), "--mlx-path", out], "already exists", "--force")
    assert (out / "keep.txt").exists()
    code, err = cli(*tiny.cli_source("bunny"), "--mlx-path", out, "--force", "--dtype", "float32")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_conflicting_and_invalid_options(tiny, tmp_path):
    ckpt = tiny.checkpoint("compose")
    out = ["--mlx-path", tmp_path / "out"]
    assert_error(
        ["--hf-path", ckpt.extra["llm"], "--vision", ckpt.extra["vision"], *out], "either --hf-path"
    )
    assert_error(["--hf-path", ckpt.extra["llm"], *out], "language model alone", "--llm")
    assert_error(["--hf-path", ckpt.extra["vision"], *out], "SigLIP checkpoint", "--vision")
    assert_error(
        [*tiny.cli_source("bunny"), "-q", "--q-bits", "3", *out], "--q-bits must be 4 or 8"
    )
    assert_error([*tiny.cli_source("bunny"), "-q", "--q-group-size", "48", *out], "--q-group-size")


def test_compose_accepts_a_standalone_siglip_vision_model(tmp_path):
    """transformers >= 5 saves a SiglipVisionModel without the ``vision_model.`` prefix."""
    from transformers import SiglipVisionModel

    _, full = make_siglip(tmp_path / "full")
    tower = SiglipVisionModel(full.config.vision_config)
    prefix = "vision_model."
    own = {k[len(prefix) :]: v for k, v in full.state_dict().items() if k.startswith(prefix)}
    tower.load_state_dict(own if "embeddings.patch_embedding.weight" in tower.state_dict()
                          else {prefix + k: v for k, v in own.items()})
    tower.save_pretrained(tmp_path / "tower")
    llm_dir, _ = make_llama(tmp_path / "llm")
    a = convert(vision=str(tmp_path / "tower"), llm=str(llm_dir), mlx_path=tmp_path / "a", dtype="float32")
    b = convert(vision=str(tmp_path / "full"), llm=str(llm_dir), mlx_path=tmp_path / "b", dtype="float32")
    wa, wb = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert any(k.startswith("vision_tower.") for k in wa)
    for k in wa:
        assert mx.array_equal(wa[k], wb[k]), k


# ------------------------------------------------------------------ config fields
def edit_config(folder: Path, name="config.json", **changes):
    config = json.loads((folder / name).read_text())
    for k, v in changes.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    write_json(folder / name, config)


def test_minicpm_fields_are_read_never_the_published_code_defaults(tiny, tmp_path):
    """query_num, drop_vision_last_layer, slice_config and the preprocessor settings
    come from the checkpoint; absent, from the tensors and 2.5's published values, never
    the published code's defaults (64 queries, last layer dropped, one slice)."""
    src = copy_checkpoint(tiny, "minicpm", tmp_path)
    edit_config(src, query_num=None, drop_vision_last_layer=None, slice_config=None)
    (src / "preprocessor_config.json").unlink()
    config = json.loads((convert(hf_path=str(src), mlx_path=tmp_path / "a") / "config.json").read_text())
    proc = config["processor_config"]
    assert config["projector_config"]["num_queries"] == 8 == proc["tokens_per_tile"]  # the tensor
    assert config["vision_config"]["num_hidden_layers"] == 3
    assert (proc["max_slices"], proc["slice"], proc["image_size"]) == (9, True, 16)
    assert config["vision_config"]["navit_coords"] == "arange"

    edit_config(src, image_size=None)  # no scale resolution anywhere: 2.5's 448
    config = json.loads((convert(hf_path=str(src), mlx_path=tmp_path / "b") / "config.json").read_text())
    assert config["processor_config"]["image_size"] == 448

    src = copy_checkpoint(tiny, "minicpm", tmp_path / "c")
    edit_config(src, "preprocessor_config.json", max_slice_nums=4, scale_resolution=20)
    edit_config(src, slice_config={"max_slice_nums": 4, "patch_size": 4})
    config = json.loads((convert(hf_path=str(src), mlx_path=tmp_path / "d") / "config.json").read_text())
    assert (config["processor_config"]["max_slices"], config["processor_config"]["image_size"]) == (4, 20)


def test_dropped_last_vision_layer_is_honoured_when_declared(tiny, tmp_path):
    src = copy_checkpoint(tiny, "minicpm", tmp_path)
    edit_config(src, drop_vision_last_layer=True)  # vision_config declares 3 layers
    out = convert(hf_path=str(src), mlx_path=tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 2


@pytest.mark.parametrize(
    "pre,message",
    [(dict(image_feature_size=64), "image_feature_size 64"), (dict(version=2.0), "version 2.0")],
)
def test_preprocessor_config_that_contradicts_the_checkpoint(tiny, tmp_path, pre, message):
    src = copy_checkpoint(tiny, "minicpm", tmp_path)
    edit_config(src, "preprocessor_config.json", **pre)
    assert_error(["--hf-path", src, "--mlx-path", tmp_path / "out"], message)


def test_llama3v_without_rope_and_norm_settings_takes_the_published_values(tiny, tmp_path):
    # the Llama 3-V config lacks much; Llama 3 8B's rope_theta 5e5 and eps 1e-5 (the
    # values the tiny model was made with) and the tensors' key/value heads fill it in
    src = copy_checkpoint(tiny, "llama3v", tmp_path)
    edit_config(src, rope_theta=None, rope_scaling=None, rms_norm_eps=None, num_key_value_heads=None)
    out = convert(hf_path=str(src), mlx_path=tmp_path / "out", dtype="float32")
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (text["rope_theta"], text["rms_norm_eps"], text["num_key_value_heads"]) == (5e5, 1e-5, 2)
    logits, inputs = run_model(out)
    ref = tiny.reference("llama3v").logits(inputs.input_ids, inputs.tiles, inputs.image_token_id)
    assert_close(logits, ref)


@pytest.mark.parametrize("schema", SCHEMAS)
def test_composed_llm_without_rope_theta_is_refused(tiny, tmp_path, schema):
    """A bare Llama has no published values to fall back on: never rope_theta 10000."""
    llm = Path(shutil.copytree(tiny.source("compose", schema)["llm"], tmp_path / "llm"))
    if schema == "5":
        params = json.loads((llm / "config.json").read_text())["rope_parameters"]
        edit_config(llm, rope_parameters={k: v for k, v in params.items() if k != "rope_theta"})
    else:
        edit_config(llm, rope_theta=None)
    args = ["--vision", tiny.source("compose")["vision"], "--llm", llm, "--mlx-path", tmp_path / "o"]
    assert_error(args, "language model config", "no rope_theta given")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "disagree"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks low_freq_factor"),
        (dict(num_attention_heads=None), "no num_attention_heads given"),
    ],
)
def test_contradictory_or_incomplete_lm_settings_are_errors(tiny, tmp_path, changes, message):
    src = copy_checkpoint(tiny, "bunny", tmp_path)
    edit_config(src, **changes)
    assert_error(["--hf-path", src, "--mlx-path", tmp_path / "out"], message)


@pytest.mark.parametrize("name", FAMILIES)
def test_only_minicpm_uses_navit_position_ids(tiny, name):
    vision = json.loads((tiny.converted(name) / "config.json").read_text())["vision_config"]
    navit = name in ("minicpm", "llama3v")
    assert (vision["variant"], vision["strip_positions"]) == (("navit", True) if navit else ("siglip", False))

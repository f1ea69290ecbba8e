"""The command-line layer: one ``error:`` line and exit 2 for values that make no sense,
the ``mlx_llama3v SUBCOMMAND`` entry point, and ``GenerationOptions`` validation."""

import math
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mlx_llama3v.convert.cli import app as convert_app
from mlx_llama3v.embed.cli import app as embed_app
from mlx_llama3v.generation.chat import app as chat_app
from mlx_llama3v.generation.generate import app as generate_app
from mlx_llama3v.generation.sampling import (
    DEFAULT_PREFILL_STEP_SIZE,
    DEFAULT_QUANTIZED_KV_START,
    GenerationOptions,
    OptionError,
)
from mlx_llama3v.train.cli import app as train_app

BAD_GENERATION = [
    (["--temp", "-1"], "--temp must be at least 0"),
    (["--temp", "nan"], "--temp must be a finite number"),
    (["--temp", "inf"], "--temp must be a finite number"),
    (["--top-p", "2"], "--top-p must be at most 1"),
    (["--top-p", "0"], "--top-p must be above 0"),
    (["--top-k", "-5"], "--top-k must be at least 0"),
    (["--min-p", "5"], "--min-p must be at most 1"),
    (["--min-p", "-0.5"], "--min-p must be at least 0"),
    (["--prefill-step-size", "0"], "--prefill-step-size must be at least 1"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be above 0"),
    (["--repetition-penalty", "nan"], "--repetition-penalty must be a finite number"),
    (["--repetition-context-size", "0"], "--repetition-context-size must be at least 1"),
    (["--max-tokens", "0"], "--max-tokens must be positive, or -1"),
    (["--max-tokens", "-2"], "--max-tokens must be positive, or -1"),
    (["--kv-bits", "7"], "--kv-bits must be one of 2, 3, 4, 5, 6, 8"),
    (["--kv-group-size", "7"], "--kv-group-size must be one of 32, 64, 128"),
    (["--max-kv-size", "0"], "--max-kv-size must be at least 1"),
    (["--quantized-kv-start", "-1"], "--quantized-kv-start must be at least 0"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--kv-bits", "4", "--max-kv-size", "64"], "--kv-bits cannot be combined with --max-kv-size"),
]


def invoke(app, args, input=None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    return result.exit_code, result.stderr.strip(), result.stdout


def assert_one_error(app, args, fragment, input=None):
    code, err, out = invoke(app, args, input)
    assert code == 2, (args, code, err, out)
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert fragment in err, err


@pytest.mark.parametrize("app", [generate_app, chat_app], ids=["generate", "chat"])
@pytest.mark.parametrize("args,fragment", BAD_GENERATION, ids=[" ".join(a) for a, _ in BAD_GENERATION])
def test_generation_options_that_make_no_sense_are_refused_before_loading(app, args, fragment, tmp_path):
    # the model does not exist: the options are checked first
    assert_one_error(app, ["--model", tmp_path / "no-model", *args], fragment, input="")


def test_good_generation_options_reach_the_model_loading(tmp_path):
    args = ["--model", tmp_path / "no-model", "--temp", "0.7", "--top-p", "0.8", "--top-k", "100"]
    assert_one_error(generate_app, [*args, "--min-p", "0.05"], "model folder not found")


def test_generation_options_name_the_keyword_from_python():
    for kwargs, name in [
        ({"temp": -1}, "temp"),
        ({"temp": math.nan}, "temp"),
        ({"top_p": 2}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 5}, "min_p"),
        ({"prefill_step_size": 0}, "prefill_step_size"),
        ({"stop": "END"}, "stop"),
        ({"kv_bits": 4, "max_kv_size": 64}, "kv_bits"),
    ]:
        with pytest.raises(OptionError, match=name) as e:
            GenerationOptions(**kwargs)
        assert isinstance(e.value, ValueError) and "--" not in str(e.value)
    with pytest.raises(TypeError, match="tempp"):
        GenerationOptions.from_kwargs({"tempp": 1})
    options = GenerationOptions(temp=0.7, stop=["END"])
    assert options.replace(top_k=5) == GenerationOptions(temp=0.7, stop=["END"], top_k=5)
    with pytest.raises(OptionError, match="top_k"):
        options.replace(top_k=-1)


def test_the_defaults_are_mlx_lms():
    import mlx_lm.generate  # noqa: F401

    generate_module = sys.modules["mlx_lm.generate"]
    assert DEFAULT_PREFILL_STEP_SIZE == generate_module.DEFAULT_PREFILL_STEP_SIZE
    assert DEFAULT_QUANTIZED_KV_START == generate_module.DEFAULT_QUANTIZED_KV_START


def test_train_refuses_a_learning_rate_that_makes_no_sense(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("")
    out = tmp_path / "out"
    base = ["--model", tmp_path / "no-model", "--data", data, "--out", out]
    for args, fragment in [
        (["--lr", "nan"], "--learning-rate must be a positive finite number; got nan"),
        (["--lr", "-1"], "--learning-rate must be a positive finite number; got -1.0"),
        (["--lr", "0"], "--learning-rate must be a positive finite number"),
        (["--learning-rate", "inf"], "--learning-rate must be a positive finite number"),
        (["--weight-decay", "-1"], "--weight-decay must be a finite number, at least 0"),
        (["--lora-dropout", "1.5"], "--lora-dropout must be a finite number, at least 0 and at most 1"),
        (["--min-lr-ratio", "nan"], "--min-lr-ratio must be a finite number"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be a finite number"),
    ]:
        assert_one_error(train_app, [*base, *args], fragment)
    assert not out.exists()


def test_convert_refuses_quantization_options_without_quantize(tmp_path):
    out = tmp_path / "out"
    for args in (["--q-bits", "3"], ["--q-group-size", "32"], ["--quantize-vision"], ["--quantize-projector"]):
        assert_one_error(
            convert_app, ["--hf-path", tmp_path, "--mlx-path", out, *args], f"{args[0]} needs -q/--quantize"
        )
    assert_one_error(
        convert_app, ["--hf-path", tmp_path, "--mlx-path", out, "--projector-layers", "0"],
        "--projector-layers must be at least 1",
    )
    assert not out.exists()


def test_embed_refuses_sizes_that_make_no_sense(tmp_path):
    out = tmp_path / "cache"
    base = ["--model", tmp_path / "m", "--images", tmp_path, "--out", out]
    for args, fragment in [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--shard-size", "0"], "--shard-size must be a positive number"),
        (["--shard-size", "nan"], "--shard-size must be a positive number"),
    ]:
        assert_one_error(embed_app, [*base, *args], fragment)
    assert not out.exists()


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=120
    )


def test_the_mlx_llama3v_entry_point_runs_each_command():
    for sub in ("convert", "generate", "chat", "embed", "train", "fuse"):
        proc = run("mlx_llama3v", sub, "--help")
        assert proc.returncode == 0 and "Usage:" in proc.stdout, (sub, proc.stderr)
    proc = run("mlx_llama3v", "generate", "--model", "/nonexistent/model", "--temp", "-1")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --temp must be at least 0; got -1.0"
    proc = run("mlx_llama3v", "nosuch")
    assert proc.returncode == 2 and proc.stderr.startswith("error: no subcommand 'nosuch'")
    proc = run("mlx_llama3v")
    assert proc.returncode == 2 and "subcommands: convert, generate" in proc.stdout


def test_the_old_module_commands_still_run():
    for module in ("mlx_llama3v.generate", "mlx_llama3v.chat", "mlx_llama3v.fuse"):
        proc = run(module, "--help")
        assert proc.returncode == 0 and "--model" in proc.stdout, (module, proc.stderr)

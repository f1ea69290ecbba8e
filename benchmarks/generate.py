"""Generation speed and memory, MLX vs transformers, side by side on the same random weights.

The model is the released Llama 3-V (MiniCPM-Llama3-V 2.5) design scaled to fit a small
machine: the full SigLIP-so400m NaViT tower (27 layers, width 1152), the MiniCPM
resampler (96 queries), and a Llama 3 with Llama-3.2-1B-like dims (width 2048, 16 layers,
32 heads, 8 KV heads, MLP 8192, vocabulary 128256, tied embeddings), float32 throughout.

Rows (greedy, KV cache on, one image: ``examples/cat.png`` unless ``--image``):

- time to first token (image loading and slicing, vision tower, projector, prefill, first
  token) and decode tokens/s: ``mlx_llama3v.stream_generate`` vs the transformers
  pipeline (``Idefics2VisionTransformer`` + the PyTorch resampler reference of the tests +
  ``LlamaForCausalLM.generate(inputs_embeds=...)``) fed the same tiles;
- a follow-up question about the same image (image-feature cache, KV cache reused);
- decode tokens/s of ``mlx_lm.stream_generate`` on the same language model alone, on a
  prompt of the same length (our wrapper should add nothing);
- peak MLX memory of a generation, float32 vs the language model in 4 bits;
- decode as a share of this machine's memory-bandwidth bound: a decoded token reads every
  weight of the language model once (the tied embedding as the output layer), so the
  bound is bandwidth / weight bytes; bandwidth is that of a large MLX float32
  matrix-vector product (the op decode is made of) measured in the same run.

Decode tokens/s is (tokens - 1) / (time of the last token - time of the first), from the
moment each token reaches the caller. The machine's other load shows in the numbers: run
it on an idle machine for a fair comparison. Run: ``python benchmarks/generate.py``.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

# torch first: its BLAS calls bind to its own library before mlx_llama3v opens
# OpenBLAS globally for MLX (opened earlier, OpenBLAS would serve torch's calls too)
import torch  # noqa: I001

import mlx_llama3v  # noqa: F401  (optimised BLAS for MLX on Linux, before mlx.core)
import mlx_llama3v.cpu
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from hf_checkpoints import TinyCheckpoint  # noqa: E402
from references import TorchResampler, randomize, to_mlx  # noqa: E402
from tiny_tokenizer import MINICPM_RENAMES, make_llama3_tokenizer  # noqa: E402

from mlx_llama3v.config import ModelConfig  # noqa: E402
from mlx_llama3v.convert.common import quantize_parts  # noqa: E402
from mlx_llama3v import stream_generate  # noqa: E402
from mlx_llama3v.generation.features import feature_cache  # noqa: E402
from mlx_llama3v.chat import ChatSession  # noqa: E402
from mlx_llama3v.generation.text import text_tokenizer  # noqa: E402
from mlx_llama3v.loading import Processor  # noqa: E402
from mlx_llama3v.models.llama3v import Model  # noqa: E402
from mlx_llama3v.processing import resolve_processor_config  # noqa: E402

from so400m import SO400M as SO400M_SHAPE  # noqa: E402

SO400M = dict(SO400M_SHAPE, image_size=980)
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
QUESTION = "What is in this image?"
FOLLOW_UP = "Describe the picture in detail."


# ------------------------------------------------------------------ models
def torch_vision():
    """Random float32 PyTorch tower and resampler (sdpa attention)."""
    from transformers import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    torch.manual_seed(0)
    vcfg = Idefics2VisionConfig(**SO400M)
    vcfg._attn_implementation = "sdpa"
    vision = randomize(Idefics2VisionTransformer(vcfg), seed=0)
    resampler = randomize(
        TorchResampler(96, LLAMA_1B["hidden_size"], SO400M["hidden_size"]), seed=1
    )
    return vision, resampler


def mlx_model(vision, resampler, layers: int, image_token_id: int) -> Model:
    """The model as the converter builds it: the tower's and resampler's weights copied
    from PyTorch, the language model's drawn here (as ``references.randomize`` does)."""
    text = dict(LLAMA_1B, num_hidden_layers=layers, model_type="llama")
    config = ModelConfig.from_dict(
        {
            "family": "minicpm_v2_5",
            "vision_config": dict(SO400M, variant="navit", strip_positions=True),
            "projector_config": {
                "kind": "resampler",
                "vision_hidden_size": SO400M["hidden_size"],
                "text_hidden_size": LLAMA_1B["hidden_size"],
                "num_queries": 96,
            },
            "text_config": text,
            "image_token": "<unk>",
            "image_token_id": image_token_id,
            "processor_config": resolve_processor_config({"family": "minicpm_v2_5"}),
        }
    )
    model = Model(config)
    weights = {
        **to_mlx(vision.state_dict(), "vision_tower."),
        **to_mlx(resampler.state_dict(), "projector."),
    }
    weights = model.sanitize({**weights, **random_llama(model.language_model)})
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model.eval()


def random_llama(language_model) -> dict:
    out = {}
    for i, (name, p) in enumerate(tree_flatten(language_model.parameters())):
        key = mx.random.key(i)
        if p.ndim == 1 and name.endswith("weight"):
            out[name] = 1.0 + 0.1 * mx.random.normal(p.shape, key=key)
        else:
            out[name] = mx.random.normal(p.shape, key=key) / math.sqrt(p.shape[-1])
        mx.eval(out[name])
    return {"language_model." + k: v for k, v in out.items()}


def shared_torch_llama(model: Model):
    """transformers' Llama over the MLX language model's own memory (no copy: the two
    models together then fit in less memory; neither writes to its weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**dict(LLAMA_1B, num_hidden_layers=len(model.language_model.layers)))
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        llm = LlamaForCausalLM(cfg)
    state = {
        k: torch.from_numpy(np.asarray(memoryview(v)))
        for k, v in tree_flatten(model.language_model.parameters())
    }
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, as in Llama 3.2 1B
    llm.load_state_dict(state, strict=True, assign=True)
    llm.model.rotary_emb = type(llm.model.rotary_emb)(config=cfg)  # buffers were on "meta"
    return llm.eval()


def processor_for(folder: Path) -> Processor:
    from transformers import PreTrainedTokenizerFast

    make_llama3_tokenizer(folder, extra=MINICPM_RENAMES)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    return Processor(tokenizer, resolve_processor_config({"family": "minicpm_v2_5"}))


# ------------------------------------------------------------------ timing
def rates(stamps, start):
    """(time to first token, decode tokens/s) from the times tokens reached the caller."""
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return stamps[0] - start, decode


def run_mlx(model, processor, question, image, tokens, **kwargs):
    start = time.perf_counter()
    stamps = []
    for _ in stream_generate(model, processor, question, [image], max_tokens=tokens, **kwargs):
        stamps.append(time.perf_counter())
    assert len(stamps) == tokens, f"stopped after {len(stamps)} tokens"
    return rates(stamps, start)


def run_mlx_lm(model, processor, prompt_ids, tokens):
    from mlx_lm.generate import stream_generate as lm_stream_generate

    start = time.perf_counter()
    stamps = []
    wrapper = text_tokenizer(processor.tokenizer)
    for _ in lm_stream_generate(
        model.language_model, wrapper, mx.array(prompt_ids), max_tokens=tokens
    ):
        stamps.append(time.perf_counter())
    return rates(stamps, start)


class Stamps:
    """A transformers streamer that notes when each generated token arrives."""

    def __init__(self):
        self.times, self.calls = [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:  # the first call passes the prompt
            self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.inference_mode()
def run_torch(reference: TinyCheckpoint, processor, question, image, tokens):
    start = time.perf_counter()
    inputs = processor([{"role": "user", "content": question}], [image])
    ids = torch.from_numpy(inputs.input_ids.astype(np.int64))[None]
    embeds = reference.llm.get_input_embeddings()(ids)
    embeds[ids == inputs.image_token_id] = torch.cat(reference.features(inputs.tiles))
    stamps = Stamps()
    reference.llm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        use_cache=True,
        streamer=stamps,
        pad_token_id=0,
    )
    assert len(stamps.times) == tokens, f"stopped after {len(stamps.times)} tokens"
    return rates(stamps.times, start)


def weight_bytes_per_token(model: Model) -> int:
    """Bytes of language-model weights one decoded token reads (the embedding table once:
    as the tied output layer; an untied input table only gives one row)."""
    lm = model.language_model
    total = sum(v.nbytes for _, v in tree_flatten(lm.parameters()))
    if not lm.args.tie_word_embeddings:
        total -= lm.model.embed_tokens.weight.nbytes
    return total


def matvec_bandwidth(rows: int = 16384, cols: int = 8192, repeats: int = 5) -> float:
    """GB/s of a float32 (1 x cols) @ (cols x rows) product over a 512 MiB matrix: the
    weight-streaming speed decode can reach here."""
    w = mx.random.normal((rows, cols))
    x = mx.random.normal((1, cols))
    mx.eval(w, x)
    mx.eval(x @ w.T)  # warm-up
    seconds = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(x @ w.T)
        seconds = min(seconds, time.perf_counter() - t)
    return w.nbytes / seconds / 1e9


def best(fn, repeats):
    """Best time to first token and best decode rate over ``repeats`` runs."""
    runs = [fn() for _ in range(repeats)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def with_peak_memory(fn):
    """``fn()`` and the peak MLX memory (GiB) while it ran."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    out = fn()
    return out, mx.get_peak_memory() / 2**30


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default=str(ROOT / "examples" / "cat.png"))
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated per run")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each row")
    ap.add_argument("--pairs", type=int, default=2, help="alternating runs, ours vs mlx-lm")
    ap.add_argument("--layers", type=int, default=LLAMA_1B["num_hidden_layers"])
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    tokens, image = args.tokens, args.image
    mlx_llama3v.cpu.enable()

    tic = time.perf_counter()
    processor = processor_for(Path(tempfile.mkdtemp()))
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<unk>")
    vision, resampler = torch_vision()
    model = mlx_model(vision, resampler, args.layers, image_token_id)
    llm = shared_torch_llama(model)
    reference = TinyCheckpoint(None, "minicpm_v2_5", vision, llm, resampler, SO400M["patch_size"])
    print(f"built the models in {time.perf_counter() - tic:.0f} s", file=sys.stderr)

    def fresh(n=tokens):  # a new question about a new image: nothing cached
        feature_cache(model).clear()
        return run_mlx(model, processor, QUESTION, image, n)

    def follow_up():
        chat = ChatSession(model, processor, max_tokens=tokens)
        chat.ask(QUESTION, images=[image])  # its features are cached by now
        start = time.perf_counter()
        return rates([time.perf_counter() for _ in chat.stream(FOLLOW_UP)], start)

    # warm-ups on a short text prompt: each side's language model runs once
    text = [{"role": "user", "content": "Hello"}]
    with torch.inference_mode():
        reference.llm.generate(
            **warm_up_inputs(processor, text), max_new_tokens=2, do_sample=False, pad_token_id=0
        )
    list(stream_generate(model, processor, text, max_tokens=2))

    ids = processor([{"role": "user", "content": QUESTION}], [image]).input_ids
    rows, memory = {}, {}
    rows["torch"] = best(
        lambda: run_torch(reference, processor, QUESTION, image, tokens), args.repeats
    )
    rows["mlx"], memory["float32"] = with_peak_memory(lambda: best(fresh, args.repeats))
    # ours (image features cached, so no vision) and mlx-lm alone, taking turns: the
    # machine's load drifts, and both should see the same
    ours, alone = [], []
    for _ in range(args.pairs):
        ours.append(run_mlx(model, processor, QUESTION, image, tokens))
        alone.append(run_mlx_lm(model, processor, ids, tokens))
    rows["mlx_cached"], rows["mlx_lm"] = best_of(ours), best_of(alone)
    rows["follow_up"] = best(follow_up, args.repeats)
    bound = {"bytes": weight_bytes_per_token(model), "GB/s": max(matvec_bandwidth() for _ in range(2))}
    reference = vision = resampler = llm = None  # free the PyTorch side
    gc.collect()
    quantize_parts(model, 4, 64, ["language_model"])
    mx.eval(model.parameters())
    list(stream_generate(model, processor, text, max_tokens=2))
    few = min(tokens, 8)  # MLX's CPU 4-bit kernels are slow: keep the run short
    rows["mlx_4bit"], memory["4-bit"] = with_peak_memory(lambda: best(lambda: fresh(few), 1))

    report(rows, memory, bound, len(ids), tokens, few, args)
    print(f"total {time.perf_counter() - tic:.0f} s", file=sys.stderr)


def best_of(runs):
    return min(r[0] for r in runs), max(r[1] for r in runs)


def warm_up_inputs(processor, messages):
    ids = torch.from_numpy(processor(messages).input_ids.astype(np.int64))[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


NAMES = {
    "torch": "transformers: Idefics2 tower + resampler (test reference) + `generate`",
    "mlx": "mlx_llama3v `stream_generate`",
    "mlx_cached": "mlx_llama3v, same image again (features cached)",
    "follow_up": "mlx_llama3v, follow-up question (features + KV cache reused)",
    "mlx_lm": "mlx-lm `stream_generate`, language model alone, same prompt length",
    "mlx_4bit": "mlx_llama3v, language model 4-bit (group 64)",
}


def report(rows, memory, bound, prompt_tokens, tokens, few, args):
    t_ttft, t_dec = rows["torch"]
    print(
        f"Llama 3-V scaled: SigLIP-so400m NaViT tower (27 layers) + resampler (96 queries) + "
        f"Llama {args.layers} layers x 2048, vocab 128256; float32. {Path(args.image).name}, one "
        f"tile, prompt {prompt_tokens} tokens; greedy, {tokens} tokens ({few} for 4-bit). "
        f"MLX {mlx_llama3v.cpu.describe()}; torch threads: {torch.get_num_threads()}.\n"
    )
    print(
        "| run | time to first token (s) | decode tokens/s | TTFT vs transformers | decode vs transformers |"
    )
    print("|---|---|---|---|---|")
    for key, name in NAMES.items():
        ttft, dec = rows[key]
        ttft_ratio = "" if key in ("torch", "mlx_lm") else f"{t_ttft / ttft:.2f}x"
        print(f"| {name} | {ttft:.2f} | {dec:.2f} | {ttft_ratio} | {dec / t_dec:.2f}x |")
    print(
        f"\nDecode, mlx_llama3v (features cached) / mlx-lm alone, best of {args.pairs} "
        f"alternating runs each: {rows['mlx_cached'][1] / rows['mlx_lm'][1]:.2f}x\n"
        f"Peak MLX memory of a generation with one image: float32 {memory['float32']:.2f} GiB, "
        f"language model 4-bit {memory['4-bit']:.2f} GiB"
    )
    limit = bound["GB/s"] * 1e9 / bound["bytes"]
    print(
        f"\nMemory-bandwidth bound: {bound['bytes'] / 1e9:.2f} GB of weights per token at "
        f"{bound['GB/s']:.1f} GB/s (1 x 8192 @ 8192 x 16384 float32 product, this run) = "
        f"{limit:.2f} tokens/s\n"
        "| decode | tokens/s | share of the bound |\n|---|---|---|"
    )
    for key in ("mlx_cached", "mlx_lm", "torch"):
        print(f"| {NAMES[key]} | {rows[key][1]:.2f} | {100 * rows[key][1] / limit:.0f}% |")


if __name__ == "__main__":
    main()

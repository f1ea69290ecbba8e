"""Training speed and memory, side by side in one run (float32, random weights).

Rows:
- Stage-2 LoRA: ``mlx_llama3v.train`` (the product path: ``train()`` with a feature
  cache) vs PyTorch + peft doing the same step on the same batches: frozen
  attention projector over the cached vision features, features scattered into
  the token embeddings, Llama forward, cross-entropy on the assistant tokens,
  backward into LoRA (rank 8, alpha 16, every linear of every block), gradient
  clipping and AdamW. Tokens/s counts every real (non-padding) token of a step.
- Stage-1: projector-only steps reading cached features (``--features``) vs
  encoding the images with the SigLIP tower on the fly.
- Peak memory (MLX's ``get_peak_memory``) of QLoRA on the 4-bit conversion vs LoRA on
  the float model, same data.

The model is the article's design at a small size: SigLIP (width 384, 6 layers,
224 px, 256 patches per image) + a 2-block attention projector + Llama 3 (width 512,
4 layers, GQA 8/4 heads, MLP 1536, the tests' tiny 640-token tokenizer). Each
sample is one image (256 tokens) and a short conversation: about 290 tokens.

Run: ``python benchmarks/train.py [--steps 8 --batch 4]``; needs ``pip install peft``.
Other processes may share the machine: each number is the fastest step after two warm-up
steps (MLX and PyTorch LoRA runs alternate twice), as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
              image_size=224, patch_size=14, variant="siglip")
TEXT = dict(model_type="llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, vocab_size=640, rms_norm_eps=1e-5,
            rope_theta=500000.0, max_position_embeddings=4096, tie_word_embeddings=False)
LORA = {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": None}  # alpha 16
LORA_KEYS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["What is in this image?", "Describe the picture in detail.", "How many people are in the photo?"]
ANSWERS = [
    "The image shows a small red house next to a tall green tree.",
    "There are two cats sitting on a wooden table, and a dog is sleeping under the window.",
    "I can see three people walking along the street.",
    "The car is yellow, parked in front of the old station.",
]


# ------------------------------------------------------------------ setup
def mlx_imports():
    """The MLX side's modules. mlx_llama3v first: it opens OpenBLAS for MLX before
    ``mlx.core`` loads. That OpenBLAS, opened globally, would also take over
    PyTorch's BLAS calls and slow PyTorch several times, so the PyTorch side runs in
    a process of its own that never imports mlx_llama3v (``--torch-worker``)."""
    global mx
    import mlx_llama3v  # noqa: F401  (before mlx.core)
    import mlx.core as mx

    return mx


mx = None


def make_model(folder: Path, quantize: bool = False) -> Path:
    """A converted folder of the small model (random weights, seed 0)."""
    from mlx_lm.utils import save_model
    from tiny_tokenizer import make_llama3_tokenizer
    from transformers import PreTrainedTokenizerFast

    from mlx_llama3v.config import ModelConfig
    from mlx_llama3v.convert.common import quantize_parts, write_config
    from mlx_llama3v.models.llama3v import Model
    from mlx_llama3v.processing import default_processor_config

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_llama3_tokenizer(folder)
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    processor = dict(default_processor_config("siglip_llama3"), image_size=224, tokens_per_tile=256)
    config = ModelConfig.from_dict(dict(
        family="siglip_llama3",
        vision_config=VISION,
        projector_config=dict(kind="attention", vision_hidden_size=384, text_hidden_size=512,
                              num_layers=2, num_attention_heads=6, intermediate_size=1536),
        text_config=TEXT,
        image_token="<unk>",
        image_token_id=tok.convert_tokens_to_ids("<unk>"),
        processor_config=processor,
    ))
    mx.random.seed(0)
    model = Model(config)
    if quantize:
        config.quantization = quantize_parts(model, 4, 64, ["language_model"])
    save_model(folder, model)
    write_config(config, {}, folder)
    return tokenizer


def make_data(root: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (300 + 8 * (i % 5), 400, 3), dtype=np.uint8)).save(
            root / "img" / f"{i}.jpg", quality=90)
        lines.append(json.dumps({"image": f"img/{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\n" + QUESTIONS[i % 3]},
            {"from": "gpt", "value": " ".join(ANSWERS[j % 4] for j in range(i % 3 + 1))}]}))
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_mlx(model: Path, data: Path, out: Path, steps: int, batch: int, stage: str, features=None):
    from mlx_llama3v.train import LoopArgs, TrainConfig, TuneConfig, train

    mx.reset_peak_memory()
    result = train(TrainConfig(
        model=str(model), data=[str(data)], out=str(out), features=features and str(features),
        tune=TuneConfig(stage=stage, lora_parameters=dict(LORA)),
        loop=LoopArgs(iters=steps, batch_size=batch, learning_rate=1e-4, steps_per_save=10**6,
                      progress=False, seed=0),
    ), log=lambda s: None)
    entries = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    entries = [e for e in entries if "loss" in e][2:]  # the first two steps warm up
    best = min(entries, key=lambda e: e["step_seconds"])
    seconds, tokens = best["step_seconds"], best["tokens"]
    from mlx.utils import tree_flatten

    weights = sum(v.nbytes for _, v in tree_flatten(result.model.parameters()))
    return dict(seconds=seconds, tokens_per_s=tokens / seconds, peak_gb=max(e["peak_memory_gb"] for e in entries),
                weights_gb=weights / 1e9)


# ------------------------------------------------------------------ PyTorch + peft
def dump_batches(folder: Path, data: Path, cache_dir: Path, steps: int, batch_size: int, out: Path) -> None:
    """The MLX run's batches (same plan, same cached features) for the PyTorch worker."""
    from mlx_llama3v.embed import FeatureCache, stack_features
    from mlx_llama3v.loading import load
    from mlx_llama3v.train.batching import BatchPlan, collate
    from mlx_llama3v.train.data import SampleEncoder, load_samples

    model, processor = load(folder)
    enc = SampleEncoder(processor.tokenizer, processor.config, model.config.projector_config, 2048)
    samples, _ = load_samples([data], enc, log=lambda s: None)
    by_index = {s.index: s for s in samples}
    plan = BatchPlan({s.index: s.length for s in samples}, batch_size, seed=0)
    cache = FeatureCache(cache_dir)
    arrays = {"image_token_id": np.array(model.config.image_token_id)}
    for step in range(steps):
        batch = collate([by_index[i] for i in plan.batch(step)], pad_id=0)
        feats, _ = stack_features([cache[src] for src in batch.images])
        arrays.update({f"ids{step}": batch.ids, f"targets{step}": batch.targets,
                       f"feats{step}": np.array(feats.astype(mx.float32)),
                       f"tokens{step}": np.array(batch.num_tokens)})
    np.savez(out, **arrays)


def torch_worker(folder: Path, batches: Path, steps: int) -> dict:
    """PyTorch + peft on the dumped batches; run in a process without mlx_llama3v."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from references import TorchAttentionProjector

    torch.set_num_threads(2)
    weights = {k: torch.from_numpy(v.astype(np.float32)) for k, v in load_file(str(folder / "model.safetensors")).items()}
    cfg = LlamaConfig(**{k: v for k, v in TEXT.items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    llm = LlamaForCausalLM(cfg)
    llm.load_state_dict({k[len("language_model."):]: v for k, v in weights.items()
                         if k.startswith("language_model.")}, strict=True)
    proj = TorchAttentionProjector(384, 6, 1536, 512, 2)
    proj.load_state_dict({k[len("projector."):]: v for k, v in weights.items() if k.startswith("projector.")},
                         strict=True)
    proj.eval().requires_grad_(False)
    llm = get_peft_model(llm, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_KEYS,
                                         bias="none"))
    trainable = [p for p in llm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    data = np.load(batches)
    image_id = int(data["image_token_id"])
    times, tokens = [], []
    for step in range(steps):
        tic = time.perf_counter()
        with torch.no_grad():
            rows = proj(torch.from_numpy(data[f"feats{step}"])).reshape(-1, 512)
        ids = torch.from_numpy(data[f"ids{step}"].astype(np.int64))
        embeds = llm.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == image_id)[..., None], rows)
        logits = llm(inputs_embeds=embeds[:, :-1]).logits
        mask = torch.from_numpy(data[f"targets{step}"][:, 1:]).reshape(-1)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               ids[:, 1:].reshape(-1), reduction="none")
        loss = (ce * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tic)
        tokens.append(int(data[f"tokens{step}"]))
    k = min(range(2, steps), key=lambda i: times[i])
    return dict(seconds=times[k], tokens_per_s=tokens[k] / times[k], threads=torch.get_num_threads())


def run_torch(folder: Path, data: Path, cache_dir: Path, steps: int, batch_size: int) -> dict:
    batches = folder.parent / "batches.npz"
    dump_batches(folder, data, cache_dir, steps, batch_size, batches)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    cmd = [sys.executable, __file__, "--torch-worker", str(folder), str(batches), str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ main
def main() -> None:
    if sys.argv[1:2] == ["--torch-worker"]:
        folder, batches, steps = sys.argv[2:5]
        print(json.dumps(torch_worker(Path(folder), Path(batches), int(steps))))
        return
    mlx_imports()
    from mlx_llama3v.embed import embed

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_model(root / "model")
        make_model(root / "model-q4", quantize=True)
        data = make_data(root, args.samples)
        t = time.perf_counter()
        embed(str(root / "model"), str(data), str(root / "cache"), dtype="float32")
        cache_seconds = time.perf_counter() - t

        # alternated twice, best of each: other processes on the machine come and go
        runs = []
        for k in range(2):
            runs.append(("mlx", run_mlx(root / "model", data, root / f"lora{k}", args.steps, args.batch, "sft",
                                        root / "cache")))
            runs.append(("torch", run_torch(root / "model", data, root / "cache", args.steps, args.batch)))
        lora = min((r for n, r in runs if n == "mlx"), key=lambda r: r["seconds"])
        ref = min((r for n, r in runs if n == "torch"), key=lambda r: r["seconds"])
        # MLX's CPU 4-bit matmul is far slower than float: a few steps measure the memory
        qlora = run_mlx(root / "model-q4", data, root / "qlora", min(args.steps, 3), args.batch, "sft",
                        root / "cache")
        cached = run_mlx(root / "model", data, root / "s1-cache", args.steps, args.batch, "pretrain", root / "cache")
        live = run_mlx(root / "model", data, root / "s1-live", args.steps, args.batch, "pretrain")

    print(f"\nfloat32, {args.batch} samples per step (~{lora['tokens_per_s'] * lora['seconds'] / args.batch:.0f} "
          f"tokens each), fastest of steps 3-{args.steps}; torch threads: {ref['threads']}\n")
    print("| measurement | MLX (mlx_llama3v.train) | reference | ratio |")
    print("|---|---|---|---|")
    print(f"| stage 2 LoRA tokens/s (vs PyTorch + peft) | {lora['tokens_per_s']:.0f} | "
          f"{ref['tokens_per_s']:.0f} | {lora['tokens_per_s'] / ref['tokens_per_s']:.2f}x |")
    print(f"| stage 1 step time, cached features (vs encoding on the fly) | {cached['seconds'] * 1e3:.0f} ms | "
          f"{live['seconds'] * 1e3:.0f} ms | {live['seconds'] / cached['seconds']:.2f}x faster |")
    print(f"| peak memory, QLoRA 4-bit (vs LoRA float32) | {qlora['peak_gb'] * 1e3:.0f} MB | "
          f"{lora['peak_gb'] * 1e3:.0f} MB | {qlora['peak_gb'] / lora['peak_gb']:.2f}x |")
    print(f"| model weights in memory, QLoRA 4-bit (vs LoRA float32) | {qlora['weights_gb'] * 1e3:.0f} MB | "
          f"{lora['weights_gb'] * 1e3:.0f} MB | {qlora['weights_gb'] / lora['weights_gb']:.2f}x |")
    print(f"\n(building the feature cache for {args.samples} images took {cache_seconds:.1f} s; "
          f"QLoRA step {qlora['seconds'] * 1e3:.0f} ms, LoRA step {lora['seconds'] * 1e3:.0f} ms, "
          f"PyTorch step {ref['seconds'] * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()

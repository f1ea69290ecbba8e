"""Training data: both formats, loss masks from the chat template, shortening, bad records."""

import subprocess
import sys

import numpy as np
import pytest

from mlx_llama3v.loading import load
from mlx_llama3v.train.batching import BatchPlan, collate
from mlx_llama3v.train.data import (
    DataError,
    SampleEncoder,
    load_samples,
    read_records,
    split_train_valid,
    to_messages,
)
from test_train_support import REPO, chat, cli_env, llava, write_jsonl


@pytest.fixture(scope="module")
def tiny(tiny_setup):
    """The session's tiny model, images and data (conftest.py)."""
    return tiny_setup


@pytest.fixture(scope="module")
def processor(tiny):
    model, processor = load(tiny.model)
    return model, processor


def encoder(processor, max_length=2048):
    model, proc = processor
    return SampleEncoder(proc.tokenizer, proc.config, model.config.projector_config, max_length)


def decode(proc, ids):
    return proc.tokenizer.decode(list(ids))


def target_runs(sample):
    t = sample.targets.astype(np.int8)
    starts = np.flatnonzero(np.diff(np.concatenate([[0], t])) == 1)
    ends = np.flatnonzero(np.diff(np.concatenate([t, [0]])) == -1) + 1
    return list(zip(starts, ends))


# ------------------------------------------------------------------ masks
def test_loss_mask_covers_exactly_the_answers_and_their_end_of_turn(tiny, processor):
    _, proc = processor
    samples, report = load_samples([tiny.data], encoder(processor))
    assert report.kept == 12 and report.num_skipped == 0
    multi = samples[0]  # chat record: two assistant turns
    runs = target_runs(multi)
    assert [decode(proc, multi.ids[s:e]) for s, e in runs] == [
        "The image shows a small red house.<|eot_id|>",
        "Two.<|eot_id|>",
    ]
    one = samples[1]  # LLaVA record
    assert [decode(proc, one.ids[s:e]) for s, e in target_runs(one)] == [
        "There are two cats on a table.<|eot_id|>"
    ]
    # nothing from the prompt, the headers or the image is learnt
    image_id = proc.tokenizer.convert_tokens_to_ids("<unk>")
    assert not multi.targets[multi.ids == image_id].any()


def test_llava_markers_and_chat_parts_give_the_same_prompt(tiny, processor):
    enc = encoder(processor)
    a = to_messages(llava(0, "Describe the picture.", "Yes."), tiny.root)
    b = to_messages(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "img/0.png"},
                                             {"type": "text", "text": "Describe the picture."}]},
                {"role": "assistant", "content": "Yes."},
            ]
        },
        tiny.root,
    )
    sa, _ = enc.encode(a, "a")
    sb, _ = enc.encode(b, "b")
    np.testing.assert_array_equal(sa.ids, sb.ids)
    np.testing.assert_array_equal(sa.targets, sb.targets)
    assert sa.images == [str(tiny.root / "img/0.png")] and len(sa.tile_patches[0]) > 2


def test_marker_in_the_middle_and_images_list(tiny):
    messages = to_messages(
        {
            "image": ["img/0.png", "img/1.png"],
            "conversations": [
                {"from": "human", "value": "Compare <image> with <image> please"},
                {"from": "gpt", "value": "Same."},
            ],
        },
        tiny.root,
    )
    kinds = [p["type"] for p in messages[0]["content"]]
    assert kinds == ["text", "image", "text", "image", "text"]
    assert messages[0]["content"][3]["image"].endswith("1.png")


def test_image_count_matches_feature_rows(tiny, processor):
    model, proc = processor
    samples, _ = load_samples([tiny.data], encoder(processor))
    image_id = proc.tokenizer.convert_tokens_to_ids("<unk>")
    q = model.config.projector_config.num_queries
    for s in samples:
        assert int((s.ids == image_id).sum()) == q * sum(len(t) for t in s.tile_patches)


def test_feature_count_mismatch_is_a_bad_sample(tiny, processor):
    model, proc = processor
    enc = encoder(processor)
    enc.features = lambda src: [1, 2]  # a cache made with other settings
    path = write_jsonl(tiny.root / "one.jsonl", [llava(0)])
    _, report = load_samples([path], enc, log=lambda s: None)
    assert report.skipped == {"other": 1}
    with pytest.raises(DataError, match=r"one\.jsonl:1: .*feature cache has tiles"):
        load_samples([path], enc, strict=True)


# ------------------------------------------------------------------ length
def test_long_sample_is_shortened_at_a_turn_end(tiny, processor):
    enc = encoder(processor)
    full, _ = enc.encode(to_messages(chat(0), tiny.root), "x")
    runs = target_runs(full)
    enc.max_length = runs[1][1] - 1  # the second answer does not fit
    short, dropped = enc.encode(to_messages(chat(0), tiny.root), "x")
    assert short.length == runs[0][1] and dropped["tokens"] == full.length - runs[0][1]
    np.testing.assert_array_equal(short.ids, full.ids[: short.length])


def test_long_answer_is_cut_but_never_inside_an_image(tiny, processor):
    enc = encoder(processor)
    record = llava(0, answer="word " * 60)
    full, _ = enc.encode(to_messages(record, tiny.root), "x")
    start = target_runs(full)[0][0]
    enc.max_length = start + 5
    cut, dropped = enc.encode(to_messages(record, tiny.root), "x")
    assert cut.length == start + 5 and cut.num_targets == 5 and dropped["images"] == 0
    image_id = enc.image_token_id
    enc.max_length = int(np.flatnonzero(full.ids == image_id)[3])  # inside the image
    with pytest.raises(ValueError, match="too long"):
        enc.encode(to_messages(record, tiny.root), "x")


# ------------------------------------------------------------------ bad data
def bad_file(tiny):
    return write_jsonl(
        tiny.root / "bad.jsonl",
        [
            llava(0),  # line 1: good
            llava(1, image="img/missing.png"),  # line 2
            {"conversations": [{"from": "human", "value": "<image>\nHi"}], "image": "img/0.png"},  # 3
            llava(3, question="What is in this image? " * 80),  # line 4: too long
        ],
        raw_lines=['{"messages": [oops'],  # line 5
    )


def test_bad_records_are_reported_with_file_and_line_and_counted(tiny, processor):
    path = bad_file(tiny)
    lines = []
    samples, report = load_samples([path], encoder(processor, max_length=200), log=lines.append)
    assert len(samples) == 1 and samples[0].where == f"{path}:1"
    assert report.skipped == {
        "missing image": 1,
        "no assistant turn": 1,
        "too long": 1,
        "malformed": 1,
    }
    assert [line.split(": ")[0] for line in lines] == [f"skipped {path}:{n}" for n in (2, 3, 4, 5)]
    assert "missing image" in lines[0] and "missing.png" in lines[0]
    assert "no assistant turn" in lines[1]
    assert "too long" in lines[2] and "max length 200" in lines[2]
    assert "malformed JSON" in lines[3]
    assert "4 skipped" in report.summary("train")


def test_strict_stops_at_the_first_bad_record(tiny, processor):
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing image"):
        load_samples([bad_file(tiny)], encoder(processor, 200), strict=True)


def test_strict_command_exits_2_with_one_line(tiny, tmp_path):
    path = bad_file(tiny)
    cmd = [sys.executable, "-m", "mlx_llama3v.train", "-m", str(tiny.model), "-d", str(path),
           "-o", str(tmp_path / "out"), "--max-length", "200", "--strict", "--iters", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {path}:2: missing image"), proc.stderr
    assert not (tmp_path / "out" / "adapters.safetensors").exists()


def test_json_array_records_have_line_numbers(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"a": 1},\n\n  {"b": 2}\n]\n')
    assert [(r.line, r.data) for r in read_records(path)] == [(2, {"a": 1}), (4, {"b": 2})]
    path.write_text('[\n  {"a": 1},\n  {"b": oops}\n]\n')
    records = list(read_records(path))
    assert records[1].line == 3 and "malformed JSON" in records[1].error


# ------------------------------------------------------------------ batching
def test_batches_group_similar_lengths_and_pad_with_masks(tiny, processor):
    samples, _ = load_samples([tiny.data], encoder(processor))
    plan = BatchPlan({s.index: s.length for s in samples}, 4, seed=0)
    batches = plan.epoch(0)
    assert sorted(i for b in batches for i in b) == list(range(12))
    lengths = {s.index: s.length for s in samples}
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spread) < max(lengths.values()) - min(lengths.values())
    assert plan.batch(3) == list(plan.epoch(1)[0])  # micro-batch 3 opens epoch 1
    batch = collate([samples[i] for i in batches[0]], pad_id=0)
    assert batch.ids.shape[1] % 8 == 0
    for b, s in enumerate(batch.samples):
        assert not batch.targets[b, s.length :].any()
        np.testing.assert_array_equal(batch.ids[b, : s.length], s.ids)


def test_split_is_seeded_and_by_record(tiny, processor):
    samples, _ = load_samples([tiny.data], encoder(processor))
    train, valid = split_train_valid(samples, 0.25, seed=3)
    again, _ = split_train_valid(samples[::-1], 0.25, seed=3)
    assert {s.index for s in train} == {s.index for s in again}
    assert len(valid) >= 1 and len(train) + len(valid) == 12

"""Training-data readers at size: linear time, every format, positions of bad records."""

import json
import time

import numpy as np
import pytest

from mlx_llama3v.train.data import DataError, load_samples, read_records, to_messages
from mlx_llama3v.train.readers import ImageBytes, ReaderError, check_source
from test_train_data import encoder, processor, tiny  # noqa: F401  (fixtures)
from test_train_support import llava


def llava_array(path, n: int):
    """A LLaVA-Pretrain-like JSON array: one record per few lines, as the real file is indented."""
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(n):
            rec = {
                "id": f"{i:09d}",
                "image": f"{i % 1000:05d}/{i:09d}.jpg",
                "conversations": [
                    {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                    {"from": "gpt", "value": f"a photo of object number {i} on a white table"},
                ],
            }
            f.write(json.dumps(rec, indent=1) + (",\n" if i < n - 1 else "\n"))
        f.write("]\n")
    return path


def read_seconds(path) -> float:
    start = time.perf_counter()
    count = sum(1 for r in read_records(path) if r.error is None)
    seconds = time.perf_counter() - start
    return seconds, count


def test_reading_a_json_array_is_linear(tmp_path):
    small, large = llava_array(tmp_path / "4k.json", 4000), llava_array(tmp_path / "40k.json", 40000)
    read_seconds(small)  # warm up
    t_small, n_small = min(read_seconds(small) for _ in range(2))
    t_large, n_large = read_seconds(large)
    assert (n_small, n_large) == (4000, 40000)
    # a reader that rescans the file per record takes about 100x here
    assert t_large < 20 * t_small, (t_small, t_large)


def test_json_array_positions_across_refills(tmp_path, monkeypatch):
    import mlx_llama3v.train.readers as readers

    monkeypatch.setattr(readers, "BLOCK", 7)  # records and numbers straddle every refill
    path = tmp_path / "a.json"
    path.write_text('\ufeff[\n  {"a": 1},\n\n  {"b": 22222},\n 12345 ,\n{"c": "x\\ny"}]')
    got = [(r.line, r.data, r.error) for r in read_records(path)]
    assert got == [(2, {"a": 1}, None), (4, {"b": 22222}, None), (5, 12345, None), (6, {"c": "x\ny"}, None)]
    path.write_text('[\n  {"a": 1},\n  {"b": oops}\n, {"c": 3}]\n')
    records = list(read_records(path))
    assert len(records) == 2 and records[1].line == 3 and "rest of file unread" in records[1].error
    path.write_text('[\n  {"a": 1}\n  {"b": 2}]\n')
    records = list(read_records(path))
    assert records[1].line == 3 and "expected ','" in records[1].error
    path.write_text('[\n  {"a": 1},\n  {"b": "unterminated\n')
    assert "malformed JSON" in list(read_records(path))[1].error


def test_jsonl_lines_and_bad_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b": \n{"c": "\xff"}\n{"d": 4}')
    got = [(r.line, r.data, bool(r.error)) for r in read_records(path)]
    assert got == [(1, {"a": 1}, False), (3, None, True), (4, None, True), (5, {"d": 4}, False)]


# ------------------------------------------------------------------ MiniCPM-V's format
def test_minicpm_v_format_single_and_named_images(tiny, processor):  # noqa: F811
    one = {
        "id": "0",
        "image": "img/0.png",
        "conversations": [
            {"role": "user", "content": "<image>\nWhat is in this image?"},
            {"role": "assistant", "content": "A house."},
        ],
    }
    two = {
        "id": "1",
        "image": {"<image_00>": "img/0.png", "<image_01>": "img/1.png"},
        "conversations": [
            {"role": "user", "content": "Compare <image_01> with\n<image_00>\nplease."},
            {"role": "assistant", "content": "The same."},
        ],
    }
    m = to_messages(two, tiny.root)
    assert [p["type"] for p in m[0]["content"]] == ["text", "image", "text", "image", "text"]
    assert m[0]["content"][1]["image"].endswith("1.png") and m[0]["content"][3]["image"].endswith("0.png")
    path = tiny.root / "minicpm.json"
    path.write_text(json.dumps([one, two]))
    samples, report = load_samples([path], encoder(processor))
    assert report.kept == 2 and report.num_skipped == 0
    assert [len(s.images) for s in samples] == [1, 2]
    assert samples[1].images[0].endswith("1.png")
    # the same conversation in LLaVA's spelling gives the same tokens
    llava_one = llava(0, answer="A house.")
    same, _ = encoder(processor).encode(to_messages(llava_one, tiny.root), "x")
    np.testing.assert_array_equal(samples[0].ids, same.ids)
    unknown = dict(two, image={"<image_00>": "img/0.png"})  # <image_01> is then plain text
    assert len(to_messages(unknown, tiny.root)[0]["content"]) == 3


# ------------------------------------------------------------------ datasets
datasets = pytest.importorskip("datasets")


def dataset_rows(tiny, kind: str):  # noqa: F811
    rows = []
    for i in range(4):
        path = tiny.root / f"img/{i}.png"
        image = {"bytes": path.read_bytes(), "path": None} if kind == "bytes" else str(path)
        rows.append(
            {
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in this image?"},
                    {"from": "gpt", "value": f"Answer {i}."},
                ],
            }
        )
    return rows


def reference_ids(tiny, processor):  # noqa: F811
    records = [dict(r, image=f"img/{i}.png") for i, r in enumerate(dataset_rows(tiny, "path"))]
    path = tiny.root / "ref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    samples, _ = load_samples([path], encoder(processor))
    return [s.ids for s in samples]


def test_saved_dataset_with_image_feature_and_parquet(tiny, processor, tmp_path):  # noqa: F811
    want = reference_ids(tiny, processor)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        }
    )
    rows = dataset_rows(tiny, "bytes")
    ds = datasets.Dataset.from_list(rows, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    samples, report = load_samples([tmp_path / "saved"], encoder(processor))
    assert report.kept == 4
    for s, ids in zip(samples, want):
        np.testing.assert_array_equal(s.ids, ids)
        assert isinstance(s.images[0], ImageBytes) and "saved[" in s.images[0].name
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    assert load_samples([tmp_path / "dict"], encoder(processor))[1].kept == 4
    # parquet with raw bytes structs, and with paths
    ds.to_parquet(str(tmp_path / "bytes.parquet"))
    plain = datasets.Dataset.from_list(dataset_rows(tiny, "path"))
    plain.to_parquet(str(tmp_path / "paths.parquet"))
    for name in ("bytes.parquet", "paths.parquet"):
        samples, report = load_samples([tmp_path / name], encoder(processor))
        assert report.kept == 4, name
        for s, ids in zip(samples, want):
            np.testing.assert_array_equal(s.ids, ids)


def test_dataset_bad_rows_are_reported_by_row(tiny, processor, tmp_path):  # noqa: F811
    rows = dataset_rows(tiny, "path")
    rows[2]["image"] = str(tiny.root / "img/missing.png")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    lines = []
    samples, report = load_samples([tmp_path / "d.parquet"], encoder(processor), log=lines.append)
    assert report.kept == 3 and lines == [
        f"skipped {tmp_path / 'd.parquet'}[2]: missing image {tiny.root / 'img/missing.png'}"
    ]
    with pytest.raises(DataError, match=r"d\.parquet\[2\]: missing image"):
        load_samples([tmp_path / "d.parquet"], encoder(processor), strict=True)


def test_hub_ids_go_through_load_dataset(tiny, processor, tmp_path, monkeypatch):  # noqa: F811
    ds = datasets.Dataset.from_list(dataset_rows(tiny, "path"))
    seen = {}

    def fake_load(name, split=None, streaming=False):
        seen.update(name=name, split=split, streaming=streaming)
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    samples, report = load_samples(["hf:someone/llava-mix:validation"], encoder(processor),
                                   image_root=tiny.root)
    assert report.kept == 4 and seen == {"name": "someone/llava-mix", "split": "validation",
                                         "streaming": True}
    assert samples[0].where == "hf:someone/llava-mix:validation[0]"


def test_sources_that_cannot_be_read(tmp_path):
    with pytest.raises(ReaderError, match="no such data file"):
        check_source(tmp_path / "none.json")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ReaderError, match="not a saved Hugging Face dataset"):
        check_source(tmp_path / "folder")
    with pytest.raises(ReaderError, match="expected hf:"):
        check_source("hf:")


def test_reading_shows_progress_with_rate_and_eta(tiny, processor, capsys):  # noqa: F811
    path = tiny.root / "many.jsonl"
    path.write_text("".join(json.dumps(llava(i)) + "\n" for i in range(20)))
    samples, _ = load_samples([path], encoder(processor), progress=True)
    err = capsys.readouterr().err
    assert len(samples) == 20
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("reading many.jsonl: 100%") and "<00:00" in last and "B/s" in last, last

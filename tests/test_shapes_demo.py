"""The shapes demo (``examples/shapes``): the whole recipe, and the committed model.

- A shortened run of ``build.py --quick`` (draw data, random model, ``embed``,
  ``train --stage sft --fine-tune-type full --train-projector``, ``fuse``, evaluate)
  must answer held-out pictures well above a picture-blind model.
- The committed model in ``examples/shapes/model`` must answer the committed held-out
  samples, and the README's first command must print the right answer.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from collections import Counter, defaultdict
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "examples" / "shapes"
MODEL, SAMPLES = SHAPES / "model", SHAPES / "samples"


def blind_accuracy(data: Path) -> dict:
    """Per question kind, the exact-match accuracy of a model that understands every
    question but never looks at the picture: for each kind of question about each kind
    of shape (however phrased), the most common answer, counted on the evaluation set
    itself (an upper bound on what ignoring the picture can score)."""
    answers, right, total = defaultdict(Counter), Counter(), Counter()
    for line in open(data):
        r = json.loads(line)
        answers[r["kind"], r["about"]][r["conversations"][1]["value"]] += 1
    for (kind, _), counts in answers.items():
        right[kind] += counts.most_common(1)[0][1]
        total[kind] += sum(counts.values())
    per_kind = {k: right[k] / total[k] for k in total}
    per_kind["all"] = sum(right.values()) / sum(total.values())
    return per_kind


# The short run fits in 5 minutes (one phrasing per kind, 400 steps of 8), too short for
# many word-for-word answers (measured: colour 0.50 against 0.38 picture-blind, the other
# kinds below it); what it must show is that the answers come from the picture: the test
# answers' likelihood with the right picture against another picture's
# (``build.picture_gain``), exactly equal for a model that ignores the picture. Measured:
# mean answer NLL 0.191 with the right picture, 0.245 with another (1.28x).
QUICK_GAIN = 1.1


@pytest.mark.slow
def test_short_pipeline_learns_to_read_pictures(tmp_path):
    """The short run (``build.py --quick``: under 5 minutes on 2 CPU cores: tower
    pretraining, data, embed, a few hundred steps of training, fuse, evaluation) must
    find the answers about held-out pictures likelier with the right picture than with
    another one, by ``QUICK_GAIN``: a picture-blind model scores both
    the same and cannot pass."""
    out, work = tmp_path / "model", tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable,
            str(SHAPES / "build.py"),
            "--quick",
            "--out",
            str(out),
            "--work",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    blind = blind_accuracy(work / "test" / "data.jsonl")
    print(
        f"short run: held-out accuracy {report['per_kind']} (all {report['accuracy']:.3f}); "
        f"picture-blind {blind}"
    )
    nll = report["answer_nll"]
    print(
        f"short run: answer NLL with the right picture {nll['right']:.4f}, another {nll['other']:.4f}"
    )
    assert nll["other"] >= QUICK_GAIN * nll["right"], (nll, report, blind)


def _sample_questions():
    answers = json.loads((SAMPLES / "answers.json").read_text())
    return [(SAMPLES / a["image"], qa["q"], qa["a"]) for a in answers for qa in a["qa"]]


README_IMAGE, README_QUESTION = "1.png", "What colour is the triangle?"
README_COMMAND = (
    "mlx_llama3v.generate --model examples/shapes/model --image examples/shapes/samples/"
    f'{README_IMAGE} --prompt "{README_QUESTION}"'
)

# Questions as a newcomer types them about the committed samples (none of these strings
# is a training phrasing: checked below), with the right answers read off the pictures.
NEWCOMER = [
    ("4.png", "Describe the picture in this image.", "a red square and a yellow triangle"),
    ("4.png", "how many objects are in this image", "two"),
    ("0.png", "Which color is the square in this picture?", "there are two squares"),
    ("3.png", "In which corner of the picture is the circle?", "there are three circles"),
    ("2.png", "Does this picture show a triangle?", "no"),
    ("5.png", "What is the weather like today?", None),
]


def _shapes(name: str):
    """``examples/shapes/<name>.py`` as a module (by path: ``build`` is also a PyPI name)."""
    spec = importlib.util.spec_from_file_location(f"shapes_{name}", SHAPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# Issue 18's goal: 0.9 for every kind of question, in phrasings held out from training.
COMMITTED_FLOORS = dict.fromkeys(("colour", "shapes", "exists", "count", "place", "unknown"), 0.9)


def test_committed_model_reads_new_pictures(tmp_path):
    """Pictures drawn now (a seed the build never used), asked in the phrasings held out
    from training: every kind of question at its floor (above)."""
    data = _shapes("dataset").make_split(
        tmp_path, 60, seed=987654, conversations=False, phrasing="held_out"
    )
    report, blind = _shapes("build").evaluate(MODEL, data), blind_accuracy(data)
    print(
        f"committed model on new pictures: {report['per_kind']} (all {report['accuracy']:.3f}); "
        f"picture-blind {blind}"
    )
    assert set(report["per_kind"]) == set(COMMITTED_FLOORS), report
    for kind, floor in COMMITTED_FLOORS.items():
        assert report["per_kind"][kind] >= floor, (kind, report, blind)


def _answers(questions):
    from mlx_llama3v import generate, load

    model, processor = load(str(MODEL))
    for image, question, answer in questions:
        out = generate(model, processor, question, images=[str(image)], max_tokens=48, temp=0.0)
        yield question, out.text.strip(), answer


def test_committed_model_answers_the_samples():
    """The committed samples (held-out phrasings): at least the 34 of 36 answers the model
    got right when it was committed."""
    right = sum(got == want for _, got, want in _answers(_sample_questions()))
    assert right >= 34, f"{right} of {len(_sample_questions())} sample answers right"


def test_committed_model_answers_a_newcomer():
    """Questions phrased the way a newcomer types them, about the committed samples."""
    dataset = _shapes("dataset")
    trained = {
        p.lower().rstrip("?.!")
        for kind in dataset.QUESTION_KINDS
        for k in dataset.KINDS
        for p in dataset.phrasings(kind, "train", k)
    }
    assert not [q for _, q, _ in NEWCOMER if q.lower().rstrip("?.!") in trained]
    unknown = dataset.UNKNOWN
    questions = [(SAMPLES / image, q, a or unknown) for image, q, a in NEWCOMER]
    wrong = [(q, got, want) for q, got, want in _answers(questions) if got != want]
    assert not wrong, wrong


def test_readme_first_command_prints_the_right_answer():
    readme = (REPO / "README.md").read_text()
    line = next(l for l in readme.splitlines() if l.startswith("pip install -e . && "))
    assert line.split(" && ", 1)[1] == README_COMMAND, (
        "README's first command changed: update this test"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_llama3v.generate",
            "--model",
            str(MODEL),
            "--image",
            str(SAMPLES / README_IMAGE),
            "--prompt",
            README_QUESTION,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    sample = next(
        a for a in json.loads((SAMPLES / "answers.json").read_text()) if a["image"] == README_IMAGE
    )
    dataset = _shapes("dataset")
    shapes = [dataset.Shape(**s) for s in sample["shapes"]]
    expected = dataset.answers(shapes, "colour", "triangle")  # the README's question
    assert proc.stdout.strip() == expected

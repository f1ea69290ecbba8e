"""A synthetic shapes dataset: pictures drawn with pillow and LLaVA-style Q&A about them.

Each picture holds one to three shapes (circle, square, triangle) in distinct
quadrants, in one of four colours and two sizes, on a varied light background.

Questions come in six kinds, each asked in several phrasings: what is there (the full
description), how many, which colour, where, whether a kind is present, and questions
the model cannot know (answered honestly with ``UNKNOWN``). Every kind has phrasings
used in training and phrasings held out from it (``phrasing="held_out"``), so that the
evaluation measures the questions as a newcomer types them, not one memorised string.
Asked about a kind that is not in the picture, or that is there more than once, the
colour and place questions get the honest answer (``there is no circle``,
``there are two squares``). Answers are short and exact, so accuracy is exact match.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
PLACES = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three")
QUESTION_KINDS = ("shapes", "count", "colour", "place", "exists", "unknown")
UNKNOWN = "I can only tell which shapes there are, their colours, how many and where."

# Phrasings per question kind: ("train", "held_out"), written as templates. ``{k}`` is
# the shape asked about, ``{o}`` one of PICTURE's words and ``{s}`` one of SUFFIXES (none,
# "in the picture", "here", ...). Every kind is asked with every suffix, so that "in this
# image" says nothing about which kind of question it ends (measured: with the suffixes
# spread unevenly, "Count the objects in this image." was answered with a description,
# because "in this image" had ended description questions). Held-out templates are never
# trained on, in any filling; they recombine the training phrasings' words, as people
# rephrase.
PICTURE = ("the picture", "this picture", "the image", "this image")
SUFFIXES = ("", " here") + tuple(f" in {o}" for o in PICTURE)

TEMPLATES: Dict[str, Dict[str, Sequence[str]]] = {
    "shapes": {
        "train": (
            "What shapes do you see{s}?",
            "What do you see{s}?",
            "Describe {o}.",
            "What is in {o}?",
            "Tell me what you see{s}.",
            "What shapes are there{s}?",
            "Which shapes are there{s}?",
            "List the shapes{s}.",
            "Describe the shapes{s}.",
        ),
        "held_out": (
            "Tell me what is in {o}.",
            "What shapes can you see{s}?",
            "Describe what you see{s}.",
        ),
    },
    "count": {
        "train": (
            "How many shapes are there{s}?",
            "How many objects are there{s}?",
            "How many shapes do you see{s}?",
            "How many shapes are in {o}?",
            "Count the shapes{s}.",
            "What is the number of shapes{s}?",
            "How many things are there{s}?",
        ),
        "held_out": (
            "How many objects do you see{s}?",
            "How many objects are in {o}?",
            "Count the objects{s}.",
        ),
    },
    "colour": {
        "train": (
            "What colour is the {k}{s}?",
            "What color is the {k}{s}?",
            "Which colour is the {k}{s}?",
            "What is the colour of the {k}{s}?",
            "Tell me the color of the {k}{s}.",
            "What colour does the {k} have{s}?",
        ),
        "held_out": (
            "Which color is the {k}{s}?",
            "What is the color of the {k}{s}?",
            "Tell me the colour of the {k}{s}.",
        ),
    },
    "place": {
        "train": (
            "Where is the {k}{s}?",
            "In which corner is the {k}{s}?",
            "Which corner is the {k} in?",
            "Where is the {k} located{s}?",
            "In which part of {o} is the {k}?",
            "Where can you see the {k}{s}?",
        ),
        "held_out": (
            "In which corner of {o} is the {k}?",
            "Where do you see the {k}{s}?",
            "Which corner is the {k} in, in {o}?",
        ),
    },
    "exists": {
        "train": (
            "Is there a {k}{s}?",
            "Do you see a {k}{s}?",
            "Can you see a {k}{s}?",
            "Is there any {k}{s}?",
            "Does {o} have a {k}?",
        ),
        "held_out": (
            "Do you see any {k}{s}?",
            "Does {o} show a {k}?",
        ),
    },
    "unknown": {
        "train": (
            "What is the weather like{s}?",
            "Who made {o}?",
            "What time is it{s}?",
            "Is this a photo of a cat?",
            "What is the capital of France?",
            "Tell me a story.",
            "What is your name?",
            "Why is the sky blue?",
            "How old is the circle?",
            "What does the square smell like?",
            "Is it raining{s}?",
            "What is the dog doing{s}?",
            "Hello!",
            "Who are you?",
            "How are you today?",
            "What animal is this?",
            "Which animal is larger, the elephant or the mouse?",
            "How many people are in the photo?",
            # The attribute questions about things that are not shapes: the model has to
            # answer from the noun, not from the question's frame.
            "What colour is the {x}{s}?",
            "What color is the {x}?",
            "Where is the {x}{s}?",
            "How many {x}s are there{s}?",
            "Is the {x} big{s}?",
        ),
        "held_out": (
            "Who drew {o}?",
            "What is the weather in {o}?",
            "Tell me a story about {o}.",
            "How old are you?",
            "Where is the dog?",
            "What colour is the sky?",
            "How many cars are in {o}?",
        ),
    },
}
# Things that are not shapes, for the unknown templates (never "dog" or "sky": the
# held-out questions ask about those).
OTHER_THINGS = ("car", "house", "cat", "tree", "sun", "bird", "boat", "flower", "person", "table")


def _fill(template: str, k: str) -> List[str]:
    """Every phrasing a template stands for (``{k}`` filled with the shape ``k``)."""
    out = []
    for s in SUFFIXES if "{s}" in template else ("",):
        for o in PICTURE if "{o}" in template else ("",):
            for x in OTHER_THINGS if "{x}" in template else ("",):
                out.append(template.format(k=k, s=s, o=o, x=x))
    return out


def phrasings(kind: str, split: str = "train", k: str = "{k}") -> List[str]:
    """All phrasings of a question kind in a split (``{k}`` left in unless given)."""
    return [p for t in TEMPLATES[kind][split] for p in _fill(t, k)]


def phrase(kind: str, split: str, k: str, rng: random.Random) -> str:
    """One phrasing: a template drawn evenly, then one of its fillings (so a template
    with many fillings is not asked more often). ``split="one"``: the first training
    phrasing only (the short build's, which has no time to learn many)."""
    if split == "one":
        return _fill(TEMPLATES[kind]["train"][0], k)[0]
    return rng.choice(_fill(rng.choice(TEMPLATES[kind][split]), k))


@dataclass
class Shape:
    kind: str
    colour: str
    place: int  # index into PLACES
    large: bool

    def words(self) -> str:
        return f"a {self.colour} {self.kind}"


def random_shapes(rng: random.Random) -> List[Shape]:
    places = rng.sample(range(4), rng.randint(1, 3))
    return [
        Shape(rng.choice(KINDS), rng.choice(list(COLOURS)), p, rng.random() < 0.5)
        for p in sorted(places)
    ]


def draw(shapes: Sequence[Shape], rng: random.Random, size: int = 64) -> Image.Image:
    bg = tuple(rng.randint(150, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    half = size // 2
    for s in shapes:
        r = (0.42 if s.large else 0.26) * half
        cx = (s.place % 2) * half + half / 2 + rng.uniform(-0.08, 0.08) * half
        cy = (s.place // 2) * half + half / 2 + rng.uniform(-0.08, 0.08) * half
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            d.ellipse(box, fill=fill)
        elif s.kind == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def drawn(n: int, seed: int, size: int = 64) -> Iterator[Tuple[List[Shape], np.ndarray]]:
    """n random pictures as (shapes, uint8 pixels, channels last): for the tower's
    pretraining and the probes, which need the labels beside the pixels."""
    rng = random.Random(seed)
    for _ in range(n):
        shapes = random_shapes(rng)
        yield shapes, np.asarray(draw(shapes, rng, size), dtype=np.uint8)


def describe(shapes: Sequence[Shape]) -> str:
    """The full description, in reading order (top left first)."""
    words = [s.words() for s in shapes]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _not_one(kind: str, n: int) -> str:
    return f"there is no {kind}" if n == 0 else f"there are {NUMBERS[n]} {kind}s"


def answers(shapes: Sequence[Shape], kind: str, about: str = "") -> str:
    """The right answer to a question of ``kind`` (about the shape kind ``about``)."""
    if kind == "shapes":
        return describe(shapes)
    if kind == "count":
        return NUMBERS[len(shapes)]
    if kind == "unknown":
        return UNKNOWN
    found = [s for s in shapes if s.kind == about]
    if kind == "exists":
        return "yes" if found else "no"
    if len(found) != 1:
        return _not_one(about, len(found))
    return found[0].colour if kind == "colour" else PLACES[found[0].place]


def questions(
    shapes: Sequence[Shape], rng: random.Random, phrasing: str = "train", unknown: float = 0.5
) -> List[Dict[str, str]]:
    """One question of each kind, in a phrasing of ``TEMPLATES[kind][phrasing]``.

    Colour and place ask about a kind in the picture three times in four, else about
    any kind (which may be absent or doubled: the honest answers); an unknown question
    is added with probability ``unknown``."""
    present = sorted({s.kind for s in shapes})
    qa = []
    for kind in QUESTION_KINDS:
        if kind == "unknown" and rng.random() >= unknown:
            continue
        about = ""
        if kind in ("colour", "place"):
            about = rng.choice(present) if rng.random() < 0.75 else rng.choice(KINDS)
        elif kind == "exists":
            about = rng.choice(KINDS)
        text = phrase(kind, phrasing, about, rng)
        qa.append({"kind": kind, "about": about, "q": text, "a": answers(shapes, kind, about)})
    return qa


def _typed(question: str, rng: random.Random) -> str:
    """How people type: sometimes lower case, sometimes without the final mark."""
    if rng.random() < 0.2:
        question = question[0].lower() + question[1:]
    if rng.random() < 0.2 and question[-1] in "?.!":
        question = question[:-1]
    return question


def make_split(
    out: Path,
    n: int,
    seed: int,
    size: int = 64,
    conversations: bool = True,
    phrasing: str = "train",
) -> Path:
    """Draw n pictures into out/images and write out/data.jsonl (LLaVA format).

    Training data (``conversations``): each picture is one conversation asking all of
    its questions in a random order, so the picture is encoded once for six answers.
    Measured against one record per question (the same pictures and features): after
    1500 steps of 32 single questions the model still answered blind (held-out colour
    0.16, count 0.21), after 1000 steps of 16 conversations it read colours (0.53) and
    began to count. The order is random because with the full description always last
    the model learned to piece it together from the earlier answers instead of the
    picture.
    Evaluation data (``conversations=False``): one record per question, carrying its
    ``kind`` so each question type is scored.
    """
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "data.jsonl", "w") as f:
        for i in range(n):
            shapes = random_shapes(rng)
            name = f"images/{i:05d}.png"
            draw(shapes, rng, size).save(out / name)
            qa = questions(shapes, rng, phrasing)
            if conversations:
                for q in qa:
                    q["q"] = _typed(q["q"], rng)
                rng.shuffle(qa)
                records = [{"image": name, "conversations": _turns(qa)}]
            else:
                records = [
                    {
                        "image": name,
                        "kind": q["kind"],
                        "about": q["about"],
                        "conversations": _turns([q]),
                    }
                    for q in qa
                ]
            for record in records:
                f.write(json.dumps(record) + "\n")
    return out / "data.jsonl"


def _turns(qa: Sequence[Dict[str, str]]) -> List[Dict[str, str]]:
    turns = []
    for k, q in enumerate(qa):
        turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q["q"]})
        turns.append({"from": "gpt", "value": q["a"]})
    return turns

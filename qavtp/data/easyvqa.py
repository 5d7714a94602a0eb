"""easy-VQA, read from the installed ``easy-vqa`` package (no network)."""

from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

from datasets import Dataset, Features, Image, Sequence, Value

from qavtp.data.prompts import vqa_text
from qavtp.errors import QavtpError

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")

FEATURES = Features(
    {
        "image": Image(),
        "question": Value("string"),
        "prompt": Value("string"),
        "answer": Value("string"),
        "choices": Sequence(Value("string")),
        "qtype": Value("string"),
        "image_id": Value("int64"),
    }
)

_NEGATION = re.compile(r"\b(not|no)\b")


def data_root() -> Path:
    # find_spec locates the package without importing it.
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise QavtpError("easy-VQA is not installed: pip install easy-vqa")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def question_type(answer: str) -> str:
    if answer in YES_NO:
        return "yes/no"
    if answer in COLORS:
        return "color"
    if answer in SHAPES:
        return "shape"
    raise QavtpError(f"easy-VQA answer {answer!r} is not one of the 13 known answers")


CHOICES = {"yes/no": list(YES_NO), "color": list(COLORS), "shape": list(SHAPES)}


@lru_cache(maxsize=4)
def _questions(split: str) -> tuple[tuple[str, str, int], ...]:
    path = data_root() / split / "questions.json"
    if not path.is_file():
        raise QavtpError(f"easy-VQA split {split!r} not found at {path}")
    return tuple((q, a, int(i)) for q, a, i in json.loads(path.read_text()))


def image_path(split: str, image_id: int) -> str:
    return str(data_root() / split / "images" / f"{image_id}.png")


def load_easyvqa(split: str = "test") -> Dataset:
    """All questions of one split as a ``datasets.Dataset`` (images decoded lazily)."""
    if split not in ("train", "test"):
        raise QavtpError(f"easy-VQA split must be 'train' or 'test', got {split!r}")
    rows = {k: [] for k in FEATURES}
    for q, a, i in _questions(split):
        t = question_type(a)
        rows["image"].append(image_path(split, i))
        rows["question"].append(q)
        rows["prompt"].append(vqa_text(q))
        rows["answer"].append(a)
        rows["choices"].append(CHOICES[t])
        rows["qtype"].append(t)
        rows["image_id"].append(i)
    return Dataset.from_dict(rows, features=FEATURES)


def image_labels(split: str = "train") -> dict[int, dict[str, str]]:
    """Each image's shape and colour, as far as its questions reveal them.

    easy-VQA images hold one shape of one colour; open questions name them directly, and a
    'yes' to a positive question (or a 'no' to a negated one) names them too.
    """
    labels: dict[int, dict[str, str]] = {}
    for q, a, i in _questions(split):
        d = labels.setdefault(i, {})
        if a in SHAPES:
            d["shape"] = a
        elif a in COLORS:
            d["color"] = a
        else:
            present = (a == "yes") != bool(_NEGATION.search(q))
            if present:
                for w in re.findall(r"[a-z]+", q):
                    if w in COLORS:
                        d["color"] = w
                    elif w in SHAPES:
                        d["shape"] = w
    return labels

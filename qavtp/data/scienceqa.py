"""ScienceQA, read from a local copy in the Hugging Face schema (derek-thomas/ScienceQA); no network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset

from qavtp.data.easyvqa import FEATURES
from qavtp.data.generic import data_dir, find_split_files, read_split, require_columns, string_list, to_image
from qavtp.data.prompts import LETTERS, multiple_choice_text
from qavtp.errors import QavtpError

REQUIRED = ("image", "question", "choices", "answer")
OPTIONAL = {"hint": "", "subject": "unknown"}
SUFFIXES = (".parquet", ".jsonl", ".json")


def _answer_index(value: Any, n_choices: int, where: str) -> int:
    # JSON copies may hold the index as a string; bool is an int subclass but never an index.
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise QavtpError(f"{where}: answer must be a choice index, got {value!r}")
    if not 0 <= value < n_choices:
        raise QavtpError(f"{where}: answer index {value} is out of range for {n_choices} choices")
    return value


def load_scienceqa(path: str | Path, split: str = "test", keep_no_image: bool = False) -> Dataset:
    """One ScienceQA split as a ``datasets.Dataset`` with qavtp's ``FEATURES``.

    Choices are scored as letters ("A", "B", ...) against the LLaVA-1.5 multiple-choice
    prompt; ``qtype`` is the subject and ``image_id`` the row's index in the split.
    Text-only questions are skipped unless ``keep_no_image`` (their image is then None).
    """
    files = find_split_files(path, split, SUFFIXES, what="ScienceQA")
    raw = read_split(files, data_dir(path), (*REQUIRED, *OPTIONAL))
    what = f"ScienceQA {split!r} split"
    require_columns(raw, REQUIRED, what)
    if raw.num_rows == 0:
        raise QavtpError(f"{what} in {raw.base} has no rows")
    col = raw.columns
    hints = col.get("hint", [None] * raw.num_rows)
    subjects = col.get("subject", [None] * raw.num_rows)

    rows: dict[str, list[Any]] = {k: [] for k in FEATURES}
    for i in range(raw.num_rows):
        where = f"{what} row {i}"
        image = to_image(col["image"][i], raw.base, where)
        if image is None and not keep_no_image:
            continue
        question = col["question"][i]
        if not isinstance(question, str):
            raise QavtpError(f"{where} has no question")
        choices = string_list(col["choices"][i], where, "choices")
        if len(choices) > len(LETTERS):
            raise QavtpError(f"{where} has {len(choices)} choices; at most {len(LETTERS)} can be lettered")
        answer = _answer_index(col["answer"][i], len(choices), where)
        hint = hints[i] or OPTIONAL["hint"]
        rows["image"].append(image)
        rows["question"].append(question)
        rows["prompt"].append(multiple_choice_text(question, choices, hint or None))
        rows["answer"].append(LETTERS[answer])
        rows["choices"].append(list(LETTERS[: len(choices)]))
        rows["qtype"].append(subjects[i] or OPTIONAL["subject"])
        rows["image_id"].append(i)
    if not rows["image_id"]:
        raise QavtpError(
            f"none of the {raw.num_rows} rows of {what} in {raw.base} has an image; "
            "pass keep_no_image=True to keep text-only questions"
        )
    return Dataset.from_dict(rows, features=FEATURES)

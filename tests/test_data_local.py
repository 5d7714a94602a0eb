"""Local ScienceQA and generic VQA loaders, on tiny fixtures built in tmp_path."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from qavtp.data.easyvqa import FEATURES
from qavtp.data.generic import find_split_files, load_local
from qavtp.data.prompts import LETTER_ANSWER, vqa_text
from qavtp.data.scienceqa import load_scienceqa
from qavtp.errors import QavtpError

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(mode: str, color: Any, size: tuple[int, int] = (4, 3)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


RGB_PNG = png("RGB", (10, 200, 30))
GRAY_PNG = png("L", 77)
RGBA_PNG = png("RGBA", (255, 0, 0, 0))  # fully transparent: must come out white, not red or black


def sqa_rows() -> list[dict[str, Any]]:
    """Four ScienceQA rows in the hub schema; row 2 is text-only."""
    return [
        {
            "image": {"bytes": RGB_PNG, "path": "image.png"},
            "question": "Which color is shown?",
            "choices": ["red", "green", "blue"],
            "answer": 1,
            "hint": "Look at the picture.",
            "subject": "natural science",
            "lecture": "Colors are ...",
        },
        {
            "image": {"bytes": GRAY_PNG, "path": None},
            "question": "Is it gray?",
            "choices": ["yes", "no"],
            "answer": 0,
            "hint": "",
            "subject": "natural science",
            "lecture": "",
        },
        {
            "image": None,
            "question": "Which word is a noun?",
            "choices": ["run", "dog", "quickly", "blue"],
            "answer": 1,
            "hint": "",
            "subject": "language science",
            "lecture": "",
        },
        {
            "image": {"bytes": RGBA_PNG, "path": None},
            "question": "Which map shows Ohio?",
            "choices": ["map 1", "map 2"],
            "answer": 1,
            "hint": "The maps are drawn to scale.",
            "subject": "social science",
            "lecture": "",
        },
    ]


def write_parquet(file: Path, rows: list[dict[str, Any]]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    schema = {"image": IMAGE_TYPE, "choices": pa.list_(pa.string())}
    names = list(dict.fromkeys(k for r in rows for k in r))
    arrays = {k: pa.array([r.get(k) for r in rows], type=schema.get(k)) for k in names}
    pq.write_table(pa.table(arrays), file)


def write_jsonl(file: Path, rows: list[dict[str, Any]]) -> None:
    def encode(r: dict[str, Any]) -> dict[str, Any]:
        img = r.get("image")
        if img is not None:
            img = {"bytes": base64.b64encode(img["bytes"]).decode(), "path": img["path"]}
        return {**r, "image": img}

    file.write_text("".join(json.dumps(encode(r)) + "\n" for r in rows))


@pytest.fixture
def sqa_parquet(tmp_path: Path) -> Path:
    write_parquet(tmp_path / "test.parquet", sqa_rows())
    return tmp_path


def check_scienceqa(ds) -> None:
    assert ds.features == FEATURES
    assert len(ds) == 3
    assert ds["image_id"] == [0, 1, 3]
    assert ds["choices"] == [["A", "B", "C"], ["A", "B"], ["A", "B"]]
    assert ds["answer"] == ["B", "A", "B"]
    assert ds["qtype"] == ["natural science", "natural science", "social science"]
    first = ds[0]["prompt"]
    assert first.splitlines() == [
        "Context: Look at the picture.",
        "Which color is shown?",
        "A. red",
        "B. green",
        "C. blue",
        LETTER_ANSWER,
    ]
    assert "Context:" not in ds[1]["prompt"]  # an empty hint adds no context line
    assert "A. yes\nB. no" in ds[1]["prompt"]
    assert "The maps are drawn to scale." in ds[2]["prompt"]
    images = ds["image"]
    assert all(im.mode == "RGB" for im in images)
    assert images[0].getpixel((0, 0)) == (10, 200, 30)
    assert images[1].getpixel((0, 0)) == (77, 77, 77)
    assert images[2].getpixel((0, 0)) == (255, 255, 255)


def test_scienceqa_parquet(sqa_parquet: Path) -> None:
    check_scienceqa(load_scienceqa(sqa_parquet))


def test_scienceqa_jsonl_and_json(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "test.jsonl", sqa_rows())
    check_scienceqa(load_scienceqa(tmp_path))
    # A .json file holding one JSON array of records.
    other = tmp_path / "array"
    other.mkdir()
    records = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    (other / "test.json").write_text(json.dumps(records))
    check_scienceqa(load_scienceqa(other))


def test_scienceqa_keep_no_image(sqa_parquet: Path) -> None:
    ds = load_scienceqa(sqa_parquet, keep_no_image=True)
    assert len(ds) == 4
    assert ds["image_id"] == [0, 1, 2, 3]
    row = ds[2]
    assert row["image"] is None
    assert row["choices"] == ["A", "B", "C", "D"]
    assert row["answer"] == "B"
    assert "D. blue" in row["prompt"] and row["prompt"].endswith(LETTER_ANSWER)
    assert row["qtype"] == "language science"


def test_scienceqa_sharded_hub_layout_keeps_row_order(tmp_path: Path) -> None:
    rows = sqa_rows()
    write_parquet(tmp_path / "data" / "test-00001-of-00002.parquet", rows[2:])
    write_parquet(tmp_path / "data" / "test-00000-of-00002.parquet", rows[:2])
    write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", rows[:1])
    check_scienceqa(load_scienceqa(tmp_path))
    assert len(load_scienceqa(tmp_path, split="train")) == 1


def test_scienceqa_optional_columns_default(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k not in ("hint", "subject")} for r in sqa_rows()]
    write_parquet(tmp_path / "test.parquet", rows)
    ds = load_scienceqa(tmp_path)
    assert set(ds["qtype"]) == {"unknown"}
    assert not any("Context:" in p for p in ds["prompt"])


def test_scienceqa_missing_column(tmp_path: Path) -> None:
    write_parquet(tmp_path / "test.parquet", [{k: v for k, v in r.items() if k != "choices"} for r in sqa_rows()])
    with pytest.raises(QavtpError, match=r"lacks column choices \(required: image, question, choices, answer;") as info:
        load_scienceqa(tmp_path)
    # Columns the loader does not read are still listed, so the user sees the whole file.
    assert str(info.value).endswith("present: image, question, answer, hint, subject, lecture)")


def test_scienceqa_missing_split_lists_found_files(sqa_parquet: Path) -> None:
    with pytest.raises(QavtpError, match=r"no 'validation' split .* found test\.parquet$"):
        load_scienceqa(sqa_parquet, split="validation")


def test_scienceqa_missing_path(tmp_path: Path) -> None:
    with pytest.raises(QavtpError, match="does not exist"):
        load_scienceqa(tmp_path / "nope")


def test_scienceqa_all_rows_text_only(tmp_path: Path) -> None:
    write_parquet(tmp_path / "test.parquet", [{**r, "image": None} for r in sqa_rows()])
    with pytest.raises(QavtpError, match="none of the 4 rows .* has an image; pass keep_no_image=True"):
        load_scienceqa(tmp_path)
    assert len(load_scienceqa(tmp_path, keep_no_image=True)) == 4


def test_scienceqa_answer_out_of_range_names_row(tmp_path: Path) -> None:
    rows = sqa_rows()
    rows[3]["answer"] = 2
    write_parquet(tmp_path / "test.parquet", rows)
    with pytest.raises(QavtpError, match="row 3: answer index 2 is out of range for 2 choices"):
        load_scienceqa(tmp_path)


def test_scienceqa_errors_are_one_line(tmp_path: Path) -> None:
    write_parquet(tmp_path / "train.parquet", sqa_rows())
    with pytest.raises(QavtpError) as info:
        load_scienceqa(tmp_path)
    assert "\n" not in str(info.value)


def write_images(root: Path) -> None:
    (root / "images").mkdir()
    (root / "images" / "a.png").write_bytes(RGB_PNG)
    (root / "images" / "b.png").write_bytes(GRAY_PNG)
    (root / "images" / "c.png").write_bytes(RGBA_PNG)


def test_load_local_column_map_and_image_paths(tmp_path: Path) -> None:
    write_images(tmp_path)
    records = [
        {"img": "images/a.png", "q": "What color?", "label": "green"},
        {"img": "images/b.png", "q": "What shade?", "label": "gray"},
        {"img": str(tmp_path / "images" / "c.png"), "q": "What color?", "label": "white"},
    ]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = load_local(tmp_path, columns={"img": "image", "q": "question", "label": "answer"})
    assert ds.features == FEATURES
    assert ds["answer"] == ["green", "gray", "white"]
    # Without a choices column every row is scored against all of the split's answers.
    assert ds["choices"] == [["gray", "green", "white"]] * 3
    assert ds["prompt"][0] == vqa_text("What color?")
    assert ds["prompt"][0].endswith("\nAnswer the question using a single word or phrase.")
    assert ds["qtype"] == ["all"] * 3
    assert ds["image_id"] == [0, 1, 2]
    images = ds["image"]
    assert [im.getpixel((0, 0)) for im in images] == [(10, 200, 30), (77, 77, 77), (255, 255, 255)]


def test_load_local_csv_with_choices_and_qtype(tmp_path: Path) -> None:
    write_images(tmp_path)
    with (tmp_path / "test.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "question", "answer", "options", "kind"])
        w.writerow(["images/a.png", "Color?", "green", json.dumps(["red", "green"]), "color"])
        w.writerow(["images/b.png", "Count?", "2", json.dumps(["1", "2", "3"]), "count"])
    ds = load_local(tmp_path, columns={"options": "choices", "kind": "qtype"})
    assert ds["choices"] == [["red", "green"], ["1", "2", "3"]]
    assert ds["answer"] == ["green", "2"]
    assert ds["qtype"] == ["color", "count"]


def test_load_local_hf_image_dicts_in_parquet(tmp_path: Path) -> None:
    rows = [{"image": {"bytes": GRAY_PNG, "path": None}, "question": "Shade?", "answer": "gray"}]
    write_parquet(tmp_path / "validation.parquet", rows)
    ds = load_local(tmp_path, split="validation")
    assert ds[0]["image"].mode == "RGB"
    assert ds["choices"] == [["gray"]]


def test_load_local_missing_column_lists_present(tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_text(json.dumps({"img": "x.png", "q": "?", "label": "a"}) + "\n")
    with pytest.raises(QavtpError, match=r"lacks columns image, question .*present: img, q, label"):
        load_local(tmp_path, columns={"label": "answer"})


def test_load_local_bad_column_map(tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_text(json.dumps({"img": "x.png", "q": "?", "label": "a"}) + "\n")
    with pytest.raises(QavtpError, match="column map value 'picture' is not a qavtp column"):
        load_local(tmp_path, columns={"img": "picture"})
    with pytest.raises(QavtpError, match=r"column map names 'photo', which is not a column .*present: img, q, label"):
        load_local(tmp_path, columns={"photo": "image"})


def test_load_local_answer_not_in_choices_and_missing_image_file(tmp_path: Path) -> None:
    write_images(tmp_path)
    row = {"image": "images/a.png", "question": "Color?", "answer": "blue", "choices": ["red", "green"]}
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(QavtpError, match="row 0: answer 'blue' is not one of its choices"):
        load_local(tmp_path)
    (tmp_path / "test.jsonl").write_text(json.dumps({**row, "image": "images/zzz.png", "answer": "red"}) + "\n")
    with pytest.raises(QavtpError, match=r"row 0: image file .*zzz\.png does not exist"):
        load_local(tmp_path)


def test_find_split_files_prefers_parquet(tmp_path: Path) -> None:
    write_parquet(tmp_path / "test.parquet", sqa_rows())
    write_jsonl(tmp_path / "test.jsonl", sqa_rows())
    assert find_split_files(tmp_path, "test") == [tmp_path / "test.parquet"]
    assert find_split_files(tmp_path, "test", suffixes=(".jsonl",)) == [tmp_path / "test.jsonl"]

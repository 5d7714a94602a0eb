"""Any local VQA data set in parquet, JSON Lines, JSON or CSV, read without network.

The helpers here (finding a split's files, reading them, normalising images) are shared
with the other local loaders, such as ``qavtp.data.scienceqa``.
"""

from __future__ import annotations

import base64
import binascii
import csv
import glob
import io
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from datasets import Dataset
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from qavtp.data.easyvqa import FEATURES
from qavtp.data.prompts import vqa_text
from qavtp.errors import QavtpError

# In priority order: the first pattern with a match wins, so a directory holding both
# test.parquet and test.json is read once, not twice.
SPLIT_PATTERNS = (
    "{split}.parquet",
    "{split}-*.parquet",
    "data/{split}.parquet",
    "data/{split}-*.parquet",
    "{split}.jsonl",
    "{split}.json",
    "{split}.csv",
)
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")

QAVTP_COLUMNS = ("image", "question", "answer", "choices", "qtype")
REQUIRED = ("image", "question", "answer")
DEFAULT_QTYPE = "all"

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def find_split_files(
    path: str | Path, split: str, suffixes: Sequence[str] = DATA_SUFFIXES, what: str = "local data set"
) -> list[Path]:
    """The files holding one split under ``path`` (a directory, or one data file), in row order."""
    root = Path(path).expanduser()
    if not root.exists():
        raise QavtpError(f"{what} path {root} does not exist")
    if root.is_file():
        if root.suffix in suffixes:
            return [root]
        raise QavtpError(f"{what} file {root} is not one of {', '.join(suffixes)}")
    patterns = [p for p in SPLIT_PATTERNS if p.endswith(tuple(suffixes))]
    for pattern in patterns:
        # Shards are named NAME-00000-of-00002...; sorting by name keeps the split's row order.
        files = sorted(p for p in root.glob(pattern.format(split=glob.escape(split))) if p.is_file())
        if files:
            return files
    found = sorted(
        {str(p.relative_to(root)) for s in suffixes for p in (*root.glob(f"*{s}"), *root.glob(f"data/*{s}"))}
    )
    listed = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
    expected = ", ".join(p.format(split=split) for p in patterns)
    raise QavtpError(
        f"no {split!r} split for {what} in {root}: expected one of {expected}; found {listed or 'no data files'}"
    )


def data_dir(path: str | Path) -> Path:
    """The directory relative image paths are resolved against: ``path``, or a data file's folder."""
    root = Path(path).expanduser()
    return root.parent if root.is_file() else root


@dataclass
class RawSplit:
    """A split's columns as Python lists, before mapping to qavtp's features."""

    columns: dict[str, list[Any]]
    num_rows: int
    names: list[str]  # every column present in any file, wanted or not, for error messages
    base: Path  # the data directory: relative image paths start here, and error messages name it


def _json_columns(file: Path) -> tuple[dict[str, list[Any]], int]:
    text = file.read_text(encoding="utf-8")
    data: Any = None
    if file.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            pass  # datasets' to_json writes JSON Lines even under a .json name
    if isinstance(data, dict):
        lengths = {len(v) for v in data.values() if isinstance(v, list)}
        if len(lengths) != 1 or not all(isinstance(v, list) for v in data.values()):
            raise QavtpError(f"{file} is a JSON object but not one of equally long column lists")
        return data, lengths.pop()
    if data is None:
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise QavtpError(f"{file} line {n} is not valid JSON: {e.msg}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise QavtpError(f"{file} does not hold records: expected a list of objects or one object per line")
    names = list(dict.fromkeys(k for r in data for k in r))
    return {k: [r.get(k) for r in data] for k in names}, len(data)


def _csv_columns(file: Path) -> tuple[dict[str, list[Any]], int]:
    with file.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        names = list(reader.fieldnames or [])
        rows = list(reader)
    # An empty CSV cell means a missing value, as in JSON's null.
    return {k: [r.get(k) or None for r in rows] for k in names}, len(rows)


def read_split(files: Sequence[Path], base: Path, wanted: Collection[str] | None = None) -> RawSplit:
    """The rows of ``files`` concatenated; only ``wanted`` columns are kept (all when None)."""
    columns: dict[str, list[Any]] = {}
    names: dict[str, None] = {}
    total = 0
    for file in files:
        if file.suffix == ".parquet":
            try:
                present = pq.read_schema(file).names
                keep = [c for c in present if wanted is None or c in wanted]
                table = pq.read_table(file, columns=keep)
            except Exception as e:  # pyarrow raises several types for a damaged file
                raise QavtpError(f"{file} is not a readable parquet file: {e}") from None
            data, n = table.to_pydict(), table.num_rows
        elif file.suffix == ".csv":
            data, n = _csv_columns(file)
            present = list(data)
        else:
            data, n = _json_columns(file)
            present = list(data)
        names.update(dict.fromkeys(present))
        for k, values in data.items():
            if wanted is not None and k not in wanted:
                continue
            # A column that only some shards have is missing (None) in the others' rows.
            columns.setdefault(k, [None] * total).extend(values)
        total += n
        for values in columns.values():
            values.extend([None] * (total - len(values)))
    return RawSplit(columns, total, list(names), base)


def require_columns(raw: RawSplit, required: Sequence[str], what: str, hint: str = "") -> None:
    missing = [c for c in required if c not in raw.columns]
    if missing:
        raise QavtpError(
            f"{what} in {raw.base} lacks column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(required: {', '.join(required)}; present: {', '.join(raw.names) or 'none'}){hint}"
        )


def _needs_rgb(im: PILImage.Image) -> bool:
    return im.mode != "RGB" or "transparency" in im.info


def _to_rgb(im: PILImage.Image) -> PILImage.Image:
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        # Composite on white: dropping alpha turns transparent diagram backgrounds black.
        rgba = im.convert("RGBA")
        return PILImage.alpha_composite(PILImage.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def _describe(file: Path | None) -> str:
    return "image bytes are" if file is None else f"image file {file} is"


def to_image(value: Any, base: Path, where: str) -> dict[str, Any] | None:
    """An HF ``Image`` value holding an RGB image, or None where the row has no image.

    ``value`` is an HF Image dict ({bytes, path}), raw bytes, a file path (relative to
    ``base``) or a ``data:`` URI. RGB images are kept as they are (a path stays a path, so
    decoding is lazy); others are converted once here so every consumer sees RGB.
    """
    data: Any = None
    path: Any = None
    if value is None:
        return None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = value
    elif isinstance(value, str) and value.startswith("data:"):
        data = value.partition(",")[2]
    elif isinstance(value, str):
        path = value
    else:
        raise QavtpError(
            f"{where}: image is a {type(value).__name__}; expected bytes, a file path or a {{bytes, path}} dict"
        )
    if isinstance(data, str):
        try:  # JSON cannot hold raw bytes, so they arrive base64-encoded
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise QavtpError(f"{where}: image bytes are a string that is not base64") from None
    if data is None and not path:
        return None  # datasets writes {bytes: None, path: None} for a missing image
    file: Path | None = None
    if data is None:
        file = Path(path).expanduser()
        if not file.is_absolute():
            file = base / file
        if not file.is_file():
            raise QavtpError(f"{where}: image file {file} does not exist")
    try:
        with PILImage.open(file if file is not None else io.BytesIO(bytes(data))) as im:
            if not _needs_rgb(im):
                return {"bytes": None, "path": str(file)} if file is not None else {"bytes": bytes(data), "path": None}
            out = io.BytesIO()
            _to_rgb(im).save(out, format="PNG")
    except UnidentifiedImageError:
        raise QavtpError(f"{where}: {_describe(file)} not in an image format PIL reads") from None
    except OSError as e:  # e.g. a truncated file
        raise QavtpError(f"{where}: {_describe(file)} not a readable image: {e}") from None
    return {"bytes": out.getvalue(), "path": None}


def string_list(value: Any, where: str, column: str) -> list[str]:
    """A list of strings from a list, or from a JSON-encoded list (as CSV cells hold them)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
        raise QavtpError(f"{where}: {column} must be a list of strings, got {value!r:.80}")
    return [str(v) for v in value]


def _source_columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    """qavtp name -> the source column that holds it."""
    source = {name: name for name in QAVTP_COLUMNS}
    renamed: dict[str, str] = {}
    for src, dst in (columns or {}).items():
        if dst not in QAVTP_COLUMNS:
            raise QavtpError(
                f"column map value {dst!r} is not a qavtp column ({', '.join(QAVTP_COLUMNS)}); "
                "the map is {source column: qavtp name}"
            )
        if dst in renamed:
            raise QavtpError(f"column map sends both {renamed[dst]!r} and {src!r} to {dst!r}")
        renamed[dst] = src
    return source | renamed


def load_local(path: str | Path, split: str = "test", columns: Mapping[str, str] | None = None) -> Dataset:
    """A local VQA split as a ``datasets.Dataset`` with qavtp's ``FEATURES``.

    ``columns`` renames source columns to qavtp's names ({source: qavtp name}); image,
    question and answer are required. Without a choices column every row is scored against
    the sorted set of all answers in the split; without qtype every row's type is "all".
    """
    source_of = _source_columns(columns)
    files = find_split_files(path, split)
    raw = read_split(files, data_dir(path), set(source_of.values()))
    what = f"local {split!r} split"
    for src in columns or {}:
        if src not in raw.names:
            raise QavtpError(
                f"column map names {src!r}, which is not a column of {what} in {raw.base} "
                f"(present: {', '.join(raw.names) or 'none'})"
            )
    # Keyed by qavtp name from here on.
    raw.columns = {name: raw.columns[src] for name, src in source_of.items() if src in raw.columns}
    require_columns(raw, REQUIRED, what, hint="; map them with columns={source column: qavtp name}")
    if raw.num_rows == 0:
        raise QavtpError(f"{what} in {raw.base} has no rows")

    answers: list[str] = []
    for i, a in enumerate(raw.columns["answer"]):
        if a is None:
            raise QavtpError(f"{what} row {i} has no answer")
        answers.append(a if isinstance(a, str) else str(a))
    shared_choices = None if "choices" in raw.columns else sorted(set(answers))
    qtypes = raw.columns.get("qtype", [None] * raw.num_rows)

    rows: dict[str, list[Any]] = {k: [] for k in FEATURES}
    for i in range(raw.num_rows):
        where = f"{what} row {i}"
        image = to_image(raw.columns["image"][i], raw.base, where)
        if image is None:
            raise QavtpError(f"{where} has no image")
        question = raw.columns["question"][i]
        if not isinstance(question, str) or not question.strip():
            raise QavtpError(f"{where} has no question")
        if shared_choices is None:
            choices = string_list(raw.columns["choices"][i], where, "choices")
            if answers[i] not in choices:
                raise QavtpError(f"{where}: answer {answers[i]!r} is not one of its choices {choices}")
        else:
            choices = shared_choices
        rows["image"].append(image)
        rows["question"].append(question)
        rows["prompt"].append(vqa_text(question))
        rows["answer"].append(answers[i])
        rows["choices"].append(choices)
        rows["qtype"].append(DEFAULT_QTYPE if qtypes[i] is None else str(qtypes[i]))
        rows["image_id"].append(i)
    return Dataset.from_dict(rows, features=FEATURES)

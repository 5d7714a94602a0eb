"""Data sets for calibration and evaluation, all in one schema (see ``easyvqa.FEATURES``)."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from qavtp.errors import QavtpError

REQUIRED = ("image", "prompt", "choices", "answer", "qtype")


def parse_columns(spec: str | None) -> dict[str, str] | None:
    """``"img=image,q=question"`` -> ``{"img": "image", "q": "question"}`` (data column -> qavtp name)."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise QavtpError(f"column map entry {part!r} is not DATA_COLUMN=QAVTP_NAME")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def data_path(spec: str) -> Path | None:
    """The directory a data spec reads (``local:DIR``, ``scienceqa:DIR``), None for the packaged data sets."""
    kind, _, path = spec.partition(":")
    return Path(path) if kind in ("local", "scienceqa") and path else None


def load_data(
    spec: str = "easy-vqa",
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    columns: dict[str, str] | None = None,
    keep_no_image: bool = False,
) -> Dataset:
    """A data set by name: ``easy-vqa``, ``scienceqa:DIR`` or ``local:DIR`` (with a column map).

    With ``limit`` a seeded random subset of that size, so runs with the same seed compare.
    """
    kind, _, path = spec.partition(":")
    if kind == "easy-vqa":
        from qavtp.data.easyvqa import load_easyvqa

        ds = load_easyvqa(split)
    elif kind == "scienceqa":
        from qavtp.data.scienceqa import load_scienceqa

        if not path:
            raise QavtpError("scienceqa needs a directory: --data scienceqa:PATH")
        ds = load_scienceqa(path, split=split, keep_no_image=keep_no_image)
    elif kind == "local":
        from qavtp.data.generic import load_local

        if not path:
            raise QavtpError("local needs a directory: --data local:PATH")
        ds = load_local(path, split=split, columns=columns)
    else:
        raise QavtpError(f"unknown data set {spec!r}; use easy-vqa, scienceqa:DIR or local:DIR")
    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise QavtpError(f"data set {spec!r} lacks columns {', '.join(missing)}")
    if len(ds) == 0:
        raise QavtpError(f"data set {spec!r} split {split!r} is empty")
    if limit is not None and limit < 0:
        raise QavtpError(f"--limit must be positive, got {limit}")
    if limit and limit < len(ds):
        ds = ds.shuffle(seed=seed).select(range(limit))
    return ds

"""Each bad input of issue 22, through the CLI on a tiny random LLaVA: a table of the one line qavtp answers.

python bench/bad_input_lines.py   (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qavtp.cli import main  # noqa: E402
from qavtp.data.easyvqa import load_easyvqa  # noqa: E402
from qavtp.data.prompts import SHORT_ANSWER  # noqa: E402
from qavtp.models.random_llava import make_random_llava, small_tokenizer  # noqa: E402


def run(*args) -> str:
    r = CliRunner().invoke(main, [str(a) for a in args])
    lines = r.output.strip().splitlines()
    return f"{r.exit_code} | `{lines[-1] if lines else ''}`"


def copy(src: Path, dst: Path, edit: Callable[[Path], None] | None = None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        edit(dst)
    return dst


def json_edit(name: str, change: Callable[[object], object]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / name).write_text(json.dumps(change(json.loads((d / name).read_text()))))

    return apply


def with_key(section: str, key: str, value) -> Callable[[dict], dict]:
    return lambda doc: {**doc, section: {**doc[section], key: value}}


def main_() -> None:
    t = Path(tempfile.mkdtemp())
    questions = list(load_easyvqa("test")["question"][:2000]) + [SHORT_ANSWER, "user assistant"] * 20
    tiny = make_random_llava(t / "llava", small_tokenizer(questions, vocab_size=400))
    calib = ["--n-samples", "4", "--batch-size", "4", "--wgroup", "16", "--retain", "none"]
    art, rtn, onnx = t / "art", t / "rtn", t / "onnx"
    run("calibrate", tiny, *calib, "-o", art)
    run("calibrate", tiny, *calib, "--method", "rtn", "-o", rtn)
    run("export", art, "-o", onnx)
    image = t / "im.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    bomb = t / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)
    blocker = t / "file"
    blocker.write_text("x")
    w = t / "w"
    copy(art, w / "a")
    (w / "notes.txt").write_text("x")
    mine = t / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")

    def ask(d):
        return run("run", d, "--image", image, "--question", "What shape?")

    def truncate(d: Path) -> None:
        with open(d / "weights.bin", "r+b") as f:
            f.truncate(100)

    def symlink_prefill(d: Path) -> None:
        (d / "evil.onnx").symlink_to(onnx / "prefill.onnx")
        json_edit("export.json", lambda m: {**m, "files": {**m["files"], "prefill": "evil.onnx"}})(d)

    cases = [
        ("calibrate M -o M --overwrite", lambda: run("calibrate", copy(tiny, t / "m"), "-o", t / "m", "--overwrite")),
        ("export A -o A --overwrite", lambda: run("export", art, "-o", art, "--overwrite")),
        ("export w/a -o w --overwrite", lambda: run("export", w / "a", "-o", w, "--overwrite")),
        ("export A -o DIR_OF_OTHER_FILES --overwrite", lambda: run("export", art, "-o", mine, "--overwrite")),
        (
            "export.json files.prefill = /etc/passwd",
            lambda: ask(copy(onnx, t / "e1", json_edit("export.json", with_key("files", "prefill", "/etc/passwd")))),
        ),
        ("export.json names a symlink out of the folder", lambda: ask(copy(onnx, t / "e2", symlink_prefill))),
        (
            "artifact weights swapped for another's",
            lambda: run(
                "eval",
                "--artifact",
                copy(art, t / "a2", lambda d: shutil.copy(rtn / "quantized.safetensors", d)),
                "--limit",
                "2",
            ),
        ),
        ("weights.bin truncated", lambda: ask(copy(onnx, t / "e3", truncate))),
        (
            "config.json text_config: null",
            lambda: run("eval", copy(tiny, t / "m2", json_edit("config.json", lambda c: {**c, "text_config": None}))),
        ),
        (
            'config.json hidden_size: "64x"',
            lambda: run(
                "eval", copy(tiny, t / "m3", json_edit("config.json", with_key("text_config", "hidden_size", "64x")))
            ),
        ),
        (
            "config.json hidden_size 4096, weights 64",
            lambda: run(
                "eval", copy(tiny, t / "m4", json_edit("config.json", with_key("text_config", "hidden_size", 4096)))
            ),
        ),
        ("-o under a regular file", lambda: run("calibrate", tiny, "-o", blocker / "art")),
        ("export.json is []", lambda: ask(copy(onnx, t / "e4", json_edit("export.json", lambda m: [])))),
        (
            "export.json without files",
            lambda: ask(
                copy(onnx, t / "e5", json_edit("export.json", lambda m: {k: v for k, v in m.items() if k != "files"}))
            ),
        ),
        ("tokenizer.json missing", lambda: ask(copy(onnx, t / "e6", lambda d: (d / "tokenizer.json").unlink()))),
        (
            "tokenizer.json garbage",
            lambda: ask(copy(onnx, t / "e7", lambda d: (d / "tokenizer.json").write_text("garbage"))),
        ),
        (
            "artifact config.json is []",
            lambda: run(
                "eval", "--artifact", copy(art, t / "a3", json_edit("config.json", lambda c: [])), "--limit", "1"
            ),
        ),
        (
            "artifact config.json without source",
            lambda: run(
                "eval",
                "--artifact",
                copy(art, t / "a4", json_edit("config.json", lambda c: {k: v for k, v in c.items() if k != "source"})),
                "--limit",
                "1",
            ),
        ),
        (
            'schema_version "3"',
            lambda: run(
                "eval",
                "--artifact",
                copy(art, t / "a5", json_edit("config.json", lambda c: {**c, "schema_version": "3"})),
                "--limit",
                "1",
            ),
        ),
        (
            'options.weights = "int4"',
            lambda: run(
                "eval",
                "--artifact",
                copy(art, t / "a6", json_edit("config.json", with_key("options", "weights", "int4"))),
                "--limit",
                "1",
            ),
        ),
        (
            "a layer the model does not have",
            lambda: run(
                "eval",
                "--artifact",
                copy(
                    art,
                    t / "a7",
                    json_edit(
                        "config.json",
                        with_key("calibration", "quantized", ["layers.9.mlp.up_proj"]),
                    ),
                ),
                "--limit",
                "1",
            ),
        ),
        ("calibrate --batch-size 0", lambda: run("calibrate", tiny, "--batch-size", "0", "-o", t / "b0")),
        ("ppl --seq-len 0", lambda: run("ppl", tiny, "--seq-len", "0")),
        ("ppl --seq-len 10000000", lambda: run("ppl", tiny, "--seq-len", "10000000")),
        ("ppl --windows -1", lambda: run("ppl", tiny, "--windows", "-1")),
        ("decompression-bomb image", lambda: run("run", onnx, "--image", bomb, "--question", "What shape?")),
        ("question with invalid UTF-8", lambda: run("run", onnx, "--image", image, "--question", "What\udcff?")),
        ("eval of a missing model directory", lambda: run("eval", t / "nope")),
    ]
    print("| input | exit | what qavtp prints |\n|---|---|---|")
    for label, case in cases:
        print(f"| {label} | {case()} |".replace(str(t), "…"))
    os.environ["QAVTP_CACHE"] = str(blocker)
    print(f"| QAVTP_CACHE set to a file | {run('calibrate', '-o', t / 'c')} |".replace(str(t), "…"))


if __name__ == "__main__":
    main_()

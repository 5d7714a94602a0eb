"""Nothing a user types destroys data, reads files from outside an export, or ends in a traceback (issue 22).

One representative case per class on the tiny random LLaVA, then a bounded fuzz over malformed ``config.json``
and ``export.json`` documents driven through every command that reads them.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from PIL import Image

from qavtp.calibrate.calibration import run_calibration
from qavtp.cli import main
from qavtp.config import ExportConfig
from qavtp.errors import QavtpError
from qavtp.export.export_model import export_model
from qavtp.export.session import check_external_data
from qavtp.io import atomic_dir
from tests.helpers import calibration


def _one_line(result, needle: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output
    return lines[0]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def artifact(tiny_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "art"
    return run_calibration(tiny_llava_dir, out, calibration(n_samples=4, batch_size=4, wgroup=16), progress=False)


@pytest.fixture(scope="module")
def exported(artifact, tmp_path_factory):
    return export_model(str(artifact), tmp_path_factory.mktemp("bad") / "onnx", ExportConfig())


@pytest.fixture()
def image(tmp_path) -> Path:
    path = tmp_path / "im.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


# ------------------------------------------------------------------------------------ data loss


def test_overwrite_never_replaces_an_input(tiny_llava_dir, artifact, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llava_dir, model)
    before = _files(model)
    _one_line(run("calibrate", model, "-o", model, "--overwrite"), "is the input")
    _one_line(run("calibrate", model, "-o", model / "sub", "--overwrite"), "lies inside the input")
    _one_line(run("calibrate", model / "sub", "-o", model.parent, "--overwrite"), "contains the input")
    assert _files(model) == before
    art = tmp_path / "w" / "a"
    shutil.copytree(artifact, art)
    (tmp_path / "w" / "notes.txt").write_text("mine")
    _one_line(run("export", art, "-o", art, "--overwrite"), "is the input")
    _one_line(run("export", art, "-o", tmp_path / "w", "--overwrite"), "contains the input")
    assert (tmp_path / "w" / "notes.txt").read_text() == "mine" and (art / "config.json").is_file()


def test_overwrite_only_replaces_an_output_of_the_same_kind(artifact, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    _one_line(run("export", artifact, "-o", mine, "--overwrite"), "is not a qavtp export")
    _one_line(run("calibrate", "-o", mine, "--overwrite", "--n-samples", "1"), "is not a qavtp artifact")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_replacing_an_output_keeps_one_complete_copy_at_every_step(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    real = Path.rename

    def fail_second(self, target):  # the old output is moved aside, then bringing the new one in fails
        if self.name.startswith(".out-") and not self.name.startswith(".out-old-"):
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", fail_second)
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    monkeypatch.undo()
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # the user's umask, not mkdtemp's private mode


# --------------------------------------------------------------------------------- confinement


def test_export_json_cannot_name_files_outside_the_export(exported, tmp_path, image):
    outside = tmp_path / "outside.onnx"
    shutil.copy(exported / "prefill.onnx", outside)
    for value, needle in (
        (str(outside), "must be a file name inside the export folder"),
        ("../outside.onnx", "must be a file name inside the export folder"),
        ("link.onnx", "points outside the export folder"),
    ):
        d = tmp_path / f"e{len(value)}"
        shutil.copytree(exported, d)
        (d / "link.onnx").symlink_to(outside)
        meta = json.loads((d / "export.json").read_text())
        meta["files"]["prefill"] = value
        (d / "export.json").write_text(json.dumps(meta))
        _one_line(run("run", d, "--image", image, "--question", "What shape?"), needle)


def test_a_constant_node_cannot_read_external_data_from_outside(tmp_path):
    const = helper.make_tensor("c", TensorProto.FLOAT, [1], [0.0])
    const.ClearField("float_data")
    const.data_location = TensorProto.EXTERNAL
    const.external_data.add(key="location", value="../../../../etc/passwd")
    node = helper.make_node("Constant", [], ["y"], value=const)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "m.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(QavtpError, match="reads external data outside the model directory"):
        check_external_data(path)
    sub = helper.make_graph([node], "body", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    cond = helper.make_tensor_value_info("b", TensorProto.BOOL, [])
    outer = helper.make_node("If", ["b"], ["z"], then_branch=sub, else_branch=sub)
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])
    path.write_bytes(helper.make_model(helper.make_graph([outer], "g", [cond], [z])).SerializeToString())
    with pytest.raises(QavtpError, match="reads external data outside"):
        check_external_data(path)


# ---------------------------------------------------------------------------------- foreign weights


def test_swapped_weights_are_refused(artifact, exported, tiny_llava_dir, tmp_path, image):
    other = run_calibration(tiny_llava_dir, tmp_path / "other", calibration(n_samples=4, wgroup=16, method="rtn"))
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    shutil.copy(other / "quantized.safetensors", art / "quantized.safetensors")
    _one_line(run("eval", "--artifact", art, "--limit", "2"), "does not match the digest")
    d = tmp_path / "onnx"
    shutil.copytree(exported, d)
    with open(d / "weights.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    _one_line(run("run", d, "--image", image, "--question", "What shape?"), "weights.bin does not match the digest")


def test_a_config_that_would_build_a_default_7b_model_is_refused(tiny_llava_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_llava_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "text_config": None}))
    _one_line(run("eval", model, "--limit", "1"), "text_config must be an object")
    (model / "config.json").write_text(json.dumps({**cfg, "text_config": {**cfg["text_config"], "hidden_size": 4096}}))
    _one_line(run("eval", model, "--limit", "1"), "does not describe these weights")
    bad = {**cfg, "text_config": {**cfg["text_config"], "hidden_size": "sixty-four"}}
    (model / "config.json").write_text(json.dumps(bad))
    _one_line(run("eval", model, "--limit", "1"), "text_config.hidden_size must be a positive integer")


# ------------------------------------------------------------------------------- one line each


def test_unusable_output_locations(tiny_llava_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line(run("calibrate", tiny_llava_dir, "-o", blocker / "art"), "is a file, not a directory")
    monkeypatch.setenv("QAVTP_CACHE", str(blocker))
    _one_line(run("calibrate", "-o", tmp_path / "a"), "is a file, not a directory")


def test_numeric_flags_and_inputs(exported, tiny_llava_dir, tmp_path, image):
    _one_line(run("calibrate", tiny_llava_dir, "--batch-size", "0", "-o", tmp_path / "a"), "--batch-size")
    _one_line(run("ppl", tiny_llava_dir, "--seq-len", "1"), "--seq-len")
    _one_line(run("ppl", tiny_llava_dir, "--seq-len", "10000000"), "--seq-len")
    _one_line(run("ppl", tiny_llava_dir, "--windows", "-1"), "--windows")
    _one_line(run("run", exported, "--image", image, "--question", "What\udcff?"), "not valid UTF-8")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpixel: over PIL's 2x decompression-bomb limit
    _one_line(run("run", exported, "--image", bomb, "--question", "What shape?"), "too large to decode safely")


def test_damaged_export_folder(exported, tmp_path, image):
    d = tmp_path / "onnx"
    shutil.copytree(exported, d)
    (d / "tokenizer.json").write_text("garbage")
    _one_line(run("run", d, "--image", image, "--question", "What shape?"), "is not a readable tokenizer")
    (d / "tokenizer.json").unlink()
    _one_line(run("run", d, "--image", image, "--question", "What shape?"), "lacks tokenizer.json")


# ------------------------------------------------------------------------------------------ fuzz


def _mutations(doc: dict, rng: random.Random, n: int) -> list[object]:
    """``n`` malformed variants of ``doc``: a key dropped, a value's type changed, a section nested wrongly."""
    out: list[object] = [[], "config", 3, None]
    paths = [(k,) for k in doc] + [(k, j) for k, v in doc.items() if isinstance(v, dict) for j in v]
    for _ in range(n):
        path = rng.choice(paths)
        mutated = json.loads(json.dumps(doc))
        parent = mutated
        for key in path[:-1]:
            parent = parent[key]
        how = rng.choice(["drop", "type", "nest"])
        if how == "drop":
            parent.pop(path[-1])
        elif how == "type":
            parent[path[-1]] = rng.choice(["3", [], {"x": 1}, 3.5, True, None, -1])
        else:
            parent[path[-1]] = {"nested": parent[path[-1]]}
        out.append(mutated)
    return out


def test_fuzz_malformed_documents(artifact, exported, tmp_path, image):
    rng = random.Random(0)
    cases = []
    art_doc = json.loads((artifact / "config.json").read_text())
    for i, doc in enumerate(_mutations(art_doc, rng, 14)):
        d = tmp_path / f"a{i}"
        shutil.copytree(artifact, d)
        (d / "config.json").write_text(json.dumps(doc))
        cases += [["eval", "--artifact", d, "--limit", "1"], ["export", d, "-o", tmp_path / f"x{i}"]]
    exp_doc = json.loads((exported / "export.json").read_text())
    for i, doc in enumerate(_mutations(exp_doc, rng, 14)):
        d = tmp_path / f"e{i}"
        shutil.copytree(exported, d)
        (d / "export.json").write_text(json.dumps(doc))
        cases += [["run", d, "--image", image, "--question", "What shape?"], ["eval-onnx", d, "--limit", "1"]]
    refused = 0
    for args in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        result = run(*args)
        refused += result.exit_code == 2
        # A mutation may leave the document usable (an optional key dropped): then it must simply work.
        if result.exit_code != 0:
            lines = result.output.strip().splitlines()
            assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), (args, result.output)
            assert sorted(p.name for p in tmp_path.iterdir()) == before, args
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), args
    print(f"{refused} of {len(cases)} malformed documents refused in one line; the rest still worked")
    assert refused >= len(cases) // 2  # most mutations break a required field


def test_diversity_selector_flags(artifact, tiny_llava_dir, tmp_path):
    """Issue 26's bad inputs: a ratio keeping more tokens than exist, a relevance weight out of range or for a
    scorer that has none, a learned DPP without the fusion weights it needs; nothing is written."""
    cases = [
        (["eval", tiny_llava_dir, "--retain", "1.5", "--scorer", "cdpruner"], "retention ratio must lie in (0, 1]"),
        (["eval", tiny_llava_dir, "--retain", "0.25", "--scorer", "cdpruner", "--relevance-weight", "1"], "[0, 1)"),
        (["eval", tiny_llava_dir, "--retain", "0.25", "--relevance-weight", "0.3"], "cdpruner and qavtp-dpp only"),
        (["eval", tiny_llava_dir, "--retain", "0.25", "--scorer", "qavtp-dpp"], "need fusion weights: pass --artifact"),
        (["eval", "--artifact", artifact, "--retain", "0.25", "--scorer", "qavtp-dpp"], "calibrated without fusion"),
        (["export", artifact, "-o", tmp_path / "e", "--retain", "0.25", "--scorer", "qavtp-dpp"], "without fusion"),
        (["export", tiny_llava_dir, "-o", tmp_path / "e", "--retain", "2", "--scorer", "divprune"], "(0, 1]"),
        (["export", artifact, "-o", tmp_path / "e", "--scorer", "cdpruner", "--relevance-weight", "-1"], "[0, 1)"),
    ]
    for args, needle in cases:
        _one_line(run(*args, "--limit", "2") if args[0] == "eval" else run(*args), needle)
    assert not (tmp_path / "e").exists()

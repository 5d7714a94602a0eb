"""Streamed checkpoints (issue 23): a sharded tiny LLaVA calibrates one decoder layer at a time, with the same codes
as the in-memory path, and exports tensor by tensor to the same files."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from qavtp.calibrate.artifact import load_artifact
from qavtp.calibrate.calibration import run_calibration
from qavtp.cli import main
from qavtp.config import CalibrationConfig, ExportConfig, FusionConfig, QuantConfig
from qavtp.export.export_model import export_model
from qavtp.models import loading
from qavtp.models.loading import load_model
from qavtp.models.random_llava import write_random_shards
from qavtp.models.streaming import INDEX, is_streamed

# GPTQ (Hessians from the calibration inputs) and a quantized KV cache: the parts of a layer's calibration that
# depend on the layers before it and on module state beyond the weights.
QUANT = QuantConfig(method="rtn", gptq=True, kv_bits=4)
NO_FUSION = FusionConfig(ratios=())


@pytest.fixture(scope="module")
def sharded(tiny, tmp_path_factory):
    """The tiny random LLaVA's shape as 3 float16 shards with the hub's (legacy) tensor names."""
    _, processor, _ = tiny
    out = tmp_path_factory.mktemp("sharded") / "llava"
    text = dict(num_hidden_layers=3)
    return write_random_shards(out, processor.tokenizer, text=text, n_shards=3)


@pytest.fixture(scope="module")
def artifacts(sharded, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for stream in (False, True):
        config = CalibrationConfig(n_samples=4, batch_size=2, stream=stream, quant=QUANT, fusion=NO_FUSION)
        out[stream] = run_calibration(sharded, root / f"stream-{stream}", config, progress=False)
    return out


def test_the_checkpoint_is_sharded_as_on_the_hub(sharded):
    index = json.loads((sharded / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert any(k.startswith("language_model.model.layers.2.") for k in index["weight_map"])
    # transformers reads the same files whole: the streamed loader must agree with it tensor for tensor
    whole, _, _ = load_model(sharded)
    lazy, _, adapter = load_model(sharded, stream=True)
    reference = whole.state_dict()
    resident = {k: v for k, v in lazy.state_dict().items() if not v.is_meta}
    assert resident and all(not k.startswith("model.language_model.layers.") for k in resident)
    for k, v in resident.items():
        assert torch.equal(v, reference[k]), k
    with adapter.resident(1) as layer:
        for k, v in layer.state_dict().items():
            assert torch.equal(v, reference[f"model.language_model.layers.1.{k}"]), k
    assert is_streamed(adapter.decoder_layers[1])


def test_streamed_calibration_visits_each_layer_alone(sharded, tmp_path, monkeypatch):
    seen: list[tuple[int, list[bool]]] = []
    real = loading.checkpoint_source

    def recording(ckpt, model, layers):
        source = real(ckpt, model, layers)

        def read(i, names):
            seen.append((i, [is_streamed(layer) for layer in layers]))
            return source(i, names)

        return read

    monkeypatch.setattr(loading, "checkpoint_source", recording)
    config = CalibrationConfig(n_samples=4, batch_size=2, stream=True, quant=QUANT, fusion=NO_FUSION)
    run_calibration(sharded, tmp_path / "a", config, progress=False)
    # each layer read once, in order, and at that moment no decoder layer holds weights (the one before is gone)
    assert [i for i, _ in seen] == [0, 1, 2]
    assert all(all(states) for _, states in seen)


def test_streamed_codes_are_bit_identical_to_the_in_memory_path(artifacts):
    whole = load_file(str(artifacts[False] / "quantized.safetensors"))
    streamed = load_file(str(artifacts[True] / "quantized.safetensors"))
    cfg = json.loads((artifacts[True] / "config.json").read_text())
    assert sorted(cfg["layer_shards"]) == [f"quantized-layer-0000{i}.safetensors" for i in range(3)]
    for shard in cfg["layer_shards"]:
        streamed |= load_file(str(artifacts[True] / shard))
    assert sorted(streamed) == sorted(whole)
    assert any(k.endswith("qweight_int4") for k in whole)
    for k, v in whole.items():
        assert torch.equal(v, streamed[k]), k
    # the streamed artifact loads back whole too, as the same fake-quantized model
    a, _, _, _ = load_artifact(artifacts[True], stream=False)
    b, _, _, _ = load_artifact(artifacts[False])
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_streamed_export_writes_the_same_graphs(artifacts, tmp_path, fmt):
    _, _, adapter, _ = load_artifact(artifacts[True])
    assert adapter.stream is not None and all(is_streamed(layer) for layer in adapter.decoder_layers)
    config = ExportConfig(retain=0.5, scorer="qapruner", format=fmt)
    files = {}
    for stream, art in artifacts.items():
        out = export_model(str(art), tmp_path / f"export-{stream}", config)
        files[stream] = {name: (out / name).read_bytes() for name in ("prefill.onnx", "decode.onnx", "weights.bin")}
    assert files[True] == files[False]


def test_stream_refuses_what_needs_the_whole_model(sharded, tmp_path):
    r = CliRunner().invoke(main, ["calibrate", str(sharded), "-o", str(tmp_path / "a"), "--stream", "--n-samples", "2"])
    assert r.exit_code == 2
    assert "streamed calibration (--stream) does not support --method quarot" in r.output
    assert not (tmp_path / "a").exists()


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _calibrate(model: Path, out: Path):
    args = ["calibrate", str(model), "-o", str(out), "--stream", "--method", "rtn", "--retain", "none"]
    return CliRunner().invoke(main, [*args, "--n-samples", "2"])


def test_damaged_shards_are_one_line_each(sharded, tmp_path):
    index = json.loads((sharded / INDEX).read_text())
    missing = _copy(sharded, tmp_path / "missing")
    (missing / "model-00002-of-00003.safetensors").unlink()
    named = _copy(sharded, tmp_path / "named")
    index_named = {
        **index,
        "weight_map": {
            **index["weight_map"],
            "language_model.model.extra.weight": index["weight_map"]["language_model.model.norm.weight"],
        },
    }
    (named / INDEX).write_text(json.dumps(index_named))
    truncated = _copy(sharded, tmp_path / "truncated")
    shard = truncated / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    cases = {
        missing: "names shard model-00002-of-00003.safetensors, which",
        named: "places tensor language_model.model.extra.weight in",
        truncated: "corrupt safetensors file",
    }
    for model, needle in cases.items():
        r = _calibrate(model, tmp_path / f"out-{model.name}")
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], r.output
        assert not (tmp_path / f"out-{model.name}").exists()
        assert not list(tmp_path.glob(f".out-{model.name}-*"))


def _cap_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("command", ["export", "calibrate"])
def test_a_full_disk_while_writing_leaves_nothing_behind(sharded, artifacts, tmp_path, command):
    out = tmp_path / "out"
    code = "import sys; from qavtp.cli import main; sys.exit(main())"
    if command == "export":
        args = ["export", str(artifacts[True]), "-o", str(out), "--format", "ort"]
    else:
        args = ["calibrate", str(sharded), "-o", str(out), "--stream", "--method", "rtn", "--retain", "none"]
        args += ["--n-samples", "2"]
    cap = _cap_file_size(20_000)
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, preexec_fn=cap, timeout=600)
    assert r.returncode == 2, r.stderr
    # the progress bar may have drawn before: what counts is one error line and no traceback
    lines = [line for line in r.stderr.strip().splitlines() if "calibrating decoder layers" not in line]
    what = "export" if command == "export" else "artifact"
    assert len(lines) == 1 and f"could not write the {what} to" in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out-*"))

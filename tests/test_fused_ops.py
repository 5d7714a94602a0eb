"""The decoder's fused ops against the same export in plain ops, on the tiny random LLaVA: onnxruntime's
GroupQueryAttention and SkipSimplifiedLayerNormalization in ``--format ort`` (logits, kept tokens, greedy tokens,
and a decode cache shared between past and present that has to grow), opset 23's Attention, RMSNormalization and
RotaryEmbedding in ``--format qdq`` (onnxruntime, OpenVINO and onnx.reference)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qavtp.calibrate.calibration import run_calibration
from qavtp.config import ExportConfig
from qavtp.errors import QavtpError
from qavtp.export.export_model import export_model
from qavtp.export.kv_buffers import KVBuffers
from qavtp.export.session import ExportedModel, read_meta
from qavtp.prompting import encode
from tests.helpers import calibration

# max |fused - plain| / max |plain| of the logits: float32 reassociation inside the fused kernels (~1e-6 here)
FUSED_RTOL = 1e-4
LLM_FUSED_OPS = {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}
OPSET23_OPS = {"Attention", "RMSNormalization", "RotaryEmbedding"}


@pytest.fixture(scope="module")
def artifacts(tiny_llava_dir, tmp_path_factory):
    """W4A4 QuaRot, and the same with a 4-bit KV cache (RoPE then runs before the fused op: the quantizer reads
    the rotated keys) and activation groups of 16."""
    root = tmp_path_factory.mktemp("fused-art")
    plain = calibration(method="quarot", n_samples=8, batch_size=4)
    kv = calibration(method="quarot", n_samples=8, batch_size=4, kv_bits=4, agroup=16)
    return {
        "plain": run_calibration(tiny_llava_dir, root / "plain", plain, progress=False),
        "kv4": run_calibration(tiny_llava_dir, root / "kv4", kv, progress=False),
    }


@pytest.fixture(scope="module")
def pairs(artifacts, tmp_path_factory):
    """(fused, plain) runtime-activation ort exports at 25 %, accuracy level 0 (float32 kernels: any difference
    is the fusion's, not int8 rounding)."""
    root = tmp_path_factory.mktemp("fused-exp")
    out = {}
    for fmt in ("ort", "qdq"):
        for name, art in artifacts.items():
            key = name if fmt == "ort" else f"{name}-qdq"
            out[key] = tuple(
                export_model(
                    str(art),
                    root / f"{key}-{fused}",
                    ExportConfig(0.25, "qapruner", fmt, 0, None, "runtime", fused),
                )
                for fused in (True, False)
            )
    return out


def _session(d, graph):
    so = ort.SessionOptions()
    for k, v in read_meta(d)["onnxruntime"]["session_config"].items():
        so.add_session_config_entry(k, v)
    sess = ort.InferenceSession(str(d / graph), so, providers=["CPUExecutionProvider"])
    return lambda feeds: dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _llm_ops(d) -> set[str]:
    g = onnx.load(str(d / "prefill.onnx"), load_external_data=False).graph
    return {n.op_type for n in g.node if n.name.startswith("llm/")}


def test_defaults_fuse_only_the_runtime_graphs():
    assert ExportConfig(0.25, format="ort", activations="runtime").weights.fused_ops
    assert not ExportConfig(0.25, format="ort").weights.fused  # exact: torch's ops one for one
    portable = ExportConfig(0.25, format="qdq", activations="runtime").weights
    assert portable.fused and not portable.fused_ops  # opset 23's ops, not onnxruntime's
    with pytest.raises(QavtpError, match="fused must be true or false"):
        ExportConfig(0.25, fused="yes")


@pytest.mark.parametrize("which", ["plain", "kv4"])
def test_fused_graphs_match_the_plain_ones(which, pairs, tiny, padded_rows):
    fused, plain = pairs[which]
    assert read_meta(fused)["onnxruntime"]["fused_ops"] and not read_meta(plain)["onnxruntime"]["fused_ops"]
    ops = _llm_ops(fused)
    assert LLM_FUSED_OPS <= ops and "Softmax" not in ops
    assert not LLM_FUSED_OPS & _llm_ops(plain)

    enc = encode(tiny[1], *padded_rows)  # three left-padded rows of different lengths
    feeds = {k: enc[k].numpy() for k in ("pixel_values", "input_ids", "attention_mask")}
    a, b = _session(fused, "prefill.onnx")(feeds), _session(plain, "prefill.onnx")(feeds)
    assert np.array_equal(a["kept_indices"], b["kept_indices"])
    assert np.array_equal(a["attention_mask_out"], b["attention_mask_out"])
    assert np.abs(a["scores"] - b["scores"]).max() < 1e-5  # the scoring layer is not fused
    assert _rel(a["logits"], b["logits"]) < FUSED_RTOL

    # Two cached tokens at once (how candidate answers are scored), each graph fed its own prefill's cache.
    mask = np.concatenate([a["attention_mask_out"], np.ones((3, 2), np.int64)], axis=1)
    step = {
        "input_ids": np.stack([a["logits"].argmax(-1), np.full(3, 5)], axis=1).astype(np.int64),
        "attention_mask": mask,
        "position_ids": a["attention_mask_out"].sum(1, keepdims=True) + np.arange(2),
    }
    # GroupQueryAttention takes them one row at a time: ExportedModel.run_decode splits the batch.
    logits = [
        ExportedModel(d).run_decode(step["input_ids"], mask, step["position_ids"], pre)["logits"]
        for d, pre in ((fused, a), (plain, b))
    ]
    assert _rel(logits[0], logits[1]) < FUSED_RTOL


@pytest.mark.parametrize("which", ["plain", "kv4"])
def test_greedy_tokens_over_a_growing_shared_cache(which, pairs, easyvqa_test):
    """16 greedy steps: the fused export writes into buffers that grow every 3 positions, the plain one
    concatenates; the same tokens."""
    fused, plain = (ExportedModel(d) for d in pairs[which])
    assert fused.in_place_cache and not plain.in_place_cache
    image, question = easyvqa_test[0]["image"], easyvqa_test[0]["question"]
    a = fused.generate(image, question, max_new_tokens=16, kv_block=3)
    b = plain.generate(image, question, max_new_tokens=16)
    assert a.timings_ms["decode_steps"] >= 4  # the cache grew at least once
    assert a.tokens == b.tokens and a.kept_indices == b.kept_indices


def test_shared_cache_step_where_the_buffer_overflows(pairs, tiny, padded_rows):
    """Decode steps into KVBuffers with room for one position: the second step must move the cache into larger
    buffers first; every step's logits and cache equal the copying path's."""
    fused = pairs["plain"][0]
    model = ExportedModel(fused)
    enc = encode(tiny[1], *padded_rows)
    feeds = {k: enc[k].numpy() for k in ("pixel_values", "input_ids", "attention_mask")}
    out = model.run_prefill(feeds)
    cache = KVBuffers(out, model.n_layers, block=1)
    first = cache.capacity
    past, mask = out, out["attention_mask_out"]
    pos = mask.sum(1, keepdims=True)
    ids = out["logits"].argmax(-1)[:, None].astype(np.int64)
    for _ in range(3):
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
        cache.reserve(1)
        step = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        in_place = model.decode.run_in_place(step, cache)
        cache.advance(1)
        past = model.run_decode(ids, mask, pos, past)
        assert _rel(in_place, past["logits"]) < 1e-6
        assert np.array_equal(cache.valid("0.key"), past["present.0.key"])
        ids, pos = in_place[:, -1].argmax(-1)[:, None].astype(np.int64), pos + 1
    assert cache.capacity > first


@pytest.mark.parametrize("which", ["plain-qdq", "kv4-qdq"])
def test_portable_fused_graphs_run_everywhere(which, pairs, tiny, padded_rows):
    """The qdq graph with opset 23's ops: the plain graph's logits and kept tokens in onnxruntime, OpenVINO and
    onnx.reference (prefill, and a decode step over the cache)."""
    from onnx.reference import ReferenceEvaluator

    from tests.test_export import GatherElements  # onnx 1.23's reference kernel has a bug this replaces

    fused, plain = pairs[which]
    assert read_meta(fused)["opset"] == 23 and read_meta(plain)["opset"] == 21
    assert OPSET23_OPS <= _llm_ops(fused) and not OPSET23_OPS & _llm_ops(plain)
    assert not read_meta(fused)["onnxruntime"]["fused_ops"]

    enc = encode(tiny[1], *padded_rows)
    feeds = {k: enc[k].numpy() for k in ("pixel_values", "input_ids", "attention_mask")}
    want = _session(plain, "prefill.onnx")(feeds)
    n_layers = read_meta(fused)["model"]["num_layers"]
    mask = np.concatenate([want["attention_mask_out"], np.ones((3, 1), np.int64)], axis=1)
    step = {
        "input_ids": want["logits"].argmax(-1)[:, None].astype(np.int64),
        "attention_mask": mask,
        "position_ids": want["attention_mask_out"].sum(1, keepdims=True),
    }
    past = {f"past.{i}.{k}": want[f"present.{i}.{k}"] for i in range(n_layers) for k in ("key", "value")}
    want_step = _session(plain, "decode.onnx")({**step, **past})["logits"]

    on_openvino = ExportedModel(fused, runtime="openvino")  # float32, no dynamic int8 quantization

    def openvino(graph):
        return on_openvino.prefill if graph == "prefill.onnx" else on_openvino.decode

    def reference(graph):
        ev = ReferenceEvaluator(str(fused / graph), new_ops=[GatherElements])
        return lambda f: dict(zip(ev.output_names, ev.run(None, f), strict=True))

    for run in (lambda graph: _session(fused, graph), openvino, reference):
        got = run("prefill.onnx")(feeds)
        assert np.array_equal(got["kept_indices"], want["kept_indices"])
        assert _rel(got["logits"], want["logits"]) < FUSED_RTOL
        got_step = run("decode.onnx")({**step, **past})["logits"]
        assert _rel(got_step, want_step) < FUSED_RTOL

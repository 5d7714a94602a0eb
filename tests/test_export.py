"""ONNX export on the tiny random LLaVA: standard graphs, parity with the torch fake-quant model (both weight
formats, pruning included), an independent runtime, a torch-free runtime path and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from PIL import Image

from qavtp.calibrate.artifact import load_artifact
from qavtp.calibrate.calibration import run_calibration
from qavtp.calibrate.quantizers import QuantEmbedding, QuantLinear, QuantSpec, fake_quant_activation
from qavtp.cli import main
from qavtp.config import ExportConfig
from qavtp.errors import QavtpError
from qavtp.export.export_model import export_model
from qavtp.export.external_data import to_model
from qavtp.export.fakequant import fake_quant
from qavtp.export.int4 import quant_gather
from qavtp.export.llava_graph import check_supported
from qavtp.export.onnx_graph import Graph
from qavtp.export.session import (
    OPENVINO_CONFIG,
    ExportedModel,
    PromptEncoder,
    check_external_data,
    preprocess_image,
    read_meta,
)
from qavtp.models.loading import load_model
from qavtp.prompting import encode
from qavtp.pruning import prune_sequence, select_tokens
from qavtp.scoring import FusionParams, score_tokens
from tests.helpers import calibration

# Parity bounds (max |onnx - torch| / max |torch| of the logits). Measured on this model: ~2e-7 for fp32, qdq
# and ort; an activation rounding flip caused by a last-bit difference in a matmul could move a W4A4 logit
# further, so the bound leaves room while still catching any real mismatch.
LOGIT_RTOL = 1e-4
FUSION = FusionParams(0.7, 0.3, -1, "zscore", "linf", True, {"bits": 4, "symmetric": True, "group_size": 32})
# The vision tower's [CLS] attention as the relevance term: computed inside the exported vision graph.
FUSION_CLS = FusionParams(0.6, 0.5, 1, "minmax", "range", False, {"bits": 4, "symmetric": True, "group_size": 0}, "cls")
# Layer 1's text attention on the full prompt as the relevance term: the graph runs layer 0 twice (scoring, LLM).
FUSION_DEEP = FusionParams(**{**FUSION_CLS.to_dict(), "alpha": 0.5, "semantic": "text-l1"})
# The fused score as the quality of a DPP (the learned fusion's select="dpp"): the graph runs a greedy-MAP Loop.
FUSION_DPP = FusionParams(**{**FUSION.to_dict(), "select": "dpp", "theta": 0.6})


def _with_fusion(artifact, out, params: FusionParams):
    """A copy of the artifact with fusion weights for retention 0.25 (format of calibrate/fusion.py)."""
    shutil.copytree(artifact, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["fusion"] = {"layer": 0, "objective": "kl", "n_samples": 8, "ratios": {"0.25": {"params": params.to_dict()}}}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def artifact(tiny_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "w4a4"
    return run_calibration(tiny_llava_dir, out, calibration(method="quarot", n_samples=8, batch_size=4), progress=False)


@pytest.fixture(scope="module")
def vocab_artifact(tiny_llava_dir, tmp_path_factory):
    """4-bit token embedding and LM head (``--vocab-bits 4``), a 4-bit KV cache (``--kv-bits 4``), activations in
    groups of 16 (blocked Q/DQ ops in the ort graph, elementwise ops in the qdq one) and mixed precision (``--a8``:
    8-bit inputs at layer 0's gate/up and every linear of layer 1)."""
    out = tmp_path_factory.mktemp("artv") / "w4a4v"
    options = {"vocab_bits": 4, "kv_bits": 4, "agroup": 16, "a8": "gate_proj,up_proj,1"}
    return run_calibration(
        tiny_llava_dir, out, calibration(method="quarot", n_samples=8, batch_size=4, **options), progress=False
    )


@pytest.fixture(scope="module")
def fusion_artifact(artifact, tmp_path_factory):
    return _with_fusion(artifact, tmp_path_factory.mktemp("artf") / "w4a4f", FUSION)


@pytest.fixture(scope="module")
def cls_artifact(artifact, tmp_path_factory):
    return _with_fusion(artifact, tmp_path_factory.mktemp("artc") / "w4a4c", FUSION_CLS)


@pytest.fixture(scope="module")
def deep_artifact(artifact, tmp_path_factory):
    return _with_fusion(artifact, tmp_path_factory.mktemp("artd") / "w4a4d", FUSION_DEEP)


@pytest.fixture(scope="module")
def dpp_artifact(artifact, tmp_path_factory):
    return _with_fusion(artifact, tmp_path_factory.mktemp("artp") / "w4a4p", FUSION_DPP)


@pytest.fixture(scope="module")
def rows(padded_rows):
    return padded_rows


@pytest.fixture(scope="module")
def exports(
    tiny_llava_dir,
    artifact,
    fusion_artifact,
    cls_artifact,
    vocab_artifact,
    deep_artifact,
    dpp_artifact,
    tmp_path_factory,
):
    root = tmp_path_factory.mktemp("exports")
    specs = {
        "qdq": (fusion_artifact, 0.25, "qavtp", "qdq"),
        "cls": (cls_artifact, 0.25, "qavtp", "ort"),
        "ort": (fusion_artifact, 0.25, "qavtp", "ort"),
        "qapruner": (artifact, 0.25, "qapruner", "qdq"),
        "dense": (artifact, 1.0, "qavtp", "qdq"),
        "fp32": (tiny_llava_dir, 0.25, "semantic", "qdq"),
        "vocab": (vocab_artifact, 0.25, "qapruner", "qdq"),
        "vocab-ort": (vocab_artifact, 0.25, "qapruner", "ort"),
        "deep": (deep_artifact, 0.25, "qavtp", "qdq"),
        # Greedy selections in a Loop: the learned DPP, qavtp-dpp forced on top-k weights, CDPruner, DivPrune.
        "dpp": (dpp_artifact, 0.25, "qavtp", "ort"),
        "qavtp-dpp": (fusion_artifact, 0.25, "qavtp-dpp", "qdq"),
        "cdpruner": (fusion_artifact, 0.25, "cdpruner", "qdq"),
        "divprune": (tiny_llava_dir, 0.25, "divprune", "qdq"),
    }
    return {k: export_model(str(s), root / k, ExportConfig(r, sc, f)) for k, (s, r, sc, f) in specs.items()}


def _session(path: Path) -> ort.InferenceSession:
    meta = read_meta(path.parent)
    so = ort.SessionOptions()
    for k, v in meta["onnxruntime"]["session_config"].items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(sess, feeds) -> dict:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _load(which, tiny_llava_dir, artifact, fusion_artifact, cls_artifact=None, vocab_artifact=None):
    if which in ("fp32", "divprune"):
        return load_model(tiny_llava_dir)
    sources = {"qapruner": artifact, "dense": artifact, "cls": cls_artifact, "deep": artifact}  # same weights
    source = {**sources, "vocab": vocab_artifact, "vocab-ort": vocab_artifact}.get(which, fusion_artifact)
    model, processor, adapter, _ = load_artifact(source)
    return model, processor, adapter


def _torch_prefill(model, adapter, enc, scorer, rho, fusion):
    """The torch fake-quant model, pruned before the LLM exactly as ``qavtp eval --retain`` does."""
    with torch.no_grad():
        visual = adapter.visual_positions(enc["input_ids"])
        embeds = adapter.embed(enc["input_ids"], enc["pixel_values"])
        scores = None
        if rho < 1:
            scores = score_tokens(scorer, adapter, enc, embeds, visual, fusion=fusion)
            keep = select_tokens(scores, rho)
        else:
            keep = torch.arange(int(visual.sum(1)[0])).expand(visual.shape[0], -1)
        pr = prune_sequence(enc["input_ids"], enc["attention_mask"], embeds, visual, keep)
        out = model(
            inputs_embeds=pr.inputs_embeds,
            attention_mask=pr.attention_mask,
            position_ids=pr.position_ids,
            use_cache=True,
        )
    return out, pr, keep, scores


def _feeds(enc) -> dict:
    return {k: enc[k].numpy() for k in ("pixel_values", "input_ids", "attention_mask")}


# ------------------------------------------------------------------------------------------- structure


def test_graphs_are_valid_onnx_and_share_one_weights_file(exports, tmp_path):
    for d in exports.values():
        for name in ("prefill.onnx", "decode.onnx"):
            onnx.checker.check_model(str(d / name), full_check=True)
            onnx.shape_inference.infer_shapes_path(str(d / name), str(tmp_path / name), strict_mode=True)
        refs = {}
        for name in ("prefill.onnx", "decode.onnx"):
            m = onnx.load(str(d / name), load_external_data=False)
            for t in m.graph.initializer:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    ext = {e.key: e.value for e in t.external_data}
                    assert ext["location"] == "weights.bin"
                    refs.setdefault(t.name, set()).add((ext["offset"], ext["length"]))
        assert all(len(v) == 1 for v in refs.values())  # a weight both graphs use is stored once
        stored = sum(int(length) for ((_, length),) in refs.values())
        assert stored <= (d / "weights.bin").stat().st_size < stored + 64 * len(refs)
    meta = read_meta(exports["ort"])
    assert meta["pruning"] == {
        "retain": 0.25,
        "n_visual": 16,
        "k": 4,
        "layer": 0,
        "scorer": "qavtp",
        "fusion": FUSION.to_dict(),
        "relevance_weight": None,
    }
    assert meta["quantization"]["weight_format"] == "ort" and meta["quantization"]["method"] == "quarot"
    ops = {n.op_type for n in onnx.load(str(exports["ort"] / "decode.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "DequantizeLinear" not in ops
    ops = {n.op_type for n in onnx.load(str(exports["qdq"] / "decode.onnx"), load_external_data=False).graph.node}
    assert "DequantizeLinear" in ops and "MatMulNBits" not in ops
    # --vocab-bits 4: the embedding is gathered from packed codes and the head is a MatMulNBits too, so no
    # float32 vocabulary matrix is left (only group scales), and the file loses at least 3/4 of those matrices' bytes.
    vocab = meta["model"]["vocab_size"]

    def vocab_floats(d):
        m = onnx.load(str(d / "decode.onnx"), load_external_data=False)
        inits = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
        return m, sum(4 * int(np.prod(t.dims)) for t in inits if vocab in t.dims)

    m, left = vocab_floats(exports["vocab-ort"])
    assert read_meta(exports["vocab-ort"])["quantization"]["kv_cache"]["bits"] == 4
    assert any(t.name.startswith("kv_hadamard.") for t in m.graph.initializer)
    heads = [n for n in m.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("llm/head")]
    assert len(heads) == 1
    assert {"Gather", "BitwiseAnd", "QuantizeLinear"} <= {n.op_type for n in m.graph.node}
    # In the qdq graph no activation DequantizeLinear feeds a MatMul: onnxruntime could not fuse the weights.
    qdq = onnx.load(str(exports["vocab"] / "decode.onnx"), load_external_data=False).graph
    assert "QuantizeLinear" not in {n.op_type for n in qdq.node}
    _, before = vocab_floats(exports["ort"])
    plain, small = ((exports[k] / "weights.bin").stat().st_size for k in ("ort", "vocab-ort"))
    assert left < before / 8  # the group scales
    assert plain - small > 0.75 * before > 0


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "which",
    ["qdq", "ort", "cls", "qapruner", "dense", "fp32", "vocab", "vocab-ort", "deep", "dpp", "qavtp-dpp", "cdpruner"]
    + ["divprune"],
)
def test_prefill_and_decode_match_torch(
    which, exports, rows, tiny_llava_dir, artifact, fusion_artifact, cls_artifact, vocab_artifact
):
    model, processor, adapter = _load(which, tiny_llava_dir, artifact, fusion_artifact, cls_artifact, vocab_artifact)
    meta = read_meta(exports[which])
    rho, scorer = meta["pruning"]["retain"], meta["pruning"]["scorer"]
    enc = encode(processor, *rows)
    fusion = {"cls": FUSION_CLS, "deep": FUSION_DEEP, "dpp": FUSION_DPP}.get(which, FUSION)
    ref, pr, keep, scores = _torch_prefill(model, adapter, enc, scorer, rho, fusion)
    got = _run(_session(exports[which] / "prefill.onnx"), _feeds(enc))

    assert np.array_equal(got["kept_indices"], keep.numpy())
    assert np.array_equal(got["attention_mask_out"], pr.attention_mask.numpy())
    # A greedy selection's torch scores are ranks; the graph outputs the picks only.
    assert ("scores" in got) == (scores is not None and which not in ("dpp", "qavtp-dpp", "cdpruner", "divprune"))
    if "scores" in got:
        assert np.abs(got["scores"] - scores.numpy()).max() < 1e-4
    assert _rel(got["logits"], ref.logits[:, -1]) < LOGIT_RTOL
    real = pr.attention_mask.numpy().astype(bool)
    for i, layer in enumerate(ref.cache.layers):
        for kind, t in (("key", layer.keys), ("value", layer.values)):
            # Only real positions: what left-padding rows hold is never read.
            a = got[f"present.{i}.{kind}"].transpose(0, 2, 1, 3)[real]
            b = t.numpy().transpose(0, 2, 1, 3)[real]
            assert _rel(a, b) < LOGIT_RTOL

    # Two cached steps at once, as multi-token candidate answers are scored.
    step = np.stack([got["logits"].argmax(-1), np.full(3, 5)], axis=1).astype(np.int64)
    mask = np.concatenate([got["attention_mask_out"], np.ones((3, 2), np.int64)], axis=1)
    pos = pr.position_ids.numpy()[:, -1:] + 1 + np.arange(2)
    feeds = {"input_ids": step, "attention_mask": mask, "position_ids": pos}
    for i in range(len(adapter.decoder_layers)):
        feeds[f"past.{i}.key"], feeds[f"past.{i}.value"] = got[f"present.{i}.key"], got[f"present.{i}.value"]
    dec = _run(_session(exports[which] / "decode.onnx"), feeds)
    with torch.no_grad():
        ref2 = model(
            input_ids=torch.tensor(step),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos),
            cache=ref.cache,
        )
    assert _rel(dec["logits"], ref2.logits) < LOGIT_RTOL
    assert dec["present.0.key"].shape[2] == mask.shape[1]


class GatherElements(OpRun):
    """GatherElements by its definition (``np.take_along_axis``). onnx 1.23's reference kernel uses ``np.choose``,
    which takes at most 32 choices, and its 2-D fallback reads only the first index of each row."""

    op_domain = ""

    def _run(self, data, indices, axis=None):
        return (np.take_along_axis(data, indices, axis=axis),)


@pytest.mark.parametrize("which", ["qdq", "vocab", "deep", "qavtp-dpp", "cdpruner", "divprune"])
def test_reference_evaluator_matches_onnxruntime(which, exports, rows, tiny_llava_dir):
    """The qdq graph is plain ONNX: onnx's pure-Python runtime computes what onnxruntime does (also the bit-op
    unpacking of a 4-bit embedding)."""
    _, processor, _ = load_model(tiny_llava_dir)
    enc = encode(processor, *rows)
    path = exports[which] / "prefill.onnx"
    got = _run(_session(path), _feeds(enc))
    ref_eval = ReferenceEvaluator(str(path), new_ops=[GatherElements])
    names = ref_eval.output_names
    ref = dict(zip(names, ref_eval.run(None, _feeds(enc)), strict=True))
    assert np.array_equal(ref["kept_indices"], got["kept_indices"])
    assert _rel(ref["logits"], got["logits"]) < 1e-5
    assert _rel(ref["present.1.value"], got["present.1.value"]) < 1e-5


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(4, True, 0),
        QuantSpec(4, False, 16),
        QuantSpec(4, True, 16, 0.9),
        QuantSpec(8, False, 0, 0.95),
        QuantSpec(8, True, 32),
        QuantSpec(3, False, 16),
    ],
    ids=str,
)
@pytest.mark.parametrize("qdq_ops", [True, False])
def test_activation_fake_quant_graph_is_bit_exact(spec, qdq_ops):
    """The in-graph quantize-dequantize equals ``fake_quant_activation`` bit for bit, in every scheme, with blocked
    Q/DQ ops or elementwise ones."""
    g = Graph("fq")
    x = g.input("x", onnx.TensorProto.FLOAT, [2, 5, 64])
    g.output(fake_quant(g, x, spec, 64, qdq_ops=qdq_ops), "y", onnx.TensorProto.FLOAT, [2, 5, 64])
    sess = ort.InferenceSession(to_model(g).SerializeToString(), providers=["CPUExecutionProvider"])
    xv = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) * 3
    xv[0, 0] = 0  # an all-zero token: scale 1, output exactly 0
    got = sess.run(None, {"x": xv.numpy()})[0]
    assert np.array_equal(got, fake_quant_activation(xv, spec).numpy())
    assert np.array_equal(ReferenceEvaluator(to_model(g)).run(None, {"x": xv.numpy()})[0], got)


def test_topk_ties_go_to_the_lower_index():
    """select_tokens breaks ties by index (stable sort); ONNX TopK does too, in both runtimes."""
    g = Graph("ties")
    x = g.input("x", onnx.TensorProto.FLOAT, [2, 8])
    _, idx = g.op("TopK", x, g.const([3], np.int64), axis=-1, largest=1, sorted=1, outputs=2)
    g.output(idx, "idx", onnx.TensorProto.INT64, [2, 3])
    m = to_model(g)
    s = np.array([[0.0] * 8, [1, 2, 2, 0, 2, 2, 1, 0]], np.float32)
    want = select_tokens(torch.tensor(s), 3 / 8).numpy()
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": s})[0]
    assert np.array_equal(np.sort(got, 1), want)
    assert np.array_equal(np.sort(ReferenceEvaluator(m).run(None, {"x": s})[0], 1), want)


# ------------------------------------------------------------------------------------- torch-free runtime


def test_prompt_and_pixels_match_the_processor(exports, tiny_llava_dir, easyvqa_test):
    _, processor, _ = load_model(tiny_llava_dir)
    d = exports["qdq"]
    meta = read_meta(d)
    text = PromptEncoder(d, meta)
    q = easyvqa_test[0]["question"]
    want = encode(processor, [easyvqa_test[0]["image"]], [easyvqa_test[0]["prompt"]])["input_ids"][0].tolist()
    assert text.encode(q) == want
    cfg = json.loads((d / "processor_config.json").read_text())["image_processor"]
    rng = np.random.default_rng(0)
    images = [
        easyvqa_test[0]["image"],
        Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)),  # resize + centre crop
        Image.fromarray(rng.integers(0, 256, (20, 16, 4), dtype=np.uint8), "RGBA"),  # alpha onto white
        Image.fromarray(rng.integers(0, 256, (33, 33), dtype=np.uint8), "L"),
    ]
    for im in images:
        want = processor.image_processor(images=[im], return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(preprocess_image(im, cfg), want)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_run_never_imports_torch(runtime, exports, easyvqa_test, tmp_path):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    img = tmp_path / "x.png"
    easyvqa_test[0]["image"].save(img)
    graph = exports["ort" if runtime == "onnxruntime" else "qdq"]
    code = (
        "import sys\n"
        "from qavtp.cli import main\n"
        f"main(['run', {str(graph)!r}, '--image', {str(img)!r}, '--question', 'What shape is this?',"
        f" '--max-new-tokens', '3', '--runtime', {runtime!r}], standalone_mode=False)\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('NO_TORCH_OK')\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert "NO_TORCH_OK" in res.stdout
    assert "visual tokens kept: 4/16" in res.stdout
    assert f"time ({runtime})" in res.stdout
    assert ("vision+scoring+prune" in res.stdout) == (runtime == "onnxruntime")  # per-stage: onnxruntime's profiler


@pytest.mark.parametrize("which", ["fp32", "qdq", "qavtp-dpp", "cdpruner", "divprune"])
def test_openvino_runs_the_portable_graphs(which, exports, easyvqa_test):
    """A second production runtime: OpenVINO (float32, no dynamic activation quantization) keeps the same tokens
    and computes the logits onnxruntime does, through the prefill and a decode step. (Its float ``Div`` is not
    correctly rounded, so where ``x / scale`` is an exact tie, as on grid-valued inputs, a 4-bit code can differ.)"""
    pytest.importorskip("openvino")
    rows = easyvqa_test.select(range(3))
    got, want = ExportedModel(exports[which], runtime="openvino"), ExportedModel(exports[which])
    feeds = want.inputs(list(rows["image"]), list(rows["question"]))
    a, b = got.run_prefill(feeds), want.run_prefill(feeds)
    assert np.array_equal(a["kept_indices"], b["kept_indices"])
    assert _rel(a["logits"], b["logits"]) < 1e-4
    mask = np.concatenate([b["attention_mask_out"], np.ones((3, 1), np.int64)], 1)
    step = (b["logits"].argmax(-1)[:, None], mask, b["attention_mask_out"].sum(1, keepdims=True), b)
    assert _rel(got.run_decode(*step)["logits"], want.run_decode(*step)["logits"]) < 1e-4
    assert (
        got.generate(rows[0]["image"], rows[0]["question"], 3).tokens
        == want.generate(rows[0]["image"], rows[0]["question"], 3).tokens
    )


@pytest.mark.parametrize("spec", [QuantSpec(4, True, 16), QuantSpec(4, False, 32), QuantSpec(8, False, 16)], ids=str)
def test_quantized_embedding_gather_is_exact_in_openvino(spec, tmp_path):
    """The packed-nibble unpacking gives the same rows in OpenVINO as in onnxruntime (a BitShift did not: OpenVINO
    rounds uint8 shifts and divisions to nearest)."""
    ov = pytest.importorskip("openvino")
    emb = QuantEmbedding.from_embedding(torch.nn.Embedding(50, 64), spec)
    g = Graph("gather")
    ids = g.input("ids", onnx.TensorProto.INT64, ["b", "t"])
    g.output(quant_gather(g, ids, emb, "emb"), "y", onnx.TensorProto.FLOAT, ["b", "t", 64])
    onnx.save(to_model(g), str(tmp_path / "g.onnx"))
    feeds = {"ids": np.arange(50, dtype=np.int64).reshape(5, 10)}
    want = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    core = ov.Core()
    got = core.compile_model(core.read_model(str(tmp_path / "g.onnx")), "CPU", OPENVINO_CONFIG)(feeds)[0]
    assert np.array_equal(want, emb(torch.from_numpy(feeds["ids"])).detach().numpy())
    assert np.array_equal(got, want)


def test_openvino_refuses_the_ort_graph_in_one_line(exports):
    pytest.importorskip("openvino")
    with pytest.raises(QavtpError, match=r"cannot run .*prefill.onnx: it does not convert .*QuantizeLinear.*qdq"):
        ExportedModel(exports["vocab-ort"], runtime="openvino")
    with pytest.raises(QavtpError, match="unknown runtime 'tvm'; use one of onnxruntime, openvino"):
        ExportedModel(exports["qdq"], runtime="tvm")


def test_exported_model_generates(exports, easyvqa_test):
    m = ExportedModel(exports["dense"])
    gen = m.generate(easyvqa_test[0]["image"], easyvqa_test[0]["question"], max_new_tokens=4)
    assert gen.kept == gen.n_visual == 16 and len(gen.tokens) <= 4
    assert gen.kept_indices == list(range(16))


# -------------------------------------------------------------------------------------------- bad input


def _cli(args):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


def test_bad_export_input(exports, artifact, tiny_llava_dir, tmp_path):
    before = sorted(p.name for p in exports["qdq"].iterdir())
    msg = _cli(["export", str(artifact), "-o", str(exports["qdq"]), "--retain", "0.25"])
    assert "exists" in msg and sorted(p.name for p in exports["qdq"].iterdir()) == before
    msg = _cli(["export", str(artifact), "-o", str(tmp_path / "a"), "--retain", "0.25", "--scorer", "qavtp"])
    assert "without fusion weights" in msg and not (tmp_path / "a").exists()
    msg = _cli(["export", str(tiny_llava_dir), "-o", str(tmp_path / "b"), "--retain", "0.5", "--scorer", "qavtp"])
    assert "artifact" in msg and not (tmp_path / "b").exists()
    msg = _cli(["export", str(artifact), "-o", str(tmp_path / "c"), "--retain", "1.5"])
    assert "retention" in msg
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_unsupported_architectures_are_named(tiny_llava_dir):
    from types import SimpleNamespace

    with pytest.raises(QavtpError, match="qwen2_vl"):
        check_supported(SimpleNamespace(config=SimpleNamespace(model_type="qwen2_vl")))
    model, _, _ = load_model(tiny_llava_dir)
    model.config.text_config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    with pytest.raises(QavtpError, match="llama3"):
        check_supported(model)


def test_bad_run_input(exports, easyvqa_test, tmp_path):
    d = exports["dense"]
    img = tmp_path / "x.png"
    easyvqa_test[0]["image"].save(img)
    notimg = tmp_path / "notes.png"
    notimg.write_text("not an image")
    assert "not a readable image" in _cli(["run", str(d), "--image", str(notimg), "--question", "Which shape?"])
    assert "not found" in _cli(["run", str(d), "--image", str(tmp_path / "nope.png"), "--question", "Which shape?"])
    long_q = " ".join(["circle"] * 3000)
    assert "maximum sequence length" in _cli(["run", str(d), "--image", str(img), "--question", long_q])
    assert "not a qavtp export" in _cli(["run", str(tmp_path), "--image", str(img), "--question", "Which shape?"])


@pytest.mark.parametrize("location", ["../weights.bin", "/etc/passwd"])
def test_external_data_outside_the_directory_is_refused(exports, easyvqa_test, tmp_path, location):
    d = tmp_path / "evil"
    shutil.copytree(exports["dense"], d)
    m = onnx.load(str(d / "decode.onnx"), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in t.external_data if e.key == "location").value = location
    (d / "decode.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(QavtpError, match="outside the model directory"):
        check_external_data(d / "decode.onnx")
    img = tmp_path / "x.png"
    easyvqa_test[0]["image"].save(img)
    assert "outside the model directory" in _cli(["run", str(d), "--image", str(img), "--question", "Which shape?"])


# ------------------------------------------------------------------------------------ reference model


REF_RUNS = Path(os.environ.get("QAVTP_BENCH_RUNS", "runs/bench"))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "fmt"), [("W4A16_RTN", "qdq"), ("W4A4_QuaRot___GPTQ", "ort")])
def test_reference_artifact_export(name, fmt, tmp_path, easyvqa_test):
    """The reference W4A4 artifact (``$QAVTP_BENCH_RUNS``, written by bench/quant_table.py), pruned to 12.5 %.

    With 16-bit activations the graph matches torch to float32 noise. With 4-bit activations a last-bit
    difference of a matmul (onnxruntime and torch sum in different orders) flips a rounding now and then,
    and 30 layers amplify it: the same torch model gives logits 26 % apart for one prompt alone and in a
    padded batch. So for W4A4 the bar is: same kept tokens, same scores, correlated logits.
    """
    art = REF_RUNS / name
    if not art.is_dir():
        pytest.skip(f"no reference artifact at {art}")
    model, processor, adapter, _ = load_artifact(art)
    d = export_model(str(art), tmp_path / "x", ExportConfig(0.125, "qapruner", fmt))
    r = easyvqa_test[:2]
    enc = encode(processor, r["image"], [r["prompt"][0], r["prompt"][1] + " Think."])
    ref, _, keep, scores = _torch_prefill(model, adapter, enc, "qapruner", 0.125, None)
    got = _run(_session(d / "prefill.onnx"), _feeds(enc))
    assert np.array_equal(got["kept_indices"], keep.numpy())
    assert np.abs(got["scores"] - scores.numpy()).max() < 1e-5
    want = ref.logits[:, -1].numpy()
    if name == "W4A16_RTN":
        assert _rel(got["logits"], want) < LOGIT_RTOL
    else:
        cos = (got["logits"] * want).sum(-1) / np.linalg.norm(got["logits"], axis=-1) / np.linalg.norm(want, axis=-1)
        assert cos.min() > 0.75  # measured 0.83 and 0.98 (onnxruntime 1.32, 2 cores)


def test_onnx_candidate_scores_equal_torch(exports, fusion_artifact, easyvqa_test):
    """The exported graphs score answers (multi-token ones through the decode graph) as qavtp eval does."""
    from qavtp.data.easyvqa import COLORS
    from qavtp.evaluate import Pruning, pruned_choice_logprobs
    from qavtp.export.accuracy import choice_logprobs

    model, processor, adapter, _ = load_artifact(fusion_artifact)
    rows = easyvqa_test.select([0, 3, 7])
    choices = [[*COLORS, "purple triangle"]] * 3
    prune = Pruning(adapter, "qavtp", 0.25, fusion=FUSION)
    want, keep = pruned_choice_logprobs(prune, processor, rows["image"], rows["prompt"], choices)
    got, kept = choice_logprobs(ExportedModel(exports["qdq"]), rows["image"], rows["question"], choices)
    assert np.array_equal(kept, keep.numpy())
    assert np.allclose(np.array(got), np.array(want), atol=1e-4)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_cli_eval_onnx_compares_with_torch(runtime, exports, tmp_path):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    out = tmp_path / "cmp"
    args = ["eval-onnx", str(exports["qdq"]), "--limit", "8", "--compare", "-o", str(out), "--runtime", runtime]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    agree = res["agreement"]
    assert agree["n"] == 8 and agree["same_answers"] == 1.0 and agree["same_kept_tokens"] == 1.0
    assert "same answers 100.0 %" in r.output and res["onnx"]["runtime"] == runtime
    # Every question lands in one margin bin (easy-VQA always offers several candidates) and agrees there.
    bins = agree["same_answers_by_torch_margin"]
    assert sum(b["n"] for b in bins) == 8 and all(b["same"] == 1.0 for b in bins if b["n"])
    assert all(p["margin"] >= 0 for p in res["onnx"]["predictions"] + res["torch"]["predictions"])


@pytest.mark.parametrize("fmt", ["qdq", "ort"])
def test_learned_group_scales_are_exported(fmt, vocab_artifact, tmp_path):
    """Alignment with ``--scale-lr`` changes only the stored group scales: the graphs must carry them, in the
    decoder linears, the quantized embedding and the LM head alike."""
    from qavtp.calibrate.artifact import save_artifact
    from qavtp.calibrate.scale_gains import ScaleGains

    model, _, _, cfg = load_artifact(vocab_artifact)
    gains = ScaleGains(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for g in gains.gains:
            g.uniform_(0.8, 1.25)
    gains.fold()
    scaled = save_artifact(tmp_path / "scaled", model, cfg)
    before = {k: v for k, v in load_artifact(vocab_artifact)[0].state_dict().items() if k.endswith(".scale")}
    after = load_artifact(scaled)[0].state_dict()
    assert {k.split(".")[-2] for k in before if not torch.equal(before[k], after[k])} >= {"embed_tokens", "lm_head"}
    out = export_model(str(scaled), tmp_path / "onnx", ExportConfig(0.25, "qapruner", fmt))
    res = CliRunner().invoke(main, ["eval-onnx", str(out), "--limit", "8", "--compare", "-o", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert res["agreement"]["same_answers"] == 1.0 and res["agreement"]["same_kept_tokens"] == 1.0
    margins = [[p["margin"] for p in res[k]["predictions"]] for k in ("torch", "onnx")]
    assert np.allclose(*margins, atol=1e-2), margins  # ~2e-3 here; the unscaled graph's differ by 0.08


def test_runtime_activations_leave_quantization_to_the_kernel(exports, fusion_artifact, rows, tmp_path):
    """``--activations runtime``: the same int4 weights and pruning subgraph, no activation quantizer on any linear;
    at accuracy level 0 it computes the torch model with its activation quantizers off, at the default level 4
    onnxruntime's int8 activations; the exact graph stays as it was."""
    art = str(fusion_artifact)
    rt0 = export_model(art, tmp_path / "rt0", ExportConfig(0.25, "qavtp", "ort", 0, None, "runtime"))
    rt4 = export_model(art, tmp_path / "rt4", ExportConfig(0.25, "qavtp", "ort", activations="runtime"))
    q = read_meta(rt4)["quantization"]
    assert (q["mode"], q["accuracy_level"]) == ("runtime", 4)
    assert read_meta(exports["ort"])["quantization"]["mode"] == "exact"

    def llm_ops(d):
        g = onnx.load(str(d / "prefill.onnx"), load_external_data=False).graph
        return {n.op_type for n in g.node if n.name.startswith("llm/")}

    assert {"Round", "QuantizeLinear"} & llm_ops(exports["ort"]) and not {"Round", "QuantizeLinear"} & llm_ops(rt0)
    model, processor, adapter, _ = load_artifact(fusion_artifact)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.aspec = None
    enc = encode(processor, *rows)
    ref, _, keep, _ = _torch_prefill(model, adapter, enc, "qavtp", 0.25, FUSION)
    got0, got4 = (_run(_session(d / "prefill.onnx"), _feeds(enc)) for d in (rt0, rt4))
    exact = _run(_session(exports["ort"] / "prefill.onnx"), _feeds(enc))
    for got in (got0, got4):
        assert np.array_equal(got["kept_indices"], keep.numpy())
        assert np.array_equal(got["kept_indices"], exact["kept_indices"])
    assert _rel(got0["logits"], ref.logits[:, -1]) < LOGIT_RTOL
    assert _rel(got4["logits"], got0["logits"]) < 0.05
    assert _rel(exact["logits"], ref.logits[:, -1]) > 10 * LOGIT_RTOL  # the exact graph does quantize activations

"""Do onnxruntime, OpenVINO and onnx.reference run opset 23's Attention, RMSNormalization and RotaryEmbedding in
the forms the portable (``qdq``) decoder would need? (issue 25, item 2: use them there only if both runtimes do)

    python bench/opset23_ops.py [--out bench/results/opset23_ops.md]

Each op is a one-node opset-23 model at the reference model's head layout (9 query heads, 3 KV heads, head size 64),
checked against a numpy reference of what the decoder computes today: RMSNorm; GQA attention over a past cache
with a boolean padding mask on a left-padded batch of 2 (causal offset by the past); rotate-half RoPE at explicit
positions. Prints one row per op and runtime: runs or the runtime's first error line, and max |error|.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from _table import emit_table
from onnx import TensorProto, helper

B, S, P, N, KV, D = 2, 5, 7, 9, 3, 64
F = TensorProto.FLOAT


def _model(node: onnx.NodeProto, inputs: dict[str, np.ndarray], inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    vis = [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inputs.items()
    ]
    outs = [helper.make_tensor_value_info(o, F, None) for o in node.output]
    init = [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()]
    graph = helper.make_graph([node], "op", vis, outs, initializer=init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)


def rmsnorm_case(rng):
    x = rng.standard_normal((B, S, N * D)).astype(np.float32)
    w = rng.standard_normal(N * D).astype(np.float32)
    ref = w * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)
    node = helper.make_node("RMSNormalization", ["x", "w"], ["y"], axis=-1, epsilon=1e-5)
    return _model(node, {"x": x}, {"w": w}), {"x": x}, ref


def attention_case(rng):
    q = rng.standard_normal((B, S, N * D)).astype(np.float32)
    k, v = (rng.standard_normal((B, S, KV * D)).astype(np.float32) for _ in range(2))
    pk, pv = (rng.standard_normal((B, KV, P, D)).astype(np.float32) for _ in range(2))
    valid = np.ones((B, P + S), bool)
    valid[1, :3] = False  # row 1 left-padded
    allowed = (np.arange(P + S)[None, :] <= P + np.arange(S)[:, None])[None, None] & valid[:, None, None, :]
    # numpy reference: heads repeated, masked logits at float32's lowest value (as export/llava_graph.py does)
    Q = q.reshape(B, S, N, D).transpose(0, 2, 1, 3)
    K = np.repeat(np.concatenate([pk, k.reshape(B, S, KV, D).transpose(0, 2, 1, 3)], 2), N // KV, 1)
    V = np.repeat(np.concatenate([pv, v.reshape(B, S, KV, D).transpose(0, 2, 1, 3)], 2), N // KV, 1)
    lg = np.where(allowed, Q @ K.transpose(0, 1, 3, 2) / np.sqrt(D), np.finfo(np.float32).min)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    ref = ((p / p.sum(-1, keepdims=True)) @ V).transpose(0, 2, 1, 3).reshape(B, S, N * D)
    feeds = {"q": q, "k": k, "v": v, "mask": allowed, "pk": pk, "pv": pv}
    node = helper.make_node(
        "Attention",
        ["q", "k", "v", "mask", "pk", "pv"],
        ["y", "present_k", "present_v"],
        q_num_heads=N,
        kv_num_heads=KV,
    )
    return _model(node, feeds, {}), feeds, ref


def rotary_case(rng):
    x = rng.standard_normal((B, N, S, D)).astype(np.float32)
    pos = np.array([[3, 4, 5, 6, 7], [0, 0, 1, 2, 3]], np.int64)
    ang = np.arange(64, dtype=np.float32)[:, None] * (1e4 ** (-np.arange(0, D, 2) / D)).astype(np.float32)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    c = np.concatenate([cos[pos], cos[pos]], -1)[:, None]
    s = np.concatenate([sin[pos], sin[pos]], -1)[:, None]
    ref = x * c + np.concatenate([-x[..., D // 2 :], x[..., : D // 2]], -1) * s
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"])
    return _model(node, {"x": x, "pos": pos}, {"cos": cos, "sin": sin}), {"x": x, "pos": pos}, ref


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:140].replace("|", "/")


def run_all(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray | str]:
    import onnxruntime as ort
    import openvino as ov
    from onnx.reference import ReferenceEvaluator

    out: dict[str, np.ndarray | str] = {}
    data = model.SerializeToString()
    try:
        out["onnxruntime"] = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    except Exception as e:  # each runtime raises its own types
        out["onnxruntime"] = _first_line(e)
    try:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(data, b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        out[f"OpenVINO {ov.__version__.split('-')[0]}"] = compiled(feeds)[0]
    except Exception as e:
        out["OpenVINO"] = _first_line(e)
    try:
        out["onnx.reference"] = ReferenceEvaluator(model).run(None, feeds)[0]
    except Exception as e:
        out["onnx.reference"] = _first_line(e)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/opset23_ops.md", help="also write the table here")
    args = ap.parse_args()
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    lines = [
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}; max |error| against the numpy reference "
        "(row 1 of the attention case is left-padded in its past: every query still sees a key)",
        "",
        "| op (opset 23) | runtime | result | max abs error |",
        "|---|---|---|---:|",
    ]
    for name, case in (
        ("RMSNormalization", rmsnorm_case),
        ("Attention", attention_case),
        ("RotaryEmbedding", rotary_case),
    ):
        model, feeds, ref = case(rng)
        for runtime, got in run_all(model, feeds).items():
            if isinstance(got, str):
                lines.append(f"| {name} | {runtime} | fails: {got} | – |")
                continue
            err = np.abs(got - ref)
            lines.append(f"| {name} | {runtime} | runs | {err.max():.1e} |")
    emit_table(lines, args.out)


if __name__ == "__main__":
    main()

"""Dynamic activation fake-quant as standard ONNX ops, step for step as ``calibrate.quantizers`` does it.

Every op runs in float32 in the spec's order (Mul then Div for the scale, a true Div for ``x / scale``,
Round = half to even), so onnxruntime reproduces ``fake_quant_activation`` bit for bit on the same input.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from qavtp.calibrate.quantizers import QuantSpec, check_group_size
from qavtp.export.onnx_graph import Graph


def _f(g: Graph, v: float) -> str:
    return g.const(np.float32(v))


def _axes(g: Graph) -> str:
    return g.const([-1], np.int64)


_CODE_TYPES = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4, (8, True): TensorProto.INT8}
_CODE_TYPES[(8, False)] = TensorProto.UINT8


def fake_quant(g: Graph, x: str, spec: QuantSpec, dim: int, rank: int = 3, qdq_ops: bool = False) -> str:
    """Quantize-dequantize ``x [..., dim]`` (rank ``rank``) in groups of ``spec.group_size`` along the last axis.

    Scales (and zero points) come from the spec's own op sequence, and the codes from plain elementwise ops.
    With ``qdq_ops`` (the ``ort`` graph), 4- and 8-bit groups use opset 21's blocked ``QuantizeLinear`` /
    ``DequantizeLinear`` instead (the same formulas, as the spec says), which onnxruntime runs about twice as fast
    as elementwise ops that broadcast over groups of 16. The portable graph keeps the elementwise ops: OpenVINO
    2026.4 refuses a blocked ``QuantizeLinear`` on an input with dynamic dimensions, and in onnxruntime an
    activation ``DequantizeLinear`` feeding a ``MatMul`` whose weight is a ``DequantizeLinear`` too stops the
    weight fusion into ``MatMulNBits`` (measured: decode 50 -> 5 tokens/s).
    """
    # q/k/v (and gate/up) read the same input: one quantizer serves them (the reference prefill: 4,163 nodes instead
    # of 5,602). onnxruntime merged the copies itself (same latency), a runtime without that pass need not.
    key = ("fake_quant", x, spec, dim, rank, qdq_ops)
    if key not in g.memo:
        g.memo[key] = _fake_quant(g, x, spec, dim, rank, qdq_ops)
    return g.memo[key]


def _fake_quant(g: Graph, x: str, spec: QuantSpec, dim: int, rank: int, qdq_ops: bool) -> str:
    gs = check_group_size(dim, spec.group_size)
    grouped = gs != dim
    blocked = qdq_ops and grouped and spec.bits in (4, 8)
    shape = [0] * (rank - 1)
    xg = g.op("Reshape", x, g.const([*shape, dim // gs, gs], np.int64)) if grouped else x
    qmax = _f(g, spec.qmax)
    zero_f, one = _f(g, 0.0), _f(g, 1.0)
    keep = 0 if blocked else 1  # blocked Q/DQ take scales [..., dim / gs]

    def clip(t: str) -> str:  # multiplying by exactly 1.0 changes no bit, so that node is left out
        return t if spec.clip_ratio == 1.0 else g.op("Mul", t, _f(g, spec.clip_ratio))

    if spec.symmetric:
        amax = g.op("ReduceMax", g.op("Abs", xg), _axes(g), keepdims=keep)
        scale = g.op("Div", clip(amax), qmax)
        scale = g.op("Where", g.op("Equal", scale, zero_f), one, scale)
        zp = None
    else:
        lo = clip(g.op("Min", g.op("ReduceMin", xg, _axes(g), keepdims=keep), zero_f))
        hi = clip(g.op("Max", g.op("ReduceMax", xg, _axes(g), keepdims=keep), zero_f))
        scale = g.op("Div", g.op("Sub", hi, lo), qmax)
        scale = g.op("Where", g.op("Equal", scale, zero_f), one, scale)
        zp = g.op("Clip", g.op("Round", g.op("Div", g.op("Neg", lo), scale)), zero_f, qmax)
    if blocked:
        # The zero point's type sets the code type; a symmetric one is a tensor of zeros shaped like the scales.
        code = _CODE_TYPES[spec.bits, spec.symmetric]
        zq = g.op("Cast", zp if zp is not None else g.op("Mul", scale, zero_f), to=code)
        q = g.op("QuantizeLinear", x, scale, zq, axis=rank - 1, block_size=gs)
        return g.op("DequantizeLinear", q, scale, zq, axis=rank - 1, block_size=gs)
    if zp is None:
        y = g.op("Mul", g.op("Clip", g.op("Round", g.op("Div", xg, scale)), _f(g, spec.qmin), qmax), scale)
    else:
        q = g.op("Clip", g.op("Add", g.op("Round", g.op("Div", xg, scale)), zp), zero_f, qmax)
        y = g.op("Mul", g.op("Sub", q, zp), scale)
    return g.op("Reshape", y, g.const([*shape, dim], np.int64)) if grouped else y

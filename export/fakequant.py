"""Dynamic activation fake-quant as standard ONNX ops, step for step as ``calibrate.quantizers`` does it.

Every op runs in float32 in the spec's order (Mul then Div for the scale, a true Div for ``x / scale``,
Round = half to even), so onnxruntime reproduces ``fake_quant_activation`` bit for bit on the same input.
"""

from __future__ import annotations

import numpy as np

from qavtp.calibrate.quantizers import QuantSpec, check_group_size
from qavtp.export.builder import Graph


def _f(g: Graph, v: float) -> str:
    return g.const(np.float32(v))


def _axes(g: Graph) -> str:
    return g.const([-1], np.int64)


def fake_quant(g: Graph, x: str, spec: QuantSpec, dim: int, rank: int = 3) -> str:
    """Quantize-dequantize ``x [..., dim]`` (rank ``rank``) in groups of ``spec.group_size`` along the last axis."""
    gs = check_group_size(dim, spec.group_size)
    grouped = gs != dim
    xg = g.op("Reshape", x, g.const([0] * (rank - 1) + [dim // gs, gs], np.int64)) if grouped else x
    qmin, qmax = _f(g, spec.qmin), _f(g, spec.qmax)
    zero_f, one = _f(g, 0.0), _f(g, 1.0)

    def clip(t: str) -> str:  # multiplying by exactly 1.0 changes no bit, so that node is left out
        return t if spec.clip_ratio == 1.0 else g.op("Mul", t, _f(g, spec.clip_ratio))

    if spec.symmetric:
        amax = g.op("ReduceMax", g.op("Abs", xg), _axes(g), keepdims=1)
        scale = g.op("Div", clip(amax), qmax)
        scale = g.op("Where", g.op("Equal", scale, zero_f), one, scale)
        q = g.op("Clip", g.op("Round", g.op("Div", xg, scale)), qmin, qmax)
        y = g.op("Mul", q, scale)
    else:
        lo = clip(g.op("Min", g.op("ReduceMin", xg, _axes(g), keepdims=1), zero_f))
        hi = clip(g.op("Max", g.op("ReduceMax", xg, _axes(g), keepdims=1), zero_f))
        scale = g.op("Div", g.op("Sub", hi, lo), qmax)
        scale = g.op("Where", g.op("Equal", scale, zero_f), one, scale)
        zp = g.op("Clip", g.op("Round", g.op("Div", g.op("Neg", lo), scale)), zero_f, qmax)
        q = g.op("Clip", g.op("Add", g.op("Round", g.op("Div", xg, scale)), zp), zero_f, qmax)
        y = g.op("Mul", g.op("Sub", q, zp), scale)
    return g.op("Reshape", y, g.const([0] * (rank - 1) + [dim], np.int64)) if grouped else y

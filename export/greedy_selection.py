"""DivPrune's and CDPruner's greedy selections as standard ONNX ``Loop`` s, as ``qavtp.diversity`` computes them.

Each iteration picks one token per sample (``ArgMax``: ties to the lower index, as ``torch.argmax``); the loop runs
exactly k times (k is fixed at export), so the graph's cost is k small steps over ``[B, N]`` and ``[B, k, N]``
tensors, batched over the samples. Every formula follows its torch twin term for term (same operands, same order)
so that onnxruntime, OpenVINO and ``onnx.reference`` pick the tokens torch picks.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from qavtp.diversity import DPP_GRID, EPS, MAXMIN_GRID
from qavtp.export.onnx_graph import Graph

I64 = np.int64
F32 = np.float32
NORM_EPS = 1e-12  # torch.nn.functional.normalize's


def _pick(g: Graph, values: str, scale: str, grid: float) -> str:
    """``qavtp.diversity.pick``: ``ArgMax`` of ``values / scale`` in steps of ``1 / grid`` (half to even, as torch)."""
    key = g.op("Round", g.op("Mul", g.op("Div", values, scale), g.const(F32(grid))))
    return g.op("ArgMax", key, axis=-1, keepdims=1)


def _l2_normalize(g: Graph, x: str) -> str:
    """``torch.nn.functional.normalize(x, dim=-1)``: ``x / max(||x||, 1e-12)``."""
    norm = g.op("Sqrt", g.op("ReduceSumSquare", x, g.const([-1], I64), keepdims=1))
    return g.op("Div", x, g.op("Max", norm, g.const(F32(NORM_EPS))))


def cosine(g: Graph, x: str) -> str:
    """Pairwise cosine similarity ``[B, N, N]`` of ``x [B, N, D]``."""
    n = _l2_normalize(g, x)
    return g.op("MatMul", n, g.op("Transpose", n, perm=[0, 2, 1]))


def text_relevance(g: Graph, vis: str, emb: str, mask: str, is_image: str) -> str:
    """``qavtp.scoring.text_relevance``: each visual token's mean cosine similarity to its prompt's real text tokens."""
    cos = g.op("MatMul", _l2_normalize(g, vis), g.op("Transpose", _l2_normalize(g, emb), perm=[0, 2, 1]))  # [B,N,L]
    real = g.op("Cast", mask, to=TensorProto.BOOL)
    text = g.op("Cast", g.op("And", real, g.op("Not", is_image)), to=TensorProto.FLOAT)  # [B, L]
    num = g.op(
        "ReduceSum", g.op("Mul", cos, g.op("Unsqueeze", text, g.const([1], I64))), g.const([-1], I64), keepdims=0
    )
    return g.op("Div", num, g.op("ReduceSum", text, g.const([-1], I64), keepdims=1))


def relevance_quality(g: Graph, r: str, theta: float) -> str:
    """``qavtp.diversity.relevance_quality``: ``exp(theta / (2 (1 - theta)) (minmax(r) - 1))``."""
    axes = g.const([-1], I64)
    lo = g.op("ReduceMin", r, axes, keepdims=1)
    span = g.op("Max", g.op("Sub", g.op("ReduceMax", r, axes, keepdims=1), lo), g.const(F32(EPS)))
    unit = g.op("Sub", g.op("Div", g.op("Sub", r, lo), span), g.const(F32(1)))
    return g.op("Exp", g.op("Mul", g.const(F32(theta / (2 * (1 - theta)))), unit))


def _row(g: Graph, m: str, j: str, n: int) -> str:
    """Row ``j [B, 1]`` of ``m [B, N, N]`` per sample: ``[B, N]``."""
    idx = g.op(
        "Expand", g.op("Unsqueeze", j, g.const([-1], I64)), g.op("Concat", g.op("Shape", j), g.const([n], I64), axis=0)
    )
    return g.op("Squeeze", g.op("GatherElements", m, idx, axis=1), g.const([1], I64))


def _mark(g: Graph, x: str, j: str) -> str:
    """``x [B, N]`` with ``-inf`` at each sample's ``j [B, 1]``: a picked token is never picked again."""
    return g.op("ScatterElements", x, j, g.op("Expand", g.const(F32(-np.inf)), g.op("Shape", j)), axis=1)


def dpp_picks(g: Graph, x: str, quality: str, n: int, k: int) -> str:
    """The first k picks ``[B, k]`` (in pick order) of ``qavtp.diversity.dpp_order(x, quality)``: greedy MAP of the
    DPP with kernel ``diag(q) cos(x) diag(q)`` (Chen et al. 2018, Algorithm 1, fixed ``[B, k, N]`` Cholesky rows)."""
    L = g.op("Mul", g.op("Mul", g.op("Unsqueeze", quality, g.const([2], I64)), cosine(g, x)),
             g.op("Unsqueeze", quality, g.const([1], I64)))  # fmt: skip
    d2 = g.op("ReduceSum", g.op("Mul", L, g.const(np.eye(n, dtype=F32))), g.const([-1], I64), keepdims=0)  # diag
    batch = g.op("Shape", quality, end=1)
    scale = g.op("Max", g.op("ReduceMax", d2, g.const([-1], I64), keepdims=1), g.const(F32(EPS)))
    rows = g.op("Expand", g.const(F32(0)), g.op("Concat", batch, g.const([k, n], I64), axis=0))  # [B, k, N]
    slot = g.const(np.arange(k).reshape(1, k, 1), I64)

    def body(i: str, state: list[str]) -> tuple[list[str], list[str]]:
        d2, c = state
        j = _pick(g, d2, scale, DPP_GRID)  # [B, 1]
        dj = g.op("Sqrt", g.op("Max", g.op("GatherElements", d2, j, axis=1), g.const(F32(0))))  # [B, 1]
        at_j = g.op(
            "Expand", g.op("Unsqueeze", j, g.const([-1], I64)), g.op("Concat", batch, g.const([k, 1], I64), axis=0)
        )
        cj = g.op("Transpose", g.op("GatherElements", c, at_j, axis=2), perm=[0, 2, 1])  # [B, 1, k]
        proj = g.op("Squeeze", g.op("MatMul", cj, c), g.const([1], I64))  # [B, N]
        e = g.op("Div", g.op("Sub", _row(g, L, j, n), proj), g.op("Max", dj, g.const(F32(EPS))))
        e = g.op("Where", g.op("LessOrEqual", dj, g.const(F32(EPS))), g.const(F32(0)), e)
        c = g.op("Where", g.op("Equal", slot, i), g.op("Unsqueeze", e, g.const([1], I64)), c)
        d2 = _mark(g, g.op("Sub", d2, g.op("Mul", e, e)), j)
        return [d2, c], [g.op("Squeeze", j, g.const([1], I64))]

    *_, picks = g.loop(g.const(k, I64), [(d2, TensorProto.FLOAT), (rows, TensorProto.FLOAT)], body, [TensorProto.INT64])
    return g.op("Transpose", picks, perm=[1, 0])  # [k, B] -> [B, k]


def maxmin_picks(g: Graph, x: str, n: int, k: int) -> str:
    """The first k picks ``[B, k]`` of ``qavtp.diversity.divprune_order(x)``: greedy max-min cosine distance."""
    dist = g.op("Sub", g.const(F32(1)), cosine(g, x))  # [B, N, N]
    two = g.op("TopK", dist, g.const([2], I64), axis=1, largest=0, sorted=1, outputs=2)[0]  # [B, 2, N]
    nearest = g.op(
        "Squeeze", g.op("Slice", two, g.const([1], I64), g.const([2], I64), g.const([1], I64)), g.const([1], I64)
    )
    first = _pick(g, nearest, g.const(F32(1)), MAXMIN_GRID)  # [B, 1]
    to_picked = _mark(g, _row(g, dist, first, n), first)

    def body(_: str, state: list[str]) -> tuple[list[str], list[str]]:
        (to_picked,) = state
        j = _pick(g, to_picked, g.const(F32(1)), MAXMIN_GRID)
        # min(-inf, .) keeps every picked token at -inf: the mask torch applies before its argmax.
        to_picked = _mark(g, g.op("Min", to_picked, _row(g, dist, j, n)), j)
        return [to_picked], [g.op("Squeeze", j, g.const([1], I64))]

    _, rest = g.loop(g.const(k - 1, I64), [(to_picked, TensorProto.FLOAT)], body, [TensorProto.INT64])
    return g.op("Concat", first, g.op("Transpose", rest, perm=[1, 0]), axis=1)

"""In-graph visual-token scoring and pruning before the LLM (K = 0), as ``qavtp.scoring`` / ``qavtp.pruning``.

Scores ``[B, N]`` -> ``TopK(k)`` (ties to the lower index, like the stable sort of ``select_tokens``), or the
greedy DPP / max-min selection of ``qavtp.export.greedy_selection`` ->
indices sorted ascending -> a keep mask over the L positions (text always kept) -> the ``L' = L - N + k``
survivors in ascending order (a second ``TopK`` over ``-position``, survivors ranked first) ->
``GatherElements`` of embeddings and mask; positions recomputed contiguous as ``prune_sequence`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from qavtp.export.fakequant import fake_quant
from qavtp.export.greedy_selection import dpp_picks, maxmin_picks, relevance_quality, text_relevance
from qavtp.export.llava_graph import Decoder, _heads, left_padded_positions, rmsnorm, seq_len
from qavtp.export.onnx_graph import Graph
from qavtp.scoring import FusionParams, semantic_layer

I64 = np.int64
F32 = np.float32


def _axes(g: Graph) -> str:
    return g.const([-1], I64)


def ordered_positions(g: Graph, select: str, count: str) -> str:
    """Indices ``[B, count]`` of the True entries of ``select [B, L]``, ascending (each row holds ``count``).

    Keys ``-p`` for selected positions and ``-p - L`` for the rest: the ``count`` largest keys are exactly the
    selected positions, in increasing p. Integer arithmetic, so there are no ties or rounding.
    """
    L = seq_len(g, select)
    p = g.op("Range", g.const(0, I64), g.op("Squeeze", L, g.const([0], I64)), g.const(1, I64))
    neg = g.op("Neg", p)
    key = g.op("Where", select, neg, g.op("Sub", neg, L))
    key = g.op("Cast", key, to=TensorProto.FLOAT)  # exact below 2^24 positions; float TopK is the portable one
    _, idx = g.op("TopK", key, count, axis=-1, largest=1, sorted=1, outputs=2)
    return idx


def gather_rows(g: Graph, x: str, idx: str) -> str:
    """``x [B, L, D]`` at per-sample positions ``idx [B, M]`` -> ``[B, M, D]`` (GatherElements, expanded indices)."""
    shape = g.op("Concat", g.op("Shape", idx), g.op("Shape", x, start=2), axis=0)
    full = g.op("Expand", g.op("Unsqueeze", idx, g.const([-1], I64)), shape)
    return g.op("GatherElements", x, full, axis=1)


# -------------------------------------------------------------------------------------------- scorers


def text_attention(g: Graph, dec: Decoder, emb: str, mask: str, positions: str, vis_pos: str, at: int = 0) -> str:
    """``qavtp.scoring.text_attention`` at decoder layer ``at``: last prompt token -> every position, mean over
    heads, at the visual positions ``vis_pos [B, N]``. For ``at > 0`` layers ``0..at-1`` first run on the full
    prompt (``qavtp.scoring.hidden_states_at``), as in the torch scorer."""
    if at:
        rope, allowed = dec.rope(positions), dec.attention_mask(mask, seq_len(g, emb), None)
        for i in range(at):
            emb, _, _ = dec.make_layer(i, emb, rope, allowed, None, stage="prune/score")
        g.scope = "prune/score"
    with dec.adapter.resident(at) as layer:
        attn = layer.self_attn
        h = rmsnorm(g, emb, layer.input_layernorm.weight, dec.eps, dec.name(layer.input_layernorm))
        last = g.op("Slice", h, g.const([-1], I64), g.const([np.iinfo(I64).max], I64), g.const([1], I64))
        rope = dec.rope(positions)
        # Weights without activation quantizer, as the torch scorer: a flipped 4-bit rounding would change the kept
        # set.
        q = _heads(g, dec.linear(last, attn.q_proj, act=False), dec.heads, dec.head_dim)  # [B, H, 1, hd]
        k = _heads(g, dec.linear(h, attn.k_proj, act=False), dec.kv_heads, dec.head_dim)  # [B, Hkv, L, hd]
    last_sl = (g.const([-1], I64), g.const([np.iinfo(I64).max], I64), g.const([2], I64))
    q_rope = type(rope)(g.op("Slice", rope.cos, *last_sl), g.op("Slice", rope.sin, *last_sl))
    q = dec.apply_rope(q, q_rope)
    k = dec.apply_rope(k, rope)
    rep = dec.heads // dec.kv_heads
    q5 = g.op("Reshape", q, g.const([0, dec.kv_heads, rep, 1, dec.head_dim], I64))
    kt = g.op("Transpose", g.op("Unsqueeze", k, g.const([2], I64)), perm=[0, 1, 2, 4, 3])
    logits = g.op("Mul", g.op("MatMul", q5, kt), g.const(F32(dec.scaling)))  # [B, Hkv, rep, 1, L]
    logits = g.op("Reshape", logits, g.const([0, dec.heads, -1], I64))  # [B, H, L]
    # The last token sees every real position; padding gets -inf exactly as the torch scorer does.
    real = g.op("Unsqueeze", g.op("Cast", mask, to=TensorProto.BOOL), g.const([1], I64))
    logits = g.op("Where", real, logits, g.const(F32(-np.inf)))
    probs = g.op("ReduceMean", g.op("Softmax", logits, axis=-1), g.const([1], I64), keepdims=0)  # [B, L]
    return g.op("GatherElements", probs, vis_pos, axis=1)


def normalize(g: Graph, s: str, kind: str) -> str:
    """``qavtp.scoring.normalize`` over the last axis; a constant row becomes zeros."""
    zero, one = g.const(F32(0)), g.const(F32(1))
    if kind == "minmax":
        lo = g.op("ReduceMin", s, _axes(g), keepdims=1)
        span = g.op("Sub", g.op("ReduceMax", s, _axes(g), keepdims=1), lo)
        pos = g.op("Greater", span, zero)
        return g.op("Where", pos, g.op("Div", g.op("Sub", s, lo), g.op("Where", pos, span, one)), zero)
    mean = g.op("ReduceMean", s, _axes(g), keepdims=1)
    d = g.op("Sub", s, mean)
    std = g.op("Sqrt", g.op("ReduceMean", g.op("Mul", d, d), _axes(g), keepdims=1))  # population std
    pos = g.op("Greater", std, zero)
    return g.op("Where", pos, g.op("Div", d, g.op("Where", pos, std, one)), zero)


def _l2(g: Graph, x: str) -> str:
    return g.op("Sqrt", g.op("ReduceSumSquare", x, _axes(g), keepdims=0))


def fused_scores(g: Graph, sem: str, X: str, dim: int, p: FusionParams, qdq_ops: bool = False) -> str:
    """``qavtp.scoring.fused_scores``: a norm(sem) + (1 - a) dir norm(b norm(eq) + (1 - b) norm(o)).

    ``qdq_ops`` as in :func:`fake_quant`: blocked Q/DQ only in the onnxruntime-specific graph (OpenVINO, for one,
    refuses a ``QuantizeLinear`` whose input has dynamic dimensions)."""
    err = _l2(g, g.op("Sub", X, fake_quant(g, X, p.spec, dim, qdq_ops=qdq_ops)))
    if p.relative:
        norm = _l2(g, X)
        zero = g.const(F32(0))
        err = g.op("Div", err, g.op("Where", g.op("Equal", norm, zero), g.const(F32(1)), norm))
    if p.outlier == "range":
        o = g.op("Sub", g.op("ReduceMax", X, _axes(g), keepdims=0), g.op("ReduceMin", X, _axes(g), keepdims=0))
    else:
        o = g.op("ReduceMax", g.op("Abs", X), _axes(g), keepdims=0)
    # Python-float coefficients, rounded to float32 as torch does when it multiplies a float32 tensor.
    hyb = g.op(
        "Add",
        g.op("Mul", g.const(F32(p.beta)), normalize(g, err, p.norm)),
        g.op("Mul", g.const(F32(1 - p.beta)), normalize(g, o, p.norm)),
    )
    return g.op(
        "Add",
        g.op("Mul", g.const(F32(p.alpha)), normalize(g, sem, p.norm)),
        g.op("Mul", g.const(F32((1 - p.alpha) * p.direction)), normalize(g, hyb, p.norm)),
    )


# -------------------------------------------------------------------------------------------- pruning


@dataclass
class PrunedSequence:
    """The names of the ONNX values of :class:`qavtp.pruning.PrunedSequence` (plus the kept indices and scores)."""

    embeds: str  # [B, L', D]
    mask: str  # [B, L']
    positions: str  # [B, L'] contiguous position ids
    kept: str  # [B, k] kept visual-token indices, ascending
    scores: str | None  # [B, N] (None for the diversity selectors, whose scores are ranks)


@dataclass(frozen=True)
class Selection:
    """How the prefill graph keeps k of its n visual tokens: the scorer (None: all kept), the fusion parameters
    of ``qavtp`` / ``qapruner`` / ``qavtp-dpp``, and ``theta``, the relevance weight of ``cdpruner``."""

    n: int
    k: int
    scorer: str | None
    params: FusionParams | None = None
    theta: float | None = None

    @property
    def pruned(self) -> bool:
        return self.scorer is not None and self.k < self.n

    @property
    def uses_cls(self) -> bool:
        """The relevance term is the vision tower's [CLS] attention."""
        p = self.params
        return self.pruned and p is not None and self.scorer != "semantic" and p.semantic == "cls"


def select(
    g: Graph, dec: Decoder, emb: str, mask: str, is_image: str, vis: str, vis_pos: str, sel: Selection, cls: str | None
) -> tuple[str, str | None]:
    """Each sample's k picks ``[B, k]`` (any order) and the scores they were ranked by (None for a greedy DPP or
    max-min selection)."""
    n, k, p = sel.n, sel.k, sel.params
    if sel.scorer == "divprune":
        g.scope = "prune/select"
        return maxmin_picks(g, vis, n, k), None
    if sel.scorer == "cdpruner":
        quality = relevance_quality(g, text_relevance(g, vis, emb, mask, is_image), sel.theta)
        g.scope = "prune/select"
        return dpp_picks(g, vis, quality, n, k), None
    if cls is not None:
        sem = cls
    else:
        at = semantic_layer(p.semantic) if p is not None and sel.scorer != "semantic" else 0
        sem = text_attention(g, dec, emb, mask, left_padded_positions(g, mask), vis_pos, at)
    scores = sem if sel.scorer == "semantic" else fused_scores(g, sem, vis, dec.hidden, p, qdq_ops=dec.weights.ort)
    g.scope = "prune/select"
    if p is not None and p.select == "dpp":
        return dpp_picks(g, vis, relevance_quality(g, scores, p.theta), n, k), None
    return g.op("TopK", scores, g.const([k], I64), axis=-1, largest=1, sorted=1, outputs=2)[1], scores


def prune(
    g: Graph, dec: Decoder, emb: str, mask: str, is_image: str, vis: str, sel: Selection, cls: str | None = None
) -> PrunedSequence:
    """Score the N visual tokens, keep the top k (or a greedy DPP / max-min selection of k), drop the others.

    ``cls`` is the vision tower's [CLS] attention ``[B, N]``, the relevance term when ``sel.params.semantic`` is cls.
    """
    g.scope = "prune/score"
    n, k = sel.n, sel.k
    vis_pos = ordered_positions(g, is_image, g.const([n], I64))  # [B, N]
    top, scores = select(g, dec, emb, mask, is_image, vis, vis_pos, sel, cls)
    g.scope = "prune/select"
    kept, _ = g.op("TopK", top, g.const([k], I64), axis=-1, largest=0, sorted=1, outputs=2)  # ascending order
    kept_pos = g.op("GatherElements", vis_pos, kept, axis=1)
    survive = g.op("Cast", g.op("Not", is_image), to=TensorProto.INT64)
    ones = g.op("Expand", g.const(1, I64), g.op("Shape", kept_pos))
    survive = g.op("Cast", g.op("ScatterElements", survive, kept_pos, ones, axis=1), to=TensorProto.BOOL)
    new_len = g.op("Sub", seq_len(g, is_image), g.const([n - k], I64))
    positions = ordered_positions(g, survive, new_len)
    new_mask = g.op("GatherElements", mask, positions, axis=1)
    return PrunedSequence(
        embeds=gather_rows(g, emb, positions),
        mask=new_mask,
        positions=left_padded_positions(g, new_mask),
        kept=kept,
        scores=scores,
    )

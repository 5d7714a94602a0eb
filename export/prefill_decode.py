"""The two exported graphs: ``prefill`` (image + prompt -> pruning -> LLM prefill) and ``decode`` (KV-cached steps)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from qavtp.config import WeightFormat
from qavtp.export.llava_graph import Decoder, left_padded_positions, vision_tokens
from qavtp.export.onnx_graph import Graph
from qavtp.export.ort_decoder import make_decoder
from qavtp.export.pruning_subgraph import Selection, gather_rows, prune

I64 = np.int64
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def _cache_dims(dec: Decoder, seq: str) -> list:
    return ["batch", dec.kv_heads, seq, dec.head_dim]


def build_prefill(adapter, weights: WeightFormat, sel: Selection, place=None) -> Graph:
    """``pixel_values, input_ids, attention_mask`` -> last-position logits, presents, pruned mask, kept indices.
    ``place``: where the weights go as they are registered (:class:`~qavtp.export.onnx_graph.Graph`)."""
    model = adapter.model
    vc = model.config.vision_config
    g = Graph("qavtp_prefill", place)
    dec = make_decoder(g, adapter, weights)
    size = vc.image_size
    pixels = g.input("pixel_values", FLOAT, ["batch", vc.num_channels, size, size])
    ids = g.input("input_ids", INT64, ["batch", "seq"])
    mask = g.input("attention_mask", INT64, ["batch", "seq"])

    n_visual, k = sel.n, sel.k
    vis, cls = vision_tokens(g, adapter, pixels, -2 if sel.uses_cls else None)  # [B, N, D]
    g.scope = "embed"
    is_image = g.op("Equal", ids, g.const(adapter.image_token_id, I64))
    # The placeholder id may lie outside the text vocabulary: embed id 0 there, as Adapter.embed does.
    text = dec.embed(g.op("Where", is_image, g.const(0, I64), ids))
    # The j-th image token of a row takes the row's j-th visual token (masked_scatter order).
    count = g.op("CumSum", g.op("Cast", is_image, to=TensorProto.INT64), g.const(1, I64))
    vidx = g.op("Clip", g.op("Sub", count, g.const(1, I64)), g.const(0, I64), g.const(n_visual - 1, I64))
    emb = g.op("Where", g.op("Unsqueeze", is_image, g.const([-1], I64)), gather_rows(g, vis, vidx), text)

    if sel.pruned:
        p = prune(g, dec, emb, mask, is_image, vis, sel, cls)
        emb, mask_out, positions, kept, scores = p.embeds, p.mask, p.positions, p.kept, p.scores
    else:
        mask_out, positions, scores = mask, left_padded_positions(g, mask), None
        g.scope = "prune/select"
        ar = g.const(np.arange(n_visual)[None], I64)
        kept = g.op("Expand", ar, g.op("Concat", g.op("Shape", ids, end=1), g.const([n_visual], I64), axis=0))

    h, presents = dec.run(emb, mask_out, positions, past=None)
    g.scope = "llm/head"
    last = g.op("Slice", h, g.const([-1], I64), g.const([np.iinfo(I64).max], I64), g.const([1], I64))
    logits = g.op("Squeeze", dec.head(last), g.const([1], I64))
    g.output(logits, "logits", FLOAT, ["batch", dec.vocab])
    for i, (kk, vv) in enumerate(presents):
        g.output(kk, f"present.{i}.key", FLOAT, _cache_dims(dec, "kept_seq"))
        g.output(vv, f"present.{i}.value", FLOAT, _cache_dims(dec, "kept_seq"))
    g.output(mask_out, "attention_mask_out", INT64, ["batch", "kept_seq"])
    g.output(kept, "kept_indices", INT64, ["batch", k])
    if scores is not None:
        g.output(scores, "scores", FLOAT, ["batch", n_visual])
    return g


def build_decode(adapter, weights: WeightFormat, place=None) -> Graph:
    """``input_ids [B, T], attention_mask [B, P+T], position_ids [B, T], past.*`` -> ``logits [B, T, V]``, presents."""
    g = Graph("qavtp_decode", place)
    dec = make_decoder(g, adapter, weights)
    ids = g.input("input_ids", INT64, ["batch", "seq"])
    mask = g.input("attention_mask", INT64, ["batch", "total_seq"])
    pos = g.input("position_ids", INT64, ["batch", "seq"])
    past = []
    for i in range(len(dec.layers)):
        past.append(
            (
                g.input(f"past.{i}.key", FLOAT, _cache_dims(dec, "past_seq")),
                g.input(f"past.{i}.value", FLOAT, _cache_dims(dec, "past_seq")),
            )
        )
    g.scope = "embed"
    h, presents = dec.run(dec.embed(ids), mask, pos, past=past)
    g.output(dec.head(h), "logits", FLOAT, ["batch", "seq", dec.vocab])
    for i, (kk, vv) in enumerate(presents):
        g.output(kk, f"present.{i}.key", FLOAT, _cache_dims(dec, "total_seq"))
        g.output(vv, f"present.{i}.value", FLOAT, _cache_dims(dec, "total_seq"))
    return g

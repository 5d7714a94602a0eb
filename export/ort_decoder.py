"""The decoder in onnxruntime's fused contrib ops (``--format ort`` with fused ops), as onnxruntime-genai's builder
writes one: a ``GroupQueryAttention`` per layer, every residual add folded into the next norm
(``SkipSimplifiedLayerNormalization``), the first and final norms ``SimplifiedLayerNormalization``.

``GroupQueryAttention`` applies RoPE itself at its physical positions: RoPE is relative, so a left-padded row's
offset cancels in q.k, and its cache then holds keys rotated at other absolute positions than torch's (the output is
the same). Where a KV quantizer reads the rotated keys, or the head size is not a multiple of 16 (the CPU kernel's
rotary needs that), RoPE and the quantizer run before the op instead. Padding is an additive ``attention_bias``;
causality is the op's own. The pruning subgraph's scoring attention stays in plain ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto
from torch import nn

from qavtp.calibrate.kvcache import kv_spec_of
from qavtp.config import WeightFormat
from qavtp.export.int4 import np32
from qavtp.export.llava_graph import MASKED, Decoder, Rope, seq_len
from qavtp.export.onnx_graph import MS_DOMAIN, Graph

I64 = np.int64


@dataclass
class FusedInputs:
    """What every ``GroupQueryAttention`` of a graph reads besides its own q/k/v and cache."""

    bias: str  # [B, 1, T, S]: 0 at real keys, MASKED at padding; causality is the op's own
    seqlens: str  # [B] int32: S - 1 (padding is masked by the bias, so every row has the same physical length)
    total: str  # scalar int32: S
    cos: str | None  # [max_positions, hd / 2] for the op's rotary, or None where RoPE is applied outside
    sin: str | None
    rope: Rope | None  # cos/sin [B, L, 1, hd] for RoPE outside the op (a KV quantizer reads the rotated keys)


class OrtFusedDecoder(Decoder):
    """:class:`Decoder` whose :meth:`run` builds the layers from onnxruntime's fused ops."""

    def norm(self, x: str, norm: nn.Module) -> str:
        w = self.g.weight(f"{self.name(norm)}.weight", np32(norm.weight))
        return self.g.op("SimplifiedLayerNormalization", x, w, axis=-1, epsilon=self.eps, stash_type=1)

    def skip_norm(self, x: str, residual: str, norm: nn.Module) -> tuple[str, str]:
        """``norm(residual + x)`` and ``residual + x`` in one ``SkipSimplifiedLayerNormalization``."""
        g = self.g
        w = g.weight(f"{self.name(norm)}.weight", np32(norm.weight))
        y, total = g.fresh("SkipNorm"), g.fresh("SkipNorm_sum")
        g.op(
            "SkipSimplifiedLayerNormalization",
            x,
            residual,
            w,
            outputs=[y, "", "", total],
            domain=MS_DOMAIN,
            epsilon=self.eps,
        )
        return y, total

    def rotary_outside(self, attn: nn.Module) -> bool:
        """RoPE before the fused op: a KV quantizer reads the rotated keys, and the op's rotary needs a head
        size that is a multiple of 16 (onnxruntime's CPU kernel)."""
        return kv_spec_of(attn) is not None or self.head_dim % 16 != 0

    def fused_inputs(self, mask: str, q_len: str, position_ids: str) -> FusedInputs:
        g = self.g
        valid = g.op("Unsqueeze", g.op("Cast", mask, to=TensorProto.BOOL), g.const([1, 2], I64))  # [B, 1, 1, S]
        bias = g.op("Where", valid, g.const(np.float32(0)), g.const(np.float32(MASKED)))
        shape = g.op("Concat", g.op("Shape", mask, end=1), g.const([1], I64), q_len, seq_len(g, mask), axis=0)
        bias = g.op("Expand", bias, shape)
        total = g.op("Cast", g.op("Squeeze", seq_len(g, mask), g.const([0], I64)), to=TensorProto.INT32)
        seqlens = g.op("Expand", g.op("Sub", total, g.const(1, np.int32)), g.op("Shape", mask, end=1))
        cos = sin = rope = None
        if any(self.rotary_outside(layer.self_attn) for layer in self.layers):
            r = self.rope(position_ids)
            rope = Rope(g.op("Transpose", r.cos, perm=[0, 2, 1, 3]), g.op("Transpose", r.sin, perm=[0, 2, 1, 3]))
        if not all(self.rotary_outside(layer.self_attn) for layer in self.layers):
            # Rows at the op's physical positions (RoPE is relative, so a left-padded row's offset cancels in
            # q.k); computed in float32 as LlamaRotaryEmbedding does.
            n = self.max_positions
            freqs = np.arange(n, dtype=np.float32)[:, None] * self.inv_freq[None, :]
            cos = g.weight("rope.cos_cache", np.cos(freqs).astype(np.float32))
            sin = g.weight("rope.sin_cache", np.sin(freqs).astype(np.float32))
        return FusedInputs(bias, seqlens, total, cos, sin, rope)

    def make_fused_attention(
        self, attn: nn.Module, x: str, f: FusedInputs, past: tuple[str, str] | None
    ) -> tuple[str, str, str]:
        """Self-attention as one ``GroupQueryAttention``: its output and the present key/value it writes."""
        g = self.g
        q, k, v = (self.linear(x, p) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        outside = self.rotary_outside(attn)
        if outside:
            assert f.rope is not None
            split = g.const([0, 0, -1, self.head_dim], I64)
            q4, k4, v4 = (g.op("Reshape", t, split) for t in (q, k, v))
            q4, k4 = self.apply_rope(q4, f.rope), self.apply_rope(k4, f.rope)
            # The cache then holds the keys and values the attention reads (per-token groups: quantizing the
            # whole cache again each step, as torch does, gives the same codes).
            q4, k4, v4 = self.kv_quant(attn, q4, k4, v4)
            q, k, v = (g.op("Reshape", t, g.const([0, 0, -1], I64)) for t in (q4, k4, v4))
        past_k, past_v = past if past is not None else ("", "")
        rotary = [f.cos, f.sin] if not outside else ["", ""]
        o, present_k, present_v = g.op(
            "GroupQueryAttention",
            q,
            k,
            v,
            past_k,
            past_v,
            f.seqlens,
            f.total,
            *rotary,
            "",
            f.bias,
            outputs=3,
            domain=MS_DOMAIN,
            num_heads=self.heads,
            kv_num_heads=self.kv_heads,
            scale=self.scaling,
            do_rotary=0 if outside else 1,
        )
        return self.linear(o, attn.o_proj), present_k, present_v

    def run(self, h: str, mask: str, position_ids: str, past: list[tuple[str, str]] | None):
        """The decoder as onnxruntime-genai's builder writes it: one ``GroupQueryAttention`` per layer, each
        residual add folded into the next norm (``SkipSimplifiedLayerNormalization``)."""
        g = self.g
        g.scope = "llm/mask"
        f = self.fused_inputs(mask, seq_len(g, h), position_ids)
        presents = []
        pending = None  # the previous layer's MLP output, added to the residual stream by the next norm
        for i in range(len(self.layers)):
            g.scope = f"llm/layer{i}"
            with self.adapter.resident(i) as layer:
                if pending is None:
                    x = self.norm(h, layer.input_layernorm)
                else:
                    x, h = self.skip_norm(pending, h, layer.input_layernorm)
                o, k, v = self.make_fused_attention(layer.self_attn, x, f, None if past is None else past[i])
                x, h = self.skip_norm(o, h, layer.post_attention_layernorm)
                pending = self.make_mlp(layer.mlp, x)
            presents.append((k, v))
        return g.op("Add", h, pending), presents


def make_decoder(g: Graph, adapter, weights: WeightFormat) -> Decoder:
    """The decoder builder the weight format asks for."""
    return OrtFusedDecoder(g, adapter, weights) if weights.fused_ops else Decoder(g, adapter, weights)

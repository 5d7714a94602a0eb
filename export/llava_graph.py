"""The LLaVA model as hand-built ONNX: CLIP vision tower, projector, and the (W4A4) LLaMA-style decoder.

Everything reads the loaded torch modules, so an artifact's rotated, fused and quantized weights are
exported exactly as the torch fake-quant model uses them. Only LLaVA + CLIP + a LLaMA-style decoder
(RMSNorm, default RoPE, GQA, SwiGLU) is supported; anything else is refused with its model type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto
from torch import nn

from qavtp.calibrate.kvcache import kv_spec_of
from qavtp.calibrate.quantizers import QuantEmbedding
from qavtp.config import WeightFormat
from qavtp.errors import QavtpError
from qavtp.export.fakequant import fake_quant
from qavtp.export.int4 import fp_linear, linear, np32, quant_gather
from qavtp.export.onnx_graph import Graph

DECODER_TYPES = ("llama", "mistral", "qwen2")
VISION_TYPES = ("clip_vision_model",)
# Masked attention logits: a large finite value, so a row with no visible key (left padding) averages
# its values instead of producing NaN (exp(-inf - -inf)).
MASKED = float(np.finfo(np.float32).min)

I64 = np.int64


def _cfg_get(cfg, key, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def check_supported(model: nn.Module) -> None:
    """LLaVA with a CLIP tower and a LLaMA-style decoder, default RoPE; one clear error otherwise."""
    cfg = model.config
    if cfg.model_type != "llava":
        raise QavtpError(
            f"cannot export model type {cfg.model_type!r}: only llava (CLIP + LLaMA-style LLM) is supported"
        )
    vt = cfg.vision_config.model_type
    if vt not in VISION_TYPES:
        raise QavtpError(f"cannot export vision tower type {vt!r}: only {', '.join(VISION_TYPES)} is supported")
    text = cfg.get_text_config()
    if text.model_type not in DECODER_TYPES:
        raise QavtpError(
            f"cannot export decoder type {text.model_type!r}: only {', '.join(DECODER_TYPES)} are supported"
        )
    if getattr(text, "hidden_act", "silu") != "silu":
        raise QavtpError(f"cannot export a decoder with hidden_act {text.hidden_act!r} (SwiGLU with silu only)")
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        raise QavtpError("cannot export sliding-window attention")
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    rope_type = _cfg_get(rope, "rope_type", _cfg_get(rope, "type", "default")) or "default"
    if rope_type not in ("default", "none"):
        raise QavtpError(f"cannot export rope type {rope_type!r}: only default RoPE is supported")
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise QavtpError(f"unknown vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")


# --------------------------------------------------------------------------------------------- helpers


def _act(g: Graph, x: str, name: str) -> str:
    """Hugging Face activation ``name`` in plain ops (the formulas of transformers' ACT2FN)."""
    if name == "gelu":
        inner = g.op("Erf", g.op("Mul", x, g.const(np.float32(1 / np.sqrt(2)))))
        return g.op("Mul", g.op("Mul", x, g.const(np.float32(0.5))), g.op("Add", inner, g.const(np.float32(1))))
    if name == "quick_gelu":
        return g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, g.const(np.float32(1.702)))))
    if name in ("silu", "swish"):
        return g.op("Mul", x, g.op("Sigmoid", x))
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return g.op("Gelu", x, approximate="tanh")
    if name == "relu":
        return g.op("Relu", x)
    raise QavtpError(f"cannot export activation {name!r}")


def _heads(g: Graph, x: str, n: int, hd: int) -> str:
    """``[B, L, n*hd] -> [B, n, L, hd]``."""
    return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, n, hd], I64)), perm=[0, 2, 1, 3])


def _merge_heads(g: Graph, x: str, width: int) -> str:
    return g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3]), g.const([0, 0, width], I64))


def rmsnorm(g: Graph, x: str, weight: torch.Tensor, eps: float, name: str) -> str:
    """LlamaRMSNorm: ``w * (x * rsqrt(mean(x^2) + eps))``."""
    var = g.op("ReduceMean", g.op("Mul", x, x), g.const([-1], I64), keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(np.float32(eps)))))
    return g.op("Mul", g.weight(f"{name}.weight", np32(weight)), g.op("Mul", x, inv))


def seq_len(g: Graph, x: str, axis: int = 1) -> str:
    """``x.shape[axis]`` as a 1-element int64 tensor."""
    return g.op("Shape", x, start=axis, end=axis + 1)


def left_padded_positions(g: Graph, mask: str) -> str:
    """``clamp(cumsum(mask) - 1, 0)``: positions of a left-padded prompt (``qavtp.prompting.position_ids``)."""
    c = g.op("CumSum", g.op("Cast", mask, to=TensorProto.INT64), g.const(1, I64))
    return g.op("Max", g.op("Sub", c, g.const(1, I64)), g.const(0, I64))


# ------------------------------------------------------------------------------------------------ LLM


@dataclass
class Rope:
    cos: str  # [B, 1, L, hd]
    sin: str


class Decoder:
    """Builds the LLaMA-style decoder of ``adapter`` into graphs (one instance per graph).

    As onnxruntime-genai's builders: :meth:`make_layer` is :meth:`make_attention` then :meth:`make_mlp`, each
    reading its weights from the module it builds (the weight format from the export's :class:`WeightFormat`);
    a decoder that differs (biases, another activation, other norms) overrides the hook that differs.
    """

    def __init__(self, g: Graph, adapter, weights: WeightFormat):
        self.g, self.adapter, self.weights = g, adapter, weights
        model = adapter.model
        text = model.config.get_text_config()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.layers = adapter.decoder_layers
        attn = self.layers[0].self_attn
        self.heads = text.num_attention_heads
        self.kv_heads = getattr(text, "num_key_value_heads", None) or self.heads
        self.head_dim = int(getattr(attn, "head_dim", None) or text.hidden_size // self.heads)
        self.hidden = text.hidden_size
        self.vocab = adapter.embed_tokens.weight.shape[0]
        self.eps = float(text.rms_norm_eps)
        self.max_positions = int(text.max_position_embeddings)
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        rotary = adapter.language_model.rotary_emb
        if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
            raise QavtpError("cannot export RoPE with an attention scaling other than 1")
        self.inv_freq = np32(rotary.inv_freq)
        # The portable graph's fused form: opset 23's RMSNormalization, RotaryEmbedding and Attention (standard
        # ops that onnxruntime, OpenVINO and onnx.reference all run: bench/results/opset23_ops.md).
        self.opset23 = weights.fused and not weights.ort
        if self.opset23:
            g.needs_opset(23)

    def name(self, m: nn.Module) -> str:
        return self.names[id(m)]

    def linear(self, x: str, m: nn.Module, act: bool = True) -> str:
        return linear(self.g, x, m, self.name(m), self.weights, act)

    def embed(self, ids: str) -> str:
        emb = self.adapter.embed_tokens
        if isinstance(emb, QuantEmbedding):
            return quant_gather(self.g, ids, emb, self.name(emb))
        return self.g.op("Gather", self.g.weight(f"{self.name(emb)}.weight", np32(emb.weight)), ids, axis=0)

    def rope(self, position_ids: str) -> Rope:
        """cos/sin ``[B, 1, L, hd]`` from positions ``[B, L]``, as LlamaRotaryEmbedding computes them."""
        g = self.g
        pos = g.op("Unsqueeze", g.op("Cast", position_ids, to=TensorProto.FLOAT), g.const([-1], I64))
        freqs = g.op("Mul", pos, g.weight("rope.inv_freq", self.inv_freq))
        emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1], I64))
        return Rope(g.op("Cos", emb), g.op("Sin", emb))

    def rotate(self, x: str, r: Rope) -> str:
        """RoPE on ``x [B, n, L, hd]`` in the decoder's attention: opset 23's ``RotaryEmbedding`` there, plain ops
        otherwise (the pruning scorer always uses :meth:`apply_rope`)."""
        if not self.opset23:
            return self.apply_rope(x, r)
        g = self.g
        key = ("rope23", r.cos, r.sin)
        if key not in g.memo:  # the op takes the first half of cos/sin, [B, L, hd / 2]
            half = (g.const([0], I64), g.const([self.head_dim // 2], I64), g.const([3], I64))
            g.memo[key] = tuple(g.op("Squeeze", g.op("Slice", t, *half), g.const([1], I64)) for t in (r.cos, r.sin))
        cos, sin = g.memo[key]
        return g.op("RotaryEmbedding", x, cos, sin)

    def apply_rope(self, x: str, r: Rope) -> str:
        g = self.g
        x1, x2 = g.op("Split", x, axis=-1, num_outputs=2, outputs=2)
        rot = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, r.cos), g.op("Mul", rot, r.sin))

    def attention_mask(self, mask: str, q_len: str, offset: str | None) -> str:
        """Boolean ``[B, 1, 1, T, S]``: key j visible to query i iff ``mask[b, j]`` and ``j <= offset + i``."""
        g = self.g
        zero, one = g.const(0, I64), g.const(1, I64)
        s = g.op("Squeeze", seq_len(g, mask), g.const([0], I64))
        t = g.op("Squeeze", q_len, g.const([0], I64))
        kidx = g.op("Range", zero, s, one)
        qidx = g.op("Range", zero, t, one)
        if offset is not None:
            qidx = g.op("Add", qidx, offset)
        causal = g.op(
            "LessOrEqual", g.op("Unsqueeze", kidx, g.const([0], I64)), g.op("Unsqueeze", qidx, g.const([1], I64))
        )
        valid = g.op("Unsqueeze", g.op("Cast", mask, to=TensorProto.BOOL), g.const([1, 2, 3], I64))
        return g.op("And", causal, valid)

    def attend(self, q: str, k: str, v: str, allowed: str) -> str:
        """GQA without copying K/V: queries grouped ``[B, Hkv, rep, T, hd]`` against keys ``[B, Hkv, 1, S, hd]``
        (opset 23's ``Attention`` in the portable fused graph, with the mask as an additive bias)."""
        g = self.g
        if self.opset23:
            key = ("bias23", allowed)
            if key not in g.memo:  # a finite bias: a padding row with no visible key averages, as below
                visible = g.op("Squeeze", allowed, g.const([2], I64))  # [B, 1, T, S]
                g.memo[key] = g.op("Where", visible, g.const(np.float32(0)), g.const(np.float32(MASKED)))
            return g.op("Attention", q, k, v, g.memo[key], scale=self.scaling)
        rep = self.heads // self.kv_heads
        q5 = g.op("Reshape", q, g.const([0, self.kv_heads, rep, -1, self.head_dim], I64))
        k5 = g.op("Unsqueeze", k, g.const([2], I64))
        v5 = g.op("Unsqueeze", v, g.const([2], I64))
        logits = g.op(
            "Mul", g.op("MatMul", q5, g.op("Transpose", k5, perm=[0, 1, 2, 4, 3])), g.const(np.float32(self.scaling))
        )
        logits = g.op("Where", allowed, logits, g.const(np.float32(MASKED)))
        out = g.op("MatMul", g.op("Softmax", logits, axis=-1), v5)
        return g.op("Reshape", out, g.const([0, self.heads, -1, self.head_dim], I64))

    def kv_quant(self, attn: nn.Module, q: str, k: str, v: str) -> tuple[str, str, str]:
        """What the attention reads (``calibrate.kvcache``): with a KV quantizer, ``q H``, ``Q(k H)``, ``Q(v)``.
        The presents keep the float keys and values, like the torch cache."""
        spec = kv_spec_of(attn)
        if spec is None:
            return q, k, v
        g = self.g
        h = g.weight(f"kv_hadamard.{self.head_dim}", np32(attn.kv_hadamard))
        k = fake_quant(g, g.op("MatMul", k, h), spec, self.head_dim, rank=4)
        return g.op("MatMul", q, h), k, fake_quant(g, v, spec, self.head_dim, rank=4)

    def make_layer(
        self, i: int, h: str, rope: Rope, allowed: str, past: tuple[str, str] | None, stage: str = "llm"
    ) -> tuple[str, str, str]:
        """One decoder layer; returns the new hidden states and the layer's present key/value. ``stage`` prefixes
        the node names (per-stage timings): ``prune/score`` where a relevance term runs layers on the full prompt."""
        g = self.g
        g.scope = f"{stage}/layer{i}"
        with self.adapter.resident(i) as layer:  # a streamed model reads the layer's weights now
            x = self.norm(h, layer.input_layernorm)
            o, k, v = self.make_attention(layer.self_attn, x, rope, allowed, past)
            h = g.op("Add", h, o)
            x = self.norm(h, layer.post_attention_layernorm)
            h = g.op("Add", h, self.make_mlp(layer.mlp, x))
        return h, k, v

    def make_attention(
        self, attn: nn.Module, x: str, rope: Rope, allowed: str, past: tuple[str, str] | None
    ) -> tuple[str, str, str]:
        """Self-attention of normed ``x``: its output (before the residual add) and the present key/value."""
        g = self.g
        q = self.rotate(_heads(g, self.linear(x, attn.q_proj), self.heads, self.head_dim), rope)
        k = self.rotate(_heads(g, self.linear(x, attn.k_proj), self.kv_heads, self.head_dim), rope)
        v = _heads(g, self.linear(x, attn.v_proj), self.kv_heads, self.head_dim)
        if past is not None:
            k = g.op("Concat", past[0], k, axis=2)
            v = g.op("Concat", past[1], v, axis=2)
        o = _merge_heads(g, self.attend(*self.kv_quant(attn, q, k, v), allowed), self.heads * self.head_dim)
        return self.linear(o, attn.o_proj), k, v

    def make_mlp(self, mlp: nn.Module, x: str) -> str:
        """SwiGLU: ``down(silu(gate(x)) * up(x))``."""
        gate = self.linear(x, mlp.gate_proj)
        act = self.g.op("Mul", _act(self.g, gate, "silu"), self.linear(x, mlp.up_proj))
        return self.linear(act, mlp.down_proj)

    def head(self, h: str) -> str:
        """Final norm and LM head; a head tied to the embeddings reuses that matrix (Gemm with transB)."""
        g = self.g
        g.scope = "llm/head"
        norm = self.adapter.final_norm
        x = self.norm(h, norm)
        lm, emb = self.adapter.lm_head, self.adapter.embed_tokens
        if lm.weight.data_ptr() != emb.weight.data_ptr():
            return self.linear(x, lm)
        w = g.weight(f"{self.name(emb)}.weight", np32(emb.weight))
        flat = g.op("Reshape", x, g.const([-1, self.hidden], I64))
        y = g.op("Gemm", flat, w, transB=1)
        if lm.bias is not None:
            y = g.op("Add", y, g.weight(f"{self.name(lm)}.bias", np32(lm.bias)))
        shape = g.op("Concat", g.op("Shape", x, end=-1), g.const([self.vocab], I64), axis=0)
        return g.op("Reshape", y, shape)

    def norm(self, x: str, norm: nn.Module) -> str:
        """An RMSNorm: opset 23's ``RMSNormalization`` in the portable fused graph, plain ops otherwise."""
        if not self.opset23:
            return rmsnorm(self.g, x, norm.weight, self.eps, self.name(norm))
        w = self.g.weight(f"{self.name(norm)}.weight", np32(norm.weight))
        return self.g.op("RMSNormalization", x, w, axis=-1, epsilon=self.eps, stash_type=1)

    def run(self, h: str, mask: str, position_ids: str, past: list[tuple[str, str]] | None):
        """All layers; returns final hidden states and the presents ``[(k, v)] * n_layers``."""
        g = self.g
        g.scope = "llm/mask"
        offset = None if past is None else g.op("Squeeze", seq_len(g, past[0][0], 2), g.const([0], I64))
        allowed = self.attention_mask(mask, seq_len(g, h), offset)
        rope = self.rope(position_ids)
        presents = []
        for i in range(len(self.layers)):
            h, k, v = self.make_layer(i, h, rope, allowed, None if past is None else past[i])
            presents.append((k, v))
        return h, presents


# --------------------------------------------------------------------------------------------- vision


def vision_tokens(g: Graph, adapter, pixel_values: str, cls_layer: int | None = None) -> tuple[str, str | None]:
    """CLIP tower -> selected feature layer -> projector: the visual tokens ``[B, N, D]`` (fp32), and with
    ``cls_layer`` the [CLS] -> patch attention ``[B, N]`` at that encoder layer (``qavtp.scoring.cls_attention``)."""
    model = adapter.model
    cfg = model.config
    names = {id(m): n for n, m in model.named_modules()}
    tower = adapter.vision_tower
    body = getattr(tower, "vision_model", tower)
    vc = cfg.vision_config
    g.scope = "vision/embed"
    emb = body.embeddings
    c, p = vc.hidden_size, vc.patch_size
    conv = g.op(
        "Conv",
        pixel_values,
        g.weight(f"{names[id(emb.patch_embedding)]}.weight", np32(emb.patch_embedding.weight)),
        kernel_shape=[p, p],
        strides=[p, p],
    )
    patches = g.op("Transpose", g.op("Reshape", conv, g.const([0, c, -1], I64)), perm=[0, 2, 1])
    batch = g.op("Shape", pixel_values, end=1)
    cls = g.op(
        "Expand",
        g.weight(f"{names[id(emb)]}.class_embedding", np32(emb.class_embedding).reshape(1, 1, c)),
        g.op("Concat", batch, g.const([1, c], I64), axis=0),
    )
    pos = np32(emb.position_embedding(emb.position_ids).detach()[0])
    h = g.op("Add", g.op("Concat", cls, patches, axis=1), g.weight(f"{names[id(emb)]}.position_table", pos))
    h = _layernorm(g, h, body.pre_layrnorm, names)

    n_layers = len(body.encoder.layers)
    wanted = cfg.vision_feature_layer
    wanted = [wanted] if isinstance(wanted, int) else list(wanted)
    idx = [w if w >= 0 else n_layers + 1 + w for w in wanted]  # index into hidden_states (0 = embeddings)
    if any(not 0 <= i <= n_layers for i in idx):
        raise QavtpError(f"vision_feature_layer {cfg.vision_feature_layer} is outside the tower's {n_layers} layers")
    cls_idx = None
    if cls_layer is not None:
        cls_idx = cls_layer + n_layers if cls_layer < 0 else cls_layer
        if not 0 <= cls_idx < n_layers:
            raise QavtpError(f"[CLS] attention layer {cls_layer} is outside the tower's {n_layers} layers")
    states = [h]
    for li in range(max(idx + ([cls_idx] if cls_idx is not None else []))):
        g.scope = f"vision/layer{li}"
        states.append(_clip_layer(g, states[-1], body.encoder.layers[li], vc, names))
    feats = states[idx[0]] if len(idx) == 1 else g.op("Concat", *[states[i] for i in idx], axis=-1)
    if cfg.vision_feature_select_strategy == "default":  # drop [CLS]
        feats = g.op("Slice", feats, g.const([1], I64), g.const([np.iinfo(I64).max], I64), g.const([1], I64))
    g.scope = "vision/projector"
    proj = adapter.projector
    x = fp_linear(g, feats, proj.linear_1, names[id(proj.linear_1)])
    x = _act(g, x, cfg.projector_hidden_act)
    tokens = fp_linear(g, x, proj.linear_2, names[id(proj.linear_2)])
    cls = None
    if cls_idx is not None:
        g.scope = "prune/score/cls"
        cls = _cls_attention(g, states[cls_idx], body.encoder.layers[cls_idx], vc, names)
    return tokens, cls


def _cls_attention(g: Graph, h: str, layer: nn.Module, vc, names: dict) -> str:
    """Attention of the [CLS] query to every patch key at one CLIP layer, averaged over heads: ``[B, N]``."""
    attn = layer.self_attn
    heads = vc.num_attention_heads
    hd = vc.hidden_size // heads
    x = _layernorm(g, h, layer.layer_norm1, names)
    first = g.op("Slice", x, g.const([0], I64), g.const([1], I64), g.const([1], I64))
    q = _heads(g, fp_linear(g, first, attn.q_proj, names[id(attn.q_proj)]), heads, hd)  # [B, H, 1, hd]
    k = _heads(g, fp_linear(g, x, attn.k_proj, names[id(attn.k_proj)]), heads, hd)
    logits = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(np.float32(attn.scale)))
    probs = g.op("ReduceMean", g.op("Softmax", logits, axis=-1), g.const([1], I64), keepdims=0)  # [B, 1, T]
    probs = g.op("Squeeze", probs, g.const([1], I64))
    return g.op("Slice", probs, g.const([1], I64), g.const([np.iinfo(I64).max], I64), g.const([1], I64))


def _layernorm(g: Graph, x: str, ln: nn.LayerNorm, names: dict) -> str:
    n = names[id(ln)]
    return g.op(
        "LayerNormalization",
        x,
        g.weight(f"{n}.weight", np32(ln.weight)),
        g.weight(f"{n}.bias", np32(ln.bias)),
        axis=-1,
        epsilon=float(ln.eps),
    )


def _clip_layer(g: Graph, h: str, layer: nn.Module, vc, names: dict) -> str:
    attn = layer.self_attn
    heads = vc.num_attention_heads
    hd = vc.hidden_size // heads
    x = _layernorm(g, h, layer.layer_norm1, names)
    q = _heads(g, fp_linear(g, x, attn.q_proj, names[id(attn.q_proj)]), heads, hd)
    k = _heads(g, fp_linear(g, x, attn.k_proj, names[id(attn.k_proj)]), heads, hd)
    v = _heads(g, fp_linear(g, x, attn.v_proj, names[id(attn.v_proj)]), heads, hd)
    logits = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.const(np.float32(attn.scale)))
    o = _merge_heads(g, g.op("MatMul", g.op("Softmax", logits, axis=-1), v), vc.hidden_size)
    h = g.op("Add", h, fp_linear(g, o, attn.out_proj, names[id(attn.out_proj)]))
    x = _layernorm(g, h, layer.layer_norm2, names)
    x = _act(g, fp_linear(g, x, layer.mlp.fc1, names[id(layer.mlp.fc1)]), vc.hidden_act)
    return g.op("Add", h, fp_linear(g, x, layer.mlp.fc2, names[id(layer.mlp.fc2)]))

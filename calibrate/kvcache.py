"""Optional KV-cache quantization, as QuaRot does it: keys after RoPE and a per-head Hadamard, and values (already
in a per-head Hadamard basis after a QuaRot rotation), quantize-dequantized per token and head.

Queries and keys both get the same orthogonal ``H`` (``q k^T = (q H)(k H)^T``), which spreads the outlier
channels of the keys before they are quantized. Quantization is per (token, head) row, so quantizing the
whole cache at every step equals storing quantized entries: the cache itself keeps float values, and the
attention reads them through the quantizer. The hook is a registered Hugging Face attention function
(SDPA after the quantizer), so the model code stays stock.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from qavtp.calibrate.hadamard import hadamard_matrix
from qavtp.calibrate.quantizers import QuantSpec, fake_quant_activation

KV_ATTENTION = "qavtp_kv_quant"


def _kv_quant_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    spec = getattr(module, "kv_spec", None)
    if spec is not None:
        h = module.kv_hadamard.to(query.dtype)
        query, key = query @ h, key @ h
        key, value = fake_quant_activation(key, spec), fake_quant_activation(value, spec)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def install_kv_quant(adapter, spec: QuantSpec) -> None:
    """Quantize every decoder layer's keys and values with ``spec`` (groups along the head dimension)."""
    AttentionInterface.register(KV_ATTENTION, _kv_quant_attention)
    AttentionMaskInterface.register(KV_ATTENTION, sdpa_mask)
    attn0 = adapter.decoder_layers[0].self_attn
    head_dim = int(getattr(attn0, "head_dim", 0) or attn0.o_proj.in_features // attn0.config.num_attention_heads)
    h = hadamard_matrix(head_dim, torch.float32)
    for layer in adapter.decoder_layers:
        attn = layer.self_attn
        attn.kv_spec = spec
        home = attn.o_proj.weight.device
        # A streamed layer is on the meta device until it is visited; this small buffer stays in memory throughout.
        home = torch.device("cpu") if home.type == "meta" else home
        attn.register_buffer("kv_hadamard", h.clone().to(home), persistent=False)
    adapter.model.config.get_text_config()._attn_implementation = KV_ATTENTION


def kv_spec_of(attn) -> QuantSpec | None:
    """The KV quantizer of an attention module (None: float keys and values)."""
    return getattr(attn, "kv_spec", None)

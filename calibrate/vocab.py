"""The vocabulary matrices (token embedding, LM head) as 4- or 8-bit weights."""

from __future__ import annotations

import torch

from qavtp.calibrate.quantizers import QuantEmbedding, QuantLinear, QuantSpec
from qavtp.calibrate.rotation import untie_lm_head


@torch.no_grad()
def quantize_vocab(adapter, wspec: QuantSpec, clip_search: bool = False) -> None:
    """Weight-only RTN of the token embedding and the LM head; the head's input stays in floating point.

    At 135M parameters these two vocabulary matrices are most of the model's bytes. A head tied to the
    embedding is untied first: each gets its own module (the codes are equal when the matrices are).
    """
    untie_lm_head(adapter)
    adapter.set_embed_tokens(QuantEmbedding.from_embedding(adapter.embed_tokens, wspec, clip_search))
    adapter.set_lm_head(QuantLinear.from_linear(adapter.lm_head, wspec, None, "rtn", clip_search=clip_search))


def install_quant_vocab(adapter, wspec: QuantSpec) -> None:
    """Empty quantized vocabulary modules for loading an artifact's codes (see :func:`quantize_vocab`)."""
    untie_lm_head(adapter)
    emb, head = adapter.embed_tokens, adapter.lm_head
    adapter.set_embed_tokens(QuantEmbedding(emb.num_embeddings, emb.embedding_dim, wspec, emb.padding_idx))
    adapter.set_lm_head(QuantLinear(head.in_features, head.out_features, wspec, None, bias=head.bias is not None))

"""A cache-free forward pruned at decoder layer K, through the model's own layers and masks.

The library prunes with :func:`qavtp.pruned_lm.pruned_prefill` (its own layer loop and KV cache); this is the
independent reference the tests hold it to: layer K's inputs captured from the model's forward, survivors
gathered, the remaining layers run with the model's own mask and rotary phases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from qavtp.config import check_ratio
from qavtp.errors import QavtpError
from qavtp.models.capture import capture_inputs
from qavtp.prompting import position_ids as left_padded_positions
from qavtp.pruning import _gather_seq, kept_positions, prune_sequence, select_tokens
from qavtp.scoring import check_layer, model_inputs


@dataclass
class PruneState:
    """What a scoring function sees at the pruning point."""

    adapter: object
    layer_idx: int
    hidden: Tensor  # [B, L, D] hidden states entering layer K (the embeddings for K = 0)
    attention_mask: Tensor  # [B, L]
    position_ids: Tensor  # [B, L]
    visual_mask: Tensor  # [B, L]
    pixel_values: Tensor | None


ScoreFn = Callable[[PruneState], Tensor]


def _prune_mask(mask, positions: Tensor):
    """The layer attention mask restricted to the surviving positions: rows (queries) and columns (keys).

    Taking rows and columns of the model's own causal + padding mask rebuilds it for the shortened sequence
    in whatever form the attention kernel expects (None: plain causal, which stays causal).
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise QavtpError(f"cannot prune an attention mask of type {type(mask).__name__} (use eager or sdpa attention)")
    if mask.dim() == 2:  # flash attention: the [B, L] padding mask
        return _gather_seq(mask, positions, 1)
    if mask.dim() == 4:  # [B, 1, L, L]
        return _gather_seq(_gather_seq(mask, positions, 2), positions, 3)
    raise QavtpError(f"cannot prune an attention mask of shape {tuple(mask.shape)}")


@torch.no_grad()
def pruned_forward(
    model,
    adapter,
    enc,
    scores_fn_or_keep_idx: ScoreFn | Tensor,
    rho: float | None = None,
    layer_k: int = 0,
) -> tuple[Tensor, Tensor]:
    """Last-position logits ``[B, V]`` and kept visual-token indices ``[B, k]`` of a forward pruned at layer K.

    ``scores_fn_or_keep_idx`` is either the kept indices ``[B, k]`` themselves (``rho`` is then ignored) or a
    function of a :class:`PruneState` returning scores ``[B, N]``, of which the top ``ceil(rho N)`` are kept.
    """
    if adapter.model is not model:
        raise QavtpError("the adapter does not wrap the given model")
    layers = adapter.decoder_layers
    K = check_layer(len(layers), layer_k)
    if not isinstance(scores_fn_or_keep_idx, Tensor):
        if not callable(scores_fn_or_keep_idx):
            raise QavtpError("pass a scoring function or a [batch, k] tensor of kept indices")
        if rho is None:
            raise QavtpError("a scoring function needs a retention ratio rho")
        check_ratio(rho)
    inputs = model_inputs(enc)
    input_ids = inputs["input_ids"]
    B, L = input_ids.shape
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones(B, L, dtype=torch.long, device=input_ids.device)
    position_ids = inputs.get("position_ids")
    if position_ids is None:
        position_ids = left_padded_positions(attention_mask)
    visual_mask = adapter.visual_positions(input_ids)
    embeds = adapter.embed(input_ids, inputs.get("pixel_values"))
    lm = adapter.language_model

    if K == 0:
        hidden, kwargs = embeds, None
    else:
        hidden, kwargs = capture_inputs(
            lambda: lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False),
            layers[K],
        )

    if isinstance(scores_fn_or_keep_idx, Tensor):
        keep_idx = scores_fn_or_keep_idx
    else:
        state = PruneState(adapter, K, hidden, attention_mask, position_ids, visual_mask, inputs.get("pixel_values"))
        keep_idx = select_tokens(scores_fn_or_keep_idx(state), rho)

    if K == 0:
        p = prune_sequence(input_ids, attention_mask, embeds, visual_mask, keep_idx)
        out = lm(
            inputs_embeds=p.inputs_embeds,
            attention_mask=p.attention_mask,
            position_ids=p.position_ids,
            use_cache=False,
        )
        last = out.last_hidden_state[:, -1]  # the language model applies its final norm itself
        return adapter.lm_head(last), keep_idx.sort(dim=1).values

    positions, _ = kept_positions(visual_mask, keep_idx)
    h = _gather_seq(hidden, positions)
    mask = _prune_mask(kwargs.get("attention_mask"), positions)
    cos, sin = kwargs["position_embeddings"]
    layer_kwargs = {
        "attention_mask": mask,
        # Survivors keep their original rotary phases (FastV); gathering cos/sin is exactly that.
        "position_embeddings": (_gather_seq(cos, positions), _gather_seq(sin, positions)),
        "position_ids": _gather_seq(position_ids, positions),
        "use_cache": False,
    }
    # One mask serves every layer from K on: true of LLaMA/Mistral/Qwen2 full attention, not of models
    # that mix sliding-window layers.
    for layer in layers[K:]:
        h = layer(h, **layer_kwargs)
        h = h[0] if isinstance(h, tuple) else h
    last = adapter.final_norm(h[:, -1:])[:, 0]
    return adapter.lm_head(last), keep_idx.sort(dim=1).values

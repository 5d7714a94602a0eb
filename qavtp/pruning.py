"""Selecting visual tokens and rewriting the sequence without the dropped ones.

Two pruning points:

- K = 0, before the LLM: the dropped tokens are removed from the input embeddings; the shortened sequence
  is an ordinary prompt, so positions are recomputed contiguous (left padding still counts nothing).
- K > 0, inside the LLM (FastV): layers < K see the full sequence; from layer K on the dropped tokens are
  gone from the hidden states, the attention mask and the rotary embeddings. Survivors keep their
  ORIGINAL position ids, so the rotary phases they had in layers < K stay consistent.

Every sample keeps the same number k of visual tokens (its own set), so a batch stays rectangular.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from qavtp.config import check_ratio
from qavtp.errors import QavtpError
from qavtp.models.capture import capture_inputs
from qavtp.prompting import position_ids as left_padded_positions
from qavtp.scoring import check_layer, model_inputs


def keep_count(n: int, rho: float) -> int:
    """``ceil(rho * n)``, at least 1."""
    check_ratio(rho)
    # Rounding first stops float noise (0.3 * 10 = 3.0000000000000004) from adding a token.
    return max(1, math.ceil(round(rho * n, 9)))


def select_tokens(scores: Tensor, rho: float) -> Tensor:
    """Indices ``[B, k]`` of the k = ceil(rho N) best-scored tokens per sample, ascending (original order).

    Ties go to the lower index: a stable descending sort keeps equal scores in index order.
    """
    if scores.dim() != 2:
        raise QavtpError(f"scores must be [batch, tokens], got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise QavtpError("token scores contain NaN")
    k = keep_count(scores.shape[1], rho)
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


def _visual_positions(visual_mask: Tensor) -> Tensor:
    """Sequence positions ``[B, N]`` of the visual tokens (every sample must hold N of them)."""
    counts = visual_mask.sum(1)
    if int(counts.min()) == 0 or int(counts.max()) != int(counts.min()):
        raise QavtpError(f"every sample must hold the same number (> 0) of visual tokens, got {counts.tolist()}")
    return visual_mask.nonzero()[:, 1].view(visual_mask.shape[0], -1)


def _check_keep(keep_idx: Tensor, B: int, N: int) -> Tensor:
    if keep_idx.dim() != 2 or keep_idx.shape[0] != B:
        raise QavtpError(f"kept indices must be [batch={B}, k], got shape {tuple(keep_idx.shape)}")
    if keep_idx.shape[1] == 0 or keep_idx.shape[1] > N:
        raise QavtpError(f"must keep between 1 and {N} visual tokens, got {keep_idx.shape[1]}")
    keep_idx = keep_idx.long().sort(dim=1).values
    if int(keep_idx.min()) < 0 or int(keep_idx.max()) >= N:
        raise QavtpError(f"kept indices must lie in [0, {N}), got {int(keep_idx.min())}..{int(keep_idx.max())}")
    if (keep_idx[:, 1:] == keep_idx[:, :-1]).any():
        raise QavtpError("kept indices repeat a token")
    return keep_idx


def kept_positions(visual_mask: Tensor, keep_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Surviving sequence positions ``[B, L - (N - k)]`` and the kept visual tokens' positions ``[B, k]``."""
    vis_pos = _visual_positions(visual_mask)
    B, N = vis_pos.shape
    keep_idx = _check_keep(keep_idx.to(vis_pos.device), B, N)
    kept_vis = vis_pos.gather(1, keep_idx)
    survive = ~visual_mask.bool()
    survive.scatter_(1, kept_vis, True)
    return survive.nonzero()[:, 1].view(B, -1), kept_vis


def _gather_seq(x: Tensor, positions: Tensor, dim: int = 1) -> Tensor:
    """``x`` indexed along ``dim`` (the sequence) by each sample's ``positions``; a batch dim of 1 is expanded."""
    B, Lp = positions.shape
    x = x.expand(B, *x.shape[1:])
    shape = [B] + [1] * (x.dim() - 1)
    shape[dim] = Lp
    idx = positions.view(shape).expand(*[Lp if d == dim else s for d, s in enumerate(x.shape)])
    return x.gather(dim, idx)


@dataclass
class PrunedSequence:
    inputs_embeds: Tensor  # [B, L', D]
    attention_mask: Tensor  # [B, L']
    position_ids: Tensor  # [B, L'], contiguous over real tokens
    positions: Tensor  # [B, L'] original sequence index of every surviving position
    visual_positions: Tensor  # [B, k] original sequence index of every kept visual token
    input_ids: Tensor | None = None  # [B, L']


def prune_sequence(
    input_ids: Tensor | None,
    attention_mask: Tensor | None,
    inputs_embeds: Tensor,
    visual_mask: Tensor,
    keep_idx: Tensor,
) -> PrunedSequence:
    """Drop the non-kept visual tokens before the LLM (K = 0).

    ``keep_idx [B, k]`` indexes each sample's N visual tokens; each sample may keep a different set.
    """
    B, L, _ = inputs_embeds.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, L, dtype=torch.long, device=inputs_embeds.device)
    positions, kept_vis = kept_positions(visual_mask, keep_idx)
    mask = attention_mask.gather(1, positions)
    # The shortened prompt is a prompt like any other: positions count its real tokens from 0.
    pos_ids = left_padded_positions(mask)
    return PrunedSequence(
        inputs_embeds=_gather_seq(inputs_embeds, positions),
        attention_mask=mask,
        position_ids=pos_ids,
        positions=positions,
        visual_positions=kept_vis,
        input_ids=None if input_ids is None else input_ids.gather(1, positions),
    )


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

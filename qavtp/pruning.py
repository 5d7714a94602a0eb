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
from dataclasses import dataclass

import torch
from torch import Tensor

from qavtp.config import check_ratio
from qavtp.errors import QavtpError
from qavtp.prompting import position_ids as left_padded_positions


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

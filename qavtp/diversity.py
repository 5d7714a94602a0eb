"""Diversity-aware selection of visual tokens: DivPrune's max-min diversity and CDPruner's conditional DPP.

Both are greedy, so the first k picks of a full greedy run are exactly the k-token selection: each selector
returns the greedy *order* of all N tokens ``[B, N]``, and :func:`order_scores` turns it into scores whose
top-k (``qavtp.pruning.select_tokens``) are the first k picks. Batched, every sample on its own.

- DivPrune (Alvar et al., CVPR 2025, "Diversity-based Visual Token Pruning for Large Multimodal Models"): with the
  cosine distance ``d(i, j) = 1 - cos(x_i, x_j)``, the first pick is the token farthest from its nearest
  neighbour, each next one the token whose minimum distance to the picked set is largest (the max-min diversity
  problem, solved greedily).
- CDPruner (Zhang et al., NeurIPS 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
  Pruning in MLLMs"): a DPP kernel ``L = diag(q) S diag(q)`` over the tokens' cosine similarity ``S`` with the
  instruction relevance ``r`` (min-max normalised) as quality ``q = exp(theta r / (2 (1 - theta)))``; greedy MAP
  inference adds the token of largest marginal gain ``log det``, computed with incremental Cholesky updates
  (Chen et al., NeurIPS 2018, "Fast Greedy MAP Inference for DPP", Algorithm 1). ``theta`` (the relevance weight)
  0 is diversity alone; towards 1 relevance dominates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qavtp.errors import QavtpError

EPS = 1e-10
# Greedy choices compare values on a grid: closer than one step they are ties, taken by the lower index. When the
# visual tokens are nearly collinear (cosine similarities near 1, as the reference model's aligned projector makes
# them), the DPP's gains fall after a few picks to ~1e-6 of the kernel's scale, where float32 cancellation decides
# them and torch and an ONNX runtime would disagree: gains are compared on a 2^-12 grid of the kernel's largest
# diagonal entry, max-min distances (no cancellation) on a 2^-12 grid.
DPP_GRID = 2.0**12
MAXMIN_GRID = 2.0**12


def pick(values: Tensor, scale: Tensor | float, grid: float) -> Tensor:
    """``argmax`` over the last axis of ``values / scale`` rounded to steps of ``1 / grid``: ties to the lower index."""
    return torch.round(values / scale * grid).argmax(-1)


def _cosine(x: Tensor) -> Tensor:
    """Pairwise cosine similarity ``[B, N, N]`` of ``x [B, N, D]`` in float32."""
    n = torch.nn.functional.normalize(x.float(), dim=-1)
    return n @ n.transpose(1, 2)


def divprune_order(features: Tensor) -> Tensor:
    """The greedy max-min-diversity order ``[B, N]`` of the tokens ``features [B, N, D]``."""
    dist = 1.0 - _cosine(features)  # [B, N, N]
    B, N, _ = dist.shape
    rows = torch.arange(B, device=dist.device)
    if N == 1:
        return torch.zeros(B, 1, dtype=torch.long, device=dist.device)
    # First pick: the largest distance to the nearest other token (the second smallest of a column: 0 is itself).
    nearest = dist.topk(2, dim=1, largest=False).values[:, 1]  # [B, N]
    order = torch.empty(B, N, dtype=torch.long, device=dist.device)
    order[:, 0] = pick(nearest, 1.0, MAXMIN_GRID)
    to_picked = dist[rows, order[:, 0]]  # [B, N] distance of every token to the picked set (its min)
    picked = torch.zeros(B, N, dtype=torch.bool, device=dist.device)
    picked[rows, order[:, 0]] = True
    for i in range(1, N):
        j = pick(to_picked.masked_fill(picked, -float("inf")), 1.0, MAXMIN_GRID)
        order[:, i] = j
        picked[rows, j] = True
        to_picked = torch.minimum(to_picked, dist[rows, j])
    return order


def relevance_quality(relevance: Tensor, theta: float) -> Tensor:
    """CDPruner's quality ``exp(alpha r)`` of a min-max normalised relevance ``[B, N]``, ``alpha = theta / (2 (1 -
    theta))``, divided by its maximum ``exp(alpha)``: the kernel then scales by a constant, which leaves every greedy
    choice as it was, and cannot overflow float32 as ``theta`` nears 1 (at 0.99 the kernel would reach e^99)."""
    check_theta(theta)
    lo, hi = relevance.amin(-1, keepdim=True), relevance.amax(-1, keepdim=True)
    r = (relevance - lo) / (hi - lo).clamp_min(EPS)
    return torch.exp(theta / (2 * (1 - theta)) * (r - 1))


def check_theta(theta: float) -> float:
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not 0.0 <= theta < 1.0:
        raise QavtpError(f"the relevance weight theta must lie in [0, 1), got {theta}")
    return float(theta)


def dpp_kernel(features: Tensor, quality: Tensor) -> Tensor:
    """CDPruner's kernel ``L = diag(q) S diag(q)`` ``[B, N, N]``, S the tokens' cosine similarity."""
    q = quality.float()
    return q.unsqueeze(2) * _cosine(features) * q.unsqueeze(1)


def dpp_order(features: Tensor, quality: Tensor, k: int | None = None) -> Tensor:
    """The greedy MAP order ``[B, k]`` (all N by default) of the DPP with kernel ``diag(q) cos(features) diag(q)``.

    Chen et al.'s Algorithm 1 with a fixed ``[B, k, N]`` buffer of Cholesky rows (zeros until filled) and the
    projection over all k rows: the form the exported ONNX ``Loop`` computes, so both sum the same terms. Once the
    kernel's rank is spent (duplicate tokens), the marginal gains are 0 and the remaining tokens follow in order of
    their (zero) gain, lowest index first: no division by zero.
    """
    L = dpp_kernel(features, quality)
    B, N, _ = L.shape
    k = N if k is None else k
    rows = torch.arange(B, device=L.device)
    c = torch.zeros(B, k, N, dtype=L.dtype, device=L.device)  # the Cholesky rows of the picked tokens
    d2 = torch.diagonal(L, dim1=1, dim2=2).clone()  # [B, N] marginal gains (squared)
    scale = d2.amax(-1, keepdim=True).clamp_min(EPS)
    order = torch.empty(B, k, dtype=torch.long, device=L.device)
    for i in range(k):
        j = pick(d2, scale, DPP_GRID)
        order[:, i] = j
        dj = d2[rows, j].clamp_min(0.0).sqrt().unsqueeze(-1)  # [B, 1]
        proj = (c[rows, :, j].unsqueeze(1) @ c).squeeze(1)  # [B, N]: sum over the picked rows of c_tj c_t
        e = torch.where(dj <= EPS, 0.0, (L[rows, j] - proj) / dj.clamp_min(EPS))
        c[:, i] = e
        d2 = d2 - e.square()
        d2[rows, j] = -float("inf")
    return order


def order_scores(order: Tensor, n: int | None = None) -> Tensor:
    """Scores ``[B, n]`` whose descending order is ``order [B, k]``: the first pick scores n, the k-th n - k + 1,
    tokens never picked 0 (``n`` defaults to k: a full order)."""
    B, k = order.shape
    n = k if n is None else n
    scores = torch.zeros(B, n, dtype=torch.float32, device=order.device)
    ranks = torch.arange(n, n - k, -1, dtype=torch.float32, device=order.device).expand(B, k)
    return scores.scatter_(1, order, ranks)

"""DivPrune and CDPruner selection: equal to brute-force greedy references, batched per sample, robust to duplicate
tokens, and usable as ``qavtp eval --scorer`` on the tiny random LLaVA."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from qavtp.cli import main
from qavtp.diversity import divprune_order, dpp_order, order_scores, relevance_quality
from qavtp.errors import QavtpError
from qavtp.pruning import select_tokens
from qavtp.scoring import score_tokens


def _brute_dpp(x: torch.Tensor, q: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP by explicit determinants: add the token that maximises det(L_S)."""
    n = torch.nn.functional.normalize(x.double(), dim=-1)
    L = q.double()[:, None] * (n @ n.T) * q.double()[None]
    picked: list[int] = []
    for _ in range(k):
        gains = [
            torch.linalg.det(L[picked + [j]][:, picked + [j]]).item() if j not in picked else -1.0
            for j in range(len(x))
        ]
        picked.append(max(range(len(x)), key=gains.__getitem__))
    return picked


def _brute_divprune(x: torch.Tensor) -> list[int]:
    n = torch.nn.functional.normalize(x.double(), dim=-1)
    d = 1 - n @ n.T
    N = len(x)
    first = max(range(N), key=lambda i: min(d[i, j].item() for j in range(N) if j != i))
    picked = [first]
    while len(picked) < N:
        rest = [j for j in range(N) if j not in picked]
        picked.append(max(rest, key=lambda j: min(d[j, i].item() for i in picked)))
    return picked


def test_selectors_equal_brute_force_greedy_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g)
    q = relevance_quality(torch.rand(3, 7, generator=g), 0.6)
    order = dpp_order(x, q)
    div = divprune_order(x)
    for b in range(3):
        assert order[b, :5].tolist() == _brute_dpp(x[b], q[b], 5)  # rank 5: five picks have positive gains
        assert div[b].tolist() == _brute_divprune(x[b])
        assert torch.equal(dpp_order(x[b : b + 1], q[b : b + 1])[0], order[b])  # the batch is per sample


def test_duplicate_tokens_are_spread_over_and_never_nan():
    centres = torch.eye(4)[:3] * 5  # three distinct directions, each token repeated four times
    x = centres.repeat_interleave(4, dim=0)[None]
    for order in (divprune_order(x), dpp_order(x, torch.ones(1, 12))):
        assert sorted(int(i) // 4 for i in order[0, :3]) == [0, 1, 2]
        assert sorted(order[0].tolist()) == list(range(12))


def test_relevance_weight_moves_the_dpp_towards_relevant_tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, generator=g)
    relevance = torch.linspace(0, 1, 16)[None]
    plain = dpp_order(x, relevance_quality(relevance, 0.0))[0, :4]
    strong = dpp_order(x, relevance_quality(relevance, 0.95))[0, :4]
    assert torch.equal(relevance_quality(relevance, 0.0), torch.ones(1, 16))
    assert relevance[0, strong].mean() > relevance[0, plain].mean()
    for bad in (-0.1, 1.0, True):
        with pytest.raises(QavtpError, match="theta must lie in"):
            relevance_quality(relevance, bad)


def test_order_scores_keep_the_first_k_picks():
    order = torch.tensor([[3, 0, 2, 1], [1, 2, 3, 0]])
    assert select_tokens(order_scores(order), 0.5).tolist() == [[0, 3], [1, 2]]


@pytest.mark.parametrize("scorer", ["divprune", "cdpruner"])
def test_scorers_run_on_the_model_and_in_eval(tiny, enc, tiny_llava_dir, scorer):
    _, _, adapter = tiny
    with torch.no_grad():
        emb = adapter.embed(enc["input_ids"], enc["pixel_values"])
    vis = adapter.visual_positions(enc["input_ids"])
    scores = score_tokens(scorer, adapter, enc, emb, vis)
    assert scores.shape == (3, 16) and torch.equal(scores.sort(-1).values[0], torch.arange(1.0, 17.0))
    r = CliRunner().invoke(main, ["eval", str(tiny_llava_dir), "--retain", "0.25", "--scorer", scorer, "--limit", "4"])
    assert r.exit_code == 0, r.output
    assert f"retain 0.25 by {scorer}" in r.output


def test_fused_score_as_dpp_quality(tiny, enc):
    """``select="dpp"``: the k kept tokens are the DPP's first k greedy picks with the fused score as quality;
    theta 0 ignores the score (DivPrune's kind of selection on cosine similarity)."""
    from qavtp.calibrate.quantizers import QuantSpec
    from qavtp.scoring import FusionParams, as_dpp, fused_scores, gather_visual, selection_scores, semantic_scores

    _, _, adapter = tiny
    with torch.no_grad():
        emb = adapter.embed(enc["input_ids"], enc["pixel_values"])
    vis = adapter.visual_positions(enc["input_ids"])
    X, p = gather_visual(emb, vis), FusionParams(alpha=0.5, qspec=QuantSpec(4, True, 16).to_dict())
    sem = semantic_scores(adapter, enc, emb, vis, p.semantic)
    fused = fused_scores(sem, X, p)
    for theta in (0.0, 0.5, 0.9):
        got = select_tokens(selection_scores(sem, X, as_dpp(p, theta)), 0.25)
        want = dpp_order(X, relevance_quality(fused, theta), k=4).sort(-1).values
        assert torch.equal(got, want)
    assert torch.equal(dpp_order(X, relevance_quality(fused, 0.0)), dpp_order(X, torch.ones_like(fused)))
    assert torch.equal(selection_scores(sem, X, p), fused)  # top-k selection: the fused score itself


def test_a_relevance_weight_near_one_stays_finite():
    """theta 0.999 makes the exponent 499: the quality is scaled to at most 1 (a constant factor of the kernel,
    which leaves the greedy order unchanged) so that the kernel cannot overflow float32."""
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(2, 12, 6, generator=g), torch.rand(2, 12, generator=g)
    q = relevance_quality(r, 0.999)
    assert torch.isfinite(q).all() and float(q.max()) == 1.0
    order = dpp_order(x, q)
    assert all(sorted(row) == list(range(12)) for row in order.tolist())
    mid = relevance_quality(r, 0.6)
    # The first 6 picks (the kernel's rank, D = 6); past it every gain is rounding noise.
    assert torch.equal(dpp_order(x, mid, k=6), dpp_order(x, mid * 7.0, k=6))

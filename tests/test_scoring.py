"""Token scoring and pruning on the tiny random LLaVA: explicit attention vs eager references, pruned forwards
vs dense and hand-built references, batching, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from qavtp.calibrate.quantizers import QuantSpec
from qavtp.config import QuantConfig
from qavtp.errors import QavtpError
from qavtp.models.loading import load_model
from qavtp.pruning import check_ratio, keep_count, prune_sequence, select_tokens
from qavtp.scoring import (
    SCORERS,
    FusionParams,
    available_semantics,
    check_scorer,
    cls_attention,
    fuse,
    gather_visual,
    hidden_states_at,
    hybrid_sensitivity,
    l1,
    l2,
    linf,
    normalize,
    outlier_intensity,
    quant_error_score,
    random_scores,
    semantic_scores,
    text_attention,
    variance,
)
from tests.oracles import PruneState, pruned_forward


def _sample(enc, i: int) -> dict:
    """Sample i of a left-padded batch, alone and unpadded."""
    m = enc["attention_mask"][i].bool()
    ids = enc["input_ids"][i][m][None]
    mask = torch.ones_like(ids)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": torch.arange(ids.shape[1])[None],
        "pixel_values": enc["pixel_values"][i : i + 1],
    }


def _dense_last(model, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(**enc).logits[:, -1]


# ------------------------------------------------------------------------------------ selection


def test_select_tokens_keeps_order_and_count():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2, 0.8, 0.3, 0.4], [8.0, 1, 7, 2, 6, 3, 5, 4]])
    idx = select_tokens(scores, 0.5)
    assert idx.tolist() == [[1, 2, 3, 5], [0, 2, 4, 6]]
    assert select_tokens(scores, 0.3).shape == (2, keep_count(8, 0.3)) == (2, 3)
    assert keep_count(10, 0.3) == 3  # not 4 from 0.3 * 10 = 3.0000000000000004
    assert keep_count(576, 32 / 576) == 32
    assert keep_count(5, 0.01) == 1
    # Ties go to the lower index.
    assert select_tokens(torch.ones(1, 6), 0.5).tolist() == [[0, 1, 2]]
    assert select_tokens(scores, 1.0).tolist() == [list(range(8))] * 2


@pytest.mark.parametrize("rho", [0, -0.5, 1.5, float("nan"), True])
def test_bad_ratio(rho):
    with pytest.raises(QavtpError, match=r"retention ratio must lie in \(0, 1\], got"):
        check_ratio(rho)


def test_bad_scorer():
    for name in SCORERS:
        assert check_scorer(name) == name
    with pytest.raises(QavtpError, match=r"unknown scorer 'x'; valid: semantic, cls, qerror, .*random"):
        check_scorer("x")


def test_bad_layer(tiny, enc):
    model, _, adapter = tiny
    with pytest.raises(QavtpError, match=r"layer K=2 is beyond the model's 2 decoder layers"):
        pruned_forward(model, adapter, enc, torch.zeros(3, 4, dtype=torch.long).add(torch.arange(4)), layer_k=2)
    with pytest.raises(QavtpError, match=r"layer K=5 is beyond"):
        hidden_states_at(adapter, enc, 5)
    with pytest.raises(QavtpError, match="needs a retention ratio"):
        pruned_forward(model, adapter, enc, lambda s: torch.zeros(3, 16))


# ---------------------------------------------------------------------------------- semantic scores


@pytest.mark.parametrize("K", [0, 1])
def test_text_attention_matches_eager(tiny, tiny_llava_dir, enc, K):
    model, _, adapter = tiny
    assert model.config.text_config._attn_implementation != "eager"  # the explicit path is what runs here
    hidden = hidden_states_at(adapter, enc, K)
    vis = adapter.visual_positions(enc["input_ids"])
    s = text_attention(adapter, hidden, K, enc["attention_mask"], enc["position_ids"], vis)
    assert s.shape == (3, 16)
    assert (s >= 0).all() and (s.sum(1) <= 1 + 1e-6).all()

    eager = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        att = eager(**enc, output_attentions=True).attentions[K]  # [B, H, L, L]
    ref = gather_visual(att[:, :, -1].mean(1), vis)
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-4)


def test_text_attention_reads_quantized_weights_without_the_activation_quantizer(tiny_llava_dir, enc):
    """The relevance score must not hinge on a 4-bit activation rounding (which may flip in another runtime)."""
    from qavtp.calibrate.quantize import calibrate_model
    from qavtp.calibrate.quantizers import QuantLinear

    model, processor, adapter = load_model(tiny_llava_dir)
    calibrate_model(
        adapter, [enc], QuantConfig("rtn", wgroup=16, abits=2, a_symmetric=False, agroup=16), progress=False
    )
    hidden = hidden_states_at(adapter, enc, 0)
    vis = adapter.visual_positions(enc["input_ids"])
    scores = text_attention(adapter, hidden, 0, enc["attention_mask"], enc["position_ids"], vis)
    attn = adapter.decoder_layers[0].self_attn
    assert isinstance(attn.q_proj, QuantLinear) and attn.q_proj.aspec is not None
    for m in (attn.q_proj, attn.k_proj):
        m.aspec = None
    torch.testing.assert_close(
        scores, text_attention(adapter, hidden, 0, enc["attention_mask"], enc["position_ids"], vis), rtol=0, atol=0
    )


def test_cls_attention_matches_eager(tiny, tiny_llava_dir, enc):
    _, _, adapter = tiny
    eager = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        att = eager.model.vision_tower(enc["pixel_values"], output_attentions=True).attentions
    for layer in (-2, -1, 0):
        s = cls_attention(adapter, enc["pixel_values"], layer=layer)
        assert s.shape == (3, 16)
        torch.testing.assert_close(s, att[layer][:, :, 0, 1:].mean(1), atol=1e-5, rtol=1e-4)
    with pytest.raises(QavtpError, match="beyond the model's 2 vision-tower layers"):
        cls_attention(adapter, enc["pixel_values"], layer=2)


def test_deeper_relevance_term_is_the_eager_attention_at_that_layer(tiny, tiny_llava_dir, enc):
    """``text-l1`` (pruning before the LLM with layer 1's attention on the full prompt) reads what eager attention
    gives at layer 1; the fusion search offers it; a bad name or a K > 0 is refused in one line."""
    _, _, adapter = tiny
    vis = adapter.visual_positions(enc["input_ids"])
    embeds = adapter.embed(enc["input_ids"], enc["pixel_values"])
    s = semantic_scores(adapter, enc, embeds, vis, "text-l1")
    eager = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        att = eager(**enc, output_attentions=True).attentions[1]
    torch.testing.assert_close(s, gather_visual(att[:, :, -1].mean(1), vis), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(s, semantic_scores(adapter, enc, embeds, vis, "text"))
    assert available_semantics(adapter) == ("text", "cls", "text-l1")  # 2 decoder layers: FastV's 2 -> 1
    with pytest.raises(QavtpError, match="unknown semantic score 'text-lx'; valid: text, cls, text-l<layer>"):
        FusionParams(semantic="text-lx")
    with pytest.raises(QavtpError, match="defined for pruning before the LLM"):
        semantic_scores(adapter, enc, embeds, vis, "text-l1", layer=1)


def test_hidden_states_at_zero_are_embeddings(tiny, enc):
    _, _, adapter = tiny
    h0 = hidden_states_at(adapter, enc, 0)
    torch.testing.assert_close(h0, adapter.embed(enc["input_ids"], enc["pixel_values"]))


# ------------------------------------------------------------------------------- sensitivity scores


def test_quant_error_and_outlier_flag_an_outlier_token():
    torch.manual_seed(0)
    X = torch.randn(2, 8, 64)
    X[:, 3, 17] = 10.0  # one outlier channel on token 3
    eq = quant_error_score(X, QuantSpec(bits=4, group_size=32))
    assert eq.shape == (2, 8) and (eq.argmax(1) == 3).all()
    assert (quant_error_score(X, QuantSpec(bits=4), relative=False).argmax(1) == 3).all()
    # A massive outlier dominates the token's own norm, so only the absolute error still singles it out.
    Y = X.clone()
    Y[:, 3, 17] = 60.0
    assert (quant_error_score(Y, QuantSpec(bits=4, group_size=32), relative=False).argmax(1) == 3).all()
    o = outlier_intensity(X)
    assert (o.argmax(1) == 3).all()
    torch.testing.assert_close(o, X.amax(-1) - X.amin(-1))
    cal = torch.full((64,), 2.0)
    torch.testing.assert_close(outlier_intensity(X, cal)[:, 3], torch.full((2,), 5.0))
    with pytest.raises(QavtpError, match="channel absmax has shape"):
        outlier_intensity(X, torch.ones(3))
    h = hybrid_sensitivity(eq, o, 0.5)
    assert h.shape == (2, 8) and (h.argmax(1) == 3).all() and float(h.max()) <= 1.0


def test_ablation_metrics():
    X = torch.tensor([[[3.0, -4.0], [1.0, 1.0]]])
    assert linf(X).tolist() == [[4.0, 1.0]]
    assert l1(X).tolist() == [[7.0, 2.0]]
    torch.testing.assert_close(l2(X), torch.tensor([[5.0, 2.0**0.5]]))
    assert variance(X).tolist() == [[12.25, 0.0]]
    r = random_scores((2, 16), seed=3)
    assert r.shape == (2, 16)
    assert torch.equal(r, random_scores((2, 16), seed=3))
    assert not torch.equal(r, random_scores((2, 16), seed=4))


def test_normalize_and_fuse():
    s = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    mm = normalize(s)
    assert mm.tolist() == [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]]
    z = normalize(s, "zscore")
    torch.testing.assert_close(z[0].mean(), torch.tensor(0.0))
    torch.testing.assert_close(z[0].std(unbiased=False), torch.tensor(1.0))
    assert z[1].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(QavtpError, match="unknown normalisation"):
        normalize(s, "l2")
    sem = torch.rand(4, 10)
    sens = torch.rand(4, 10)
    f = fuse(sem, sens, 0.7)
    assert f.shape == (4, 10) and float(f.min()) >= 0 and float(f.max()) <= 1
    g = fuse(sem, sens, 0.7, direction=-1)
    assert float(g.min()) >= -0.3 - 1e-6 and float(g.max()) <= 0.7 + 1e-6
    torch.testing.assert_close(fuse(sem, sens, 1.0), normalize(sem))
    with pytest.raises(QavtpError, match="direction must be"):
        fuse(sem, sens, 0.5, direction=0)
    with pytest.raises(QavtpError, match="alpha must lie in"):
        fuse(sem, sens, 1.5)


# ----------------------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("K", [0, 1])
def test_full_retention_equals_dense(tiny, enc, K):
    model, _, adapter = tiny
    logits, keep = pruned_forward(model, adapter, enc, lambda s: random_scores((3, 16), 0), 1.0, layer_k=K)
    assert keep.tolist() == [list(range(16))] * 3
    torch.testing.assert_close(logits, _dense_last(model, enc), atol=1e-4, rtol=0)


def test_prune_before_llm_equals_removed_tokens(tiny, enc):
    model, _, adapter = tiny
    one = _sample(enc, 1)
    keep = torch.tensor([[0, 2, 3, 7, 11, 15]])
    logits, _ = pruned_forward(model, adapter, one, keep, layer_k=0)

    # Reference by hand: delete the dropped placeholders from the prompt and scatter only the kept
    # visual tokens (from HF's own image-feature path) into what remains.
    ids = one["input_ids"][0]
    vis_pos = (ids == model.config.image_token_id).nonzero()[:, 0]
    drop = set(vis_pos[[i for i in range(16) if i not in keep[0].tolist()]].tolist())
    kept_ids = torch.tensor([t for j, t in enumerate(ids.tolist()) if j not in drop])[None]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=one["pixel_values"], return_dict=True).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, list | tuple) else feats.reshape(-1, feats.shape[-1])
        emb = model.get_input_embeddings()(kept_ids.clamp(max=model.config.text_config.vocab_size - 1))
        emb[kept_ids == model.config.image_token_id] = feats[keep[0]]
        ref = model(
            inputs_embeds=emb, attention_mask=torch.ones_like(kept_ids), position_ids=torch.arange(emb.shape[1])[None]
        ).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("K", [0, 1])
def test_batch_equals_samples_alone(tiny, enc, K):
    model, _, adapter = tiny
    keep = torch.tensor([[0, 1, 2, 3, 4], [3, 5, 8, 13, 15], [1, 4, 9, 10, 12]])
    logits, kept = pruned_forward(model, adapter, enc, keep, layer_k=K)
    assert logits.shape[0] == 3 and torch.equal(kept, keep)
    for i in range(3):
        alone, _ = pruned_forward(model, adapter, _sample(enc, i), keep[i : i + 1], layer_k=K)
        torch.testing.assert_close(logits[i : i + 1], alone, atol=1e-4, rtol=0)
    # Pruning changes the answer distribution: the check is not vacuous.
    assert (logits - _dense_last(model, enc)).abs().max() > 1e-3


def test_prune_inside_llm_equals_masking_dropped_keys(tiny, enc):
    """FastV reference: from layer K on, nobody attends to a dropped token; positions stay the original ones."""
    model, _, adapter = tiny
    K = 1
    keep = torch.tensor([[2, 3, 9], [0, 7, 15], [4, 5, 6]])
    logits, _ = pruned_forward(model, adapter, enc, keep, layer_k=K)
    vis = adapter.visual_positions(enc["input_ids"])
    dropped = vis.clone()
    for b in range(3):
        dropped[b, vis[b].nonzero()[keep[b], 0]] = False

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        assert mask.dtype == torch.bool  # SDPA's boolean mask: True = may attend
        kwargs["attention_mask"] = mask & ~dropped[:, None, None, :]
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in adapter.decoder_layers[K:]]
    try:
        ref = _dense_last(model, enc)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


def test_scored_pruning_inside_llm(tiny, enc):
    model, _, adapter = tiny

    def fastv(state: PruneState) -> torch.Tensor:
        return text_attention(
            state.adapter, state.hidden, state.layer_idx, state.attention_mask, state.position_ids, state.visual_mask
        )

    logits, keep = pruned_forward(model, adapter, enc, fastv, 0.25, layer_k=1)
    assert keep.shape == (3, 4) and (keep.diff(dim=1) > 0).all()
    hidden = hidden_states_at(adapter, enc, 1)
    vis = adapter.visual_positions(enc["input_ids"])
    expect = select_tokens(text_attention(adapter, hidden, 1, enc["attention_mask"], enc["position_ids"], vis), 0.25)
    assert torch.equal(keep, expect)
    assert torch.isfinite(logits).all()


def test_prune_sequence_shapes(tiny, enc):
    _, _, adapter = tiny
    emb = adapter.embed(enc["input_ids"], enc["pixel_values"])
    vis = adapter.visual_positions(enc["input_ids"])
    keep = torch.tensor([[0, 5], [1, 2], [14, 15]])
    p = prune_sequence(enc["input_ids"], enc["attention_mask"], emb, vis, keep)
    B, L, D = emb.shape
    assert p.inputs_embeds.shape == (B, L - 14, D)
    assert p.attention_mask.shape == p.position_ids.shape == p.input_ids.shape == (B, L - 14)
    for b in range(B):
        n_real = int(p.attention_mask[b].sum())
        assert p.position_ids[b, -n_real:].tolist() == list(range(n_real))
        vp = vis[b].nonzero()[:, 0]
        assert p.visual_positions[b].tolist() == vp[keep[b]].tolist()
        torch.testing.assert_close(p.inputs_embeds[b][p.input_ids[b] == adapter.image_token_id], emb[b, vp[keep[b]]])
    with pytest.raises(QavtpError, match="kept indices must lie in"):
        prune_sequence(enc["input_ids"], enc["attention_mask"], emb, vis, torch.tensor([[0, 16]] * 3))
    with pytest.raises(QavtpError, match="repeat"):
        prune_sequence(enc["input_ids"], enc["attention_mask"], emb, vis, torch.tensor([[1, 1]] * 3))


@pytest.mark.parametrize("K", [0, 1])
def test_pruned_scoring_at_full_retention_equals_dense(tiny_llava_dir, easyvqa_test, K):
    from qavtp.data.easyvqa import COLORS
    from qavtp.evaluate import Pruning, choice_logprobs, pruned_choice_logprobs

    model, processor, adapter = load_model(tiny_llava_dir)
    rows = easyvqa_test.select([0, 1, 5])
    choices = [[*COLORS, "purple triangle"]] * 3  # several tokens: the cache continuation runs too
    dense = choice_logprobs(model, processor, rows["image"], rows["prompt"], choices)
    prune = Pruning(adapter, "l2", 1.0, layer=K)
    full, keep = pruned_choice_logprobs(prune, processor, rows["image"], rows["prompt"], choices)
    assert keep.shape == (3, 16)
    for a, b in zip(full, dense, strict=True):
        assert a == pytest.approx(b, abs=2e-4)


@pytest.mark.parametrize(
    ("scorer", "K"),
    [("semantic", 0), ("cls", 0), ("l2", 0), ("qerror", 0), ("outlier", 0), ("random", 0), ("semantic", 1)],
)
def test_pruned_scoring_keeps_a_quarter_and_matches_per_sample(tiny_llava_dir, easyvqa_test, scorer, K):
    from qavtp.data.easyvqa import SHAPES
    from qavtp.evaluate import Pruning, pruned_choice_logprobs

    model, processor, adapter = load_model(tiny_llava_dir)
    rows = easyvqa_test.select([0, 12, 30])
    choices = [list(SHAPES)] * 3
    prune = Pruning(adapter, scorer, 0.25, layer=K)
    batch, keep = pruned_choice_logprobs(prune, processor, rows["image"], rows["prompt"], choices)
    assert keep.shape == (3, 4) and bool((keep.diff(dim=1) > 0).all())
    for i in range(3):
        alone, k1 = pruned_choice_logprobs(prune, processor, [rows["image"][i]], [rows["prompt"][i]], [choices[i]])
        if scorer != "random":  # random draws one matrix per batch shape
            assert torch.equal(k1[0], keep[i])
            assert batch[i] == pytest.approx(alone[0], abs=2e-4)


def test_cli_eval_with_pruning_and_bad_pruning_input(tiny_llava_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from qavtp.cli import main

    run = CliRunner().invoke
    out = tmp_path / "res"
    r = run(main, ["eval", str(tiny_llava_dir), "--limit", "6", "--retain", "0.25", "--scorer", "cls", "-o", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "results.json").read_text())
    assert data["visual_tokens_kept"] == 4 and data["config"]["scorer"] == "cls"
    for args, needle in (
        (["--retain", "1.5"], "retention ratio must lie in (0, 1]"),
        (["--retain", "0.5", "--scorer", "fastest"], "unknown scorer 'fastest'; valid: semantic"),
        (["--retain", "0.5", "--layer", "7"], "layer K=7 is beyond the model's 2 decoder layers"),
    ):
        r = run(main, ["eval", str(tiny_llava_dir), "--limit", "2", *args])
        assert r.exit_code == 2 and needle in r.output, r.output

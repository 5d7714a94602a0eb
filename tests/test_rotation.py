"""Hadamard constructions and the function-preserving transforms (norm fusion, QuaRot rotation, SmoothQuant)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qavtp.calibrate.hadamard import apply_hadamard, hadamard_matrix, random_hadamard
from qavtp.calibrate.rotation import (
    OnlineHadamardLinear,
    fuse_layer_norms,
    install_online_transforms,
    rotate_model,
)
from qavtp.calibrate.smooth import collect_input_absmax, smooth_model
from qavtp.errors import QavtpError
from qavtp.models.loading import load_model
from qavtp.prompting import encode


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 40, 52, 60, 64, 576, 1536])
def test_hadamard_is_orthonormal(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))  # a true Hadamard: entries ±1/sqrt(n)


@pytest.mark.parametrize("n", [6, 7, 14, 7 * 64 + 2, 92])
def test_hadamard_impossible_orders_name_n(n):
    with pytest.raises(QavtpError, match=str(n)):
        hadamard_matrix(n)


def test_random_hadamard_seeded_and_apply():
    a, b, c = random_hadamard(576, 1), random_hadamard(576, 1), random_hadamard(576, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a @ a.T, torch.eye(576, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(3, 5, 576, dtype=torch.bfloat16)
    y = apply_hadamard(x, a)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    torch.testing.assert_close(y.float(), (x.double() @ a).float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(QavtpError, match="576"):
        apply_hadamard(torch.zeros(2, 64), a)


# -- models -------------------------------------------------------------------------------------


def _model(tiny_llava_dir, seed: int = 0):
    """The tiny LLaVA with non-trivial norm weights (random init leaves them at 1, hiding fusion bugs)."""
    model, processor, adapter = load_model(tiny_llava_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapter.language_model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
    return model, processor, adapter


@pytest.fixture(scope="module")
def enc(tiny_llava_dir, easyvqa_test):
    _, processor, _ = load_model(tiny_llava_dir)
    rows = easyvqa_test.select([0, 1, 5])
    return encode(processor, rows["image"], rows["prompt"])


def _logits(model, enc, **kw):
    with torch.no_grad():
        return model(**enc, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_fuse_layer_norms_preserves_logits_and_unties(tiny_llava_dir, enc):
    model, _, adapter = _model(tiny_llava_dir)
    assert adapter.lm_head.weight is adapter.embed_tokens.weight  # the fixture ties them
    ref = _logits(model, enc).logits
    assert fuse_layer_norms(adapter) is True
    assert adapter.lm_head.weight is not adapter.embed_tokens.weight
    assert model.config.get_text_config().tie_word_embeddings is False
    for layer in adapter.decoder_layers:
        assert torch.all(layer.input_layernorm.weight == 1) and torch.all(layer.post_attention_layernorm.weight == 1)
    assert torch.all(adapter.final_norm.weight == 1)
    assert _rel(_logits(model, enc).logits, ref) < 1e-3
    assert fuse_layer_norms(adapter) is False  # idempotent
    assert _rel(_logits(model, enc).logits, ref) < 1e-3


def test_online_o_proj_hadamard_preserves_logits(tiny_llava_dir, enc):
    model, _, adapter = _model(tiny_llava_dir)
    ref = _logits(model, enc).logits
    desc = rotate_model(adapter, seed=3, online_o_proj=True)
    assert _rel(_logits(model, enc).logits, ref) < 1e-3
    assert all(isinstance(layer.self_attn.o_proj, OnlineHadamardLinear) for layer in adapter.decoder_layers)
    assert {o["module"] for o in desc["online"]} >= {f"layers.{i}.self_attn.o_proj" for i in range(2)}


def test_rotate_model_preserves_logits(tiny_llava_dir, enc):
    model, _, adapter = _model(tiny_llava_dir)
    ref = _logits(model, enc).logits
    emb0 = adapter.embed_tokens.weight.detach().clone()
    g_final = adapter.final_norm.weight.detach().clone()
    desc = rotate_model(adapter, seed=3)
    out = _logits(model, enc).logits
    assert _rel(out, ref) < 1e-3, _rel(out, ref)

    cfg = model.config.get_text_config()
    assert json.loads(json.dumps(desc)) == desc
    assert desc["hidden"] == cfg.hidden_size and desc["intermediate"] == cfg.intermediate_size
    assert desc["head_dim"] == cfg.hidden_size // cfg.num_attention_heads and desc["seed"] == 3
    assert desc["untied_lm_head"] is True
    assert [o["module"] for o in desc["online"]] == [
        f"layers.{i}.mlp.down_proj" for i in range(len(adapter.decoder_layers))
    ]
    assert all(isinstance(layer.mlp.down_proj, OnlineHadamardLinear) for layer in adapter.decoder_layers)

    # Tied embeddings: after rotation the two matrices differ (E Q vs (E diag g) Q) yet the model is the same.
    q = random_hadamard(cfg.hidden_size, 3).float()
    assert adapter.lm_head.weight.data_ptr() != adapter.embed_tokens.weight.data_ptr()
    assert not torch.allclose(adapter.lm_head.weight, adapter.embed_tokens.weight)
    torch.testing.assert_close(adapter.embed_tokens.weight, emb0 @ q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapter.lm_head.weight, (emb0 * g_final) @ q, rtol=1e-4, atol=1e-5)
    with pytest.raises(QavtpError, match="already rotated"):
        rotate_model(adapter, seed=3)


def test_rotated_state_dict_reloads_through_description(tiny_llava_dir, enc):
    model, _, adapter = _model(tiny_llava_dir)
    desc = rotate_model(adapter, seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any(k.endswith("hadamard") for k in state)  # rebuilt from the description, not stored
    fresh, _, fadapter = load_model(tiny_llava_dir)
    install_online_transforms(fadapter, json.loads(json.dumps(desc)))
    fresh.load_state_dict(state)
    assert _rel(_logits(fresh, enc).logits, _logits(model, enc).logits) < 1e-6


def test_rotation_spreads_an_outlier_channel(tiny_llava_dir, enc):
    model, _, adapter = _model(tiny_llava_dir)
    c = 5
    with torch.no_grad():
        # A massive-activation channel on every token, text and visual alike.
        adapter.embed_tokens.weight[:, c] += 50.0
        model.model.multi_modal_projector.linear_2.bias[c] += 50.0
    h0 = _logits(model, enc, output_hidden_states=True).hidden_states[1]
    desc = rotate_model(adapter, seed=0)
    h1 = _logits(model, enc, output_hidden_states=True).hidden_states[1]
    q = random_hadamard(desc["hidden"], desc["seed"]).float()
    torch.testing.assert_close(h1, h0 @ q, rtol=1e-3, atol=1e-3)  # the residual stream is exactly rotated

    def ratio(h):
        return (h.abs().amax() / h.abs().median()).item()

    assert h0.abs().amax(dim=(0, 1)).argmax().item() == c
    assert ratio(h0) > 200 and ratio(h1) < 10 and ratio(h0) / ratio(h1) > 50, (ratio(h0), ratio(h1))


def test_collect_stats_and_smooth_model_preserve_logits(tiny_llava_dir, enc):
    model, _, adapter = _model(tiny_llava_dir)
    ref = _logits(model, enc).logits
    stats = collect_input_absmax(adapter, [enc])
    n_layers = len(adapter.decoder_layers)
    assert len(stats) == 7 * n_layers
    q_proj = adapter.decoder_layers[1].self_attn.q_proj
    assert stats["layers.1.self_attn.q_proj"].shape == (q_proj.in_features,)
    torch.testing.assert_close(stats["layers.1.self_attn.q_proj"], stats["layers.1.self_attn.v_proj"])

    scales = smooth_model(adapter, stats, alpha=0.5)
    assert set(scales) == {
        f"layers.{i}.{n}" for i in range(n_layers) for n in ("input_layernorm", "post_attention_layernorm")
    }
    assert _rel(_logits(model, enc).logits, ref) < 1e-3
    after = collect_input_absmax(adapter, [enc])
    s = scales["layers.1.input_layernorm"]
    torch.testing.assert_close(
        after["layers.1.self_attn.q_proj"], stats["layers.1.self_attn.q_proj"] / s, rtol=1e-4, atol=1e-6
    )
    with pytest.raises(QavtpError, match="no activation statistics"):
        smooth_model(adapter, {}, alpha=0.5)


def test_smooth_after_rotation_preserves_logits(tiny_llava_dir, enc):
    model, _, adapter = _model(tiny_llava_dir)
    ref = _logits(model, enc).logits
    rotate_model(adapter, seed=2)
    stats = collect_input_absmax(adapter, [enc])
    # The hook sees down_proj's input after the online Hadamard, which is what gets quantized.
    assert "layers.0.mlp.down_proj.linear" in stats and "layers.0.mlp.down_proj" not in stats
    smooth_model(adapter, stats, alpha=0.6)
    assert _rel(_logits(model, enc).logits, ref) < 1e-3


@pytest.mark.parametrize("n", [4, 64, 576, 1536, 2048])
def test_factored_hadamard_equals_the_matrix(n):
    from qavtp.calibrate.hadamard import apply_hadamard_factored, hadamard_factors

    a, b = hadamard_factors(n)
    assert a.shape[0] * b.shape[0] == n and max(a.shape[0], b.shape[0]) < n
    np.testing.assert_allclose(np.kron(a, b), hadamard_matrix(n).numpy(), atol=1e-12)
    x = torch.randn(2, 3, n)
    want = x @ hadamard_matrix(n, torch.float32)
    torch.testing.assert_close(apply_hadamard_factored(x, n), want, atol=1e-5, rtol=1e-5)

"""Pruned prefill + KV cache on the tiny random LLaVA: equal to dense at full retention, to the cache-free
pruned forward of tests/oracles.py, to each sample alone, and greedy generation equal to Hugging Face's at full
retention."""

from __future__ import annotations

import pytest
import torch

from qavtp.pruned_lm import extend, pruned_generate, pruned_prefill
from tests.oracles import pruned_forward

KEEP = torch.tensor([[0, 1, 2, 3, 4], [3, 5, 8, 13, 15], [1, 4, 9, 10, 12]])


def _append(enc, suffix: torch.Tensor) -> dict:
    ids = torch.cat([enc["input_ids"], suffix], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(suffix)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "pixel_values": enc["pixel_values"]}


@pytest.mark.parametrize("K", [0, 1])
def test_full_retention_equals_dense(tiny, enc, K):
    model, _, adapter = tiny
    logits, state = pruned_prefill(adapter, enc, torch.arange(16).expand(3, -1), layer_k=K)
    with torch.no_grad():
        ref = model(**enc).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    assert state.pruned_mask.shape == enc["attention_mask"].shape


@pytest.mark.parametrize("K", [0, 1])
def test_prefill_and_extension_equal_the_cache_free_pruned_forward(tiny, enc, K):
    model, _, adapter = tiny
    logits, state = pruned_prefill(adapter, enc, KEEP, layer_k=K)
    ref, _ = pruned_forward(model, adapter, enc, KEEP, layer_k=K)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    # Appending three tokens through the cache = pruning the longer prompt from scratch.
    suffix = torch.tensor([[5, 6, 7]] * 3)
    ext = extend(adapter, state, suffix)
    ref2, _ = pruned_forward(model, adapter, _append(enc, suffix), KEEP, layer_k=K)
    torch.testing.assert_close(ext[:, -1], ref2, atol=1e-4, rtol=0)
    expected_len = enc["input_ids"].shape[1] - 11 + 3
    assert state.pruned_mask.shape[1] == expected_len
    assert state.cache.layers[-1].keys.shape[2] == expected_len
    if K:  # layers before K cached the whole prompt
        assert state.cache.layers[0].keys.shape[2] == enc["input_ids"].shape[1] + 3


@pytest.mark.parametrize("K", [0, 1])
def test_batch_with_different_kept_sets_equals_samples_alone(tiny, enc, K):
    _, _, adapter = tiny
    logits, state = pruned_prefill(adapter, enc, KEEP, layer_k=K)
    nxt = extend(adapter, state, torch.tensor([[9], [9], [9]]))
    for i in range(3):
        m = enc["attention_mask"][i].bool()
        one = {"input_ids": enc["input_ids"][i][m][None], "pixel_values": enc["pixel_values"][i : i + 1]}
        alone, st = pruned_prefill(adapter, one, KEEP[i : i + 1], layer_k=K)
        torch.testing.assert_close(logits[i : i + 1], alone, atol=1e-4, rtol=0)
        torch.testing.assert_close(nxt[i : i + 1], extend(adapter, st, torch.tensor([[9]])), atol=1e-4, rtol=0)


def test_greedy_generation_at_full_retention_equals_hf_generate(tiny, enc):
    model, processor, adapter = tiny
    logits, state = pruned_prefill(adapter, enc, torch.arange(16).expand(3, -1), layer_k=1)
    ours = pruned_generate(adapter, state, logits, eos_id=None, max_new_tokens=5)
    hf_in = {k: v for k, v in enc.items() if k != "position_ids"}
    with torch.no_grad():
        ref = model.generate(**hf_in, max_new_tokens=5, do_sample=False, min_new_tokens=5)[
            :, enc["input_ids"].shape[1] :
        ]
    assert torch.equal(ours, ref)


def test_generation_after_pruning_runs_and_stops_at_eos(tiny, enc):
    _, processor, adapter = tiny
    logits, state = pruned_prefill(adapter, enc, KEEP[:, :2], layer_k=1)
    eos = int(logits[0].argmax())  # sample 0 stops at once
    out = pruned_generate(adapter, state, logits, eos_id=eos, max_new_tokens=4)
    assert out.shape[0] == 3 and out[0, 0] == eos and (out[0] == eos).all()

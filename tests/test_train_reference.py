"""The reference model's training code, run for a few steps on the tiny random LLaVA."""

from __future__ import annotations

import json

import torch

from qavtp.config import StageConfig
from qavtp.models.loading import load_model
from qavtp.train_reference import stage1, stage2


def _rows(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_stage2_trains_projector_only_and_resumes(tiny_llava_dir, tmp_path):
    model, processor, adapter = load_model(tiny_llava_dir)
    lm_before = {k: v.clone() for k, v in adapter.language_model.state_dict().items()}
    proj_before = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    log, ckpt = tmp_path / "log.jsonl", tmp_path / "ckpt"
    stage2(model, processor, log, ckpt, StageConfig(2, batch=4, eval_every=2, heldout=6, save_every=1), seed=0)
    rows = _rows(log)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert 0.0 <= rows[-1]["heldout_acc"] <= 1.0
    assert torch.load(ckpt / "stage2_state.pt", weights_only=True)["step"] == 2
    for k, v in adapter.language_model.state_dict().items():
        assert torch.equal(v, lm_before[k]), f"frozen LLM weight {k} changed"
    changed = [
        k for k, v in model.model.multi_modal_projector.state_dict().items() if not torch.equal(v, proj_before[k])
    ]
    assert changed, "the projector did not train"

    # A second run with more steps resumes from the checkpoint instead of starting over.
    fresh, processor2, _ = load_model(tiny_llava_dir)
    stage2(fresh, processor2, log, ckpt, StageConfig(3, batch=4, eval_every=10, heldout=6, save_every=1), seed=0)
    assert [r["step"] for r in _rows(log)] == [1, 2, 3]


def test_stage1_learns_colour_from_image_labels(tiny_llava_dir, tmp_path):
    model, processor, _ = load_model(tiny_llava_dir)
    log = tmp_path / "log.jsonl"
    stage1(model, processor, log, epochs=2, seed=0, lr=3e-3)
    rows = _rows(log)
    assert [r["epoch"] for r in rows] == [1, 2]
    # Eight colours: chance is 12.5 %; even this 2-layer, 32-wide tower learns colour within two epochs.
    assert rows[-1]["heldout"]["color"] > 0.5


def test_packed_conversations_put_loss_on_every_answer(tiny_llava_dir):
    from qavtp.data.easyvqa import load_easyvqa
    from qavtp.train_reference import _packed_batch, packed_loss

    model, processor, _ = load_model(tiny_llava_dir)
    ds = load_easyvqa("train")
    convs = [ds.select(range(0, 4)), ds.select(range(10, 13))]
    enc, rows, pos, targets = _packed_batch(processor, convs)
    # One image per conversation, however many questions it holds.
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 2 * 16
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = [t for c in convs for a in c["answer"] for t in tok(a, add_special_tokens=False).input_ids + [end]]
    assert targets.tolist() == expected
    # The hidden state at pos predicts the token at pos + 1.
    assert all(enc["input_ids"][r, p + 1] == t for r, p, t in zip(rows, pos, targets, strict=True))
    loss = packed_loss(model, enc, rows, pos, targets)
    loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None

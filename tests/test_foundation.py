"""Data, adapter, evaluator and the CLI's handling of bad input, on a tiny random LLaVA."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from qavtp.cli import main
from qavtp.data import load_data
from qavtp.data.easyvqa import CHOICES, COLORS, SHAPES, image_labels
from qavtp.errors import QavtpError
from qavtp.evaluate import choice_logprobs, evaluate, markdown_table
from qavtp.models.loading import load_model
from qavtp.prompting import choice_ids, encode


def test_easyvqa_schema_and_counts(easyvqa_test):
    assert len(easyvqa_test) == 9673
    row = easyvqa_test[0]
    assert row["answer"] in row["choices"]
    assert row["choices"] == CHOICES[row["qtype"]]
    assert row["prompt"].startswith(row["question"]) and "single word" in row["prompt"]
    assert row["image"].size == (64, 64)
    types = set(easyvqa_test["qtype"])
    assert types == {"yes/no", "color", "shape"}
    assert sum(t == "yes/no" for t in easyvqa_test["qtype"]) == 7136  # the data set's published count


def test_image_labels_agree_with_open_questions():
    labels = image_labels("train")
    assert len(labels) == 4000
    assert sum("shape" in d for d in labels.values()) > 3400
    assert all(d.get("color", "red") in COLORS and d.get("shape", "circle") in SHAPES for d in labels.values())


def test_seeded_subsets_are_reproducible():
    a = load_data("easy-vqa", "test", limit=50, seed=3)
    b = load_data("easy-vqa", "test", limit=50, seed=3)
    c = load_data("easy-vqa", "test", limit=50, seed=4)
    assert a["question"] == b["question"] and a["image_id"] == b["image_id"]
    assert a["image_id"] != c["image_id"]
    assert len(load_data("easy-vqa", "train", limit=10**6)) == 38575


def test_adapter_embedding_matches_hf_forward(tiny_llava_dir, easyvqa_test):
    model, processor, adapter = load_model(tiny_llava_dir)
    rows = easyvqa_test[:3]
    enc = encode(processor, rows["image"], rows["prompt"])
    vis = adapter.visual_tokens(enc["pixel_values"])
    assert vis.shape == (3, 16, model.config.text_config.hidden_size)
    assert adapter.visual_positions(enc["input_ids"]).sum(1).tolist() == [16, 16, 16]
    with torch.no_grad():
        ref = model(**enc).logits
        emb = adapter.embed(enc["input_ids"], enc["pixel_values"])
        h = adapter.language_model(
            inputs_embeds=emb, attention_mask=enc["attention_mask"], position_ids=enc["position_ids"]
        ).last_hidden_state
        ours = adapter.lm_head(h)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert len(adapter.decoder_layers) == 2


def _full_sequence_logprob(model, processor, image, prompt, choice):
    ids = choice_ids(processor.tokenizer, choice)
    enc = encode(processor, [image], [prompt], [ids])
    with torch.no_grad():
        logp = model(**enc).logits[0].float().log_softmax(-1)
    n = len(ids)
    return sum(logp[-n - 1 + k, ids[k]].item() for k in range(n))


def test_cached_candidate_scoring_equals_full_sequences(tiny_llava_dir, easyvqa_test):
    model, processor, _ = load_model(tiny_llava_dir)
    rows = easyvqa_test.select([0, 1, 5, 7])
    choices = [list(SHAPES) + ["purple triangle"], list(COLORS), ["yes", "no"], ["a b c d", "no"]]
    lengths = {len(choice_ids(processor.tokenizer, c)) for cs in choices for c in cs}
    assert max(lengths) > 1, "the test needs multi-token candidates"
    scores = choice_logprobs(model, processor, rows["image"], rows["prompt"], choices)
    for i, cs in enumerate(choices):
        for j, c in enumerate(cs):
            full = _full_sequence_logprob(model, processor, rows["image"][i], rows["prompt"][i], c)
            assert scores[i][j] == pytest.approx(full, abs=2e-4)


def test_scores_do_not_depend_on_batch_padding(tiny_llava_dir, easyvqa_test):
    model, processor, _ = load_model(tiny_llava_dir)
    long_q = easyvqa_test[0]["prompt"] + " Think carefully about the colour and the shape of it."
    images = [easyvqa_test[1]["image"], easyvqa_test[0]["image"]]
    alone = choice_logprobs(model, processor, images[:1], [easyvqa_test[1]["prompt"]], [list(COLORS)])
    batched = choice_logprobs(model, processor, images, [easyvqa_test[1]["prompt"], long_q], [list(COLORS)] * 2)
    assert batched[0] == pytest.approx(alone[0], abs=2e-4)


def test_evaluate_reports_per_type_and_odd_images(tiny_llava_dir, easyvqa_test):
    model, processor, _ = load_model(tiny_llava_dir)
    ds = easyvqa_test.select(range(12))
    # Grayscale, RGBA and odd-sized images go through the same path as RGB ones.
    odd = [ds[0]["image"].convert("L"), ds[1]["image"].convert("RGBA"), ds[2]["image"].resize((50, 37))]
    ds = ds.map(lambda r, i: {"image": odd[i] if i < 3 else r["image"]}, with_indices=True)
    res = evaluate(model, processor, ds, batch_size=5, progress=False)
    assert res["n"] == 12 and len(res["predictions"]) == 12
    assert sum(v["n"] for k, v in res["by_type"].items() if k != "all") == 12
    hits = sum(p["correct"] for p in res["predictions"])
    assert res["accuracy"] == pytest.approx(hits / 12)
    assert all(p["prediction"] in r for p, r in zip(res["predictions"], ds["choices"], strict=True))
    assert "| **all** | 12 |" in markdown_table(res)
    gen = evaluate(model, processor, ds.select(range(4)), batch_size=4, mode="generate", progress=False)
    assert gen["n"] == 4


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_evaluate_on_a_device_scores_as_on_the_cpu(tiny_llava_dir, easyvqa_test, device):
    """The model on ``device`` (``qavtp eval --device``): the questions follow it and the scores match the CPU's."""
    from qavtp.device import visiting

    model, processor, _ = load_model(tiny_llava_dir)
    ds = easyvqa_test.select(range(6))
    args = (processor, ds["image"], ds["prompt"], ds["choices"])
    ref = choice_logprobs(model, processor, *args[1:])
    with visiting(model, torch.device(device)):
        ours = choice_logprobs(model, *args)
    assert next(model.parameters()).device.type == "cpu"
    for a, b in zip(ours, ref, strict=True):
        assert a == pytest.approx(b, abs=1e-3)


def test_cli_eval_writes_json_and_markdown(tiny_llava_dir, tmp_path):
    out = tmp_path / "res"
    r = CliRunner().invoke(main, ["eval", str(tiny_llava_dir), "--limit", "6", "--batch-size", "3", "-o", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "results.json").read_text())
    assert data["n"] == 6 and data["config"]["limit"] == 6
    assert (out / "results.md").read_text().startswith("###")
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_model_inputs_give_one_line(tiny_llava_dir, tmp_path):
    run = CliRunner().invoke
    _one_line_error(run(main, ["eval", str(tmp_path / "nope"), "--limit", "2"]), "model directory not found")
    pruned_on_gpu = run(main, ["eval", "--device", "cuda", "--retain", "0.5"])
    _one_line_error(pruned_on_gpu, "--device cuda runs dense --mode loglik")
    _one_line_error(run(main, ["eval", "--device", "meta"]), "only cpu and cuda are supported")
    (tmp_path / "empty").mkdir()
    _one_line_error(run(main, ["eval", str(tmp_path / "empty"), "--limit", "2"]), "no config.json")
    other = tmp_path / "qwen"
    shutil.copytree(tiny_llava_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (other / "config.json").write_text(json.dumps(cfg))
    _one_line_error(run(main, ["eval", str(other), "--limit", "2"]), "unsupported architecture 'qwen2_vl'", "llava")
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny_llava_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    _one_line_error(run(main, ["eval", str(bad), "--limit", "2"]), "corrupt safetensors")


def test_bad_data_inputs_give_one_line(tiny_llava_dir, tmp_path):
    run = CliRunner().invoke
    _one_line_error(run(main, ["eval", str(tiny_llava_dir), "--data", "imagenet"]), "unknown data set 'imagenet'")
    _one_line_error(run(main, ["eval", str(tiny_llava_dir), "--split", "validation"]), "split must be")
    with pytest.raises(QavtpError, match="--limit"):
        load_data("easy-vqa", "test", limit=-1)


def test_text_only_rows_are_scored_without_image(tiny_llava_dir, easyvqa_test):
    model, processor, _ = load_model(tiny_llava_dir)
    img = easyvqa_test[0]["image"]
    scores = choice_logprobs(model, processor, [img, None], ["what shape?", "what shape?"], [list(SHAPES)] * 2)
    assert len(scores) == 2 and scores[0] != scores[1]
    assert isinstance(Image.new("RGB", (2, 2)), Image.Image)


def test_rows_sharing_an_image_score_as_if_alone(tiny_llava_dir, easyvqa_test):
    model, processor, _ = load_model(tiny_llava_dir)
    same = easyvqa_test.filter(lambda r: r["image_id"] == 3)
    assert len(same) >= 3
    rows = same[:3]
    together = choice_logprobs(model, processor, rows["image"], rows["prompt"], rows["choices"])
    for i in range(3):
        alone = choice_logprobs(model, processor, [rows["image"][i]], [rows["prompt"][i]], [rows["choices"][i]])
        assert together[i] == pytest.approx(alone[0], abs=2e-4)
        for j, c in enumerate(rows["choices"][i]):
            full = _full_sequence_logprob(model, processor, rows["image"][i], rows["prompt"][i], c)
            assert together[i][j] == pytest.approx(full, abs=2e-4)


def test_answer_margins_and_agreement_by_margin():
    from qavtp.metrics import agreement_by_margin, margin_bin_label, pick

    assert pick([-1.0, -0.25, -3.0], ["a", "b", "c"]) == ("b", 0.75)
    assert pick([-0.5, -0.5], ["yes", "no"]) == ("yes", 0.0)  # the first of equal ones, as argmax
    assert pick([-2.0], ["only"]) == ("only", None)
    ref = [{"prediction": p, "margin": m} for p, m in [("a", 0.01), ("b", 0.03), ("a", 0.1), ("b", 5.0), ("a", 2.0)]]
    other = [{"prediction": p} for p in ["b", "b", "a", "b", "a"]]
    bins = agreement_by_margin(ref, other, bins=(0.05, 1.0))
    assert [(b["from"], b["n"], b["same"]) for b in bins] == [(0.0, 2, 0.5), (0.05, 1, 1.0), (1.0, 2, 1.0)]
    assert [margin_bin_label(b) for b in bins] == ["0–0.05", "0.05–1", "1+"]
    assert agreement_by_margin(ref[:1], other[:1], bins=(0.05,))[1] == {
        "from": 0.05,
        "to": float("inf"),
        "n": 0,
        "same": None,
    }

"""Learning the fusion weights on calibration data, storing them in the artifact and using them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qavtp.calibrate.artifact import load_artifact, read_config
from qavtp.calibrate.artifact_config import ArtifactConfig, fusion_params, ratio_key
from qavtp.calibrate.calibration import run_calibration
from qavtp.calibrate.fusion import candidate_grid, holdout_test, learn_fusion
from qavtp.config import parse_ratios
from qavtp.data import load_data
from qavtp.errors import QavtpError
from qavtp.models.loading import load_model
from qavtp.prompting import encode
from qavtp.scoring import FusionParams, fused_scores, gather_visual, qapruner_params, score_tokens, semantic_scores
from tests.helpers import calibration, config_json


@pytest.fixture(scope="module")
def artifact(tiny_llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion") / "art"
    return run_calibration(
        tiny_llava_dir, out, calibration(n_samples=8, batch_size=4, retain="0.5,0.25", fusion_samples=6), progress=False
    )


def test_parse_ratios_and_keys():
    assert parse_ratios("0.5, 0.25,0.125") == [0.5, 0.25, 0.125]
    assert parse_ratios("none") == [] and parse_ratios(None) == []
    assert ratio_key(0.125) == "0.125" and ratio_key(1) == "1"
    with pytest.raises(QavtpError, match=r"retention ratio must lie in \(0, 1\], got 1.5"):
        parse_ratios("0.5,1.5")
    with pytest.raises(QavtpError, match="'half' is not a number"):
        parse_ratios("half")


def test_fusion_params_validate():
    with pytest.raises(QavtpError, match="alpha must lie in"):
        FusionParams(alpha=1.5)
    with pytest.raises(QavtpError, match="direction must be"):
        FusionParams(direction=0)
    with pytest.raises(QavtpError, match="unknown fusion parameters"):
        FusionParams.from_dict({"alpha": 0.5, "gamma": 1})
    p = qapruner_params(576)
    assert p.spec.group_size == 64 and p.alpha == 0.5 and p.direction == 1 and not p.relative
    assert FusionParams.from_dict(p.to_dict()) == p


def test_candidate_grid_stages_cover_the_open_choices():
    base = FusionParams()
    s1 = candidate_grid(base, 1)
    assert {p.semantic for p in s1 if p.alpha == 1.0} == {"text", "cls"}
    assert {(p.beta, p.direction) for p in s1 if p.alpha == 0.0} == {(b, d) for b in (0, 0.5, 1) for d in (1, -1)}
    s2 = candidate_grid(base, 2, base)
    assert len(s2) == 18 and {p.alpha for p in s2} == {0.25, 0.5, 0.75}
    s3 = candidate_grid(base, 3, base)
    assert [(p.norm, p.outlier, p.relative) for p in s3] == [
        ("zscore", "range", False),
        ("minmax", "linf", False),
        ("minmax", "range", True),
    ]
    s4 = candidate_grid(base, 4, base)  # the best point's score as a DPP's quality, against plain top-k
    assert {p.select for p in s4} == {"dpp"} and [p.theta for p in s4] == [0.25, 0.5, 0.75, 0.9]


def test_calibrate_learns_and_stores_fusion(artifact, tiny_llava_dir):
    cfg = read_config(artifact)
    fus = config_json(artifact)["fusion"]
    assert set(fus["ratios"]) == {"0.5", "0.25"} and fus["objective"] == "kl" and fus["n_samples"] == 6
    assert fus["holdout_samples"] == 2  # calibration questions 7 and 8: the search saw only the first 6
    preset = qapruner_params(load_model(tiny_llava_dir)[2].embed_tokens.weight.shape[1])
    for key, entry in fus["ratios"].items():
        curve = entry["curve"]
        assert {e["stage"] for e in curve} == {1, 2, 3, 4}
        best = min(curve, key=lambda e: e["kl"])
        # The searched point is the best of its curve, and never worse than the paper's preset there.
        assert entry["searched"] == best["params"] and best["kl"] <= entry["qapruner"]["kl"] + 1e-12
        check = entry["holdout"]
        if entry["searched"] == preset.to_dict():
            assert check is None and entry["params"] == preset.to_dict()
        else:
            assert check["n"] == 2 and check["adopted"] in ("learned", "qapruner")
            adopted = entry["searched"] if check["adopted"] == "learned" else preset.to_dict()
            assert entry["params"] == adopted
        assert fusion_params(cfg, float(key)) == FusionParams.from_dict(entry["params"])
    # Memoised kept sets: far fewer forwards than candidates x questions x ratios.
    n_candidates = sum(len(e["curve"]) for e in fus["ratios"].values())
    assert fus["forwards"] < n_candidates * 6


class _FakeJudge:
    """Per-question metrics (kl, accuracy, choice_kl) of [learned, preset], as _Judge.per_question gives them."""

    def __init__(self, learned_kl, preset_kl):
        self.rows = [[(k, 1, k) for k in learned_kl], [(k, 1, k) for k in preset_kl]]

    def per_question(self, configs, rho):
        return self.rows


def test_holdout_adopts_the_learned_weights_only_on_a_clear_paired_gain():
    learned, preset = FusionParams(alpha=0.75), qapruner_params(576)
    rng = torch.Generator().manual_seed(0)
    base = torch.rand(40, generator=rng).tolist()
    # A steady gain on every question: adopted.
    clear = holdout_test(_FakeJudge([b - 0.05 for b in base], base), learned, preset, 0.25, "kl")
    assert clear["adopted"] == "learned" and clear["gain"] == pytest.approx(0.05) and clear["n"] == 40
    # The same mean gain drowned in per-question noise: the preset stays.
    noise = (torch.rand(40, generator=rng) - 0.5).tolist()
    noisy = holdout_test(
        _FakeJudge([b - 0.05 + e for b, e in zip(base, noise, strict=True)], base), learned, preset, 0.25, "kl"
    )
    assert noisy["adopted"] == "qapruner" and noisy["z"] < 2
    # Worse on held-out questions: the preset stays.
    assert holdout_test(_FakeJudge(base, base), learned, preset, 0.25, "kl")["adopted"] == "qapruner"


def test_fusion_lookup_errors(artifact, tiny_llava_dir, tmp_path):
    cfg = read_config(artifact)
    with pytest.raises(QavtpError, match=r"fusion weights for retention 0.5, 0.25, not 0.125"):
        fusion_params(cfg, 0.125)
    assert fusion_params(cfg, 1.0) == FusionParams()
    with pytest.raises(QavtpError, match="calibrated without fusion weights"):
        fusion_params(replace(cfg, fusion=None), 0.5)


def test_learned_scorer_reproduces_the_formula(artifact, easyvqa_test):
    net, processor, adapter, cfg = load_artifact(artifact)
    rows = easyvqa_test[:3]
    enc = encode(processor, rows["image"], rows["prompt"])
    visual = adapter.visual_positions(enc["input_ids"])
    embeds = adapter.embed(enc["input_ids"], enc["pixel_values"])
    p = fusion_params(cfg, 0.25)
    got = score_tokens("qavtp", adapter, enc, embeds, visual, fusion=p)
    sem = semantic_scores(adapter, enc, embeds, visual, p.semantic)
    torch.testing.assert_close(got, fused_scores(sem, gather_visual(embeds, visual), p))
    with pytest.raises(QavtpError, match="needs fusion weights"):
        score_tokens("qavtp", adapter, enc, embeds, visual)


def test_learn_fusion_accuracy_objective_and_bad_objective(tiny_llava_dir):
    model, processor, adapter = load_model(tiny_llava_dir)
    ds = load_data("easy-vqa", "train", limit=4, seed=1)
    from qavtp.calibrate.fusion import dense_logprobs
    from qavtp.calibrate.quantizers import QuantSpec

    target = dense_logprobs(model, processor, ds)
    # The floating-point model judged against itself: dense KL is 0, pruned KL is never negative.
    res = learn_fusion(adapter, processor, ds, [0.5], target, QuantSpec(4, True, 0), "accuracy", progress=False)
    assert res["dense"]["kl"] == pytest.approx(0.0, abs=1e-5)
    entry = res["ratios"]["0.5"]
    assert entry["accuracy"] == max(e["accuracy"] for e in entry["curve"])
    assert all(e["kl"] >= -1e-6 for e in entry["curve"])
    with pytest.raises(QavtpError, match="unknown fusion objective 'mse'"):
        learn_fusion(adapter, processor, ds, [0.5], target, QuantSpec(4, True, 0), "mse", progress=False)


def test_cli_sweep_writes_tables_and_plots(artifact, tmp_path):
    import json

    from click.testing import CliRunner

    from qavtp.cli import main

    out = tmp_path / "sweep"
    args = ["eval", "--artifact", str(artifact), "--limit", "6", "--retain", "1,0.5,0.25"]
    r = CliRunner().invoke(main, [*args, "--scorer", "semantic,qavtp,l2", "--with-fp", "-o", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "results.json").read_text())
    got = {(x["model"], x["scorer"], x["retain"]) for x in data["runs"]}
    assert ("FP", "dense", 1.0) in got and ("FP", "semantic", 0.25) in got and ("FP", "qavtp", 0.25) not in got
    assert {("W4A4", s, 0.5) for s in ("semantic", "qavtp", "l2")} <= got and ("W4A4", "dense", 1.0) in got
    for x in data["runs"]:
        assert x["visual_tokens"] == 16 and x["visual_tokens_kept"] == {1.0: 16, 0.5: 8, 0.25: 4}[x["retain"]]
        assert len(x["correct"]) == 6 and all(len(k) == x["visual_tokens_kept"] for k in x["kept_examples"])
    md = (out / "results.md").read_text()
    assert "| W4A4 + qavtp |" in md and "| FP dense |" in md and "Learned fusion weights" in md
    for png in ("accuracy_vs_retention.png", "kept_tokens.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_pruning_bad_input(artifact, tiny_llava_dir, tmp_path):
    from click.testing import CliRunner

    from qavtp.cli import main

    bare = tmp_path / "bare"
    run_calibration(tiny_llava_dir, bare, calibration(n_samples=4, batch_size=4), progress=False)
    run = CliRunner().invoke
    cases = [
        (["--artifact", str(bare), "--retain", "0.5", "--scorer", "qavtp"], "calibrated without fusion weights"),
        (["--artifact", str(artifact), "--retain", "0.125", "--scorer", "qavtp"], "not 0.125"),
        ([str(tiny_llava_dir), "--retain", "0.5", "--with-fp"], "--with-fp needs --artifact"),
        ([str(tiny_llava_dir), "--retain", "0.5,0"], "retention ratio must lie in (0, 1], got 0.0"),
        ([str(tiny_llava_dir), "--retain", "0.5", "--scorer", "l2,nope"], "unknown scorer 'nope'"),
    ]
    for args, needle in cases:
        r = run(main, ["eval", *args, "--limit", "2"])
        assert r.exit_code == 2 and needle in r.output, (args, r.output)


def test_refit_with_the_candidate_objective(artifact, tmp_path):
    import shutil

    from click.testing import CliRunner

    from qavtp.cli import main

    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    r = CliRunner().invoke(
        main, ["fuse", str(copy), "--retain", "0.25", "--fusion-samples", "4", "--fusion-objective", "choice-kl"]
    )
    assert r.exit_code == 0, r.output
    fus = config_json(copy)["fusion"]
    assert fus["objective"] == "choice-kl" and set(fus["ratios"]) == {"0.25"} and fus["n_samples"] == 4
    entry = fus["ratios"]["0.25"]
    best = min(entry["curve"], key=lambda e: (e["choice_kl"], -e["accuracy"]))
    assert entry["searched"] == best["params"]  # the search minimised the candidate KL
    adopted = entry["holdout"] is None or entry["holdout"]["adopted"] == "learned"
    if adopted:
        assert entry["params"] == best["params"]
    else:  # the paper's preset, whose metrics the entry then holds
        assert entry["choice_kl"] == entry["qapruner"]["choice_kl"]
    assert all(e["choice_kl"] >= -1e-6 for e in entry["curve"])
    r = CliRunner().invoke(main, ["fuse", str(copy), "--retain", "1"])
    assert r.exit_code == 2 and "at least one retention ratio below 1" in r.output


def test_only_scorers_that_use_fusion_weights_need_their_ratio():
    """An artifact learned for 12.5 % alone (the main job's) can still be swept at 50 % with semantic or [CLS]
    pruning; scorer qavtp at 50 % is refused in one line; the sensitivity ablation uses the weights where they exist."""
    from qavtp.sweep import pruning_for

    learned = FusionParams(alpha=0.25, direction=-1)
    cfg = ArtifactConfig.from_dict(
        {
            "schema_version": 3,
            "source": {"model": "m", "path": "m", "fingerprint": "0"},
            "data": {"spec": "easy-vqa", "split": "train", "n_samples": 1, "seed": 0},
            "options": {"method": "rtn", "weights": {"bits": 4}, "activations": None, "seed": 0},
            "calibration": {"transforms": {}, "quantized": []},
            "fusion": {"ratios": {"0.125": {"params": learned.to_dict()}}},
        }
    )
    assert pruning_for(None, "semantic", 0.5, cfg).fusion is None
    assert pruning_for(None, "qerror", 0.125, cfg).fusion == learned
    assert pruning_for(None, "qerror", 0.5, cfg).fusion is None
    assert pruning_for(None, "qavtp", 0.125, cfg).fusion == learned
    with pytest.raises(QavtpError, match="fusion weights for retention 0.125, not 0.5"):
        pruning_for(None, "qavtp", 0.5, cfg)

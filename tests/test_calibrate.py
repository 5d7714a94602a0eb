"""W4A4 calibration end to end on the tiny random LLaVA: transforms, quantization, artifact round trip."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from qavtp.calibrate.artifact import fingerprint, load_artifact
from qavtp.calibrate.calibration import run_calibration
from qavtp.calibrate.kvcache import KV_ATTENTION
from qavtp.calibrate.quantize import calibrate_model, calibration_batches, sequential_groups
from qavtp.calibrate.quantizers import QuantEmbedding, QuantLinear, QuantSpec, dequantize_weight, fake_quant_activation
from qavtp.calibrate.rotation import rotate_model
from qavtp.calibrate.stats import InputStats, capture_layer_inputs, observe_layer
from qavtp.cli import main
from qavtp.config import AlignConfig, QuantConfig
from qavtp.data import load_data
from qavtp.errors import QavtpError
from qavtp.models.loading import load_model
from qavtp.prompting import encode
from tests.helpers import calibration, config_json

# A LLaMA decoder layer's linears, in data-flow order.
LINEARS = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
]


@pytest.fixture(scope="module")
def calib(tiny_llava_dir):
    _, processor, _ = load_model(tiny_llava_dir)
    return calibration_batches(processor, load_data("easy-vqa", "train", limit=12, seed=0), batch_size=4)


@pytest.fixture(scope="module")
def probe(tiny_llava_dir, easyvqa_test):
    _, processor, _ = load_model(tiny_llava_dir)
    rows = easyvqa_test[:4]
    return encode(processor, rows["image"], rows["prompt"])


def _logits(model, enc):
    with torch.no_grad():
        return model(**enc).logits


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_statistics_ignore_padding_and_see_every_linear(tiny_llava_dir, calib):
    _, _, adapter = load_model(tiny_llava_dir)
    inputs = capture_layer_inputs(adapter, calib)
    assert len(inputs) == len(calib)
    stats, hess = observe_layer(adapter.decoder_layers[0], "layers.0", inputs, hessians=True)
    names = {n.split(".", 2)[2] for n in stats}
    assert names == set(LINEARS)
    real = sum(int(b["attention_mask"].sum()) for b in calib)
    s = stats["layers.0.self_attn.q_proj"].summary()
    assert s["tokens"] == real
    assert s["percentiles"]["p50"] <= s["percentiles"]["p99"] <= s["percentiles"]["p100"] == pytest.approx(s["absmax"])
    assert hess["layers.0.mlp.down_proj"].hessian().shape == (128, 128)


def test_statistics_keep_a_sample_not_the_activations():
    """A layer's statistics live until every linear is quantized: they must not pin each batch's activations."""
    st = InputStats()
    x = torch.randn(8, 600, 4096)
    st.add(x, None, "probe")
    kept = sum(t.untyped_storage().nbytes() for t in [*st.sample, *st.token_absmax, st.channel_absmax])
    assert kept < x.numel() * x.element_size() / 100
    assert st.summary()["tokens"] == 8 * 600


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "quarot"])
def test_w8a8_stays_close_and_w4a4_degrades(tiny_llava_dir, calib, probe, method):
    ref_model, _, _ = load_model(tiny_llava_dir)
    ref = _logits(ref_model, probe)
    errs = {}
    for bits in (8, 4):
        model, _, adapter = load_model(tiny_llava_dir)
        calibrate_model(adapter, calib, QuantConfig(method=method, wbits=bits, wgroup=16, abits=bits), progress=False)
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
        errs[bits] = _rel(_logits(model, probe), ref)
    assert errs[8] < 0.05
    assert errs[4] > 2 * errs[8]


def test_sequential_groups_follow_the_data_flow():
    names = [
        "mlp.down_proj.linear",
        "mlp.up_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "self_attn.q_proj",
        "extra.proj",
        "self_attn.v_proj",
        "self_attn.k_proj",
    ]
    assert sequential_groups(names) == [
        ["self_attn.q_proj", "self_attn.v_proj", "self_attn.k_proj"],
        ["self_attn.o_proj"],
        ["mlp.up_proj", "mlp.gate_proj"],
        ["mlp.down_proj.linear"],
        ["extra.proj"],
    ]


def test_sequential_hessians_see_the_quantized_inputs(tiny_llava_dir, calib, probe):
    _, _, adapter = load_model(tiny_llava_dir)
    inputs = capture_layer_inputs(adapter, calib)
    layer, name = adapter.decoder_layers[0], "layers.0.self_attn.q_proj"
    spec = QuantSpec(4, False, 16)
    quant = {name: partial(fake_quant_activation, spec=spec)}
    st, h_q = observe_layer(layer, "layers.0", inputs, hessians=True, names=["self_attn.q_proj"], act_quant=quant)
    _, h_f = observe_layer(layer, "layers.0", inputs, hessians=True, names=["self_attn.q_proj"])
    assert set(st) == {name}
    with torch.no_grad():
        rows = [layer.input_layernorm(x.hidden)[x.mask] for x in inputs]
    xq = fake_quant_activation(torch.cat(rows), spec).double()
    torch.testing.assert_close(h_q[name].hessian(), 2 * xq.T @ xq / len(xq))
    assert not torch.allclose(h_q[name].hessian(), h_f[name].hessian())
    # End to end: every linear quantized, in data-flow order, and not the one-pass result.
    quant = QuantConfig(gptq=True, wgroup=16, a_symmetric=False, agroup=16)
    models = []
    for seq in (False, True):
        model, _, adapter = load_model(tiny_llava_dir)
        rec = calibrate_model(adapter, calib, replace(quant, sequential=seq), progress=False)
        models.append(model)
    assert [q.split(".", 2)[2] for q in rec["quantized"][:7]] == [*LINEARS[:-1], "mlp.down_proj.linear"]
    assert (_logits(models[0], probe) - _logits(models[1], probe)).abs().max() > 1e-4


@pytest.mark.parametrize("gptq", [False, True])
def test_fp_alignment_brings_the_quantized_model_closer_to_float(tiny_llava_dir, calib, probe, gptq):
    ref_model, _, _ = load_model(tiny_llava_dir)
    ref = _logits(ref_model, probe)
    quant = QuantConfig(gptq=gptq, wgroup=16, a_symmetric=False, agroup=16, sequential=True)
    errs = {}
    for alpha in (0.0, 1.0):
        model, _, adapter = load_model(tiny_llava_dir)
        calibrate_model(adapter, calib, replace(quant, fp_align=alpha), progress=False)
        errs[alpha] = _rel(_logits(model, probe), ref)
    assert errs[1.0] < errs[0.0], errs


OFFLOAD_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", OFFLOAD_DEVICES)
@pytest.mark.parametrize("method,aligned", [("smoothquant", False), ("quarot", False), ("quarot", True)])
def test_layer_offload_gives_the_in_place_calibration(tiny_llava_dir, calib, probe, device, method, aligned):
    """``calibrate_model(device=...)``: each layer visits the device and comes back; the model ends where it
    started and equals the in-place calibration (bit for bit when the device is the CPU itself)."""
    quant = QuantConfig(method, gptq=True, wgroup=16, abits=8, sequential=aligned, fp_align=0.25 if aligned else 0.0)
    base, _, adapter = load_model(tiny_llava_dir)
    rec = calibrate_model(adapter, calib, quant, progress=False)
    model, _, adapter = load_model(tiny_llava_dir)
    rec_dev = calibrate_model(adapter, calib, quant, progress=False, device=torch.device(device))
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in tensors} == {"cpu"}
    assert rec_dev["quantized"] == rec["quantized"] and len(rec["quantized"]) == 14
    ours, theirs = _logits(model, probe), _logits(base, probe)
    codes = [
        (a.qweight == b.qweight).float().mean().item()
        for a, b in zip(
            (m for m in model.modules() if isinstance(m, QuantLinear)),
            (m for m in base.modules() if isinstance(m, QuantLinear)),
            strict=True,
        )
    ]
    if device == "cpu":
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert min(codes) == 1.0
    else:  # another device's float64 folds and float32 GPTQ round a few codes differently
        assert min(codes) > 0.98, codes
        assert _rel(ours, theirs) < 0.02


def test_artifact_round_trip_is_exact(tiny_llava_dir, calib, probe, tmp_path):
    out = run_calibration(
        tiny_llava_dir,
        tmp_path / "art",
        calibration(n_samples=8, batch_size=4, method="quarot", wgroup=16, gptq=True),
        progress=False,
    )
    cfg = config_json(out)
    assert cfg["schema_version"] == 3 and cfg["source"]["fingerprint"] == fingerprint(tiny_llava_dir)
    assert cfg["options"]["weights"]["bits"] == 4 and cfg["options"]["gptq"] is True
    assert len(cfg["calibration"]["quantized"]) == 14
    loaded, _, _, _ = load_artifact(out)
    again, _, _, _ = load_artifact(out)
    torch.testing.assert_close(_logits(loaded, probe), _logits(again, probe), rtol=0, atol=0)
    # Same calibration in memory gives the same model as the one read back.
    model, processor, adapter = load_model(tiny_llava_dir)
    torch.manual_seed(0)
    batches = calibration_batches(processor, load_data("easy-vqa", "train", limit=8, seed=0), 4)
    calibrate_model(adapter, batches, QuantConfig(gptq=True, wgroup=16), progress=False)
    torch.testing.assert_close(_logits(model, probe), _logits(loaded, probe), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,wsym", [(4, True), (8, False)])
def test_quantized_vocabulary_round_trip(tiny_llava_dir, probe, tmp_path, bits, wsym):
    """--vocab-bits: embedding and LM head become weight codes; the artifact holds no float vocabulary matrix."""
    out = run_calibration(
        tiny_llava_dir,
        tmp_path / "art",
        calibration(n_samples=8, batch_size=4, vocab_bits=bits, wsym=wsym),
        progress=False,
    )
    cfg = config_json(out)
    assert cfg["options"]["vocab"] == {**cfg["options"]["weights"], "bits": bits}
    keys = safe_open(str(out / "quantized.safetensors"), "pt").keys()
    assert not [k for k in keys if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert any(k.endswith("embed_tokens.qweight" + ("_int4" if bits == 4 else "")) for k in keys)
    loaded, _, adapter, _ = load_artifact(out)
    emb, head = adapter.embed_tokens, adapter.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear) and head.aspec is None
    # The looked-up rows are the dequantized codes, within half a step of the rotated float rows.
    model, _, fp = load_model(tiny_llava_dir)
    rotated = rotate_model(fp, 0) and fp.embed_tokens.weight
    step = emb.scale.repeat_interleave(emb.qweight.shape[1] // emb.scale.shape[1], dim=1)
    assert ((emb.weight - rotated).abs() <= step / 2 + 1e-6).all()
    ids = torch.arange(emb.num_embeddings)[None]
    torch.testing.assert_close(emb(ids)[0], emb.weight, rtol=0, atol=0)
    again, _, _, _ = load_artifact(out)
    torch.testing.assert_close(_logits(loaded, probe), _logits(again, probe), rtol=0, atol=0)


def test_kv_cache_quantization_round_trip(tiny_llava_dir, probe, tmp_path):
    """--kv-bits 4: attention reads 4-bit keys (after RoPE and a per-head Hadamard) and values. Float activations
    elsewhere (W4A16): a W4A4 model moves as much under any small perturbation, which would hide the effect."""
    options = {"abits": 16, "kv_bits": 4}
    out = run_calibration(
        tiny_llava_dir, tmp_path / "art", calibration(n_samples=8, batch_size=4, **options), progress=False
    )
    assert config_json(out)["options"]["kv_cache"] == {
        "bits": 4,
        "symmetric": False,
        "group_size": 0,
        "clip_ratio": 0.95,
    }
    model, _, adapter, _ = load_artifact(out)
    assert model.config.get_text_config()._attn_implementation == KV_ATTENTION
    quantized = _logits(model, probe)
    again, _, _, _ = load_artifact(out)
    torch.testing.assert_close(_logits(again, probe), quantized, rtol=0, atol=0)
    # The same weights reading float keys and values compute another function; unclipped 8-bit ones stay close.
    attns = [layer.self_attn for layer in adapter.decoder_layers]
    for a in attns:
        a.kv_spec = None
    float_kv = _logits(model, probe)
    for a in attns:
        a.kv_spec = QuantSpec(8, False, 0, 1.0)
    eight = _logits(model, probe)
    assert _rel(quantized, float_kv) > 1e-3 and _rel(eight, float_kv) < _rel(quantized, float_kv) / 4


def test_vision_statistics_are_recorded_on_request(tiny_llava_dir, tmp_path):
    out = run_calibration(
        tiny_llava_dir,
        tmp_path / "art",
        calibration(n_samples=4, batch_size=4, vision_stats=True, retain="none"),
        progress=False,
    )
    vision = config_json(out)["calibration"]["vision_stats"]
    model, _, _ = load_model(tiny_llava_dir)
    tower = model.model.vision_tower.config
    patches = (tower.image_size // tower.patch_size) ** 2
    assert {n.rsplit(".", 1)[-1] for n in vision} >= {"q_proj", "fc1", "fc2", "linear_1", "linear_2"}
    assert not [n for n in vision if "language_model" in n]
    # Four images: every tower token ([CLS] included) per layer; the projector sees the selected patches.
    q0 = next(v for n, v in vision.items() if n.endswith("encoder.layers.0.self_attn.q_proj"))
    assert q0["tokens"] == 4 * (patches + 1)
    assert vision["model.multi_modal_projector.linear_1"]["tokens"] == 4 * patches
    assert all(v["absmax"] >= v["percentiles"]["p99"] > 0 for v in vision.values())


def test_mixed_precision_a8_round_trip(tiny_llava_dir, probe, tmp_path):
    """--a8 keeps 8-bit inputs at the selected linears (by projection and by layer, down_proj inside its online
    Hadamard wrapper included); the artifact records them and loads the same model back."""
    out = run_calibration(
        tiny_llava_dir,
        tmp_path / "art",
        calibration(n_samples=8, batch_size=4, agroup=16, a8="up_proj,down_proj,1"),
        progress=False,
    )
    cfg = config_json(out)
    assert cfg["schema_version"] == 3 and cfg["options"]["a8"] == "up_proj,down_proj,1"
    want = {"layers.0.mlp.up_proj", "layers.0.mlp.down_proj.linear"} | {
        n for n in cfg["calibration"]["quantized"] if n.startswith("layers.1.")
    }
    assert set(cfg["calibration"]["a8_linears"]) == want and len(want) == 9
    model, _, adapter, _ = load_artifact(out)
    bits = {
        f"layers.{n}": m.aspec.bits for n, m in adapter.decoder_layers.named_modules() if isinstance(m, QuantLinear)
    }
    assert bits == {n: 8 if n in want else 4 for n in cfg["calibration"]["quantized"]}
    assert {m.aspec.group_size for m in adapter.decoder_layers.modules() if isinstance(m, QuantLinear)} == {16}
    again, _, _, _ = load_artifact(out)
    torch.testing.assert_close(_logits(model, probe), _logits(again, probe), rtol=0, atol=0)


def _one_line_error(result, needle):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output


def test_bad_calibration_inputs(tiny_llava_dir, tmp_path):
    run = CliRunner().invoke
    base = ["calibrate", str(tiny_llava_dir), "--n-samples", "4", "-o"]
    _one_line_error(run(main, [*base, str(tmp_path / "a"), "--wbits", "5"]), "bits must be one of 2, 3, 4, 8")
    _one_line_error(run(main, [*base, str(tmp_path / "a"), "--wgroup", "48"]), "does not divide")
    _one_line_error(run(main, [*base, str(tmp_path / "a"), "--n-samples", "0"]), "calibration set is empty")
    assert "Invalid value for '--vocab-bits'" in run(main, [*base, str(tmp_path / "a"), "--vocab-bits", "3"]).output
    _one_line_error(run(main, [*base, str(tmp_path / "a"), "--a8", "mlp"]), "--a8 term 'mlp' is neither a projection")
    _one_line_error(run(main, [*base, str(tmp_path / "a"), "--a8", "1-5"]), "not within the model's layers 0-1")
    _one_line_error(run(main, [*base, str(tmp_path / "a"), "--a8", "0", "--abits", "8"]), "these are 8-bit")
    _one_line_error(run(main, [*base, str(tmp_path / "a"), "--fp-align", "-0.5"]), "--fp-align must be >= 0")
    _one_line_error(run(main, [*base, str(tmp_path / "a"), "--align-projector", "-1"]), "--align-projector must be")
    _one_line_error(run(main, [*base, str(tmp_path / "a"), "--align-projector", "2", "--align-lr", "0"]), "--align-lr")
    _one_line_error(run(main, [*base, str(tmp_path / "a"), "--align-projector", "2", "--align-retain", "0"]), "(0, 1]")
    _one_line_error(run(main, [*base, str(tmp_path / "a"), "--device", "meta"]), "only cpu and cuda are supported")
    _one_line_error(run(main, [*base, str(tmp_path / "a"), "--device", "gpu0"]), "is not a torch device")
    if not torch.cuda.is_available():
        _one_line_error(run(main, [*base, str(tmp_path / "a"), "--device", "cuda"]), "torch sees no CUDA device")
    (tmp_path / "exists").mkdir()
    _one_line_error(run(main, [*base, str(tmp_path / "exists")]), "exists; pass --overwrite")
    assert not list(tmp_path.glob(".a-*")) and not (tmp_path / "a").exists()


def test_artifact_from_another_model_or_schema_is_refused(tiny_llava_dir, tmp_path):
    out = run_calibration(
        tiny_llava_dir,
        tmp_path / "art",
        calibration(n_samples=4, batch_size=4, method="rtn", wgroup=16),
        progress=False,
    )
    cfg = json.loads((out / "config.json").read_text())
    cfg["schema_version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QavtpError, match="schema version 99"):
        load_artifact(out)
    cfg["schema_version"] = 1  # still readable: version 2 only added options
    cfg["source"]["fingerprint"] = "0" * 16
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QavtpError, match="calibrated from another model"):
        load_artifact(out)


def test_cli_eval_reads_an_artifact(tiny_llava_dir, tmp_path):
    art = tmp_path / "art"
    r = CliRunner().invoke(
        main,
        ["calibrate", str(tiny_llava_dir), "--n-samples", "4", "--wgroup", "16", "--method", "rtn", "-o", str(art)],
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["eval", "--artifact", str(art), "--limit", "4"])
    assert r.exit_code == 0, r.output
    assert "| **all** | 4 |" in r.output


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_llava_dir):
    from qavtp.perplexity import corpus_text, perplexity

    model, processor, adapter = load_model(tiny_llava_dir)
    assert len(corpus_text()) > 100_000
    base = perplexity(model, processor.tokenizer, seq_len=64, max_chunks=2, progress=False)
    assert base["windows"] == 2 and base["tokens"] == 126 and base["perplexity"] > 1
    adapter.lm_head.weight.data.zero_()  # uniform next-token distribution
    flat = perplexity(model, processor.tokenizer, seq_len=64, max_chunks=2, progress=False)
    assert flat["perplexity"] == pytest.approx(model.config.text_config.vocab_size, rel=1e-4)


def test_auto_group_size_divides_every_width(tiny_llava_dir, tmp_path):
    out = run_calibration(
        tiny_llava_dir, tmp_path / "art", calibration(n_samples=4, batch_size=4, method="rtn"), progress=False
    )
    assert config_json(out)["options"]["weights"]["group_size"] == 64  # widths 64 and 128: 128 does not fit
    with pytest.raises(QavtpError, match="wgroup must be an integer or 'auto'"):
        run_calibration(tiny_llava_dir, tmp_path / "b", calibration(wgroup="big"), progress=False)
    r = CliRunner().invoke(main, ["calibrate", str(tiny_llava_dir), "--wgroup", "big", "-o", str(tmp_path / "c")])
    assert r.exit_code == 2 and "Error: --wgroup must be an integer or 'auto', got 'big'" in r.output


def test_projector_alignment_moves_only_the_projector_and_never_worsens_heldout_kl(tiny_llava_dir, tmp_path):
    common = dict(n_samples=8, batch_size=4, wgroup=16, gptq=True, retain="0.5", fusion_samples=3)
    plain = run_calibration(tiny_llava_dir, tmp_path / "plain", calibration(**common), progress=False)
    aligned = run_calibration(
        tiny_llava_dir,
        tmp_path / "aligned",
        calibration(align_steps=4, align_lr=3e-3, align_batch=4, **common),
        progress=False,
    )
    cfg = config_json(aligned)
    rec = cfg["alignment"]
    assert cfg["fusion"]["holdout_samples"] == 3  # the fusion weights are learned after, on the aligned model
    assert (aligned / "alignment.png").stat().st_size > 0 and not (tmp_path / "plain" / "alignment.png").exists()
    assert rec["steps"] == 4 and rec["train_questions"] == 16 and rec["curve"][-1]["step"] == 4
    assert rec["heldout_kl_after"] <= rec["heldout_kl_before"]
    sa, sb = load_artifact(plain)[0].state_dict(), load_artifact(aligned)[0].state_dict()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    # The random model's W4A4 outputs are already within 2e-4 nats of its float ones, so on it the
    # step-0 projector usually wins and nothing changes; whatever changes is the projector's.
    assert all(k.startswith("model.multi_modal_projector.") for k in changed)
    assert bool(changed) == (rec["best_step"] > 0)


@pytest.mark.parametrize("ratios", [(1.0,), (1.0, 0.25)])
def test_projector_alignment_learns_through_the_quantized_llm(tiny_llava_dir, probe, tmp_path, ratios):
    from qavtp.calibrate.align import align_projector, alignment_data

    art = run_calibration(
        tiny_llava_dir, tmp_path / "a", calibration(n_samples=8, wgroup=16, retain="none"), progress=False
    )
    student, processor, adapter, _ = load_artifact(art)
    teacher, _, _ = load_model(tiny_llava_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # a projector that no longer speaks the LLM's language
        for p in student.model.multi_modal_projector.parameters():
            p.add_(0.5 * p.std() * torch.randn_like(p))

    def kl():
        ref = torch.log_softmax(_logits(teacher, probe)[:, -1], -1)
        return (ref.exp() * (ref - torch.log_softmax(_logits(student, probe)[:, -1], -1))).sum(-1).mean().item()

    before = kl()
    llm = {k: v.clone() for k, v in student.model.language_model.state_dict().items()}
    train, held = alignment_data("easy-vqa", 12, 4, 16, seed=0)
    config = AlignConfig(steps=12, batch_size=4, lr=3e-3, ratios=ratios)
    rec = align_projector(adapter, teacher, processor, train, held, config, eval_every=4, progress=False)
    assert rec["best_step"] > 0 and rec["heldout_kl_after"] < 0.7 * rec["heldout_kl_before"]
    best = next(c for c in rec["curve"] if c["step"] == rec["best_step"])["by_ratio"]
    assert best.keys() == {str(r) for r in ratios}
    assert all(best[k] < v for k, v in rec["curve"][0]["by_ratio"].items())  # every ratio gained
    if ratios == (1.0,):
        assert kl() < 0.5 * before  # test questions neither set saw
    assert all(torch.equal(v, llm[k]) for k, v in student.model.language_model.state_dict().items())


def test_alignment_data_skips_what_an_earlier_alignment_used():
    from qavtp.calibrate.align import alignment_data

    first, held = alignment_data("easy-vqa", 3, 4, 16, seed=0)
    more, held2 = alignment_data("easy-vqa", 3, 4, 16, seed=0, skip=12)
    key = lambda ds: {(q, a, str(i)) for q, a, i in zip(ds["question"], ds["answer"], ds["image_id"], strict=True)}  # noqa: E731
    assert len(first) == len(more) == 12 and held["question"] == held2["question"]
    assert not key(first) & key(more) and not key(held) & (key(first) | key(more))


def test_align_command_aligns_an_existing_artifact_and_relearns_fusion(tiny_llava_dir, tmp_path):
    """``qavtp align``: a new artifact whose only changed tensors are the projector's, fusion learned again with
    the same settings; aligning that one again continues on new questions."""
    plain = run_calibration(
        tiny_llava_dir,
        tmp_path / "plain",
        calibration(n_samples=8, wgroup=16, retain="0.5", fusion_samples=3),
        progress=False,
    )
    run = CliRunner().invoke
    res = run(main, ["align", str(plain), "-o", str(tmp_path / "a1"), "--steps", "4", "--lr", "3e-2",
                     "--batch-size", "4", "--retain", "1,0.5"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "held-out KL" in res.output and f"wrote {tmp_path / 'a1'}" in res.output
    before, cfg = config_json(plain), config_json(tmp_path / "a1")
    rec = cfg["alignment"]
    assert rec["steps"] == 4 and rec["ratios"] == [1.0, 0.5] and "continued_from" not in rec
    assert cfg["options"]["align_steps"] == 4 and cfg["aligned_from"] == str(plain)
    assert cfg["calibration"] == before["calibration"] and cfg["options"]["weights"] == before["options"]["weights"]
    fb, fa = before["fusion"], cfg["fusion"]
    assert fa["ratios"].keys() == fb["ratios"].keys() and fa["holdout_samples"] == fb["holdout_samples"] == 3
    assert fa["objective"] == fb["objective"] and fa["n_samples"] == fb["n_samples"]
    assert (tmp_path / "a1" / "alignment.png").stat().st_size > 0
    sa, sb = load_artifact(plain)[0].state_dict(), load_artifact(tmp_path / "a1")[0].state_dict()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert all(k.startswith("model.multi_modal_projector.") for k in changed)
    assert bool(changed) == (rec["best_step"] > 0)
    res = run(main, ["align", str(tmp_path / "a1"), "-o", str(tmp_path / "a2"), "--steps", "2", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    cfg2 = config_json(tmp_path / "a2")
    assert cfg2["alignment"]["continued_from"]["steps"] == 4 and cfg2["options"]["align_steps"] == 6
    kept = next(c for c in rec["curve"] if c["step"] == rec["best_step"])["by_ratio"]["1.0"]
    assert cfg2["alignment"]["curve"][0]["by_ratio"] == {"1.0": kept}  # the same held-out questions


def test_align_vision_tower_is_stored_and_carried(tiny_llava_dir, tmp_path):
    """``--vision-lr``: the tower is aligned with the projector, stored in the artifact (the source checkpoint's
    tower no longer describes the model) and loaded back; a later projector-only alignment keeps carrying it."""
    from safetensors import safe_open

    plain = run_calibration(
        tiny_llava_dir, tmp_path / "plain", calibration(n_samples=4, wgroup=16, retain="none"), progress=False
    )
    run = CliRunner().invoke
    res = run(main, ["align", str(plain), "-o", str(tmp_path / "t"), "--steps", "3", "--lr", "3e-2",
                     "--vision-lr", "3e-2", "--batch-size", "4"])  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = config_json(tmp_path / "t")
    assert cfg["alignment"]["target"] == "multi_modal_projector+vision_tower" and cfg["alignment"]["vision_lr"] == 3e-2
    assert cfg["options"]["aligned_vision"] is True and not config_json(plain)["options"]["aligned_vision"]
    sa, sb = load_artifact(plain)[0].state_dict(), load_artifact(tmp_path / "t")[0].state_dict()
    changed = {k.split(".")[1] for k in sa if not torch.equal(sa[k], sb[k])}
    assert changed == ({"multi_modal_projector", "vision_tower"} if cfg["alignment"]["best_step"] else set())

    def tower_keys(art):
        with safe_open(str(art / "quantized.safetensors"), "pt") as f:
            return {k for k in f.keys() if k.startswith("model.vision_tower.")}

    assert tower_keys(tmp_path / "t") and not tower_keys(plain)
    res = run(main, ["align", str(tmp_path / "t"), "-o", str(tmp_path / "p"), "--steps", "1", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert config_json(tmp_path / "p")["options"]["aligned_vision"] is True
    assert tower_keys(tmp_path / "p") == tower_keys(tmp_path / "t")
    sp = load_artifact(tmp_path / "p")[0].state_dict()
    assert all(torch.equal(sp[k], sb[k]) for k in sb if k.startswith("model.vision_tower."))


def test_scale_gains_rebuild_differentiably_and_fold_into_the_scales():
    from qavtp.calibrate.scale_gains import ScaleGains

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        QuantLinear.from_linear(torch.nn.Linear(32, 8), QuantSpec(4, True, 16)),
        QuantLinear.from_linear(torch.nn.Linear(8, 4, bias=False), QuantSpec(4, False, 8)),  # with zero points
    )
    cached = [m.weight.clone() for m in net]
    gains = ScaleGains(net)
    assert [tuple(g.shape) for g in gains.gains] == [(8, 2), (4, 1)] and not list(gains.children())[1:]
    gains.rebuild()
    assert all(torch.equal(m.weight, w) for m, w in zip(net, cached, strict=True))  # gains of 1: the same weights
    net(torch.randn(5, 32)).square().sum().backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gains.gains)
    codes = [(m.qweight.clone(), None if m.zero is None else m.zero.clone(), m.scale.clone()) for m in net]
    with torch.no_grad():
        gains.gains[0].mul_(1.5)
        gains.gains[1][1, 0] = 0.5
    spread = gains.fold()
    assert spread == {"min": 0.5, "max": 1.5, "mean_abs_change": round((16 * 0.5 + 0.5) / 20, 5)}
    for m, (q, z, scale), g in zip(net, codes, [1.5, torch.tensor([[1.0], [0.5], [1.0], [1.0]])], strict=True):
        assert torch.equal(m.qweight, q) and (z is None or torch.equal(m.zero, z))
        assert torch.allclose(m.scale, scale * g)
        assert not m.weight.requires_grad and torch.equal(m.weight, dequantize_weight(q, m.scale, z, m.wspec))


@pytest.mark.parametrize("device", OFFLOAD_DEVICES)
def test_align_scales_changes_only_scales_and_loads_back(tiny_llava_dir, tmp_path, monkeypatch, device):
    """``--scale-lr``: the projector and the quantized weights' group scales move; codes and zero points do not,
    and the artifact loads back to the model that was aligned (also when ``--device`` ran the alignment)."""
    import qavtp.calibrate.align as align

    plain = run_calibration(
        tiny_llava_dir,
        tmp_path / "plain",
        calibration(n_samples=4, wgroup=16, vocab_bits=4, retain="none"),
        progress=False,
    )
    heldout_kl = align._heldout_kl
    calls = []

    def improving(*args):  # the tiny model's KL is ~3e-4 and noisy: make the last step the kept one
        calls.append(heldout_kl(*args))
        return {r: 1.0 / len(calls) for r in calls[-1]}

    monkeypatch.setattr(align, "_heldout_kl", improving)
    res = CliRunner().invoke(main, ["align", str(plain), "-o", str(tmp_path / "s"), "--steps", "3", "--lr", "1e-2",
                                    "--scale-lr", "1e-2", "--batch-size", "4", "--device", device])  # fmt: skip
    assert res.exit_code == 0, res.output
    rec = config_json(tmp_path / "s")["alignment"]
    assert rec["device"].split(" ")[0] == device
    assert rec["target"] == "multi_modal_projector+weight_scales" and rec["scale_lr"] == 1e-2
    assert rec["best_step"] == 3 and rec["scale_gains"]["mean_abs_change"] > 1e-3
    assert f"scale gains {rec['scale_gains']['min']:.4f}-{rec['scale_gains']['max']:.4f}" in res.output
    assert calls[0] != calls[1]  # the held-out KL saw the trained gains, not the cached weights
    aligned = load_artifact(tmp_path / "s")[0]
    sa, sb = load_artifact(plain)[0].state_dict(), aligned.state_dict()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert {k.rsplit(".", 1)[1] for k in changed if "projector" not in k} == {"scale"}  # weight: not stored
    assert any(k.endswith("lm_head.scale") for k in changed) and any("embed_tokens.scale" in k for k in changed)
    assert any("multi_modal_projector" in k for k in changed)
    heads = [m for m in aligned.modules() if isinstance(m, QuantLinear)]
    assert all(torch.equal(m.weight, dequantize_weight(m.qweight, m.scale, m.zero, m.wspec)) for m in heads)


def test_text_positions_cover_the_text_after_the_image(tiny_llava_dir, easyvqa_test):
    """``positions="text"``: every text token after the image is predicted, the answer's included, and the pruned
    student is compared at the same tokens as the dense one."""
    from qavtp.calibrate.align import _answer_logprobs, _batches, _pruned_answer_logprobs, _text_positions

    model, processor, adapter = load_model(tiny_llava_dir)
    rows = easyvqa_test.select(range(5))
    (batch,) = _batches(processor, rows, 5)
    prompt_enc, enc, keep, mask = _text_positions(batch, adapter.image_token_id)
    ids = enc["input_ids"]
    length = ids.shape[1]
    assert len({int(m.sum()) for m in mask}) > 1  # questions of different lengths
    for b in range(len(rows)):
        last_visual = max(i for i in range(length) if ids[b, i] == adapter.image_token_id)
        predicted = [length - keep + j + 1 for j in range(keep - 1) if mask[b, j]]  # position p predicts token p + 1
        assert predicted == list(range(last_visual + 2, length))
    answer_keep, answer_mask = batch[2], batch[3]
    assert mask[:, -(answer_keep - 1) :][answer_mask].all()
    with torch.no_grad():
        dense = _answer_logprobs(model, enc, keep, mask, False)
        everything = _pruned_answer_logprobs(adapter, prompt_enc, enc, keep, mask, 1.0, False)
        pruned = _pruned_answer_logprobs(adapter, prompt_enc, enc, keep, mask, 0.25, False)
    assert dense.shape == pruned.shape == (int(mask.sum()), model.config.text_config.vocab_size)
    torch.testing.assert_close(everything, dense, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(pruned, dense, atol=1e-3)


def test_bad_align_inputs(tiny_llava_dir, tmp_path, monkeypatch):
    import qavtp.calibrate.refine as refine

    plain = run_calibration(
        tiny_llava_dir, tmp_path / "plain", calibration(n_samples=4, wgroup=16, retain="none"), progress=False
    )
    run = CliRunner().invoke
    base = ["align", str(plain), "-o", str(tmp_path / "a")]
    _one_line_error(run(main, [*base, "--steps", "0"]), "--steps must be at least 1")
    _one_line_error(run(main, [*base, "--lr", "-1"]), "--lr must be positive")
    _one_line_error(run(main, [*base, "--batch-size", "0"]), "--batch-size must be at least 1")
    _one_line_error(run(main, [*base, "--retain", "1.5"]), "(0, 1]")
    _one_line_error(run(main, [*base, "--vision-lr", "-1"]), "--vision-lr must be 0 (tower frozen) or positive")
    _one_line_error(run(main, [*base, "--scale-lr", "-1"]), "--scale-lr must be 0 (weight scales frozen) or positive")
    _one_line_error(run(main, [*base, "--device", "meta"]), "only cpu and cuda are supported")
    _one_line_error(run(main, [*base, "--device", "cuda", "--retain", "1,0.5"]), "aligns the dense model only")
    if not torch.cuda.is_available():
        _one_line_error(run(main, [*base, "--device", "cuda"]), "torch sees no CUDA device")
    _one_line_error(run(main, ["align", str(tmp_path), "-o", str(tmp_path / "a")]), "is not a qavtp artifact")
    _one_line_error(run(main, ["align", str(plain), "-o", str(plain)]), "exists; pass --overwrite")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a*"))

    def broken_plot(record, path):
        raise OSError("disk full")

    monkeypatch.setattr(refine, "plot_alignment", broken_plot)  # the last file written: all or nothing lands
    with pytest.raises(OSError, match="disk full"):
        refine.align_artifact(plain, tmp_path / "a", AlignConfig(steps=1, batch_size=2), progress=False)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a*"))


def test_recipes_fill_only_the_options_left_at_their_defaults():
    from qavtp.cli import calibration_config

    defaults = {"gptq": False, "agroup": 0, "retain": "0.5,0.25,0.125", "align_retain": "1", "align_steps": 0}
    cfg, flags = calibration_config(defaults, {"agroup"}, "aligned")
    assert cfg.quant.gptq is True and cfg.quant.agroup == 0 and cfg.align.steps == 200
    assert cfg.align.ratios == (0.5, 0.25, 0.125) and "--align-retain 0.5,0.25,0.125" in flags
    assert "--gptq" in flags and not any(f.startswith("--agroup") for f in flags)
    cfg, _ = calibration_config({**defaults, "retain": "none"}, {"retain"}, "aligned")
    assert cfg.align.ratios == (1.0,)
    cfg, _ = calibration_config({**defaults, "retain": "1,0.125", "align_retain": "0.125"}, {"align_retain"}, "aligned")
    assert cfg.align.ratios == (0.125,)
    cfg, _ = calibration_config({**defaults, "retain": "1,0.125"}, {"retain"}, "aligned")
    assert cfg.align.ratios == (0.125,)
    cfg, _ = calibration_config({**defaults, "retain": "1"}, {"retain"}, "aligned")
    assert cfg.align.ratios == (1.0,)
    with pytest.raises(QavtpError, match="retention ratio 'half' is not a number"):
        calibration_config({**defaults, "retain": "0.5,half"}, {"retain"}, "aligned")
    plain, flags = calibration_config(defaults, set(), None)
    assert flags == [] and plain.recipe is None
    cfg, flags = calibration_config(defaults, set(), "quarot")
    assert flags == [] and cfg == replace(plain, recipe="quarot")


def test_cli_recipe_is_applied_recorded_and_overridden(tiny_llava_dir, tmp_path):
    art = tmp_path / "art"
    r = CliRunner().invoke(
        main,
        [
            "calibrate",
            str(tiny_llava_dir),
            "--recipe",
            "accurate",
            "--agroup",
            "32",
            "--n-samples",
            "4",
            "--batch-size",
            "4",
            "--retain",
            "none",
            "-o",
            str(art),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "recipe accurate: --gptq --aasym --sequential --fp-align 0.25" in r.output
    opts = config_json(art)["options"]
    assert opts["recipe"] == "accurate" and opts["gptq"] and opts["sequential"] and opts["fp_align"] == 0.25
    assert opts["activations"]["group_size"] == 32 and opts["activations"]["symmetric"] is False
    r = CliRunner().invoke(main, ["calibrate", str(tiny_llava_dir), "--recipe", "best", "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and "'best' is not one of" in r.output

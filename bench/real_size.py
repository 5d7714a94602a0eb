"""Real size, end to end: llava-hf/llava-1.5-7b-hf's whole shape (CLIP ViT-L/14-336, 576 visual tokens; LLaMA-7B,
32 layers, hidden 4096, vocabulary 32,064) with random weights, calibrated, exported and run on this machine.

    python bench/real_size.py [--work runs/real-size] [--stages build,calibrate,export,run,parity,cut]

Each stage runs as its own process (its wall time and peak RSS are that process's, from ``wait4``), and what it
measured is kept in ``WORK/results.json``, so a later invocation runs only the stages asked for and the table is
printed (and written to ``bench/results/real_size.md``) from everything measured so far. The weights are random:
answers are noise, timings, sizes and memory are not. Settings: RTN W4A4 (g128 weights, per-token activations,
4-bit vocabulary), 4 calibration questions, ``--stream`` (the default at this size); exports ``ort`` runtime
(MatMulNBits accuracy level 4, fused ops), ``ort`` exact (level 0) and ``qdq`` runtime; 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# llava-hf/llava-1.5-7b-hf config.json (vision_config / text_config)
VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
TEXT = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
CUT_LAYERS = 4  # the fp32 reference that fits: the same shape with 4 decoder layers
RATIOS = (1.0, 0.5, 0.25, 0.125)
CALIBRATE = ["--method", "rtn", "--retain", "none", "--vocab-bits", "4", "--n-samples", "4", "--batch-size", "2"]
EXPORTS = {  # name: export flags (ort runtime at every ratio; the others at 0.125 and 1)
    "ort-l4": ["--format", "ort", "--activations", "runtime"],
    "ort-l0-exact": ["--format", "ort", "--activations", "exact", "--accuracy-level", "0"],
    "qdq": ["--format", "qdq", "--activations", "runtime"],
}
QUESTION = "What shape is in the image?"


def _run_measured(args: list[str], log: Path) -> dict:
    """Run ``args``; its wall time and peak RSS (this child's alone)."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        p = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(args[:4])} ... failed ({code}); see {log}")
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _qavtp(*args: str) -> list[str]:
    return _py("import sys; from qavtp.cli import main; sys.exit(main())") + list(args)


def _du(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30, 2)


def build(work: Path, name: str, layers: int) -> dict:
    ckpt = work / name
    code = f"""
from pathlib import Path
from qavtp.data.easyvqa import load_easyvqa
from qavtp.data.prompts import SHORT_ANSWER
from qavtp.models.random_llava import small_tokenizer, write_random_shards
import torch
# A BPE tokenizer of easy-VQA's words whose ids (image token included) lie inside the 32,064-row vocabulary, as
# LLaVA-1.5's do (the reference model's SmolLM2 tokenizer puts <image> at 49,152).
ds = load_easyvqa("train")
tok = small_tokenizer(list(ds["question"][:20000]) + list(ds["answer"][:20000]) + [SHORT_ANSWER] * 50, 32000)
write_random_shards({str(ckpt)!r}, tok, vision={VISION!r}, text={{**{TEXT!r}, "num_hidden_layers": {layers}}},
                    max_shard_bytes=2 << 30, dtype=torch.float16, legacy_names=True, progress=True)
"""
    rec = _run_measured(_py(code), work / f"build-{name}.log")
    return rec | {"size_gib": _du(ckpt), "shards": len(list(ckpt.glob("model-*.safetensors")))}


def calibrate(work: Path, ckpt: str, art: str) -> dict:
    args = _qavtp("calibrate", str(work / ckpt), "-o", str(work / art), "--overwrite", *CALIBRATE)
    rec = _run_measured(args, work / f"calibrate-{art}.log")
    cfg = json.loads((work / art / "config.json").read_text())
    return rec | {"size_gib": _du(work / art), "streamed": cfg["calibration"].get("streamed")}


def export(work: Path, source: str, name: str, flags: list[str], rho: float) -> dict:
    out = work / "exports" / f"{name}-{rho}"
    args = _qavtp("export", str(work / source), "-o", str(out), "--overwrite", "--retain", str(rho), *flags)
    args += ["--scorer", "qapruner"]  # the preset fusion: a --retain none artifact has no learned weights
    rec = _run_measured(args, work / f"export-{name}-{rho}.log")
    return rec | {"size_gib": _du(out), "path": str(out)}


RUN = """
import json, resource, sys, time
import numpy as np
from PIL import Image
from qavtp.export.session import ExportedModel
t0 = time.perf_counter()
em = ExportedModel(sys.argv[1], threads=2)
load = time.perf_counter() - t0
rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
img = Image.fromarray((np.random.default_rng(0).random((336, 336, 3)) * 255).astype(np.uint8))
feeds = em.inputs([img], [sys.argv[2]], 16)
prefill = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); out = em.run_prefill(feeds); prefill.append(time.perf_counter() - t)
t = time.perf_counter()
tokens, steps = em.greedy(out, 17)
dec = time.perf_counter() - t
print(json.dumps({"load_s": round(load, 1), "rss_after_load_gib": round(rss_load, 2),
    "prompt_tokens": int(feeds["input_ids"].shape[1]), "kept_tokens": int(out["attention_mask_out"].shape[1]),
    "prefill_s": sorted(round(p, 2) for p in prefill), "decode_tok_s": round(steps / dec, 2), "steps": steps}))
"""


def run(work: Path, export_dir: str, repeats: int) -> dict:
    log = work / f"run-{Path(export_dir).name}.log"
    rec = _run_measured(_py(RUN) + [export_dir, QUESTION, str(repeats)], log)
    return rec | json.loads(log.read_text().strip().splitlines()[-1])


PARITY = """
import json, sys, numpy as np, torch
from qavtp.data.easyvqa import load_easyvqa
from qavtp.evaluate import _pruned_prefill
from qavtp.export.session import ExportedModel
from qavtp.export.torch_reference import torch_like_export
from qavtp.pruned_lm import pruned_generate
n, steps = int(sys.argv[2]), int(sys.argv[3])
rows = load_easyvqa("test")[:n]
em = ExportedModel(sys.argv[1], threads=2)
onnx_logits, onnx_kept, onnx_tokens = [], [], []
for image, question in zip(rows["image"], rows["question"]):
    out = em.run_prefill(em.inputs([image], [question], steps))
    onnx_logits.append(out["logits"][0]); onnx_kept.append(sorted(out["kept_indices"][0].tolist()))
    onnx_tokens.append(em.greedy(out, steps)[0])
del em
net, processor, prune = torch_like_export(json.load(open(sys.argv[1] + "/export.json")))
with torch.no_grad():
    logits, state = _pruned_prefill(prune, processor, rows["image"], rows["prompt"])
    tokens = pruned_generate(prune.adapter, state, logits, None, steps)
rec = []
for r in range(n):
    a, b = onnx_logits[r].astype(np.float64), logits[r].double().numpy()
    rec.append({"same_kept": onnx_kept[r] == state.keep_idx[r].tolist(),
                "cosine": float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)),
                "max_rel_err": float(np.abs(a - b).max() / np.abs(b).max()),
                "same_greedy": onnx_tokens[r] == tokens[r].tolist()[: len(onnx_tokens[r])],
                "onnx_tokens": onnx_tokens[r], "torch_tokens": tokens[r].tolist()})
print(json.dumps(rec))
"""


def parity(work: Path, export_dir: str, n: int = 4, steps: int = 4) -> dict:
    log = work / f"parity-{Path(export_dir).name}.log"
    rec = _run_measured(_py(PARITY) + [export_dir, str(n), str(steps)], log)
    return rec | {"prompts": json.loads(log.read_text().strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/real-size")
    ap.add_argument("--stages", default="build,calibrate,export,run,cut")
    ap.add_argument("--repeats", type=int, default=3, help="prefill runs per export (median reported)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res_file = work / "results.json"
    res = json.loads(res_file.read_text()) if res_file.exists() else {}

    def save() -> None:
        res_file.write_text(json.dumps(res, indent=2) + "\n")

    stages = a.stages.split(",")
    if "build" in stages:
        res["build"] = build(work, "llava-7b-shape", TEXT["num_hidden_layers"])
        save()
    if "calibrate" in stages:
        res["calibrate"] = calibrate(work, "llava-7b-shape", "w4a4")
        save()
    if "export" in stages:
        for name, flags in EXPORTS.items():
            for rho in RATIOS if name == "ort-l4" else (1.0, 0.125):
                res.setdefault("export", {})[f"{name}-{rho}"] = export(work, "w4a4", name, flags, rho)
                save()
    if "run" in stages:
        for key, rec in res.get("export", {}).items():
            res.setdefault("run", {})[key] = run(work, rec["path"], a.repeats)
            save()
    if "parity" in stages:
        res["parity"] = parity(work, res["export"]["ort-l0-exact-0.125"]["path"])
        save()
    if "cut" in stages:
        res["cut_build"] = build(work, "llava-7b-cut4", CUT_LAYERS)
        res["cut_calibrate"] = calibrate(work, "llava-7b-cut4", "cut4-w4a4")
        for source, name, flags in (
            ("llava-7b-cut4", "cut4-fp32", []),
            ("cut4-w4a4", "cut4-ort-l4", EXPORTS["ort-l4"]),
        ):
            rec = export(work, source, name, flags, 0.125)
            res.setdefault("cut_export", {})[name] = rec
            res.setdefault("cut_run", {})[name] = run(work, rec["path"], a.repeats)
            save()
    text = table(res)
    print(text)
    Path("bench/results/real_size.md").write_text(text + "\nRaw measurements: `" + str(res_file) + "`.\n")


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def table(res: dict) -> str:
    """The markdown table of everything measured so far."""
    out = ["# Real size: llava-1.5-7b's shape, random weights, on this machine", ""]
    out += ["| stage | wall s | peak RSS GiB | on disk GiB | notes |", "|---|---:|---:|---:|---|"]
    rows = [("build checkpoint (float16 shards)", res.get("build"), lambda r: f"{r['shards']} shards")]
    rows.append(("calibrate (streamed RTN W4A4, 4 questions)", res.get("calibrate"), lambda r: ""))
    for key, rec in res.get("export", {}).items():
        rows.append((f"export {key}", rec, lambda r: ""))
    for label, rec, note in rows:
        if rec:
            out.append(
                f"| {label} | {rec['wall_s']} | {rec['peak_rss_gib']} | {rec.get('size_gib', '')} | {note(rec)} |"
            )
    runs = res.get("run", {})
    if runs:
        out += [
            "",
            "| export | ratio | prompt → kept tokens | load s | prefill s (median) | decode tok/s | peak RSS GiB |",
        ]
        out.append("|---|---:|---|---:|---:|---:|---:|")
        for key, r in runs.items():
            name, _, rho = key.rpartition("-")
            out.append(
                f"| {name} | {rho} | {r['prompt_tokens']} → {r['kept_tokens']} | {r['load_s']} | "
                f"{_median(r['prefill_s']):.2f} | {r['decode_tok_s']} | {r['peak_rss_gib']} |"
            )
        for name in EXPORTS:
            dense, pruned = runs.get(f"{name}-1.0"), runs.get(f"{name}-0.125")
            if dense and pruned:
                speedup = _median(dense["prefill_s"]) / _median(pruned["prefill_s"])
                out.append(f"\n{name}: prefill at 0.125 is **{speedup:.2f}x** faster than at 1.")
    par = res.get("parity")
    if par:
        out += [
            "",
            "Parity, torch fake-quant (streamed) vs onnxruntime, `ort-l0-exact` at 0.125, 4 easy-VQA prompts:",
            "",
        ]
        out += [
            "| prompt | same kept tokens | logits cosine | max rel. error | same greedy tokens |",
            "|---:|---|---:|---:|---|",
        ]
        for i, p in enumerate(par["prompts"]):
            out.append(f"| {i} | {p['same_kept']} | {p['cosine']:.6f} | {p['max_rel_err']:.2e} | {p['same_greedy']} |")
    cut = res.get("cut_run")
    if cut and len(cut) == 2:
        fp, q = cut["cut4-fp32"], cut["cut4-ort-l4"]
        out += ["", f"{CUT_LAYERS}-layer cut (same shape, 4 decoder layers), ratio 0.125:", ""]
        out += ["| export | on disk GiB | prefill s | decode tok/s | peak RSS GiB |", "|---|---:|---:|---:|---:|"]
        for name, r in cut.items():
            size = res["cut_export"][name]["size_gib"]
            out.append(
                f"| {name} | {size} | {_median(r['prefill_s']):.2f} | {r['decode_tok_s']} | {r['peak_rss_gib']} |"
            )
        out.append(f"\nint4 / fp32 decode rate on the cut: **{q['decode_tok_s'] / fp['decode_tok_s']:.2f}x**.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()

"""Alignment settings compared on a GPU, each on the whole easy-VQA test set (issue 3's gap to FP32).

    python bench/gpu_alignment.py --device cuda [--budget 480] [--base ARTIFACT] [--work runs/gpu-align]

On the CPU one alignment takes 10-15 min and one whole-test evaluation 10-13 min, so few settings can be
compared there. On a GPU this calibrates the reference model's W4A4 base once (``qavtp calibrate --gptq --aasym
--agroup 16 --vocab-bits 4 --sequential --fp-align 0.25 --retain none --device DEVICE``, or takes ``--base``),
evaluates FP32 and the base, then aligns the base with each setting in ``SETTINGS`` (``qavtp align --device
DEVICE``) and evaluates it on all 9,673 test questions (``qavtp eval --device DEVICE``). Paired differences are
against FP32 and against the unaligned base, question by question, ± 1.96 standard errors. Settings that would not
finish inside ``--budget`` seconds are skipped and say so. The numbers are the GPU's: its calibration rounds a few
codes differently from the CPU's, so compare them with each other, not with CPU tables. ``--device cpu
--steps-factor 0.01 --limit 32`` is a dry run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _table import emit_table
from paired_diff import paired

BASE_FLAGS = ["--gptq", "--aasym", "--agroup", "16", "--vocab-bits", "4", "--sequential", "--fp-align", "0.25"]
SETTINGS = [  # (label, qavtp align options); the label gets "steps × batch"
    ("projector", ["--steps", "200"]),
    ("+ scale gains 1e-4", ["--steps", "200", "--scale-lr", "1e-4"]),
    ("+ scale gains 1e-4", ["--steps", "200", "--batch-size", "16", "--scale-lr", "1e-4"]),
    ("+ scale gains 1e-4", ["--steps", "400", "--batch-size", "32", "--scale-lr", "1e-4"]),
    ("+ scale 1e-4, tower 3e-5", ["--steps", "400", "--batch-size", "32", "--scale-lr", "1e-4", "--vision-lr", "3e-5"]),
]


def qavtp(args: list[str], log: Path, timeout: float) -> tuple[bool, float]:
    """Run ``qavtp ARGS`` with its output in ``log``; (finished, seconds)."""
    t0 = time.time()
    with log.open("w") as f:
        try:
            rc = subprocess.run(
                [sys.executable, "-m", "qavtp.cli", *args], stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    secs = time.time() - t0
    print(f"qavtp {' '.join(args)}: {'ok' if rc == 0 else rc} in {secs:.0f} s", flush=True)
    if rc not in (0, "timeout"):
        print(log.read_text()[-2000:], flush=True)
    return rc == 0, secs


def correct(path: Path) -> list[int]:
    preds = sorted(json.loads(path.read_text())["predictions"], key=lambda p: p["index"])
    return [int(p["correct"]) for p in preds]


def row(label: str, results: Path, fp: list[int], base: list[int], rec: dict | None, align_s: float | None) -> str:
    """One table row: accuracy, yes/no, paired differences against FP32 and the unaligned base, alignment."""
    res = json.loads(results.read_text())
    c = correct(results)
    (m, h), (m1, h1) = paired(c, fp), paired(c, base)
    yes_no = res["by_type"].get("yes/no", {}).get("accuracy", float("nan"))
    kl = f"{rec['heldout_kl_before']:.4f} → {rec['heldout_kl_after']:.4f} (step {rec['best_step']})" if rec else ""
    return (
        f"| {label} | {100 * res['accuracy']:.2f} | {100 * yes_no:.2f} | {100 * m:+.2f} ± {100 * h:.2f} | "
        f"{100 * m1:+.2f} ± {100 * h1:.2f} | {kl} | {f'{align_s:.0f}' if align_s else ''} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole run; later settings are skipped")
    ap.add_argument("--base", default=None, help="an unaligned artifact (default: calibrate one here)")
    ap.add_argument("--batch-size", type=int, default=128, help="evaluation batch (the same for every row)")
    ap.add_argument("--limit", type=int, default=None, help="test questions (default all 9,673)")
    ap.add_argument("--steps-factor", type=float, default=1.0, help="scale every setting's steps (0.02: a dry run)")
    ap.add_argument("--work", default="runs/gpu-align")
    ap.add_argument("--out", default="bench/results/gpu_alignment.md")
    a = ap.parse_args()

    t_start = time.time()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    dev = ["--device", a.device]
    left = lambda: a.budget - (time.time() - t_start)  # noqa: E731
    base = Path(a.base) if a.base else work / "base"
    if not a.base:
        ok, _ = qavtp(
            ["calibrate", *BASE_FLAGS, "--retain", "none", *dev, "-o", str(base), "--overwrite"],
            work / "base.log",
            left(),
        )
        if not ok:
            raise SystemExit("calibration did not finish")
    evalopts = ["--batch-size", str(a.batch_size), *dev] + (["--limit", str(a.limit)] if a.limit else [])
    ok, eval_s = qavtp(["eval", *evalopts, "-o", str(work / "fp32")], work / "fp32.log", left())
    if not ok:
        raise SystemExit("the FP32 evaluation did not finish")
    fp = correct(work / "fp32" / "results.json")
    fp_res = json.loads((work / "fp32" / "results.json").read_text())

    def report() -> None:  # after every row: a run cut short keeps what it measured
        emit_table(
            [
                f"`python bench/gpu_alignment.py --device {a.device} --budget {a.budget:g}`: reference model, W4A4 "
                f"base `qavtp calibrate {' '.join(BASE_FLAGS)}`, each row `qavtp align BASE ...` then `qavtp eval "
                f"--batch-size {a.batch_size}` on {len(fp)} easy-VQA test questions; device "
                f"{fp_res.get('device', a.device)}.",
                "",
                "| alignment | accuracy | yes/no | − FP32 (paired) | − unaligned (paired) | held-out KL | align s |",
                "|---|---:|---:|---:|---:|---|---:|",
                f"| FP32 | {100 * fp_res['accuracy']:.2f} | "
                f"{100 * fp_res['by_type'].get('yes/no', {}).get('accuracy', float('nan')):.2f} | | | | |",
                *rows,
            ],
            a.out,
        )

    rows, per_question, overhead = [], None, 0.0
    ok, _ = qavtp(
        ["eval", "--artifact", str(base), *evalopts, "-o", str(work / "base-eval")], work / "base-eval.log", left()
    )
    if not ok:
        raise SystemExit("the base's evaluation did not finish")
    unaligned = correct(work / "base-eval" / "results.json")
    rows.append(row("unaligned W4A4 base", work / "base-eval" / "results.json", fp, unaligned, None, None))
    for i, (label, opts) in enumerate(SETTINGS):
        name = f"s{i}"
        flags = dict(zip(opts[::2], opts[1::2], strict=True))
        steps = max(1, round(int(flags["--steps"]) * a.steps_factor))
        batch = int(flags.get("--batch-size", 8))
        opts = [x for kv in {**flags, "--steps": str(steps)}.items() for x in kv]
        label = f"{label}, {steps} × {batch}"
        need = eval_s + overhead + (per_question * steps * batch if per_question else 0)
        if left() < need * 1.1:
            rows.append(f"| {label} | skipped: {left():.0f} s left, ~{need:.0f} s needed | | | | | |")
            report()
            continue
        ok, align_s = qavtp(
            ["align", str(base), "-o", str(work / name), *opts, *dev, "--overwrite"], work / f"{name}.log", left()
        )
        if not ok:
            rows.append(f"| {label} | did not finish | | | | | |")
            report()
            continue
        rec = json.loads((work / name / "config.json").read_text())["alignment"]
        per_question, overhead = rec["seconds"] / (steps * batch), align_s - rec["seconds"]  # training; loading
        ok, _ = qavtp(
            ["eval", "--artifact", str(work / name), *evalopts, "-o", str(work / f"{name}-eval")],
            work / f"{name}-eval.log",
            left(),
        )
        if not ok:
            rows.append(f"| {label} | aligned in {align_s:.0f} s; evaluation did not finish | | | | | |")
            report()
            continue
        rows.append(row(label, work / f"{name}-eval" / "results.json", fp, unaligned, rec, align_s))
        report()


if __name__ == "__main__":
    main()

"""Issue-3 table: accuracy, perplexity, calibration time and peak memory per quantization config.

Each config runs as its own `qavtp` process (so peak memory is per config), on the embedded
reference model unless --model says otherwise:

    python bench/quant_table.py --limit 1000 --out bench/results/quant_table.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _table import emit_table  # bench/ is the script's directory, so its siblings import

CONFIGS = {
    "FP32": None,
    "W8A8 RTN (sanity)": ["--method", "rtn", "--wbits", "8", "--abits", "8"],
    "W4A16 RTN": ["--method", "rtn", "--abits", "16"],
    "W4A4 RTN": ["--method", "rtn"],
    "W4A4 SmoothQuant": ["--method", "smoothquant"],
    "W4A4 QuaRot + RTN": ["--method", "quarot"],
    "W4A4 QuaRot + GPTQ": ["--method", "quarot", "--gptq"],
}
# Where the W4A4 accuracy goes (issue 3's investigation): `--only` picks these by name.
INVESTIGATE = {
    "W4A16 QuaRot + GPTQ": ["--method", "quarot", "--gptq", "--abits", "16"],
    "W4A8 QuaRot + GPTQ": ["--method", "quarot", "--gptq", "--abits", "8"],
    "W8A4 QuaRot": ["--method", "quarot", "--wbits", "8"],
    "W4A4 QuaRot + GPTQ, act clip 0.9": ["--method", "quarot", "--gptq", "--aclip", "0.9"],
    "W4A4 QuaRot + GPTQ, asym acts": ["--method", "quarot", "--gptq", "--aasym"],
    "W4A4 QuaRot + GPTQ, clip search": ["--method", "quarot", "--gptq", "--clip-search"],
    "W4A4 QuaRot + GPTQ, w g32": ["--method", "quarot", "--gptq", "--wgroup", "32"],
    "W4A4 QuaRot + GPTQ, o_proj Hadamard": ["--method", "quarot", "--gptq", "--o-proj-hadamard"],
    "W4A4 QuaRot + GPTQ, asym acts g32": ["--method", "quarot", "--gptq", "--aasym", "--agroup", "32"],
    "W4A4 QuaRot + GPTQ, asym acts g16": ["--method", "quarot", "--gptq", "--aasym", "--agroup", "16"],
    "W4A4 QuaRot + GPTQ, asym acts g16, 4-bit vocab": [
        *("--method", "quarot", "--gptq", "--aasym", "--agroup", "16", "--vocab-bits", "4")
    ],
    "W4A4 QuaRot + GPTQ, asym acts g16, 4-bit vocab, gate/up inputs A8": [
        *("--method", "quarot", "--gptq", "--aasym", "--agroup", "16", "--vocab-bits", "4", "--a8", "gate_proj,up_proj")
    ],
    "W4A4 QuaRot + GPTQ sequential, asym acts g16, 4-bit vocab": [
        *("--method", "quarot", "--gptq", "--aasym", "--agroup", "16", "--vocab-bits", "4", "--sequential")
    ],
    "W4A4 QuaRot + GPTQ sequential, FP-aligned 0.1, asym acts g16, 4-bit vocab": [
        *("--method", "quarot", "--gptq", "--aasym", "--agroup", "16", "--vocab-bits", "4", "--sequential"),
        *("--fp-align", "0.1"),
    ],
    "W4A4 QuaRot + GPTQ sequential, FP-aligned 0.25, asym acts g16, 4-bit vocab": [
        *("--method", "quarot", "--gptq", "--aasym", "--agroup", "16", "--vocab-bits", "4", "--sequential"),
        *("--fp-align", "0.25"),
    ],
    "W4A4 QuaRot + GPTQ sequential, FP-aligned 0.5, asym acts g16, 4-bit vocab": [
        *("--method", "quarot", "--gptq", "--aasym", "--agroup", "16", "--vocab-bits", "4", "--sequential"),
        *("--fp-align", "0.5"),
    ],
    "W4A4 QuaRot + GPTQ sequential, FP-aligned 1, asym acts g16, 4-bit vocab": [
        *("--method", "quarot", "--gptq", "--aasym", "--agroup", "16", "--vocab-bits", "4", "--sequential"),
        *("--fp-align", "1"),
    ],
    "W4A4KV4 QuaRot + GPTQ, asym acts g16, 4-bit vocab": [
        *("--method", "quarot", "--gptq", "--aasym", "--agroup", "16", "--vocab-bits", "4", "--kv-bits", "4")
    ],
}


def _earlier(work: Path, slug: str, limit: int) -> tuple[dict, dict, dict] | None:
    """An earlier run's (results, perplexity, calibration) of one config, if it evaluated the same questions."""
    res_path, ppl_path = work / f"{slug}-eval" / "results.json", work / f"{slug}-ppl.json"
    if not (res_path.is_file() and ppl_path.is_file()):
        return None
    res = json.loads(res_path.read_text())
    if res["config"].get("limit") != (limit or None):
        return None
    calib = {}
    if (work / slug / "config.json").is_file():
        c = json.loads((work / slug / "config.json").read_text())["calibration"]
        calib = {"seconds": c["seconds"], "rss": c["peak_rss_mib"]}
    return res, json.loads(ppl_path.read_text()), calib


def qavtp(*args: str) -> None:
    subprocess.run(["qavtp", *args], check=True, stdout=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollava-easyvqa")
    ap.add_argument("--limit", type=int, default=1000, help="easy-VQA test questions (0: all 9,673)")
    ap.add_argument(
        "--wgroup", default="auto", help="weight group size (auto: 64 on the reference model, 576 = 9 x 64)"
    )
    ap.add_argument("--n-samples", default="128")
    ap.add_argument("--windows", default="32", help="perplexity windows of 512 tokens")
    ap.add_argument("--only", nargs="*", help="run only these config names")
    ap.add_argument("--work", default="runs/bench")
    ap.add_argument("--out", default="bench/results/quant_table.md")
    ap.add_argument(
        "--reuse", action="store_true", help="take a config's results from --work where an earlier run left them"
    )
    a = ap.parse_args()
    work = Path(a.work)
    rows = []
    for name, flags in {**CONFIGS, **INVESTIGATE}.items():
        if (a.only and name not in a.only) or (not a.only and name in INVESTIGATE):
            continue
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        done = _earlier(work, slug, a.limit) if a.reuse else None
        if done is not None:
            rows.append((name, *done))
            continue
        target = [a.model]
        calib = {}
        if flags is not None:
            art = work / slug
            t0 = time.time()
            qavtp(
                "calibrate",
                a.model,
                "--wgroup",
                a.wgroup,
                *flags,  # after the defaults, so a config's own --wgroup wins
                "--retain",
                "none",  # pruning fusion weights are not part of this table
                "--n-samples",
                a.n_samples,
                "-o",
                str(art),
                "--overwrite",
            )
            cfg = json.loads((art / "config.json").read_text())
            calib = {
                "seconds": cfg["calibration"]["seconds"],
                "rss": cfg["calibration"]["peak_rss_mib"],
                "wall": time.time() - t0,
            }
            target = ["--artifact", str(art)]
        limit = ["--limit", str(a.limit)] if a.limit else []
        qavtp("eval", *target, *limit, "-o", str(work / f"{slug}-eval"))
        qavtp("ppl", *target, "--windows", a.windows, "-o", str(work / f"{slug}-ppl.json"))
        res = json.loads((work / f"{slug}-eval" / "results.json").read_text())
        ppl = json.loads((work / f"{slug}-ppl.json").read_text())
        rows.append((name, res, ppl, calib))
    types = sorted(k for k in rows[0][1]["by_type"] if k != "all")
    lines = [
        f"easy-VQA test ({rows[0][1]['n']} questions, seed 0), log-likelihood scoring; perplexity on "
        f"{rows[0][2]['corpus']}, {rows[0][2]['tokens']} tokens; weight groups {a.wgroup}; "
        "activations per token unless the config names a group (g32, g16).",
        "",
        "| config | accuracy | " + " | ".join(types) + " | perplexity | calibration s | peak RSS MiB |",
        "|---|---:|" + "---:|" * len(types) + "---:|---:|---:|",
    ]
    for name, res, ppl, calib in rows:
        per = " | ".join(f"{100 * res['by_type'][t]['accuracy']:.2f}" for t in types)
        lines.append(
            f"| {name} | {100 * res['accuracy']:.2f} | {per} | {ppl['perplexity']:.2f} | "
            f"{calib.get('seconds', '–')} | {calib.get('rss', '–')} |"
        )
    emit_table(lines, a.out)


if __name__ == "__main__":
    main()

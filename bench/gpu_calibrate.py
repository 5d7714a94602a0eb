"""A 7B LLaVA calibrates to W4A4 on one GPU, layer by layer (``qavtp calibrate --device cuda``).

    python bench/gpu_calibrate.py --device cuda [--layers 32] [--samples 128] [--work runs/gpu-calibrate]

Builds a random-weight LLaVA with llava-hf/llava-1.5-7b-hf's whole config (CLIP ViT-L/14-336, 24 layers;
LLaMA-7B, 32 decoder layers; 7.06 B parameters), saves it in float16 as llava-hf does, and runs
``qavtp calibrate MODEL --method quarot --gptq --device DEVICE`` on easy-VQA in a child process. Prints
the wall time of each stage, the calibration's own time, peak host memory, peak device memory and the
artifact's size. The weights are random, so this measures cost, not accuracy (the tests compare the
offloaded calibration with the in-place one). ``--layers 2 --vision-layers 1 --device cpu`` is a dry run.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _table import emit_table
from real_dims import TEXT, VISION


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (LLaMA-7B: 32)")
    ap.add_argument("--vision-layers", type=int, default=24, help="vision tower layers (CLIP ViT-L: 24)")
    ap.add_argument("--samples", type=int, default=128, help="easy-VQA calibration samples")
    ap.add_argument("--work", default="runs/gpu-calibrate")
    ap.add_argument("--out", default="bench/results/gpu_calibrate.md")
    a = ap.parse_args()

    import torch

    from qavtp.data.easyvqa import load_easyvqa
    from qavtp.data.prompts import SHORT_ANSWER
    from qavtp.models.random_llava import make_random_llava, small_tokenizer

    work = Path(a.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    test = load_easyvqa("test")
    tok = small_tokenizer(list(test["question"][:2000]) + [SHORT_ANSWER, "user assistant"] * 20, vocab_size=400)
    t0 = time.time()
    model_dir = make_random_llava(
        work / "model",
        tok,
        vision={**VISION, "num_hidden_layers": a.vision_layers},
        text={**TEXT, "num_hidden_layers": a.layers},
        init_device=a.device,
        save_dtype=torch.float16,
    )
    build_s = time.time() - t0
    n_params = sum(math.prod(shape) for f in model_dir.glob("*.safetensors") for shape in _shapes(f))
    print(f"built {n_params / 1e9:.2f} B parameters in {build_s:.0f} s", flush=True)

    art = work / "artifact"
    cmd = [
        *(sys.executable, "-m", "qavtp.cli", "calibrate", str(model_dir)),
        *("--method", "quarot", "--gptq", "--wgroup", "128", "--n-samples", str(a.samples)),
        *("--retain", "none", "--device", a.device, "-o", str(art)),
    ]
    print(" ".join(cmd[2:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=work)  # not the source tree, whose qavtp/ would shadow the package
    calib_s = time.time() - t0
    cfg = json.loads((art / "config.json").read_text())["calibration"]

    def gib(d: Path) -> float:
        return sum(f.stat().st_size for f in d.iterdir()) / 2**30

    lines = [
        f"`python bench/gpu_calibrate.py --device {a.device} --layers {a.layers} --vision-layers {a.vision_layers} "
        f"--samples {a.samples}`: random-weight llava-1.5-7b config, {n_params / 1e9:.2f} B parameters, "
        f"W4A4 QuaRot + GPTQ g128, easy-VQA calibration set; device {cfg['device']}.",
        "",
        "| stage | value |",
        "|---|---:|",
        f"| build + save the float16 checkpoint (s) | {build_s:.0f} |",
        f"| checkpoint size (GiB) | {gib(model_dir):.1f} |",
        f"| `qavtp calibrate` wall, load and save included (s) | {calib_s:.0f} |",
        f"| calibration proper: rotate, statistics, GPTQ, quantize (s) | {cfg['seconds']:.0f} |",
        f"| peak host memory (GiB) | {cfg['peak_rss_mib'] / 1024:.1f} |",
        "| peak device memory (GiB) | "
        + (f"{cfg['device_peak_mib'] / 1024:.1f}" if "device_peak_mib" in cfg else "n/a")
        + " |",
        f"| artifact size (GiB) | {gib(art):.1f} |",
        f"| decoder linears quantized | {len(cfg['quantized'])} |",
    ]
    emit_table(lines, a.out)


def _shapes(path: Path) -> list[list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return [f.get_slice(k).get_shape() for k in f.keys()]


if __name__ == "__main__":
    main()

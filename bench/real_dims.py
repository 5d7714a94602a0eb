"""Real dimensions: a random-weight LLaVA with llava-hf/llava-1.5-7b-hf's exact config (CLIP ViT-L/14-336,
576 visual tokens, LLaMA hidden 4096, vocabulary 32,064), truncated to 1 vision layer and 2 decoder layers,
goes through calibrate (with fusion learning) -> export (both weight formats) -> run -> eval-onnx --compare.

    python bench/real_dims.py [--work runs/real-dims]

Prints a table of each stage's wall time and the export sizes, so nothing is tuned to the small model.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

# llava-hf/llava-1.5-7b-hf config.json (vision_config / text_config), layers truncated.
VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=1,
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
    num_hidden_layers=2,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/real-dims")
    ap.add_argument("--questions", type=int, default=8, help="easy-VQA test questions for eval-onnx --compare")
    a = ap.parse_args()

    from click.testing import CliRunner

    from qavtp.calibrate.calibration import run_calibration
    from qavtp.cli import main as cli
    from qavtp.config import CalibrationConfig, ExportConfig, FusionConfig
    from qavtp.data.easyvqa import load_easyvqa
    from qavtp.data.prompts import SHORT_ANSWER
    from qavtp.export.export_model import export_model
    from qavtp.models.random_llava import make_random_llava, small_tokenizer

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    rows = []

    def stage(name, fn):
        t0 = time.time()
        out = fn()
        rows.append((name, time.time() - t0))
        print(f"{name}: {rows[-1][1]:.1f} s", flush=True)
        return out

    test = load_easyvqa("test")
    corpus = list(test["question"][:2000]) + [SHORT_ANSWER, "user assistant"] * 20
    tok = small_tokenizer(corpus, vocab_size=400)
    model_dir = stage(
        "build random llava-1.5-7b config (1 + 2 layers)",
        lambda: make_random_llava(work / "model", tok, vision=VISION, text=TEXT, vision_feature_layer=-2),
    )
    cfg = json.loads((model_dir / "config.json").read_text())
    art = stage(
        "calibrate W4A4 QuaRot RTN g128 + fusion (retain 0.125)",
        lambda: run_calibration(
            model_dir,
            work / "artifact",
            CalibrationConfig(n_samples=8, batch_size=4, fusion=FusionConfig(ratios=(0.125,), samples=4)),
            progress=False,
        ),
    )
    exports = {}
    for fmt in ("qdq", "ort"):
        exports[fmt] = stage(
            f"export {fmt} (retain 0.125, qavtp)",
            lambda f=fmt: export_model(str(art), work / f, ExportConfig(0.125, "qavtp", f)),
        )
    image = work / "q.png"
    test[0]["image"].save(image)
    run = CliRunner().invoke
    r = stage(
        "qavtp run (ort)",
        lambda: run(cli, ["run", str(exports["ort"]), "--image", str(image), "--question", test[0]["question"]]),
    )
    print(r.output)
    res = stage(
        f"eval-onnx --compare ({a.questions} q, qdq)",
        lambda: run(
            cli, ["eval-onnx", str(exports["qdq"]), "--limit", str(a.questions), "--compare", "-o", str(work / "cmp")]
        ),
    )
    print(res.output)
    agree = json.loads((work / "cmp" / "results.json").read_text())["agreement"]

    def mib(d):
        return sum(f.stat().st_size for f in Path(d).iterdir() if f.suffix in (".onnx", ".bin")) / 2**20

    print()
    print(
        f"config: vision {cfg['vision_config']['hidden_size']} x {cfg['vision_config']['num_hidden_layers']} layer, "
        f"{(VISION['image_size'] // VISION['patch_size']) ** 2} visual tokens; LLM hidden {TEXT['hidden_size']}, "
        f"{TEXT['num_hidden_layers']} layers, vocab {TEXT['vocab_size']}"
    )
    print()
    print("| stage | wall s |")
    print("|---|---:|")
    for name, s in rows:
        print(f"| {name} | {s:.1f} |")
    print()
    print(
        f"export sizes: qdq {mib(exports['qdq']):.0f} MiB, ort {mib(exports['ort']):.0f} MiB; "
        f"same answers torch vs onnx {100 * agree['same_answers']:.0f} %, same kept tokens "
        f"{100 * agree['same_kept_tokens']:.0f} % (n={agree['n']}); "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
    )


if __name__ == "__main__":
    main()

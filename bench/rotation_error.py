"""How much can a better rotation of the residual stream still lower the 4-bit activation error? (issue 3)

    python bench/rotation_error.py [--samples 32]

Collects the inputs of every decoder layer's attention and MLP (the normed residual stream, RMSNorm weights fused
into the next linears, as QuaRot does) on calibration questions of the floating-point reference model, rotates them
with: nothing, qavtp's ``H diag(s)`` (two seeds), QuaRot's ``diag(s) H`` (four seeds) and a random orthogonal matrix,
and prints the mean (and
worst) relative squared error ``||Q(x R) - x R||^2 / ||x R||^2`` over the 60 inputs, per activation quantizer.
A learned rotation (SpinQuant) lowers this error where one exists that beats random ones by a margin.
"""

from __future__ import annotations

import argparse

import torch
from _table import emit_table  # bench/ is the script's directory, so its siblings import


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollava-easyvqa")
    ap.add_argument("--samples", type=int, default=32, help="calibration questions (easy-VQA train, seed 0)")
    ap.add_argument("--out", default="bench/results/rotation_error.md", help="also write the table here")
    a = ap.parse_args()

    from qavtp.calibrate.hadamard import hadamard_matrix, random_hadamard
    from qavtp.calibrate.quantize import calibration_batches
    from qavtp.calibrate.quantizers import QuantSpec, fake_quant_activation
    from qavtp.calibrate.rotation import fuse_layer_norms
    from qavtp.data import load_data
    from qavtp.models.loading import load_model, resolve

    torch.manual_seed(0)
    net, processor, adapter = load_model(resolve(a.model))
    fuse_layer_norms(adapter)  # function-preserving; the rotation acts on what the norms output
    batches = calibration_batches(processor, load_data("easy-vqa", "train", limit=a.samples, seed=0), 8)
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    real: list[torch.Tensor] = []

    def keep(key):
        def hook(_module, args):
            inputs.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1])[real[-1]])

        return hook

    hooks = []
    for i, layer in enumerate(adapter.decoder_layers):
        hooks.append(layer.self_attn.q_proj.register_forward_pre_hook(keep((i, "attention"))))
        hooks.append(layer.mlp.gate_proj.register_forward_pre_hook(keep((i, "mlp"))))
    with torch.no_grad():
        for b in batches:
            real.append(b["attention_mask"].bool().reshape(-1))  # padding rows are left out
            net(**b)
    for h in hooks:
        h.remove()
    xs = [torch.cat(v).double() for v in inputs.values()]
    hidden = xs[0].shape[-1]

    def error(r: torch.Tensor | None, spec: QuantSpec) -> tuple[float, float]:
        errs = []
        for x in xs:
            z = x if r is None else x @ r
            q = fake_quant_activation(z.float(), spec).double()
            errs.append(((q - z).pow(2).sum() / z.pow(2).sum()).item())
        return sum(errs) / len(errs), max(errs)

    gen = torch.Generator().manual_seed(0)
    rotations: dict[str, torch.Tensor | None] = {"none": None}
    rotations.update({f"H diag(s), seed {s} (qavtp's random_hadamard)": random_hadamard(hidden, s) for s in range(2)})
    for s in range(4):  # QuaRot's form: random signs on the input side
        signs = torch.randint(0, 2, (hidden,), generator=torch.Generator().manual_seed(s)).double() * 2 - 1
        rotations[f"diag(s) H, seed {s} (QuaRot's form)"] = signs[:, None] * hadamard_matrix(hidden)
    rotations["random orthogonal (QR of a Gaussian)"] = torch.linalg.qr(
        torch.randn(hidden, hidden, generator=gen, dtype=torch.float64)
    )[0]
    specs = {
        "4-bit symmetric per token": QuantSpec(4, True, 0),
        "4-bit asymmetric per token": QuantSpec(4, False, 0),
        "4-bit asymmetric, groups of 16 (main job)": QuantSpec(4, False, 16),
    }
    lines = [
        f"Relative squared error of 4-bit activation fake-quant on the {len(xs)} attention/MLP inputs of the reference "
        f"model ({xs[0].shape[0]} real tokens from {a.samples} calibration questions); mean (worst) over inputs, %.",
        "",
        "| rotation | " + " | ".join(specs) + " |",
        "|---|" + "---:|" * len(specs),
    ]
    for name, r in rotations.items():
        cells = [error(r, s) for s in specs.values()]
        lines.append(f"| {name} | " + " | ".join(f"{100 * m:.3f} ({100 * w:.3f})" for m, w in cells) + " |")
        print(lines[-1], flush=True)
    emit_table(lines, a.out)


if __name__ == "__main__":
    main()

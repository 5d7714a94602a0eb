"""One linear layer in onnxruntime: fp32 ``MatMul`` against the int4 and int8 kernels a W4A4 graph could use.

    python bench/matmul_kernels.py [--threads 2] [--runs 300]

Prints the time per call for the reference model's shapes (576 -> 1536, 1536 -> 576, the 576 -> 49,152 LM head)
at 1 row (a decode step), 35 rows (a 12.5 % prompt) and 91 rows (the dense prompt), as a Markdown table:

* ``MatMulNBits`` (int4 weights, groups of 64) at accuracy levels 0 and 4, the kernel alone;
* the main job's whole linear as ``qavtp export --format ort`` writes it: asymmetric 4-bit activation fake-quant in
  groups of 16, then ``MatMulNBits`` level 0;
* ``MatMulInteger`` (u8 activations x s8 weights, onnxruntime's VNNI GEMM) alone, and as a whole integer W4A4 linear:
  per-token asymmetric 4-bit activation codes made in the graph, the integer GEMM, the zero-point correction and the
  two scales. That linear needs per-token activation scales and per-channel weight scales (a group-wise scale is
  not a plain integer GEMM); it is what an integer path would cost, not something the exporter writes.

It explains the export table: int4 weights speed up decode, not a short compute-bound prefill.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
from _table import emit_table  # bench/ is the script's directory, so its siblings import

ROWS = (1, 35, 91)
SHAPES = ((576, 1536), (1536, 576), (576, 49152))
COLUMNS = (
    "fp32 MatMul",
    "MatMulNBits level 0",
    "MatMulNBits level 4",
    "A4 g16 fake-quant + MatMulNBits (main job)",
    "MatMulInteger u8×s8",
    "integer W4A4 linear (per-token A4 + MatMulInteger)",
)


def _matmul(g, x: str, w: np.ndarray) -> str:
    return g.op("MatMul", x, g.weight("w", w))


def _matmul_integer(g, x: str, codes: np.ndarray) -> str:
    return g.op("MatMulInteger", x, g.weight("codes", codes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--block", type=int, default=64, help="int4 block size (64 on the reference model)")
    ap.add_argument("--out", default="bench/results/matmul_kernels.md", help="also write the table here")
    a = ap.parse_args()

    import onnxruntime as ort
    import torch
    from onnx import TensorProto

    from qavtp.calibrate.quantizers import QuantLinear, QuantSpec
    from qavtp.export.external_data import to_model
    from qavtp.export.int4 import quant_linear
    from qavtp.export.onnx_graph import Graph

    F, U8 = TensorProto.FLOAT, TensorProto.UINT8

    def per_call_us(build, x: np.ndarray, dtype: int) -> float:
        g = Graph("bench")
        xi = g.input("x", dtype, list(x.shape))
        y = build(g, xi)
        g.output(y, "y", TensorProto.INT32 if dtype != F else F, None)
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        sess = ort.InferenceSession(to_model(g).SerializeToString(), so, providers=["CPUExecutionProvider"])
        sess.run(None, {"x": x})
        t0 = time.perf_counter()
        for _ in range(a.runs):
            sess.run(None, {"x": x})
        return (time.perf_counter() - t0) / a.runs * 1e6

    def integer_linear(g: Graph, x: str, codes: np.ndarray, w_scale: np.ndarray) -> str:
        """Per-token asymmetric 4-bit codes (the spec's formulas), ``MatMulInteger``, then
        ``s_t * s_n * (acc - z_t * colsum(codes))``: exact integer accumulation of ``(q - z) * c``."""
        spec = QuantSpec(4, False, 0)
        f = lambda v: g.const(np.float32(v))  # noqa: E731
        axes = g.const([-1], np.int64)
        lo = g.op("Min", g.op("ReduceMin", x, axes, keepdims=1), f(0))
        hi = g.op("Max", g.op("ReduceMax", x, axes, keepdims=1), f(0))
        s = g.op("Div", g.op("Sub", hi, lo), f(spec.qmax))
        s = g.op("Where", g.op("Equal", s, f(0)), f(1), s)
        z = g.op("Clip", g.op("Round", g.op("Div", g.op("Neg", lo), s)), f(0), f(spec.qmax))
        q = g.op("Clip", g.op("Add", g.op("Round", g.op("Div", x, s)), z), f(0), f(spec.qmax))
        acc = g.op("MatMulInteger", g.op("Cast", q, to=U8), g.weight("codes", codes))
        colsum = g.weight("colsum", codes.astype(np.float32).sum(0))
        y = g.op("Sub", g.op("Cast", acc, to=F), g.op("Mul", z, colsum))
        return g.op("Mul", g.op("Mul", y, s), g.weight("w_scale", w_scale))

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    lines = [
        f"onnxruntime {ort.__version__}, {a.threads} threads, mean µs per call over {a.runs} runs; int4 weights in "
        f"groups of {a.block}.",
        "",
        "| K → N | rows | " + " | ".join(COLUMNS) + " |",
        "|---|---:|" + "---:|" * len(COLUMNS),
    ]
    for k, n in SHAPES:
        lin = torch.nn.Linear(k, n, bias=False)
        w_t = np.ascontiguousarray(lin.weight.detach().numpy().T)
        wspec = QuantSpec(4, True, a.block)
        kernels = [QuantLinear.from_linear(lin, wspec, None, method="rtn") for _ in range(2)]
        main_job = QuantLinear.from_linear(lin, wspec, QuantSpec(4, False, 16), method="rtn")
        codes = rng.integers(-8, 8, (k, n)).astype(np.int8)
        w_scale = rng.random(n, dtype=np.float32)
        for m in ROWS:
            x = rng.standard_normal((1, m, k), dtype=np.float32)
            xu8 = rng.integers(0, 16, (1, m, k)).astype(np.uint8)
            ql = partial(quant_linear, name="l", fmt="ort")
            variants = (
                (partial(_matmul, w=w_t), x, F),
                (partial(ql, m=kernels[0], accuracy_level=0), x, F),
                (partial(ql, m=kernels[1], accuracy_level=4), x, F),
                (partial(ql, m=main_job, accuracy_level=0), x, F),
                (partial(_matmul_integer, codes=codes), xu8, U8),
                (partial(integer_linear, codes=codes, w_scale=w_scale), x, F),
            )
            cells = [per_call_us(build, xv, dtype) for build, xv, dtype in variants]
            lines.append(f"| {k} → {n} | {m} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
            print(lines[-1], flush=True)
    emit_table(lines, a.out)


if __name__ == "__main__":
    main()

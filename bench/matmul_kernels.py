"""One linear layer in onnxruntime: fp32 ``MatMul`` vs int4 ``MatMulNBits`` (accuracy levels 0 and 4).

    python bench/matmul_kernels.py [--threads 2] [--runs 300]

Prints the time per call for the reference model's shapes (576 -> 1536, 1536 -> 576, the 576 -> 49,152 LM head)
at 1 row (a decode step), 35 rows (a 12.5 % prompt) and 91 rows (the dense prompt), as a Markdown table.
It explains the export table: int4 weights speed up decode, not a short compute-bound prefill.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--block", type=int, default=64, help="int4 block size (64 on the reference model)")
    a = ap.parse_args()

    import onnxruntime as ort
    import torch
    from onnx import TensorProto

    from qavtp.calibrate.quantizers import pack_int4
    from qavtp.export.builder import MS_DOMAIN, Graph, Tensor
    from qavtp.export.weights import to_model

    def session(g: Graph) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        return ort.InferenceSession(to_model(g).SerializeToString(), so, providers=["CPUExecutionProvider"])

    def per_call_us(sess: ort.InferenceSession, x: np.ndarray) -> float:
        sess.run(None, {"x": x})
        t0 = time.perf_counter()
        for _ in range(a.runs):
            sess.run(None, {"x": x})
        return (time.perf_counter() - t0) / a.runs * 1e6

    rng = np.random.default_rng(0)
    lines = [
        f"onnxruntime {ort.__version__}, {a.threads} threads, mean µs per call over {a.runs} runs.",
        "",
        "| K → N | rows | fp32 MatMul | MatMulNBits level 0 | MatMulNBits level 4 |",
        "|---|---:|---:|---:|---:|",
    ]
    for k, n in ((576, 1536), (1536, 576), (576, 49152)):
        w = rng.standard_normal((n, k), dtype=np.float32)
        packed = pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8)).reshape(n, k // a.block, a.block // 2)
        scales = rng.random(n * k // a.block, dtype=np.float32)
        for m in (1, 35, 91):
            x = rng.standard_normal((1, m, k), dtype=np.float32)
            g = Graph("fp32")
            y = g.op("MatMul", g.input("x", TensorProto.FLOAT, [1, m, k]), g.weight("w", np.ascontiguousarray(w.T)))
            g.output(y, "y", TensorProto.FLOAT, [1, m, n])
            cells = [per_call_us(session(g), x)]
            for level in (0, 4):
                g = Graph("nbits")
                b, s = g.weight("b", Tensor.from_numpy(packed.numpy())), g.weight("s", scales)
                xi = g.input("x", TensorProto.FLOAT, [1, m, k])
                y = g.op(
                    "MatMulNBits",
                    xi,
                    b,
                    s,
                    domain=MS_DOMAIN,
                    K=k,
                    N=n,
                    bits=4,
                    block_size=a.block,
                    accuracy_level=level,
                )
                g.output(y, "y", TensorProto.FLOAT, [1, m, n])
                cells.append(per_call_us(session(g), x))
            lines.append(f"| {k} → {n} | {m} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Linear layers as ONNX: fp32 MatMul, blocked INT4 ``DequantizeLinear`` (``qdq``) or ``MatMulNBits`` (``ort``).

``qdq``: the codes transposed to ``[in, out]`` as an INT4/UINT4 initializer, ``DequantizeLinear(axis=0,
block_size=g)`` with scales ``[in/g, out]`` (and a zero point when asymmetric), then ``MatMul``: standard
opset 21, runs in any runtime. ``ort``: onnxruntime's ``com.microsoft.MatMulNBits`` (B ``[N, K/g, g/2]``
uint8, low nibble first; scales ``[N * K/g]``; packed uint8 zero points, default 8), its fast int4 GEMM.
Both dequantize as ``(code - zero) * scale`` in float32, like ``quantizers.dequantize_weight``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from onnx import TensorProto
from torch import nn

from qavtp.calibrate.hadamard import hadamard_factors
from qavtp.calibrate.quantizers import QuantLinear, check_group_size, pack_int4
from qavtp.calibrate.rotation import OnlineHadamardLinear
from qavtp.errors import QavtpError
from qavtp.export.builder import MS_DOMAIN, Graph, Tensor
from qavtp.export.fakequant import fake_quant

FORMATS = ("qdq", "ort")


def np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _int_tensor(codes: torch.Tensor, signed: bool, bits: int) -> Tensor:
    """Integer codes as an ONNX INT4/UINT4 (packed two per byte, ONNX's raw layout) or INT8/UINT8 tensor."""
    dims = tuple(codes.shape)
    if bits == 4:
        raw = pack_int4(codes.flatten()).numpy().tobytes()
        return Tensor(TensorProto.INT4 if signed else TensorProto.UINT4, dims, raw)
    arr = codes.numpy().astype(np.int8 if signed else np.uint8)
    return Tensor(TensorProto.INT8 if signed else TensorProto.UINT8, dims, arr.tobytes())


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise QavtpError(f"unknown weight format {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


def nbits_block_ok(block: int) -> bool:
    """MatMulNBits (CPU) takes power-of-two blocks from 16 to 256."""
    return 16 <= block <= 256 and block & (block - 1) == 0


def _qdq_weight(g: Graph, m: QuantLinear, name: str) -> str:
    """The dequantized ``W^T [in, out]`` (float32) through a blocked ``DequantizeLinear``."""
    spec = m.wspec
    block = check_group_size(m.in_features, spec.group_size)
    codes = g.weight(f"{name}.qweight_t", _int_tensor(m.qweight.T.contiguous(), spec.symmetric, spec.bits))
    scale = g.weight(f"{name}.scale_t", np32(m.scale.T.contiguous()))
    inputs = [codes, scale]
    if not spec.symmetric:
        inputs.append(g.weight(f"{name}.zero_t", _int_tensor(m.zero.T.contiguous(), False, spec.bits)))
    return g.op("DequantizeLinear", *inputs, axis=0, block_size=block)


def _matmul_nbits(g: Graph, x: str, m: QuantLinear, name: str, accuracy_level: int) -> str:
    spec = m.wspec
    block = check_group_size(m.in_features, spec.group_size)
    n, k = m.out_features, m.in_features
    # Signed codes c in -8..7 are stored as c + 8: MatMulNBits' default zero point is 8, so no zero input.
    codes = m.qweight.to(torch.int16) + (8 if spec.symmetric else 0)
    packed = pack_int4(codes.to(torch.uint8)).reshape(n, k // block, block // 2)
    b = g.weight(f"{name}.qweight_nbits", Tensor.from_numpy(packed.numpy()))
    scales = g.weight(f"{name}.scale_nbits", np32(m.scale).reshape(-1))
    inputs = [x, b, scales]
    if not spec.symmetric:
        zp = pack_int4(m.zero.to(torch.uint8)).reshape(-1)  # per row, n_blocks nibbles padded to whole bytes
        inputs.append(g.weight(f"{name}.zero_nbits", Tensor.from_numpy(zp.numpy())))
    return g.op(
        "MatMulNBits", *inputs, domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level
    )


def _bias(g: Graph, y: str, bias: torch.Tensor | None, name: str) -> str:
    return y if bias is None else g.op("Add", y, g.weight(f"{name}.bias", np32(bias)))


def quant_linear(g: Graph, x: str, m: QuantLinear, name: str, fmt: str, accuracy_level: int = 0) -> str:
    """``F.linear(Qa(x), dequant(W), b)``: the module's own activation quantizer first, as in torch."""
    if m.wspec.bits not in (4, 8):
        raise QavtpError(f"{name}: {m.wspec.bits}-bit weights cannot be exported (ONNX has 4- and 8-bit types)")
    if m.aspec is not None:
        x = fake_quant(g, x, m.aspec, m.in_features)
    block = check_group_size(m.in_features, m.wspec.group_size)
    if fmt == "ort" and m.wspec.bits == 4:
        if nbits_block_ok(block):
            return _bias(g, _matmul_nbits(g, x, m, name, accuracy_level), m.bias, name)
        warnings.warn(
            f"{name}: weight group {block} is not a power of two in 16..256, which MatMulNBits needs; "
            "this layer falls back to DequantizeLinear + MatMul",
            stacklevel=2,
        )
    return _bias(g, g.op("MatMul", x, _qdq_weight(g, m, name)), m.bias, name)


def fp_linear(g: Graph, x: str, m: nn.Linear, name: str) -> str:
    """A float32 ``x @ W^T + b`` with the weight stored transposed."""
    w = g.weight(f"{name}.weight_t", np32(m.weight.T.contiguous()))
    return _bias(g, g.op("MatMul", x, w), m.bias, name)


def hadamard(g: Graph, x: str, n: int) -> str:
    """``x @ H_n`` for ``x [B, T, n]`` as ``qavtp.calibrate.hadamard.apply_hadamard_factored`` computes it:
    ``[B, T, a, b]``, ``MatMul B``, swap the last two axes, ``MatMul A``, swap back. The factors are stored once
    per order and shared by every layer."""
    a_np, b_np = hadamard_factors(n)
    A = g.weight(f"hadamard.{n}.A", np.asarray(a_np, dtype=np.float32))
    B = g.weight(f"hadamard.{n}.B", np.asarray(b_np, dtype=np.float32))
    X = g.op("Reshape", x, g.const([0, 0, a_np.shape[0], b_np.shape[0]], np.int64))
    Y = g.op("MatMul", g.op("Transpose", g.op("MatMul", X, B), perm=[0, 1, 3, 2]), A)
    return g.op("Reshape", g.op("Transpose", Y, perm=[0, 1, 3, 2]), g.const([0, 0, n], np.int64))


def linear(g: Graph, x: str, m: nn.Module, name: str, fmt: str, accuracy_level: int = 0) -> str:
    """Any linear the decoder holds: plain, quantized, or with an online Hadamard on its input."""
    if isinstance(m, OnlineHadamardLinear):
        # The torch module computes linear(x @ H): the rotation comes before the activation quantizer.
        return linear(g, hadamard(g, x, m.in_features), m.linear, f"{name}.linear", fmt, accuracy_level)
    if isinstance(m, QuantLinear):
        return quant_linear(g, x, m, name, fmt, accuracy_level)
    if isinstance(m, nn.Linear):
        return fp_linear(g, x, m, name)
    raise QavtpError(f"{name}: cannot export a {type(m).__name__} as a linear layer")

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
from qavtp.calibrate.quantizers import QuantEmbedding, QuantLinear, check_group_size, pack_int4
from qavtp.calibrate.rotation import OnlineHadamardLinear
from qavtp.config import WeightFormat
from qavtp.errors import QavtpError
from qavtp.export.fakequant import fake_quant
from qavtp.export.onnx_graph import MS_DOMAIN, Graph, Tensor


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


def quant_linear(g: Graph, x: str, m: QuantLinear, name: str, weights: WeightFormat, act: bool = True) -> str:
    """``F.linear(Qa(x), dequant(W), b)``: the module's own activation quantizer first, as in torch (unless
    ``act`` is false: the pruning scorer reads attention with the weights alone; or the export leaves the
    activations to the runtime's kernel, ``weights.activations == "runtime"``)."""
    if m.wspec.bits not in (4, 8):
        raise QavtpError(f"{name}: {m.wspec.bits}-bit weights cannot be exported (ONNX has 4- and 8-bit types)")
    if m.aspec is not None and act and weights.exact:
        x = fake_quant(g, x, m.aspec, m.in_features, qdq_ops=weights.ort)
    block = check_group_size(m.in_features, m.wspec.group_size)
    if weights.ort and m.wspec.bits == 4:
        if nbits_block_ok(block):
            return _bias(g, _matmul_nbits(g, x, m, name, weights.accuracy_level), m.bias, name)
        warnings.warn(
            f"{name}: weight group {block} is not a power of two in 16..256, which MatMulNBits needs; "
            "this layer falls back to DequantizeLinear + MatMul",
            stacklevel=2,
        )
    return _bias(g, g.op("MatMul", x, _qdq_weight(g, m, name)), m.bias, name)


def quant_gather(g: Graph, ids: str, m: QuantEmbedding, name: str) -> str:
    """``embedding(ids)`` of a quantized embedding in standard ops: gather the looked-up rows' codes, scales (and
    zero points) and dequantize only those rows. 4-bit codes stay packed two per byte in the file (low nibble
    first, as :func:`pack_int4`) and are unpacked with integer ops; ``(code - zero) * scale`` in float32 as torch."""
    spec = m.wspec
    dim = m.qweight.shape[1]
    gs = check_group_size(dim, spec.group_size)
    if spec.bits == 4:
        packed = g.op(
            "Gather", g.weight(f"{name}.qweight_packed", Tensor.from_numpy(pack_int4(m.qweight).numpy())), ids
        )
        lo = g.op("BitwiseAnd", packed, g.const(15, np.uint8))
        # (packed - lo) / 16 divides exactly; OpenVINO 2026.4 rounds uint8 BitShift(RIGHT) and Div (9 >> 4 = 1).
        hi = g.op("Div", g.op("Sub", packed, lo), g.const(16, np.uint8))
        axis = g.const([-1], np.int64)
        nib = g.op("Concat", g.op("Unsqueeze", lo, axis), g.op("Unsqueeze", hi, axis), axis=-1)
        nib = g.op("Reshape", nib, g.const([0, 0, dim // gs, gs], np.int64))
        if spec.symmetric:  # two's complement nibble n holds (n ^ 8) - 8
            codes = g.op(
                "Sub",
                g.op("Cast", g.op("BitwiseXor", nib, g.const(8, np.uint8)), to=TensorProto.FLOAT),
                g.const(np.float32(8)),
            )
        else:
            codes = g.op("Cast", nib, to=TensorProto.FLOAT)
    else:
        codes8 = g.op("Gather", g.weight(f"{name}.qweight", _int_tensor(m.qweight, spec.symmetric, spec.bits)), ids)
        codes = g.op("Reshape", g.op("Cast", codes8, to=TensorProto.FLOAT), g.const([0, 0, dim // gs, gs], np.int64))
    last = g.const([-1], np.int64)
    if not spec.symmetric:
        zero = g.op("Gather", g.weight(f"{name}.zero", _int_tensor(m.zero, False, 8)), ids)
        codes = g.op("Sub", codes, g.op("Unsqueeze", g.op("Cast", zero, to=TensorProto.FLOAT), last))
    scale = g.op("Unsqueeze", g.op("Gather", g.weight(f"{name}.scale", np32(m.scale)), ids), last)
    return g.op("Reshape", g.op("Mul", codes, scale), g.const([0, 0, dim], np.int64))


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


def linear(g: Graph, x: str, m: nn.Module, name: str, weights: WeightFormat, act: bool = True) -> str:
    """Any linear the decoder holds: plain, quantized, or with an online Hadamard on its input. ``act=False``
    leaves out the activation quantizer."""
    if isinstance(m, OnlineHadamardLinear):
        # The torch module computes linear(x @ H): the rotation comes before the activation quantizer.
        return linear(g, hadamard(g, x, m.in_features), m.linear, f"{name}.linear", weights, act)
    if isinstance(m, QuantLinear):
        return quant_linear(g, x, m, name, weights, act)
    if isinstance(m, nn.Linear):
        return fp_linear(g, x, m, name)
    raise QavtpError(f"{name}: cannot export a {type(m).__name__} as a linear layer")

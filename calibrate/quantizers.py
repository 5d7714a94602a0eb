"""The single numeric spec of qavtp's quantizers: RTN and GPTQ weights, dynamic activation fake-quant, int4 packing.

The ONNX export reproduces these formulas bit for bit, so every step is spelled out and done in float32
in this exact order (``x`` a group of values, ``b`` the bit width, ``clip`` the spec's clip ratio):

Symmetric (signed codes, ``qmin = -2^(b-1)``, ``qmax = 2^(b-1) - 1``; b = 4 gives -8..7)::

    scale = (max|x| * clip) / qmax          # Mul, then Div
    scale = where(scale == 0, 1, scale)     # all-zero group: codes 0, output exactly 0, never NaN
    q     = clip(round(x / scale), qmin, qmax)
    x_hat = q * scale

Asymmetric (unsigned codes, ``qmin = 0``, ``qmax = 2^b - 1``)::

    lo    = min(min(x), 0) * clip           # the range always holds 0, so the zero point is an
    hi    = max(max(x), 0) * clip           # integer code in [0, qmax] (ONNX's uint zero_point)
    scale = (hi - lo) / qmax
    scale = where(scale == 0, 1, scale)
    zero  = clip(round(-lo / scale), 0, qmax)
    q     = clip(round(x / scale) + zero, 0, qmax)
    x_hat = (q - zero) * scale

``round`` is ``torch.round``: round half to even, the same as ONNX ``Round`` and ``QuantizeLinear``.
The division is a true division (not a multiplication by ``1 / scale``): the two differ in the last bit.
These are exactly ONNX ``QuantizeLinear`` / ``DequantizeLinear`` given ``scale`` and ``zero``.

Groups run along the last dimension (the input features of a ``[out, in]`` weight, the channels of an
activation); group size 0 or -1 means one group per row (per-channel weights, per-token activations).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from qavtp.errors import QavtpError

ALLOWED_BITS = (2, 3, 4, 8)

# Clip search candidates, as multiples of the spec's clip ratio. 1.0 comes first and a later candidate
# must be strictly better to win, so searching can never do worse than not searching.
CLIP_GRID = tuple(round(1.0 - 0.025 * k, 3) for k in range(21))  # 1.0, 0.975, ..., 0.5


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: bit width, symmetric or not, group size, clip ratio."""

    bits: int = 4
    symmetric: bool = True
    group_size: int = 0  # 0 or -1: the whole row is one group
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in ALLOWED_BITS:
            raise QavtpError(f"bits must be one of 2, 3, 4, 8, got {self.bits}")
        if not isinstance(self.symmetric, bool):
            raise QavtpError(f"symmetric must be true or false, got {self.symmetric!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < -1:
            raise QavtpError(f"group size must be a positive integer, 0 or -1 (whole row), got {self.group_size}")
        clip = self.clip_ratio
        if isinstance(clip, bool) or not isinstance(clip, int | float) or not 0.0 < clip <= 1.0:
            raise QavtpError(f"clip ratio must be in (0, 1], got {clip}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """int8 for signed codes, uint8 for unsigned ones (8-bit asymmetric codes reach 255)."""
        return torch.int8 if self.symmetric else torch.uint8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        unknown = sorted(set(d) - {"bits", "symmetric", "group_size", "clip_ratio"})
        if unknown:
            raise QavtpError(f"unknown quantization spec keys: {', '.join(unknown)}")
        return cls(**d)


def check_group_size(dim: int, group_size: int) -> int:
    """The effective group size along a dimension of size ``dim`` (``dim`` itself for 0 or -1)."""
    if dim <= 0:
        raise QavtpError(f"cannot quantize along an empty dimension (size {dim})")
    if group_size in (0, -1):
        return dim
    if group_size < -1:
        raise QavtpError(f"group size must be a positive integer, 0 or -1 (whole row), got {group_size}")
    if dim % group_size:
        raise QavtpError(f"group size {group_size} does not divide the dimension {dim}")
    return group_size


# ---------------------------------------------------------------------------------------------- core


def _params(x: Tensor, spec: QuantSpec, clip: float) -> tuple[Tensor, Tensor | None]:
    """Scale and (float) zero point of each group; ``x`` is float32 ``[..., g]``, outputs ``[..., 1]``."""
    if spec.symmetric:
        scale = x.abs().amax(dim=-1, keepdim=True) * clip / spec.qmax
        return torch.where(scale == 0, 1.0, scale), None
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0.0) * clip
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0.0) * clip
    scale = (hi - lo) / spec.qmax
    scale = torch.where(scale == 0, 1.0, scale)
    zero = torch.clamp(torch.round(-lo / scale), 0, spec.qmax)
    return scale, zero


def _quantize(x: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec) -> Tensor:
    """Integer codes as float32 (exact: they are small integers)."""
    q = torch.round(x / scale)
    if zero is not None:
        q = q + zero
    return torch.clamp(q, spec.qmin, spec.qmax)


def _dequantize(q: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    return (q - zero) * scale if zero is not None else q * scale


def _fake_quant(x: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec) -> Tensor:
    return _dequantize(_quantize(x, scale, zero, spec), scale, zero)


def _group_params(x: Tensor, spec: QuantSpec, clip_search: bool) -> tuple[Tensor, Tensor | None]:
    """Params of float32 groups ``[..., g]``; with ``clip_search`` each group picks the clip minimising its MSE."""
    if not clip_search:
        return _params(x, spec, spec.clip_ratio)
    best_scale, best_zero = _params(x, spec, spec.clip_ratio)
    best_err = (x - _fake_quant(x, best_scale, best_zero, spec)).square().sum(dim=-1, keepdim=True)
    for r in CLIP_GRID[1:]:
        scale, zero = _params(x, spec, spec.clip_ratio * r)
        err = (x - _fake_quant(x, scale, zero, spec)).square().sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _check_weight(w: Tensor) -> None:
    if w.dim() != 2:
        raise QavtpError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")


# -------------------------------------------------------------------------------------------- weights


def quantize_weight_rtn(w: Tensor, spec: QuantSpec, clip_search: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest quantization of a ``[out, in]`` weight in groups along ``in``.

    Returns ``(codes [out, in] int8/uint8, scale [out, n_groups] float32, zero [out, n_groups] uint8 or None)``.
    ``clip_search`` tries clip ratios ``spec.clip_ratio * r`` for r in 1.0..0.5 per group and keeps the one
    with the smallest ``||w - Q(w)||^2`` (AWQ / llm-compressor MSE search); the choice is baked into ``scale``.
    """
    _check_weight(w)
    out_f, in_f = w.shape
    g = check_group_size(in_f, spec.group_size)
    wg = w.detach().to(torch.float32).reshape(out_f, in_f // g, g)
    scale, zero = _group_params(wg, spec, clip_search)
    q = _quantize(wg, scale, zero, spec).reshape(out_f, in_f).to(spec.code_dtype)
    return q, scale.squeeze(-1), None if zero is None else zero.squeeze(-1).to(spec.code_dtype)


def dequantize_weight(
    q: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``(q - zero) * scale`` (or ``q * scale``) with each group's scale broadcast over its columns."""
    _check_weight(q)
    out_f, in_f = q.shape
    g = check_group_size(in_f, spec.group_size)
    if tuple(scale.shape) != (out_f, in_f // g):
        raise QavtpError(f"scale has shape {tuple(scale.shape)}, expected {(out_f, in_f // g)} for groups of {g}")
    if (zero is None) != spec.symmetric:
        raise QavtpError("a zero point is required for asymmetric weights and not allowed for symmetric ones")
    qg = q.to(torch.float32).reshape(out_f, in_f // g, g)
    z = None if zero is None else zero.to(torch.float32).unsqueeze(-1)
    return _dequantize(qg, scale.to(torch.float32).unsqueeze(-1), z).reshape(out_f, in_f).to(dtype)


class HessianAccumulator:
    """Accumulates GPTQ's ``H = 2/n * sum_t x_t x_t^T`` over the ``n`` input rows ``x_t`` of one linear layer."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None):
        # float64 by default: summing millions of outer products in float32 loses the small eigenvalues
        # that the Cholesky needs.
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n = 0

        self.cross: Tensor | None = None

    def _rows(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise QavtpError(f"Hessian expects inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        return x.detach().reshape(-1, self.in_features).to(device=self.sum.device, dtype=self.sum.dtype)

    def add(self, x: Tensor, reference: Tensor | None = None) -> None:
        """Add inputs of shape ``[..., in]``; every leading index is one row. ``reference``, the same rows as the
        floating-point model sees them, also accumulates ``C = 2/n * sum_t (r_t - x_t) x_t^T``
        (:func:`fp_aligned_weight`)."""
        rows = self._rows(x)
        self.sum.addmm_(rows.T, rows)
        self.n += rows.shape[0]
        if reference is not None:
            delta = self._rows(reference) - rows
            if self.cross is None:
                self.cross = torch.zeros_like(self.sum)
            self.cross.addmm_(delta.T, rows)

    def hessian(self) -> Tensor:
        if self.n == 0:
            raise QavtpError("no layer inputs were accumulated, so there is no Hessian for GPTQ")
        return self.sum * (2.0 / self.n)

    def cross_term(self) -> Tensor | None:
        return None if self.cross is None else self.cross * (2.0 / self.n)

    def attach(self, linear: nn.Module) -> RemovableHandle:
        """Record every input of ``linear`` from now on; call ``.remove()`` on the handle to stop."""
        return linear.register_forward_pre_hook(lambda _m, args: self.add(args[0]))


def fp_aligned_weight(w: Tensor, H: Tensor, C: Tensor, alpha: float = 1.0, percdamp: float = 0.01) -> Tensor:
    """The float weight that best maps the quantized model's inputs onto the floating-point model's outputs.

    With ``X`` the floating-point model's inputs to this linear and ``X~`` the quantized model's (rows are
    tokens), ``min_W' |X W^T - X~ W'^T|`` is solved by ``W' = W + W C H^-1`` where ``H = 2/n X~^T X~`` and
    ``C = 2/n (X - X~)^T X~``; ``|X W^T - X~ Q^T|^2 = |X~ (W' - Q)^T|^2 + const``, so GPTQ (or RTN) of ``W'``
    with ``H`` minimises the error against the floating-point outputs, which is GPTAQ's "asymmetric
    calibration". ``H`` is dampened as in GPTQ (a ridge); ``alpha`` scales the correction (0: plain ``W``).
    """
    H = H.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    # W C H^-1 = (H^-1 C^T W^T)^T, H symmetric positive definite.
    corr = torch.linalg.solve(H, C.to(H).T @ w.detach().to(H).T).T
    return (w.detach().to(torch.float64) + alpha * corr).to(w.dtype)


def gptq_quantize(
    w: Tensor,
    H: Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    clip_search: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """GPTQ (Frantar et al. 2022) of a ``[out, in]`` weight given the input Hessian ``H [in, in]``.

    Same outputs as :func:`quantize_weight_rtn`. The standard algorithm: dead input channels
    (``H[i, i] == 0``) get their weights zeroed (they never affect the output) and a unit diagonal;
    ``H`` is dampened by ``percdamp * mean(diag H)``; the upper Cholesky factor of ``H^-1`` drives
    column-by-column quantization with the error spread over the not-yet-quantized columns, lazily in
    blocks of ``block_size``.

    Group parameters: without ``act_order`` each group's scale is computed when its first column comes up,
    from the weights as updated by all earlier errors (the block size is rounded to a multiple of the group
    size so that a group never straddles two blocks, and every update has landed by then). With
    ``act_order`` (columns in order of decreasing ``H[i, i]``) the groups are "static": their parameters
    come from the original weights up front, so that groups stay contiguous along ``in`` (what ONNX blocked
    ``DequantizeLinear`` and ``MatMulNBits`` need) instead of needing a ``g_idx`` permutation.
    """
    _check_weight(w)
    out_f, in_f = w.shape
    if tuple(H.shape) != (in_f, in_f):
        raise QavtpError(f"Hessian has shape {tuple(H.shape)}, expected {(in_f, in_f)} for a weight of {(out_f, in_f)}")
    if block_size < 1:
        raise QavtpError(f"GPTQ block size must be positive, got {block_size}")
    if not percdamp > 0:
        raise QavtpError(f"GPTQ dampening must be positive, got {percdamp}")
    g = check_group_size(in_f, spec.group_size)
    n_groups = in_f // g

    W = w.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # One group per row behaves the same either way: its only start is column 0, before any update.
    static = act_order or n_groups == 1
    scale = torch.ones(out_f, n_groups, dtype=torch.float32, device=W.device)
    zero = None if spec.symmetric else torch.zeros_like(scale)
    if static:
        s, z = _group_params(W.reshape(out_f, n_groups, g), spec, clip_search)
        scale = s.squeeze(-1)
        zero = None if z is None else z.squeeze(-1)

    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm = torch.arange(in_f, device=W.device)
    group_of = (perm // g).tolist()  # group (in original order) of each permuted column

    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise QavtpError("the Hessian is not positive definite even after dampening; raise percdamp")
    # Upper Cholesky factor of H^-1: row i holds the updates that quantizing column i makes to columns > i.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)

    codes = torch.empty(out_f, in_f, dtype=torch.float32, device=W.device)
    block = block_size if static else max(block_size // g, 1) * g
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            k = group_of[i1 + i]
            if not static and (i1 + i) % g == 0:
                s, z = _group_params(W1[:, i : i + g].unsqueeze(1), spec, clip_search)
                scale[:, k] = s.reshape(-1)
                if zero is not None:
                    zero[:, k] = z.reshape(-1)
            s_col = scale[:, k]
            z_col = None if zero is None else zero[:, k]
            col = W1[:, i]
            q = _quantize(col, s_col, z_col, spec)
            codes[:, i1 + i] = q
            err = (col - _dequantize(q, s_col, z_col)) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(spec.code_dtype), scale, None if zero is None else zero.to(spec.code_dtype)


# ---------------------------------------------------------------------------------------- activations


class _StraightThrough(torch.autograd.Function):
    """The fake-quant values forward, the identity backward (the straight-through estimator).

    ``round`` has a zero gradient almost everywhere, so without this nothing upstream of a quantized
    activation (the projector, when ``calibrate.align`` tunes it) could learn through the quantized LLM.
    """

    @staticmethod
    def forward(ctx, x: Tensor, spec: QuantSpec) -> Tensor:  # noqa: ARG004
        return _fake_quant_activation(x, spec)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ARG004
        return grad, None


def fake_quant_activation(x: Tensor, spec: QuantSpec) -> Tensor:
    """Dynamic quantize-dequantize of each token (the last dimension), in groups of ``spec.group_size``.

    Computed in float32 and returned in ``x``'s dtype. A group of zeros stays exactly zero. When a gradient
    flows, it passes straight through (the forward values are the same).
    """
    if x.requires_grad and torch.is_grad_enabled():
        return _StraightThrough.apply(x, spec)
    return _fake_quant_activation(x, spec)


def _fake_quant_activation(x: Tensor, spec: QuantSpec) -> Tensor:
    d = x.shape[-1]
    g = check_group_size(d, spec.group_size)
    xg = x.to(torch.float32).reshape(*x.shape[:-1], d // g, g)
    scale, zero = _params(xg, spec, spec.clip_ratio)
    return _fake_quant(xg, scale, zero, spec).reshape(x.shape).to(x.dtype)


def quant_error(x: Tensor, spec: QuantSpec, relative: bool = True) -> Tensor:
    """Per-token quantization error ``||x - Q(x)||_2`` (divided by ``||x||_2`` if ``relative``); shape ``x.shape[:-1]``.

    An all-zero token has error 0.
    """
    xf = x.to(torch.float32)
    err = torch.linalg.vector_norm(xf - fake_quant_activation(xf, spec), dim=-1)
    if not relative:
        return err
    norm = torch.linalg.vector_norm(xf, dim=-1)
    return err / torch.where(norm == 0, 1.0, norm)


# -------------------------------------------------------------------------------------------- modules


class ActQuant(nn.Module):
    """A standalone dynamic activation quantizer (e.g. on the input of a matmul that is not a Linear)."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec

    def forward(self, x: Tensor) -> Tensor:
        return fake_quant_activation(x, self.spec)

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


class QuantWeight(nn.Module):
    """Integer weight codes, group scales and zero points as buffers (safetensors-friendly), with the
    dequantized ``weight`` as a non-persistent cache rebuilt after ``load_state_dict`` (it also keeps code
    that reads ``module.weight.dtype`` or ``.shape`` working). Rows are output channels or vocabulary entries;
    groups run along the columns."""

    def __init__(self, rows: int, cols: int, wspec: QuantSpec):
        super().__init__()
        g = check_group_size(cols, wspec.group_size)
        self.wspec = wspec
        self.register_buffer("qweight", torch.zeros(rows, cols, dtype=wspec.code_dtype))
        self.register_buffer("scale", torch.ones(rows, cols // g))
        zero = None if wspec.symmetric else torch.zeros(rows, cols // g, dtype=wspec.code_dtype)
        self.register_buffer("zero", zero)
        self.register_buffer("weight", torch.zeros(rows, cols), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh())

    @torch.no_grad()
    def set_codes(self, q: Tensor, scale: Tensor, zero: Tensor | None) -> None:
        self.qweight.copy_(q)
        self.scale.copy_(scale)
        if zero is not None:
            self.zero.copy_(zero)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the cached dequantized weight from codes, scale and zero point."""
        self.weight = dequantize_weight(self.qweight, self.scale, self.zero, self.wspec, dtype=self.scale.dtype)


class QuantLinear(QuantWeight):
    """``F.linear(Qa(x), dequant(codes, scale, zero), bias)``."""

    def __init__(
        self, in_features: int, out_features: int, wspec: QuantSpec, aspec: QuantSpec | None = None, bias: bool = True
    ):
        super().__init__(out_features, in_features, wspec)
        self.in_features, self.out_features = in_features, out_features
        self.aspec = aspec
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        wspec: QuantSpec,
        aspec: QuantSpec | None = None,
        method: str = "rtn",
        H: Tensor | None = None,
        clip_search: bool = False,
        **gptq_kwargs: Any,
    ) -> QuantLinear:
        """Quantize ``linear``'s weight with ``method`` ("rtn", or "gptq" which needs the input Hessian ``H``)."""
        if method == "rtn":
            q, scale, zero = quantize_weight_rtn(linear.weight, wspec, clip_search=clip_search)
        elif method == "gptq":
            if H is None:
                raise QavtpError("method 'gptq' needs the Hessian H of the layer's inputs")
            q, scale, zero = gptq_quantize(linear.weight, H, wspec, clip_search=clip_search, **gptq_kwargs)
        else:
            raise QavtpError(f"unknown weight quantization method {method!r}; use 'rtn' or 'gptq'")
        m = cls(linear.in_features, linear.out_features, wspec, aspec, bias=linear.bias is not None)
        m.to(linear.weight.device)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().to(torch.float32))
        m.set_codes(q, scale, zero)
        return m

    def forward(self, x: Tensor) -> Tensor:
        if self.aspec is not None:
            x = fake_quant_activation(x, self.aspec)
        return self.weights_only(x)

    def weights_only(self, x: Tensor) -> Tensor:
        """The layer without its activation quantizer: ``F.linear(x, dequant(W), b)``."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w={self.wspec}, a={self.aspec}"


class QuantEmbedding(QuantWeight):
    """A token embedding whose rows are weight codes: ``embedding(ids, dequant(codes, scale, zero))``.

    The rows are quantized like a linear layer's output channels (groups along the hidden size), so
    the exported graph gathers packed codes and dequantizes only the looked-up rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, wspec: QuantSpec, padding_idx: int | None = None):
        super().__init__(num_embeddings, embedding_dim, wspec)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, wspec: QuantSpec, clip_search: bool = False) -> QuantEmbedding:
        q, scale, zero = quantize_weight_rtn(emb.weight, wspec, clip_search=clip_search)
        m = cls(emb.num_embeddings, emb.embedding_dim, wspec, emb.padding_idx).to(emb.weight.device)
        m.set_codes(q, scale, zero)
        return m

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, w={self.wspec}"


# -------------------------------------------------------------------------------------------- packing


def pack_int4(q: Tensor) -> Tensor:
    """Pack 4-bit codes two per byte along the last dimension: even index in the low nibble, odd in the high.

    Signed codes (-8..7) are stored two's complement in the nibble, unsigned ones (0..15) as is: the layout
    of ONNX INT4/UINT4 and of onnxruntime ``MatMulNBits``. An odd last dimension is padded with a 0 code.
    Packing ``q.flatten()`` gives ONNX's raw layout of a whole tensor.
    """
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise QavtpError(f"int4 codes must be an integer tensor, got {q.dtype}")
    if q.numel():
        lo, hi = int(q.min()), int(q.max())
        if lo < -8 or hi > 15 or (lo < 0 and hi > 7):
            raise QavtpError(f"int4 codes must lie in -8..7 or 0..15, got {lo}..{hi}")
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    if nib.shape[-1] % 2:
        nib = F.pad(nib, (0, 1))
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: Tensor, signed: bool, n: int) -> Tensor:
    """Inverse of :func:`pack_int4`: the first ``n`` codes along the last dimension, int8 if ``signed`` else uint8."""
    if packed.dtype != torch.uint8:
        raise QavtpError(f"packed int4 data must be uint8, got {packed.dtype}")
    if n < 0 or math.ceil(n / 2) != packed.shape[-1]:
        raise QavtpError(f"cannot unpack {n} int4 codes from {packed.shape[-1]} bytes")
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]
    if not signed:
        return codes
    codes = codes.to(torch.int8)
    return torch.where(codes >= 8, codes - 16, codes)

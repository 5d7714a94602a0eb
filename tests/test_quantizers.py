"""The numeric spec in qavtp.calibrate.quantizers, on small random tensors with fixed seeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from qavtp.calibrate.quantizers import (
    ActQuant,
    HessianAccumulator,
    QuantLinear,
    QuantSpec,
    check_group_size,
    dequantize_weight,
    fake_quant_activation,
    fp_aligned_weight,
    gptq_quantize,
    pack_int4,
    quant_error,
    quantize_weight_rtn,
    unpack_int4,
)
from qavtp.errors import QavtpError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(out_f: int = 32, in_f: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=_gen(seed))


def _correlated_inputs(n: int = 512, in_f: int = 64, seed: int = 1) -> torch.Tensor:
    # A few latent factors mixed into all channels plus a little noise and uneven channel scales: the strong
    # off-diagonal Hessian that GPTQ exploits and RTN ignores.
    g = _gen(seed)
    z = torch.randn(n, 8, generator=g)
    mix = torch.randn(8, in_f, generator=g)
    scales = torch.rand(in_f, generator=g) * 3 + 0.2
    return (z @ mix + 0.1 * torch.randn(n, in_f, generator=g)) * scales


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().mean())


# -------------------------------------------------------------------------------------------- spec


@pytest.mark.parametrize("bits", [1, 5, 16, 0])
def test_bad_bits_rejected(bits):
    with pytest.raises(QavtpError, match=rf"^bits must be one of 2, 3, 4, 8, got {bits}$"):
        QuantSpec(bits=bits)


def test_bad_group_size_and_clip_rejected():
    with pytest.raises(QavtpError, match=r"^group size 7 does not divide the dimension 64$"):
        check_group_size(64, 7)
    with pytest.raises(QavtpError, match=r"^group size 48 does not divide the dimension 64$"):
        quantize_weight_rtn(_weight(), QuantSpec(bits=4, group_size=48))
    with pytest.raises(QavtpError, match=r"^group size 5 does not divide the dimension 64$"):
        fake_quant_activation(torch.randn(3, 64), QuantSpec(group_size=5))
    with pytest.raises(QavtpError, match="group size must be"):
        QuantSpec(group_size=-2)
    for clip in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(QavtpError, match="clip ratio must be in"):
            QuantSpec(clip_ratio=clip)
    assert check_group_size(64, 0) == 64 and check_group_size(64, -1) == 64 and check_group_size(64, 16) == 16


def test_spec_ranges_and_dict_round_trip():
    assert (QuantSpec(bits=4).qmin, QuantSpec(bits=4).qmax) == (-8, 7)
    assert (QuantSpec(bits=4, symmetric=False).qmin, QuantSpec(bits=4, symmetric=False).qmax) == (0, 15)
    assert QuantSpec(bits=8, symmetric=False).code_dtype == torch.uint8
    spec = QuantSpec(bits=3, symmetric=False, group_size=32, clip_ratio=0.9)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(QavtpError, match="unknown quantization spec keys: bogus"):
        QuantSpec.from_dict({"bits": 4, "bogus": 1})


# -------------------------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [0, 16])
def test_rtn_symmetric_codes_in_range_and_error_within_half_scale(bits, group_size):
    spec = QuantSpec(bits=bits, symmetric=True, group_size=group_size)
    w = _weight()
    q, scale, zero = quantize_weight_rtn(w, spec)
    assert zero is None and q.dtype == torch.int8
    assert scale.shape == (32, 64 // (group_size or 64))
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    assert torch.equal(q.float(), q.float().round())
    deq = dequantize_weight(q, scale, zero, spec)
    per_col_scale = scale.repeat_interleave(64 // scale.shape[1], dim=1)
    assert torch.all((w - deq).abs() <= per_col_scale / 2 * (1 + 1e-5))
    # scale = max|w| / qmax exactly, per group
    g = 64 // scale.shape[1]
    absmax = w.reshape(32, -1, g).abs().amax(-1)
    torch.testing.assert_close(scale, absmax / spec.qmax, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rtn_asymmetric_codes_zero_points_and_error(bits):
    spec = QuantSpec(bits=bits, symmetric=False, group_size=16)
    w = _weight() + 0.7  # off-centre, where a zero point matters
    q, scale, zero = quantize_weight_rtn(w, spec)
    assert q.dtype == torch.uint8 and zero is not None and zero.dtype == torch.uint8
    assert int(q.max()) <= 2**bits - 1 and int(zero.max()) <= 2**bits - 1
    deq = dequantize_weight(q, scale, zero, spec)
    assert torch.all((w - deq).abs() <= scale.repeat_interleave(16, dim=1) / 2 * (1 + 1e-5))


def test_rtn_uses_round_half_to_even():
    # max|w| = 7 gives scale 1, so w/scale hits the .5 ties exactly.
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 7.0, 3.5]])
    q, scale, _ = quantize_weight_rtn(w, QuantSpec(bits=4))
    assert float(scale) == 1.0
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 7, 4]]


def test_8bit_error_much_smaller_than_4bit():
    w = _weight()
    errs = {}
    for bits in (4, 8):
        spec = QuantSpec(bits=bits, group_size=16)
        errs[bits] = _mse(w, dequantize_weight(*quantize_weight_rtn(w, spec), spec))
    # Step size shrinks 127/7 ≈ 18x, so MSE shrinks ≈ 330x; demand at least 100x.
    assert errs[8] * 100 < errs[4]


def test_zero_rows_and_groups_give_zeros_not_nan():
    w = _weight()
    w[3] = 0.0
    w[5, 16:32] = 0.0
    for spec in (QuantSpec(bits=4, group_size=16), QuantSpec(bits=4, symmetric=False, group_size=16)):
        for clip_search in (False, True):
            q, scale, zero = quantize_weight_rtn(w, spec, clip_search=clip_search)
            deq = dequantize_weight(q, scale, zero, spec)
            assert torch.isfinite(scale).all() and torch.isfinite(deq).all()
            assert torch.all(deq[3] == 0) and torch.all(deq[5, 16:32] == 0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_worse_than_no_clip(symmetric):
    # Heavy tails: one large weight per group makes max-scaling wasteful, so clipping should help somewhere.
    w = _weight() * (1 + 5 * (torch.rand(32, 64, generator=_gen(3)) > 0.97))
    spec = QuantSpec(bits=4, symmetric=symmetric, group_size=16)
    q0, s0, z0 = quantize_weight_rtn(w, spec)
    q1, s1, z1 = quantize_weight_rtn(w, spec, clip_search=True)
    e0 = (w - dequantize_weight(q0, s0, z0, spec)).square().reshape(32, 4, 16).sum(-1)
    e1 = (w - dequantize_weight(q1, s1, z1, spec)).square().reshape(32, 4, 16).sum(-1)
    assert torch.all(e1 <= e0)  # per group, not just on average
    assert (e1 < e0).sum() >= 10 and e1.sum() < e0.sum()


# -------------------------------------------------------------------------------------------- GPTQ


def test_hessian_accumulator_matches_formula_and_hook():
    x = torch.randn(2, 5, 8, generator=_gen(4))
    acc = HessianAccumulator(8)
    acc.add(x[0])
    acc.add(x[1])
    rows = x.reshape(-1, 8).double()
    torch.testing.assert_close(acc.hessian(), 2.0 / 10 * rows.T @ rows)
    lin = nn.Linear(8, 3)
    hooked = HessianAccumulator(8)
    handle = hooked.attach(lin)
    lin(x)
    handle.remove()
    lin(x)  # not recorded after remove()
    assert hooked.n == 10
    torch.testing.assert_close(hooked.hessian(), acc.hessian())
    with pytest.raises(QavtpError, match="no layer inputs"):
        HessianAccumulator(8).hessian()
    with pytest.raises(QavtpError, match="expects inputs with 8 features"):
        acc.add(torch.randn(3, 7))


@pytest.mark.parametrize("group_size", [0, 16])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_output_reconstruction(group_size, act_order, symmetric):
    x = _correlated_inputs()
    w = _weight()
    acc = HessianAccumulator(64)
    acc.add(x)
    spec = QuantSpec(bits=4, symmetric=symmetric, group_size=group_size)
    ref = x @ w.T
    rtn = dequantize_weight(*quantize_weight_rtn(w, spec), spec)
    q, scale, zero = gptq_quantize(w, acc.hessian(), spec, block_size=32, act_order=act_order)
    assert q.dtype == spec.code_dtype and scale.shape == rtn.shape[:1] + (64 // (group_size or 64),)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    gptq = dequantize_weight(q, scale, zero, spec)
    err_rtn = torch.linalg.norm(ref - x @ rtn.T)
    err_gptq = torch.linalg.norm(ref - x @ gptq.T)
    assert err_gptq < 0.7 * err_rtn, (float(err_gptq), float(err_rtn))


def _reference_gptq(w, H, blocksize=32, percdamp=0.01, actorder=False):
    """A literal transliteration of GPTQ's fasterquant (IST-DASLab/gptq), per-channel symmetric 4 bits."""
    d = w.shape[1]
    W, H = w.clone().float(), H.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale = W.abs().amax(1, keepdim=True) / 7
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    H[range(d), range(d)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            q = (torch.clamp(torch.round(col.unsqueeze(1) / scale), -8, 7) * scale).flatten()
            Q1[:, i] = q
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q[:, torch.argsort(perm)] if actorder else Q


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_per_channel_is_bit_identical_to_reference(act_order):
    x = _correlated_inputs(in_f=96)
    x[:, 7] = 0.0
    acc = HessianAccumulator(96)
    acc.add(x)
    w = torch.randn(40, 96, generator=_gen(11))
    spec = QuantSpec(bits=4)
    ours = dequantize_weight(*gptq_quantize(w, acc.hessian(), spec, block_size=32, act_order=act_order), spec)
    assert torch.equal(ours, _reference_gptq(w, acc.hessian(), actorder=act_order))


def test_gptq_handles_dead_input_channels():
    x = _correlated_inputs()
    x[:, [3, 40]] = 0.0
    w = _weight()
    acc = HessianAccumulator(64)
    acc.add(x)
    spec = QuantSpec(bits=4, group_size=16)
    q, scale, zero = gptq_quantize(w, acc.hessian(), spec, block_size=32)
    deq = dequantize_weight(q, scale, zero, spec)
    assert torch.isfinite(deq).all()
    assert torch.all(deq[:, [3, 40]] == 0)  # never seen by the output, so not worth a quantization level
    rtn = dequantize_weight(*quantize_weight_rtn(w, spec), spec)
    assert torch.linalg.norm(x @ (w - deq).T) < torch.linalg.norm(x @ (w - rtn).T)


def test_gptq_group_larger_than_block_and_bad_inputs():
    x = _correlated_inputs()
    acc = HessianAccumulator(64)
    acc.add(x)
    spec = QuantSpec(bits=4, group_size=32)
    a = gptq_quantize(_weight(), acc.hessian(), spec, block_size=8)  # rounded up to whole groups
    b = gptq_quantize(_weight(), acc.hessian(), spec, block_size=32)
    # Lazy block updates are an exact reordering of the same arithmetic up to float rounding.
    assert (a[0] != b[0]).float().mean() < 0.02
    with pytest.raises(QavtpError, match="Hessian has shape"):
        gptq_quantize(_weight(), torch.eye(32), spec)
    with pytest.raises(QavtpError, match="weight must be 2-D"):
        gptq_quantize(torch.randn(64), torch.eye(64), spec)


# ------------------------------------------------------------------------------------- activations


def test_activation_fake_quant_formula_exact():
    x = torch.randn(3, 5, 32, generator=_gen(5))
    spec = QuantSpec(bits=4, group_size=8, clip_ratio=0.9)
    xg = x.reshape(3, 5, 4, 8)
    s = xg.abs().amax(-1, keepdim=True) * 0.9 / 7
    expected = (torch.clamp(torch.round(xg / s), -8, 7) * s).reshape(x.shape)
    assert torch.equal(fake_quant_activation(x, spec), expected)
    # asymmetric: min/max per token including 0
    aspec = QuantSpec(bits=4, symmetric=False)
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 15
    z = torch.clamp(torch.round(-lo / s), 0, 15)
    expected = (torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s
    assert torch.equal(fake_quant_activation(x, aspec), expected)


def test_activation_outlier_channel_hurts_per_token_far_more_than_per_group():
    x = torch.randn(16, 128, generator=_gen(6))
    x[:, 5] = 1000.0  # a massive-activation channel, as in SmolLM2's channel 507
    per_token = QuantSpec(bits=4, group_size=0)
    per_group = QuantSpec(bits=4, group_size=8)
    rest = torch.ones(128, dtype=torch.bool)
    rest[5] = False

    def err_on_rest(spec):
        xh = fake_quant_activation(x, spec)
        return torch.linalg.norm((x - xh)[:, rest], dim=-1) / torch.linalg.norm(x[:, rest], dim=-1)

    # Per token the outlier sets a step of 1000/7 and every other channel rounds to 0: error 100 %.
    # Per group of 8 only the outlier's 7 neighbours are lost: error ≈ sqrt(7/127) ≈ 0.25.
    torch.testing.assert_close(err_on_rest(per_token), torch.ones(16))
    assert torch.all(err_on_rest(per_token) > 2.5 * err_on_rest(per_group))
    assert torch.all(quant_error(x, per_token, relative=False) > 2.5 * quant_error(x, per_group, relative=False))
    # Even 8 bits per token (step 1000/127 ≈ 7.9) lose most of the rest: worse than 4 bits in groups of 8.
    assert torch.all(err_on_rest(QuantSpec(bits=8)) > 2 * err_on_rest(per_group))


def test_activation_zero_tokens_and_dtypes():
    x = torch.randn(4, 32, generator=_gen(7))
    x[1] = 0.0
    x[2, :8] = 0.0
    for spec in (QuantSpec(bits=4, group_size=8), QuantSpec(bits=4, symmetric=False, group_size=8)):
        xh = fake_quant_activation(x, spec)
        assert torch.isfinite(xh).all() and torch.all(xh[1] == 0) and torch.all(xh[2, :8] == 0)
        e = quant_error(x, spec)
        assert e.shape == (4,) and torch.isfinite(e).all() and float(e[1]) == 0.0
        assert torch.all(e < 0.5)
    xb = x.to(torch.bfloat16)
    assert fake_quant_activation(xb, QuantSpec(bits=4)).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quant_linear_matches_formula_and_survives_safetensors(tmp_path, method, symmetric):
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    wspec = QuantSpec(bits=4, symmetric=symmetric, group_size=16)
    aspec = QuantSpec(bits=4, group_size=32, clip_ratio=0.9)
    H = None
    if method == "gptq":
        acc = HessianAccumulator(64)
        acc.add(_correlated_inputs())
        H = acc.hessian()
    ql = QuantLinear.from_linear(lin, wspec, aspec, method=method, H=H)
    x = torch.randn(2, 7, 64, generator=_gen(8))
    w = dequantize_weight(ql.qweight, ql.scale, ql.zero, wspec)
    expected = F.linear(fake_quant_activation(x, aspec), w, lin.bias.detach())
    assert torch.equal(ql(x), expected)
    assert torch.equal(ActQuant(aspec)(x), fake_quant_activation(x, aspec))

    sd = ql.state_dict()
    assert "weight" not in sd and sd["qweight"].dtype == wspec.code_dtype
    save_file(sd, tmp_path / "q.safetensors")
    fresh = QuantLinear(64, 24, wspec, aspec)
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"))
    assert torch.equal(fresh(x), expected)


def test_quant_linear_without_bias_or_act_quant_and_bad_method():
    lin = nn.Linear(32, 8, bias=False)
    spec = QuantSpec(bits=8)
    ql = QuantLinear.from_linear(lin, spec)
    x = torch.randn(5, 32, generator=_gen(9))
    assert ql.bias is None
    assert torch.equal(ql(x), F.linear(x, dequantize_weight(*quantize_weight_rtn(lin.weight, spec), spec)))
    with pytest.raises(QavtpError, match="unknown weight quantization method 'awq'"):
        QuantLinear.from_linear(lin, spec, method="awq")
    with pytest.raises(QavtpError, match="needs the Hessian"):
        QuantLinear.from_linear(lin, spec, method="gptq")


# ----------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("n", [1, 2, 7, 64, 129])
def test_pack_unpack_int4_round_trip(n):
    g = _gen(n)
    signed = torch.randint(-8, 8, (3, n), generator=g, dtype=torch.int8)
    unsigned = torch.randint(0, 16, (3, n), generator=g, dtype=torch.uint8)
    for codes, is_signed in ((signed, True), (unsigned, False)):
        packed = pack_int4(codes)
        assert packed.dtype == torch.uint8 and packed.shape == (3, (n + 1) // 2)
        out = unpack_int4(packed, signed=is_signed, n=n)
        assert out.dtype == codes.dtype and torch.equal(out, codes)


def test_pack_int4_layout_low_nibble_first_twos_complement():
    packed = pack_int4(torch.tensor([1, 2, -1, 7, -8], dtype=torch.int8))
    assert packed.tolist() == [0x21, 0x7F, 0x08]
    assert pack_int4(torch.tensor([15, 0, 9], dtype=torch.uint8)).tolist() == [0x0F, 0x09]
    with pytest.raises(QavtpError, match="int4 codes must lie in"):
        pack_int4(torch.tensor([-1, 9]))
    with pytest.raises(QavtpError, match="int4 codes must lie in"):
        pack_int4(torch.tensor([16]))
    with pytest.raises(QavtpError, match="cannot unpack 5 int4 codes from 2 bytes"):
        unpack_int4(torch.zeros(2, dtype=torch.uint8), signed=True, n=5)


def test_fp_aligned_weight_maps_quantized_inputs_onto_float_outputs():
    """``W'`` from the accumulated ``H`` and ``C`` is the least-squares map from ``X~`` to ``X W^T``."""
    g = torch.Generator().manual_seed(0)
    n, d, out = 4000, 32, 8
    x = torch.randn(n, d, generator=g)
    drift = torch.eye(d) + 0.2 * torch.randn(d, d, generator=g)  # the quantized model's inputs drift away
    x_tilde = x @ drift + 0.05 * torch.randn(n, d, generator=g)
    w = torch.randn(out, d, generator=g)
    acc = HessianAccumulator(d)
    for rows, ref in zip(x_tilde.split(1000), x.split(1000), strict=True):
        acc.add(rows, ref)
    aligned = fp_aligned_weight(w, acc.hessian(), acc.cross_term(), percdamp=1e-9)
    lstsq = torch.linalg.lstsq(x_tilde.double(), (x @ w.T).double()).solution.T
    torch.testing.assert_close(aligned.double(), lstsq, rtol=1e-4, atol=1e-4)
    target = x @ w.T
    assert (x_tilde @ aligned.T - target).norm() < 0.2 * (x_tilde @ w.T - target).norm()
    torch.testing.assert_close(fp_aligned_weight(w, acc.hessian(), acc.cross_term(), alpha=0.0), w)


def test_activation_fake_quant_passes_gradients_straight_through():
    torch.manual_seed(0)
    x = torch.randn(3, 32, requires_grad=True)
    spec = QuantSpec(4, False, 16)
    y = fake_quant_activation(x, spec)
    assert torch.equal(y, fake_quant_activation(x.detach(), spec))  # same values with and without autograd
    (y * torch.arange(32.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(32.0).expand(3, 32))  # round() alone would give zeros

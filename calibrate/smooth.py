"""SmoothQuant: move activation outliers into the weights with per-channel scales folded into RMSNorms.

For a norm feeding linears, ``X W^T = (X / s) (W s)^T``: dividing the norm's weight by ``s`` and
multiplying each linear's input columns by ``s`` keeps the function while flattening the
activation channels that quantization clips worst.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from qavtp.calibrate.rotation import norm_groups
from qavtp.calibrate.stats import capture_layer_inputs, observe_layer, run_layer
from qavtp.device import visiting
from qavtp.errors import QavtpError
from qavtp.models.base import Adapter


@torch.no_grad()
def smooth_layer(
    norm: nn.Module, linears: Iterable[nn.Linear], act_absmax: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """Fold ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` into ``norm`` and ``linears``; returns ``s``.

    ``act_absmax`` is the per-channel absmax of the norm's output (the linears' common input) and
    ``max|W_j|`` is taken over all the linears' input column ``j``.
    """
    linears = list(linears)
    if not linears:
        raise QavtpError("smooth_layer needs at least one linear")
    if not 0.0 <= alpha <= 1.0:
        raise QavtpError(f"SmoothQuant alpha must lie in [0, 1], got {alpha}")
    n = norm.weight.shape[0]
    if act_absmax.shape != (n,) or any(lin.in_features != n for lin in linears):
        raise QavtpError(
            f"smoothing shapes disagree: norm {n}, activation stats {tuple(act_absmax.shape)}, "
            f"linears {[lin.in_features for lin in linears]}"
        )
    dev = norm.weight.device
    w_max = torch.stack([lin.weight.detach().double().abs().amax(0).to(dev) for lin in linears]).amax(0)
    x_max = act_absmax.detach().double().to(dev)
    # Clamps as in the SmoothQuant reference: a dead channel or an all-zero weight column would
    # otherwise give a zero or infinite scale.
    s = (x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
    norm.weight.copy_((norm.weight.double() / s).to(norm.weight.dtype))
    for lin in linears:
        sl = s.to(lin.weight.device)
        lin.weight.copy_((lin.weight.double() * sl[None, :]).to(lin.weight.dtype))
    return s.float()


def smooth_model(adapter: Adapter, act_absmax: Mapping[str, torch.Tensor], alpha: float = 0.5) -> dict:
    """Smooth (input_layernorm -> q, k, v) and (post_attention_layernorm -> gate, up) in every layer.

    ``act_absmax`` maps linear names (``layers.3.self_attn.q_proj``) to their input's per-channel
    absmax, as :func:`collect_input_absmax` returns. Returns the scales by norm name.
    On a rotated model this still preserves the function (the norms there have unit weights and
    still feed only these linears); smoothing before :func:`rotate_model` would be folded away by
    its norm fusion.
    """
    scales = {}
    for norm_name, norm, linears in norm_groups(adapter):
        stats = [act_absmax[n] for n in linears if n in act_absmax]
        if not stats:
            raise QavtpError(f"no activation statistics for the linears after {norm_name} (e.g. {next(iter(linears))})")
        # q/k/v (and gate/up) read the same tensor; their stats agree, the max guards against partial stats.
        x_max = torch.stack([t.detach().float().cpu() for t in stats]).amax(0)
        scales[norm_name] = smooth_layer(norm, linears.values(), x_max, alpha)
    return scales


@torch.no_grad()
def collect_input_absmax(
    adapter: Adapter, batches: Iterable[Mapping], device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Per-input-channel absmax of every ``nn.Linear`` in the decoder layers, over all real tokens.

    ``batches`` yields keyword arguments for the model's forward (e.g. ``qavtp.prompting.encode``
    output); padding positions are skipped. Layer by layer, with the same machinery as the
    calibration statistics (and, with ``device``, the same offload).
    """
    inputs = capture_layer_inputs(adapter, batches, device)
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(adapter.decoder_layers):
        with visiting(layer, device):
            stats, _ = observe_layer(layer, f"layers.{i}", inputs)
            out.update({name: st.channel_absmax.cpu() for name, st in stats.items()})
            inputs = run_layer(layer, inputs)
    return out

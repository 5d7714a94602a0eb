"""Calibration statistics, collected layer by layer.

The decoder layers are visited one at a time: the inputs of layer i are held in memory, layer i is
observed (and then quantized by the caller), and its outputs become the inputs of layer i+1.  Peak
memory is one layer's activations for the calibration set plus the model, which is what lets a
7B/13B model calibrate on one GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from qavtp.calibrate.quantizers import HessianAccumulator
from qavtp.device import shell_visiting, to_device
from qavtp.errors import QavtpError
from qavtp.models.capture import capture_inputs

# Decoder-layer keyword arguments that stay the same from layer to layer.
_LAYER_KWARGS = ("attention_mask", "position_embeddings", "position_ids")
PERCENTILES = (50.0, 99.0, 99.9, 100.0)
_SAMPLE = 65536  # |x| values kept per linear for percentiles


@dataclass
class LayerInput:
    hidden: torch.Tensor
    kwargs: dict
    mask: torch.Tensor | None = None  # [B, L] real (non-padding) tokens


@torch.no_grad()
def capture_layer_inputs(adapter, batches: Iterable[dict], device: torch.device | None = None) -> list[LayerInput]:
    """The hidden states (and mask/positions) entering decoder layer 0, one entry per batch.

    With ``device`` (:mod:`qavtp.device`) they are computed and kept there.
    """
    captured: list[LayerInput] = []
    with shell_visiting(adapter, device):
        for batch in batches:
            batch = to_device(batch, device)
            hidden, kwargs = capture_inputs(lambda b=batch: adapter.model(**b), adapter.decoder_layers[0])
            mask = batch.get("attention_mask")
            keep = {k: kwargs[k] for k in _LAYER_KWARGS if k in kwargs}
            captured.append(LayerInput(hidden.detach(), keep, mask.bool() if mask is not None else None))
    if not captured:
        raise QavtpError("the calibration set is empty")
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    out = []
    for x in inputs:
        y = layer(x.hidden, **x.kwargs)
        y = y[0] if isinstance(y, tuple) else y
        out.append(LayerInput(y, x.kwargs, x.mask))
    return out


@dataclass
class InputStats:
    """What one linear layer's input looked like over the calibration set."""

    channel_absmax: torch.Tensor | None = None
    token_absmax: list[torch.Tensor] = field(default_factory=list)
    sample: list[torch.Tensor] = field(default_factory=list)
    n_tokens: int = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None, name: str) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        if mask is not None:
            x = x[mask.reshape(-1)]
        if not torch.isfinite(x).all():
            raise QavtpError(f"non-finite activations at the input of {name} during calibration")
        a = x.abs()
        cmax = a.amax(0)
        self.channel_absmax = cmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, cmax)
        self.token_absmax.append(a.amax(1))
        flat = a.reshape(-1)
        step = max(1, flat.numel() // (_SAMPLE // 8))
        self.sample.append(flat[::step].clone())  # a strided view would keep all of ``a`` alive until summary()
        self.n_tokens += x.shape[0]

    def summary(self) -> dict:
        tok = torch.cat(self.token_absmax)
        vals = torch.cat(self.sample)
        q = torch.quantile(vals[: 2**24], torch.tensor([p / 100 for p in PERCENTILES], device=vals.device))
        cm = self.channel_absmax
        return {
            "tokens": self.n_tokens,
            "absmax": float(cm.max()),
            "argmax_channel": int(cm.argmax()),
            "channel_absmax_median": float(cm.median()),
            "outlier_ratio": float(cm.max() / cm.median().clamp_min(1e-12)),
            "token_absmax_median": float(tok.median()),
            "token_absmax_max": float(tok.max()),
            "percentiles": {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, q, strict=True)},
        }


@torch.no_grad()
def observe_vision(adapter, batches: Iterable[dict]) -> dict[str, dict]:
    """Input statistics of every linear of the vision tower and the projector (``qavtp calibrate --vision-stats``).

    They stay in floating point; the summaries show what quantizing them would face. Each distinct batch of
    pixels runs once through ``adapter.visual_tokens``; every patch (and [CLS]) token counts.
    """
    model = adapter.model
    skip = {id(m) for m in adapter.language_model.modules()} | {id(adapter.lm_head)}
    stats: dict[str, InputStats] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and id(mod) not in skip:
            stats[name] = InputStats()

            def hook(_mod, args, name=name):
                stats[name].add(args[0], None, name)

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            if batch.get("pixel_values") is not None:
                adapter.visual_tokens(batch["pixel_values"])
    finally:
        for h in handles:
            h.remove()
    return {n: st.summary() for n, st in stats.items() if st.n_tokens}


def linear_modules(layer: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            yield name, mod


@torch.no_grad()
def observe_layer(
    layer: nn.Module,
    prefix: str,
    inputs: list[LayerInput],
    hessians: bool = False,
    names: Collection[str] | None = None,
    act_quant: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    reference: tuple[nn.Module, list[LayerInput]] | None = None,
) -> tuple[dict[str, InputStats], dict[str, HessianAccumulator]]:
    """Statistics (and GPTQ Hessians) of the inputs of ``layer``'s linears (those in ``names``, else every
    ``nn.Linear``), over ``inputs``.

    Padding positions are excluded, so statistics do not depend on how batches were padded. ``act_quant`` maps
    a linear's full name to the activation quantizer its Hessian should see (the deployed input); the
    statistics always describe the unquantized input. ``reference`` is the same layer in floating point and its
    inputs in the floating-point model, batch for batch: the Hessians then also accumulate the cross term of
    :func:`qavtp.calibrate.quantizers.fp_aligned_weight`.
    """
    stats: dict[str, InputStats] = {}
    hess: dict[str, HessianAccumulator] = {}
    current_mask: list[torch.Tensor | None] = [None]
    handles = []
    for name, lin in linear_modules(layer):
        if names is not None and name not in names:
            continue
        full = f"{prefix}.{name}"
        stats[full] = InputStats()
        if hessians:
            hess[full] = HessianAccumulator(lin.in_features, device=lin.weight.device)

        def hook(mod, args, full=full):
            x = args[0]
            m = current_mask[0]
            stats[full].add(x, m, full)
            if full in hess:
                q = act_quant.get(full) if act_quant else None
                xq = q(x) if q is not None else x
                hess[full].add(_real_rows(xq, m), fp_rows.pop(full, None))

        handles.append(lin.register_forward_pre_hook(hook))
    fp_rows: dict[str, torch.Tensor] = {}  # the reference layer's inputs for the current batch
    ref_layer, ref_inputs = reference if reference is not None else (None, None)
    if ref_layer is not None:
        for name, lin in linear_modules(ref_layer):
            full = f"{prefix}.{name}"
            if full in hess:

                def ref_hook(mod, args, full=full):
                    fp_rows[full] = _real_rows(args[0], current_mask[0])

                handles.append(lin.register_forward_pre_hook(ref_hook))
    try:
        for j, x in enumerate(inputs):
            current_mask[0] = x.mask
            if ref_layer is not None:
                r = ref_inputs[j]
                ref_layer(r.hidden, **r.kwargs)
            layer(x.hidden, **x.kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats, hess


def _real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x[mask.reshape(-1)] if mask is not None else x

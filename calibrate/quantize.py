"""W4A4 calibration of a multimodal model's LLM: transform, then quantize layer by layer."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from qavtp.calibrate.quantizers import (
    QuantLinear,
    QuantSpec,
    check_group_size,
    fake_quant_activation,
    fp_aligned_weight,
)
from qavtp.calibrate.rotation import rotate_model
from qavtp.calibrate.smooth import collect_input_absmax, smooth_model
from qavtp.calibrate.stats import capture_layer_inputs, linear_modules, observe_layer, run_layer
from qavtp.config import ConfigError, QuantConfig
from qavtp.device import visiting
from qavtp.errors import QavtpError
from qavtp.prompting import encode

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_a8(text: str | None, n_layers: int) -> tuple[set[str], set[int]]:
    """``--a8``: projection names and layers (``7`` or ``0-4``), comma-separated, whose linears keep 8-bit inputs."""
    names: set[str] = set()
    layers: set[int] = set()
    for term in (t.strip() for t in (text or "").split(",")):
        if not term:
            continue
        if term in PROJECTIONS:
            names.add(term)
            continue
        lo, sep, hi = term.partition("-")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise ConfigError(
                "quant.a8",
                f"term {term!r} is neither a projection ({', '.join(PROJECTIONS)}) nor a layer range like 0-4",
            )
        first, last = int(lo), int(hi) if sep else int(lo)
        if not first <= last < n_layers:
            raise ConfigError("quant.a8", f"layers {term} are not within the model's layers 0-{n_layers - 1}")
        layers.update(range(first, last + 1))
    return names, layers


def act_spec_for(full: str, aspec: QuantSpec | None, a8: tuple[set[str], set[int]] | None) -> QuantSpec | None:
    """The activation quantizer of decoder linear ``full`` (``layers.3.mlp.up_proj``): ``aspec``, or the same
    scheme at 8 bits where ``a8`` selects it by projection name or by layer."""
    if aspec is None or not a8 or aspec.bits >= 8:
        return aspec
    names, layers = a8
    parts = full.split(".")
    if names.intersection(parts) or int(parts[1]) in layers:  # down_proj's linear sits in an online-Hadamard wrapper
        return replace(aspec, bits=8)
    return aspec


# The order in which a decoder layer's linears feed one another: QuaRot's and GPTQ's "true sequential" order.
SEQUENTIAL = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def sequential_groups(names: Iterable[str]) -> list[list[str]]:
    """``names`` (``self_attn.q_proj``, ``mlp.down_proj.linear``, ...) grouped in :data:`SEQUENTIAL` order;
    a linear of no known projection comes last, alone."""
    names = list(names)
    groups = [[n for n in names if set(n.split(".")) & set(g)] for g in SEQUENTIAL]
    known = {n for g in groups for n in g}
    return [g for g in groups if g] + [[n] for n in names if n not in known]


def calibration_batches(processor, dataset, batch_size: int = 8) -> list[dict]:
    """Prompt + answer sequences, as the model sees them in a conversation."""
    if len(dataset) == 0:
        raise QavtpError("the calibration set is empty")
    tok = processor.tokenizer
    batches = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        answers = [tok(a, add_special_tokens=False).input_ids for a in rows["answer"]]
        batches.append(dict(encode(processor, rows["image"], rows["prompt"], answers)))
    return batches


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def quant_specs(quant: QuantConfig, adapter) -> tuple[QuantSpec, QuantSpec | None]:
    """The weight and activation quantizers ``quant`` asks for on ``adapter``'s decoder linears.

    An automatic weight group is the largest of 128/64/32/16 that divides every input width; every width must
    split into whole groups of both quantizers, which is said before any work is done.
    """
    widths = sorted({lin.in_features for _, lin in linear_modules(adapter.decoder_layers[0])})
    group = quant.wgroup
    if group is None:
        group = next((g for g in (128, 64, 32, 16) if all(w % g == 0 for w in widths)), 0)
    wspec = QuantSpec(quant.wbits, quant.w_symmetric, group)
    aspec = None if quant.abits == 16 else QuantSpec(quant.abits, quant.a_symmetric, quant.agroup, quant.aclip)
    for spec, what in ((wspec, "weight"), (aspec, "activation")):
        for w in widths if spec is not None else ():
            try:
                check_group_size(w, spec.group_size)
            except QavtpError as e:
                raise QavtpError(f"{what} {e} (decoder linear input widths: {widths})") from None
    return wspec, aspec


@torch.no_grad()
def calibrate_model(
    adapter,
    batches: Sequence[dict],
    quant: QuantConfig,
    *,
    seed: int = 0,
    device=None,
    progress: bool = True,
    sink: Callable[[int, nn.Module], None] | None = None,
) -> dict:
    """Transform the LLM (``quant.method``), then quantize every decoder linear in place.

    Each layer is observed on the outputs of the already-quantized layers before it, so GPTQ and
    the statistics see the inputs the deployed model will see.  The LM head, the vision tower and
    the projector stay in floating point, as in QuaRot (``calibrate.vocab`` quantizes the embedding and
    the head afterwards, on request).  Returns the JSON-able record of what was
    done (transforms, per-linear input statistics) for the artifact. ``quant.a8`` (:func:`parse_a8`) keeps 8-bit
    inputs at the linears it selects (mixed precision); the record lists them under ``a8_linears``. With ``device``
    the model stays where it is and each decoder layer visits ``device`` for its work
    (:mod:`qavtp.device`). ``quant.sequential`` quantizes each layer's linears in :data:`SEQUENTIAL` order,
    each group observed (statistics, GPTQ Hessians on activation-quantized inputs) with the groups before it
    already quantized, as QuaRot's GPTQ does; otherwise one pass observes the whole float layer. ``fp_align`` > 0
    also carries the floating-point model's hidden states along and quantizes, instead of each float weight,
    the one that maps the quantized model's inputs onto the floating-point model's outputs
    (:func:`~qavtp.calibrate.quantizers.fp_aligned_weight`, scaled by ``fp_align``; GPTAQ's asymmetric calibration).
    ``sink(i, layer)`` receives each layer once it is quantized (a streamed model's layers are written by it:
    :class:`~qavtp.calibrate.artifact.LayerShards`).
    """
    if not batches:
        raise QavtpError("the calibration set is empty")
    wspec, aspec = quant_specs(quant, adapter)
    a8 = parse_a8(quant.a8, len(adapter.decoder_layers)) if quant.a8 else None
    record: dict = {"method": quant.method, "transforms": transform_model(adapter, batches, quant, seed, device)}
    inputs = capture_layer_inputs(adapter, batches, device)
    ref_inputs = inputs if quant.fp_align else None  # the floating-point stream: the same until layer 0 runs
    done = _Done()
    bar = tqdm(
        list(enumerate(adapter.decoder_layers)), desc="calibrating decoder layers", unit="layer", disable=not progress
    )
    for i, _ in bar:
        # A streamed model reads layer i from the checkpoint here and drops it after the sink has written it.
        with adapter.resident(i) as layer, visiting(layer, device):
            ref_layer = copy.deepcopy(layer) if quant.fp_align else None
            specs = {name: act_spec_for(f"layers.{i}.{name}", aspec, a8) for name, _ in linear_modules(layer)}
            _quantize_layer(layer, i, inputs, (ref_layer, ref_inputs), quant, wspec, specs, aspec, done)
            inputs = run_layer(layer, inputs)
            if ref_layer is not None:
                ref_inputs = run_layer(ref_layer, ref_inputs)
            if sink is not None:
                sink(i, layer)
            del ref_layer
    record["quantized"] = done.quantized
    if done.eight:
        record["a8_linears"] = done.eight
    record["stats"] = done.stats
    return record


def transform_model(adapter, batches: Sequence[dict], quant: QuantConfig, seed: int, device) -> dict:
    """SmoothQuant's scale migration or QuaRot's rotation (nothing for RTN); the record of what was done."""
    if quant.method == "smoothquant":
        absmax = collect_input_absmax(adapter, batches, device)
        scales = smooth_model(adapter, absmax, quant.smooth_alpha)
        return {"smooth": {"alpha": quant.smooth_alpha, "layers": sorted(scales)}}
    if quant.method == "quarot":
        return {"rotation": rotate_model(adapter, seed, quant.online_o_proj, device)}
    return {}


@dataclass
class _Done:
    """What the layer loop has quantized so far, for the record."""

    quantized: list[str] = field(default_factory=list)
    eight: list[str] = field(default_factory=list)
    stats: dict[str, dict] = field(default_factory=dict)


def _quantize_layer(layer, i: int, inputs, reference, quant: QuantConfig, wspec, specs, aspec, done: _Done) -> None:
    """Observe decoder layer ``i`` on ``inputs`` and replace its linears by quantized ones, group by group."""
    linears = dict(linear_modules(layer))
    fp_align = quant.fp_align
    for group in sequential_groups(linears) if quant.sequential else [list(linears)]:
        # Sequential: each group's Hessians see the deployed inputs, i.e. the earlier groups already
        # quantized and this group's own activation quantizer applied.
        act = (
            {f"layers.{i}.{n}": partial(fake_quant_activation, spec=specs[n]) for n in group if specs[n]}
            if quant.sequential
            else None
        )
        stats, hess = observe_layer(
            layer,
            f"layers.{i}",
            inputs,
            hessians=quant.gptq or bool(fp_align),
            names=group,
            act_quant=act,
            reference=reference if fp_align else None,
        )
        for name in group:
            full = f"layers.{i}.{name}"
            done.stats[full] = stats[full].summary()
            if specs[name] is not aspec:
                done.eight.append(full)
            H = hess[full].hessian() if full in hess else None
            if fp_align:
                lin = linears[name]
                lin.weight.copy_(fp_aligned_weight(lin.weight, H, hess[full].cross_term(), fp_align))
            ql = QuantLinear.from_linear(
                linears[name],
                wspec,
                specs[name],
                method="gptq" if quant.gptq else "rtn",
                H=H if quant.gptq else None,
                clip_search=quant.clip_search,
            )
            _set_module(layer, name, ql)
            done.quantized.append(full)

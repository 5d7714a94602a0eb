"""W4A4 calibration of a multimodal model's LLM: transform, then quantize layer by layer."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from qavtp.calibrate.quantizers import QuantLinear, QuantSpec, fake_quant_activation, fp_aligned_weight
from qavtp.calibrate.rotation import rotate_model
from qavtp.calibrate.smooth import collect_input_absmax, smooth_model
from qavtp.calibrate.stats import capture_layer_inputs, linear_modules, observe_layer, run_layer
from qavtp.device import visiting
from qavtp.errors import QavtpError
from qavtp.prompting import encode

METHODS = ("rtn", "smoothquant", "quarot")
W4_G128 = QuantSpec(4, True, 128)
A4_PER_TOKEN = QuantSpec(4, True, 0)
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
            raise QavtpError(
                f"--a8 term {term!r} is neither a projection ({', '.join(PROJECTIONS)}) nor a layer range like 0-4"
            )
        first, last = int(lo), int(hi) if sep else int(lo)
        if not first <= last < n_layers:
            raise QavtpError(f"--a8 layers {term} are not within the model's layers 0-{n_layers - 1}")
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


def check_fp_align(fp_align: float) -> None:
    if fp_align < 0:
        raise QavtpError(f"--fp-align must be >= 0, got {fp_align}")


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


@torch.no_grad()
def calibrate_model(
    adapter,
    batches: Sequence[dict],
    method: str = "quarot",
    wspec: QuantSpec = W4_G128,
    aspec: QuantSpec | None = A4_PER_TOKEN,
    gptq: bool = False,
    clip_search: bool = False,
    smooth_alpha: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    online_o_proj: bool = False,
    a8: tuple[set[str], set[int]] | None = None,
    device: torch.device | None = None,
    sequential: bool = False,
    fp_align: float = 0.0,
) -> dict:
    """Transform the LLM (``method``), then quantize every decoder linear in place.

    Each layer is observed on the outputs of the already-quantized layers before it, so GPTQ and
    the statistics see the inputs the deployed model will see.  The LM head, the vision tower and
    the projector stay in floating point, as in QuaRot (``calibrate.vocab`` quantizes the embedding and
    the head afterwards, on request).  Returns the JSON-able record of what was
    done (transforms, per-linear input statistics) for the artifact. ``a8`` (:func:`parse_a8`) keeps 8-bit inputs at
    the linears it selects (mixed precision); the record lists them under ``a8_linears``. With ``device``
    the model stays where it is and each decoder layer visits ``device`` for its work
    (:mod:`qavtp.device`). ``sequential`` quantizes each layer's linears in :data:`SEQUENTIAL` order,
    each group observed (statistics, GPTQ Hessians on activation-quantized inputs) with the groups before it
    already quantized, as QuaRot's GPTQ does; otherwise one pass observes the whole float layer. ``fp_align`` > 0
    also carries the floating-point model's hidden states along and quantizes, instead of each float weight,
    the one that maps the quantized model's inputs onto the floating-point model's outputs
    (:func:`~qavtp.calibrate.quantizers.fp_aligned_weight`, scaled by ``fp_align``; GPTAQ's asymmetric calibration).
    """
    if method not in METHODS:
        raise QavtpError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if not batches:
        raise QavtpError("the calibration set is empty")
    check_fp_align(fp_align)
    record: dict = {"method": method, "transforms": {}}
    if method == "smoothquant":
        absmax = collect_input_absmax(adapter, batches, device)
        scales = smooth_model(adapter, absmax, smooth_alpha)
        record["transforms"]["smooth"] = {"alpha": smooth_alpha, "layers": sorted(scales)}
    elif method == "quarot":
        record["transforms"]["rotation"] = rotate_model(adapter, seed, online_o_proj, device)
    inputs = capture_layer_inputs(adapter, batches, device)
    ref_inputs = inputs if fp_align else None  # the floating-point model's stream: the same until layer 0 runs
    stats_out: dict[str, dict] = {}
    quantized: list[str] = []
    eight: list[str] = []
    layers = adapter.decoder_layers
    bar = tqdm(list(enumerate(layers)), desc="calibrating decoder layers", unit="layer", disable=not progress)
    for i, layer in bar:
        with visiting(layer, device):
            ref_layer = copy.deepcopy(layer) if fp_align else None
            linears = dict(linear_modules(layer))
            specs = {name: act_spec_for(f"layers.{i}.{name}", aspec, a8) for name in linears}
            for group in sequential_groups(linears) if sequential else [list(linears)]:
                # Sequential: each group's Hessians see the deployed inputs, i.e. the earlier groups already
                # quantized and this group's own activation quantizer applied.
                act = (
                    {f"layers.{i}.{n}": partial(fake_quant_activation, spec=specs[n]) for n in group if specs[n]}
                    if sequential
                    else None
                )
                stats, hess = observe_layer(
                    layer,
                    f"layers.{i}",
                    inputs,
                    hessians=gptq or bool(fp_align),
                    names=group,
                    act_quant=act,
                    reference=(ref_layer, ref_inputs) if fp_align else None,
                )
                for name in group:
                    full = f"layers.{i}.{name}"
                    stats_out[full] = stats[full].summary()
                    if specs[name] is not aspec:
                        eight.append(full)
                    H = hess[full].hessian() if full in hess else None
                    if fp_align:
                        lin = linears[name]
                        lin.weight.copy_(fp_aligned_weight(lin.weight, H, hess[full].cross_term(), fp_align))
                    ql = QuantLinear.from_linear(
                        linears[name],
                        wspec,
                        specs[name],
                        method="gptq" if gptq else "rtn",
                        H=H if gptq else None,
                        clip_search=clip_search,
                    )
                    _set_module(layer, name, ql)
                    quantized.append(full)
            inputs = run_layer(layer, inputs)
            if ref_layer is not None:
                ref_inputs = run_layer(ref_layer, ref_inputs)
    record["quantized"] = quantized
    if eight:
        record["a8_linears"] = eight
    record["stats"] = stats_out
    return record

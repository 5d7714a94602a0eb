"""``qavtp calibrate``: load, calibrate and write the artifact (the CLI is a thin wrapper over this)."""

from __future__ import annotations

import os
import resource
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

from qavtp.calibrate.artifact import fingerprint, save_artifact
from qavtp.calibrate.kvcache import install_kv_quant
from qavtp.calibrate.quantize import METHODS, calibrate_model, calibration_batches, check_fp_align, parse_a8
from qavtp.calibrate.quantizers import QuantSpec, check_group_size
from qavtp.calibrate.stats import observe_vision
from qavtp.calibrate.vocab import quantize_vocab
from qavtp.device import describe, peak_mib, reset_peak, resolve_device
from qavtp.errors import QavtpError


def quant_specs(
    wbits: int, abits: int, wgroup: int, agroup: int, wsym: bool, asym: bool, aclip: float
) -> tuple[QuantSpec, QuantSpec | None]:
    wspec = QuantSpec(wbits, wsym, wgroup)
    aspec = None if abits == 16 else QuantSpec(abits, asym, agroup, aclip)
    return wspec, aspec


def auto_group(adapter, preferred: tuple[int, ...] = (128, 64, 32, 16)) -> int:
    """The largest preferred group size that divides every decoder linear's input width (else 0)."""
    from qavtp.calibrate.stats import linear_modules

    widths = {lin.in_features for _, lin in linear_modules(adapter.decoder_layers[0])}
    return next((g for g in preferred if all(w % g == 0 for w in widths)), 0)


def check_groups(adapter, wspec: QuantSpec, aspec: QuantSpec | None) -> None:
    """Every decoder linear's input width must split into whole groups; say so before any work."""
    from qavtp.calibrate.stats import linear_modules

    widths = sorted({lin.in_features for _, lin in linear_modules(adapter.decoder_layers[0])})
    for spec, what in ((wspec, "weight"), (aspec, "activation")):
        if spec is None:
            continue
        for w in widths:
            try:
                check_group_size(w, spec.group_size)
            except QavtpError as e:
                raise QavtpError(f"{what} {e} (decoder linear input widths: {widths})") from None


def run_calibration(
    model: str | os.PathLike,
    output: str | os.PathLike,
    data_spec: str = "easy-vqa",
    n_samples: int = 128,
    batch_size: int = 8,
    method: str = "quarot",
    wbits: int = 4,
    abits: int = 4,
    wgroup: int | str = "auto",
    agroup: int = 0,
    wsym: bool = True,
    asym: bool = True,
    aclip: float = 1.0,
    gptq: bool = False,
    sequential: bool = False,
    fp_align: float = 0.0,
    clip_search: bool = False,
    smooth_alpha: float = 0.5,
    online_o_proj: bool = False,
    vocab_bits: int = 16,
    kv_bits: int = 16,
    kv_clip: float = 0.95,
    a8: str | None = None,
    vision_stats: bool = False,
    device: str | None = None,
    seed: int = 0,
    retain: str | list[float] | None = None,
    fusion_samples: int = 64,
    fusion_objective: str = "kl",
    fusion_holdout: bool = True,
    align_steps: int = 0,
    align_lr: float = 3e-4,
    align_batch: int = 8,
    align_retain: str | list[float] = "1",
    align_vision_lr: float = 0.0,
    align_scale_lr: float = 0.0,
    align_positions: str = "answer",
    recipe: str | None = None,
    overwrite: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    from qavtp.calibrate.align import align_projector, alignment_data, check_align_options, plot_alignment
    from qavtp.calibrate.fusion import check_fusion_samples, check_objective, fusion_targets, learn_fusion, parse_ratios
    from qavtp.data import load_data
    from qavtp.models.loading import load_model, resolve

    if method not in METHODS:
        raise QavtpError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if n_samples < 1:
        raise QavtpError(f"the calibration set is empty (--n-samples {n_samples})")
    if Path(output).exists() and not overwrite:
        raise QavtpError(f"output directory {output} exists; pass --overwrite to replace it")
    check_fp_align(fp_align)
    if not 0 < smooth_alpha <= 1:
        raise QavtpError(f"--smooth-alpha must lie in (0, 1], got {smooth_alpha}")
    if wgroup != "auto":
        try:
            wgroup = int(wgroup)
        except ValueError:
            raise QavtpError(f"--wgroup must be an integer or 'auto', got {wgroup!r}") from None
    quant_specs(wbits, abits, 0 if wgroup == "auto" else wgroup, agroup, wsym, asym, aclip)  # fail fast
    if vocab_bits not in (4, 8, 16):
        raise QavtpError(f"--vocab-bits must be 4, 8 or 16 (floating point), got {vocab_bits}")
    # Keys and values: asymmetric, one scale per token and head (QuaRot's KV recipe).
    kv_spec = None if kv_bits == 16 else QuantSpec(kv_bits, False, 0, kv_clip)
    ratios = [r for r in parse_ratios(retain) if r < 1.0]
    check_objective(fusion_objective)
    check_align_options(align_steps, align_lr, align_batch, vision_lr=align_vision_lr, scale_lr=align_scale_lr)
    align_ratios = parse_ratios(align_retain)
    if align_steps and not align_ratios:
        raise QavtpError("--align-retain needs at least one retention ratio (1: the dense model)")
    if ratios:
        check_fusion_samples(fusion_samples)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    path = resolve(model, cache_dir)
    net, processor, adapter = load_model(path)
    if wgroup == "auto":
        wgroup = auto_group(adapter)
    wspec, aspec = quant_specs(wbits, abits, wgroup, agroup, wsym, asym, aclip)
    check_groups(adapter, wspec, aspec)
    eight = parse_a8(a8, len(adapter.decoder_layers)) if a8 else None
    if eight and (aspec is None or aspec.bits >= 8):
        raise QavtpError(f"--a8 raises 4-bit (or lower) activations to 8 bits; these are {abits}-bit")
    ds = load_data(data_spec, "train", limit=n_samples, seed=seed)
    batches = calibration_batches(processor, ds, batch_size)
    t0 = time.time()
    # The KL objective's target is the floating-point model's answer distribution: taken before calibration.
    fds, target, held = fusion_targets(net, processor, ds, fusion_samples, fusion_holdout) if ratios else (None,) * 3
    vision = observe_vision(adapter, batches) if vision_stats else None
    reset_peak(dev)
    if kv_spec is not None:
        install_kv_quant(adapter, kv_spec)  # before the layers are calibrated: GPTQ sees the deployed attention
    record = calibrate_model(
        adapter,
        batches,
        method,
        wspec,
        aspec,
        gptq=gptq,
        sequential=sequential,
        fp_align=fp_align,
        clip_search=clip_search,
        smooth_alpha=smooth_alpha,
        seed=seed,
        progress=progress,
        online_o_proj=online_o_proj,
        a8=eight,
        device=dev,
    )
    device_peak = peak_mib(dev)
    vspec = None
    if vocab_bits != 16:
        # Before the fusion weights are learned: they must see the model that will be deployed.
        vspec = QuantSpec(vocab_bits, wspec.symmetric, wspec.group_size)  # hidden size: checked with the decoder
        quantize_vocab(adapter, vspec, clip_search)
    seconds = round(time.time() - t0, 1)
    alignment = None
    if align_steps:
        # The teacher is the checkpoint as it was: a second copy, since ``net`` is quantized in place by now.
        teacher, _, _ = load_model(path)
        align_train, align_held = alignment_data(data_spec, align_steps, align_batch, seed=seed)
        alignment = align_projector(
            adapter,
            teacher,
            processor,
            align_train,
            align_held,
            align_steps,
            batch_size=align_batch,
            lr=align_lr,
            ratios=align_ratios,
            progress=progress,
            vision_lr=align_vision_lr,
            scale_lr=align_scale_lr,
            positions=align_positions,
        )
        del teacher
    fusion = None
    if ratios:
        fusion = learn_fusion(
            adapter, processor, fds, ratios, target, aspec, fusion_objective, progress=progress, holdout=held
        )
    config = {
        "qavtp_version": version("qavtp"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"model": str(model), "path": str(path), "fingerprint": fingerprint(path)},
        "data": {"spec": data_spec, "split": "train", "n_samples": len(ds), "seed": seed},
        "options": {
            "method": method,
            "weights": wspec.to_dict(),
            "activations": aspec.to_dict() if aspec else None,
            "gptq": gptq,
            "sequential": sequential,
            "fp_align": fp_align,
            "clip_search": clip_search,
            "smooth_alpha": smooth_alpha if method == "smoothquant" else None,
            "online_o_proj": online_o_proj if method == "quarot" else None,
            "vocab": vspec.to_dict() if vspec else None,
            "kv_cache": kv_spec.to_dict() if kv_spec else None,
            "a8": a8 if eight else None,
            "align_steps": align_steps,
            "recipe": recipe,
            "aligned_vision": bool(align_steps) and align_vision_lr > 0,
            "seed": seed,
        },
        # ru_maxrss is the process's peak resident memory (KiB on Linux): model + one layer's activations.
        "calibration": {
            **record,
            **({"vision_stats": vision} if vision else {}),
            "seconds": seconds,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "device": describe(dev),
            **({"device_peak_mib": device_peak} if device_peak is not None else {}),
        },
    }
    if alignment is not None:
        config["alignment"] = alignment
    if fusion is not None:
        config["fusion"] = fusion
    plot = (lambda d: plot_alignment(alignment, d / "alignment.png")) if alignment is not None else None
    return save_artifact(output, net, config, overwrite=overwrite, extras=plot)

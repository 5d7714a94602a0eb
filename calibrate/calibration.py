"""``qavtp calibrate``: load the model, quantize it, align and fuse on request, write the artifact.

Read top to bottom, :func:`run_calibration` is the whole job; every option arrives in one
:class:`~qavtp.config.CalibrationConfig`, checked when it was made.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

from qavtp.calibrate.align import align_projector, alignment_data
from qavtp.calibrate.alignment_plot import plot_alignment
from qavtp.calibrate.artifact import LayerShards, fingerprint, write_artifact
from qavtp.calibrate.artifact_config import ArtifactConfig, Calibration, CalibrationData, Fusion, Options, Source
from qavtp.calibrate.fusion import fusion_targets, learn_fusion
from qavtp.calibrate.kvcache import install_kv_quant
from qavtp.calibrate.quantize import calibrate_model, calibration_batches, parse_a8, quant_specs
from qavtp.calibrate.quantizers import QuantSpec
from qavtp.calibrate.stats import observe_vision
from qavtp.calibrate.vocab import quantize_vocab
from qavtp.config import CalibrationConfig, QuantConfig
from qavtp.data import data_path, load_data
from qavtp.device import describe, peak_mib, reset_peak, resolve_device
from qavtp.errors import QavtpError
from qavtp.io import atomic_dir, check_output, disk_full_is_one_line
from qavtp.models.loading import fp32_bytes, load_model, resolve
from qavtp.models.reference import NAME, cache_root


def kv_spec(quant: QuantConfig) -> QuantSpec | None:
    # Keys and values: asymmetric, one scale per token and head (QuaRot's KV recipe).
    return None if quant.kv_bits == 16 else QuantSpec(quant.kv_bits, False, 0, quant.kv_clip)


def run_calibration(
    model: str | os.PathLike,
    output: str | os.PathLike,
    config: CalibrationConfig,
    *,
    overwrite: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Calibrate ``model`` as ``config`` says and write the artifact to ``output``; returns its path.

    The artifact is filled in a temporary sibling directory that takes ``output``'s place only once complete; a
    streamed calibration (:func:`streamed`) writes each decoder layer there as soon as it is quantized.
    """
    inputs = [None if str(model) == NAME else model, cache_root(cache_dir), data_path(config.data)]
    check_output(output, "artifact", inputs, overwrite)
    quant, fusion = config.quant, config.fusion
    dev = resolve_device(config.device)
    torch.manual_seed(config.seed)
    path = resolve(model, cache_dir)
    out = check_output(output, "artifact", [path], overwrite)
    stream = streamed(config, path)
    net, processor, adapter = load_model(path, stream=stream)
    wspec, aspec = quant_specs(quant, adapter)  # group sizes and --a8 checked before any data is loaded
    if quant.a8:
        parse_a8(quant.a8, len(adapter.decoder_layers))
    ds = load_data(config.data, "train", limit=config.n_samples, seed=config.seed)
    if len(ds) < config.n_samples:
        print(
            f"qavtp: the data set has {len(ds)} training questions; calibrating on all of them, not on "
            f"{config.n_samples}",
            file=sys.stderr,
        )
    batches = calibration_batches(processor, ds, config.batch_size)
    t0 = time.time()
    # The KL objective's target is the floating-point model's answer distribution: taken before calibration.
    targets = fusion_targets(net, processor, ds, fusion.samples, fusion.holdout) if fusion.enabled else None
    vision = observe_vision(adapter, batches) if quant.vision_stats else None
    reset_peak(dev)
    kv = kv_spec(quant)
    if kv is not None:
        install_kv_quant(adapter, kv)  # before the layers are calibrated: GPTQ sees the deployed attention
    with disk_full_is_one_line(out, "artifact"), atomic_dir(out) as tmp:
        shards = LayerShards(tmp, adapter) if stream else None
        record = calibrate_model(adapter, batches, quant, seed=config.seed, device=dev, progress=progress, sink=shards)
        device_peak = peak_mib(dev)
        vspec = None
        if quant.vocab_bits != 16:
            # Before the fusion weights are learned: they must see the model that will be deployed.
            vspec = QuantSpec(quant.vocab_bits, wspec.symmetric, wspec.group_size)  # hidden size: checked already
            quantize_vocab(adapter, vspec, quant.clip_search)
        seconds = round(time.time() - t0, 1)
        alignment = _align(adapter, processor, path, config, progress) if config.align.enabled else None
        learned = None
        if targets is not None:
            fds, target, held = targets
            learned = learn_fusion(
                adapter,
                processor,
                fds,
                list(fusion.ratios),
                target,
                aspec,
                fusion.objective,
                progress=progress,
                holdout=held,
            )
        calibration = {
            **record,
            **({"vision_stats": vision} if vision else {}),
            "seconds": seconds,
            # ru_maxrss: the process's peak resident memory (KiB on Linux): model (or, streamed, one decoder layer
            # and what stays resident) + one layer's activations.
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "device": describe(dev),
            "streamed": stream,
            **({"device_peak_mib": device_peak} if device_peak is not None else {}),
        }
        cfg = artifact_config(model, path, config, len(ds), (wspec, aspec, vspec, kv), calibration)
        cfg = replace(cfg, alignment=alignment, fusion=Fusion(learned) if learned is not None else None)
        plot = (lambda d: plot_alignment(alignment, d / "alignment.png")) if alignment is not None else None
        write_artifact(tmp, net, cfg, extras=plot, shards=shards)
    return out


STREAM_ABOVE_GIB = 4
STREAM_ABOVE_BYTES = STREAM_ABOVE_GIB << 30


def streamed(config: CalibrationConfig, path: Path) -> bool:
    """Whether to stream the decoder layers (``config.stream``, or by the checkpoint's float32 size); a streamed
    calibration is RTN or GPTQ on the layers as they come, nothing that needs the whole model at once."""
    stream = config.stream if config.stream is not None else fp32_bytes(path) > STREAM_ABOVE_BYTES
    if not stream:
        return False
    unsupported = {
        f"--method {config.quant.method} (its transform touches every layer at once)": config.quant.method != "rtn",
        "--align-projector (it trains through the whole model)": config.align.enabled,
        "fusion learning (--retain other than none)": config.fusion.enabled,
    }
    for what, used in unsupported.items():
        if used:
            why = "--stream" if config.stream else f"the model's float32 weights exceed {STREAM_ABOVE_GIB} GiB"
            raise QavtpError(
                f"a streamed calibration ({why}) does not support {what}: use --method rtn [--gptq] --retain none, "
                "or --no-stream where the float32 model fits in memory"
            )
    return True


def _align(adapter, processor, path: Path, config: CalibrationConfig, progress: bool) -> dict:
    # The teacher is the checkpoint as it was: a second copy, since the student is quantized in place by now.
    teacher, _, _ = load_model(path)
    align = config.align
    train, held = alignment_data(config.data, align.steps, align.batch_size, seed=config.seed)
    try:
        return align_projector(adapter, teacher, processor, train, held, align, progress=progress)
    finally:
        del teacher


def artifact_config(
    model, path: Path, config: CalibrationConfig, n_samples: int, specs, calibration: dict
) -> ArtifactConfig:
    """The artifact's config: where it came from, with what options, what was done."""
    wspec, aspec, vspec, kv = specs
    quant = config.quant
    options = Options(
        method=quant.method,
        weights=wspec,
        activations=aspec,
        seed=config.seed,
        gptq=quant.gptq,
        sequential=quant.sequential,
        fp_align=quant.fp_align,
        clip_search=quant.clip_search,
        smooth_alpha=quant.smooth_alpha if quant.method == "smoothquant" else None,
        online_o_proj=quant.online_o_proj if quant.method == "quarot" else None,
        vocab=vspec,
        kv_cache=kv,
        a8=quant.a8 or None,
        align_steps=config.align.steps,
        recipe=config.recipe,
        aligned_vision=config.align.enabled and config.align.vision_lr > 0,
    )
    return ArtifactConfig(
        source=Source(str(model), str(path), fingerprint(path)),
        data=CalibrationData(config.data, n_samples, config.seed),
        options=options,
        calibration=Calibration(calibration),
        qavtp_version=version("qavtp"),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )

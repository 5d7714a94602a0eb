"""Jobs that take an artifact and give an artifact: align its projector again, learn its fusion weights again.

Both read the artifact, rebuild what they need (the floating-point teacher, the fake-quantized student), run
the library's alignment or fusion search, and write the result atomically (``qavtp align``, ``qavtp fuse``).
"""

from __future__ import annotations

import gc
from dataclasses import replace
from pathlib import Path

from qavtp.calibrate.align import align_projector, alignment_data
from qavtp.calibrate.alignment_plot import plot_alignment
from qavtp.calibrate.artifact import (
    CONFIG,
    calibration_questions,
    load_artifact,
    read_config,
    save_artifact,
)
from qavtp.calibrate.artifact_config import ArtifactConfig, Fusion, activation_spec
from qavtp.calibrate.fusion import fusion_targets, learn_fusion
from qavtp.config import AlignConfig, ConfigError, FusionConfig
from qavtp.device import describe, resolve_device, visiting
from qavtp.errors import QavtpError
from qavtp.io import atomic_write_json, check_output
from qavtp.models.loading import load_model, resolve
from qavtp.models.reference import NAME


def align_artifact(
    artifact_dir,
    output,
    config: AlignConfig,
    *,
    device: str | None = None,
    overwrite: bool = False,
    cache_dir=None,
    progress: bool = True,
) -> Path:
    """``qavtp align``: align the projector of an existing artifact and write the result as a new artifact.

    The LLM's codes are the artifact's; an artifact aligned before continues from its projector on training
    questions it has not seen. Fusion weights, if the artifact has them, are learned again for the new
    projector, with the ratios, objective and sample count they were learned with. ``device`` (cuda, cuda:N)
    runs a dense alignment there, student and teacher both; fusion learning stays on the CPU.
    """
    if not config.enabled:
        raise ConfigError("steps", f"must be at least 1, got {config.steps}")
    if device not in (None, "cpu") and any(r < 1 for r in config.ratios):
        # The pruned student (scoring, selection) has not run on a GPU yet.
        raise QavtpError(f"--device {device} aligns the dense model only (--retain 1); pruned ratios align on the CPU")
    dev = resolve_device(device)
    src, out = Path(artifact_dir), Path(output)
    source = read_config(src).source  # read_config checks the schema
    check_output(out, "artifact", [src, None if source.model == NAME else source.model], overwrite)
    path = resolve(source.model, cache_dir)
    check_output(out, "artifact", [path], overwrite)
    model, processor, adapter, cfg = load_artifact(src, path)  # and this the source model's fingerprint
    teacher, _, _ = load_model(path)
    before = cfg.alignment
    done = before["train_questions"] if before else 0
    seed = cfg.options.seed
    train, held = alignment_data(cfg.data.spec, config.steps, config.batch_size, seed=seed, skip=done)
    with visiting(model, dev), visiting(teacher, dev):
        record = align_projector(adapter, teacher, processor, train, held, config, progress=progress, device=dev)
    record["device"] = describe(dev)
    if before:
        record["continued_from"] = {k: before[k] for k in ("steps", "best_step", "heldout_kl_after", "train_questions")}
    fusion = cfg.fusion.record if cfg.fusion else None
    if fusion:
        # The fusion weights were chosen for the old projector's tokens: learn them again, as they were learned.
        again = FusionConfig(
            ratios=tuple(float(r) for r in fusion["ratios"]),
            samples=fusion["n_samples"],
            objective=fusion["objective"],
            holdout=bool(fusion.get("holdout_samples")),  # 0: learned without a hold-out
        )
        fds, target, hold = fusion_targets(teacher, processor, calibration_questions(cfg), again.samples, again.holdout)
        del teacher
        gc.collect()
        cfg = replace(cfg, fusion=Fusion(_learn(adapter, processor, cfg, again, (fds, target, hold), progress)))
    options = replace(
        cfg.options,
        align_steps=cfg.options.align_steps + config.steps,
        # Once a tower has been aligned, the artifact keeps carrying it, whatever later alignments train.
        aligned_vision=cfg.options.aligned_vision or config.vision_lr > 0,
    )
    cfg = replace(cfg, alignment=record, options=options, aligned_from=str(src))
    return save_artifact(out, model, cfg, overwrite, extras=lambda d: plot_alignment(record, d / "alignment.png"))


def refit_fusion(artifact_dir, config: FusionConfig, *, cache_dir=None, progress: bool = True) -> dict:
    """Learn the fusion weights of an existing artifact again (other ratios, objective or sample count).

    The calibration questions are the artifact's own; only ``config.json`` is rewritten (atomically).
    """
    cfg = read_config(artifact_dir)
    if not config.enabled:
        raise ConfigError("ratios", "must name at least one retention ratio below 1 to learn fusion weights for")
    fp, processor, _ = load_model(resolve(cfg.source.model, cache_dir))
    targets = fusion_targets(fp, processor, calibration_questions(cfg), config.samples, config.holdout)
    del fp
    gc.collect()
    _, processor, adapter, cfg = load_artifact(artifact_dir)
    learned = _learn(adapter, processor, cfg, config, targets, progress)
    atomic_write_json(Path(artifact_dir) / CONFIG, replace(cfg, fusion=Fusion(learned)).to_dict())
    return learned


def _learn(adapter, processor, cfg: ArtifactConfig, config: FusionConfig, targets, progress: bool) -> dict:
    fds, target, held = targets
    aspec = activation_spec(cfg)
    ratios = list(config.ratios)
    return learn_fusion(
        adapter, processor, fds, ratios, target, aspec, config.objective, progress=progress, holdout=held
    )

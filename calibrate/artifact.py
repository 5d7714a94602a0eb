"""The calibration artifact: safetensors + a versioned config.json, written atomically.

Only what calibration changed is stored (the LLM, the LM head, the projector, and the vision tower when
alignment trained it); everything else is read from the source checkpoint, which the artifact names and
fingerprints.
4-bit codes are packed two per byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qavtp.calibrate.artifact_config import ArtifactConfig, SchemaError
from qavtp.calibrate.kvcache import install_kv_quant
from qavtp.calibrate.quantizers import QuantLinear, QuantWeight, pack_int4, unpack_int4
from qavtp.calibrate.rotation import install_online_transforms
from qavtp.calibrate.vocab import install_quant_vocab
from qavtp.data import load_data
from qavtp.errors import QavtpError
from qavtp.io import atomic_dir, check_output, sha256_file
from qavtp.models.loading import load_model, resolve
from qavtp.models.reference import NAME as DEFAULT_MODEL

CONFIG = "config.json"
WEIGHTS = "quantized.safetensors"
_STORED_PREFIXES = ("model.language_model.", "lm_head.", "model.multi_modal_projector.")
_TOWER_PREFIX = "model.vision_tower."


def _prefixes(config: ArtifactConfig) -> tuple[str, ...]:
    # A reader that predates aligned towers loads these tensors all the same (they are the model's own names).
    return _STORED_PREFIXES + ((_TOWER_PREFIX,) if config.options.aligned_vision else ())


def fingerprint(model_dir: str | os.PathLike) -> str:
    """A hash of the checkpoint's config and safetensors headers: cheap even for a 13B model.

    The headers hold every tensor's name, dtype, shape and byte offsets, and the file sizes are
    included, so any other checkpoint (or a retrained one) gets another fingerprint.
    """
    d = Path(model_dir)
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(f.name.encode() + fh.read(n) + str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def _stored_state(model: torch.nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        if not k.startswith(prefixes):
            continue
        out[k] = v.detach().contiguous().clone()
    # Packed int4 codes: half the bytes of int8, as the artifact format promises.
    for name, mod in model.named_modules():
        if isinstance(mod, QuantWeight) and mod.wspec.bits == 4 and f"{name}.qweight" in out:
            codes = out.pop(f"{name}.qweight")
            out[f"{name}.qweight_int4"] = pack_int4(codes)
    return out


def save_artifact(
    out_dir: str | os.PathLike,
    model: torch.nn.Module,
    config: ArtifactConfig,
    overwrite: bool = False,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``config`` and the calibrated weights to ``out_dir`` via a temporary sibling + rename.

    ``extras(tmp)`` adds other files (plots) to the temporary directory, so they land with the rest or not at all.
    """
    out = check_output(out_dir, "artifact", overwrite=overwrite)
    with atomic_dir(out) as tmp:
        save_file(_stored_state(model, _prefixes(config)), str(tmp / WEIGHTS))
        config = replace(config, weights_sha256=sha256_file(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if extras is not None:
            extras(tmp)
    return out


def read_config(artifact_dir: str | os.PathLike) -> ArtifactConfig:
    """An artifact's typed ``config.json`` (older schema versions migrated), or one line saying what is wrong."""
    d = Path(artifact_dir)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise QavtpError(f"{d} is not a qavtp artifact (needs {CONFIG} and {WEIGHTS})")
    try:
        raw = json.loads((d / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QavtpError(f"{d / CONFIG} is not valid JSON: {e}") from None
    try:
        return ArtifactConfig.from_dict(raw)
    except SchemaError as e:
        raise QavtpError(f"artifact {d}: {e}") from None


def calibration_questions(cfg: ArtifactConfig):
    """The calibration questions an artifact was calibrated on (its data spec, size and seed)."""
    data = cfg.data
    return load_data(data.spec, "train", limit=data.n_samples, seed=data.seed)


def load_artifact(artifact_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None, dtype: str = "fp32"):
    """The calibrated model: the source checkpoint, rebuilt with the artifact's modules and weights."""
    d = Path(artifact_dir)
    cfg = read_config(d)
    if cfg.weights_sha256 is not None and sha256_file(d / WEIGHTS) != cfg.weights_sha256:
        raise QavtpError(
            f"{d / WEIGHTS} does not match the digest in {d / CONFIG}: the weights were changed, truncated or come "
            "from another artifact"
        )
    src = cfg.source
    path = resolve(model_dir or src.model, src.cache_dir)
    model, processor, adapter = load_model(path, dtype)
    got = fingerprint(path)
    if got != src.fingerprint:
        raise QavtpError(
            f"artifact {d} was calibrated from another model (fingerprint {src.fingerprint}, {path} has {got})"
        )
    rotation = cfg.calibration.transforms.get("rotation")
    if rotation:
        install_online_transforms(adapter, rotation)
    if cfg.options.vocab:
        install_quant_vocab(adapter, cfg.options.vocab)
    if cfg.options.kv_cache:
        install_kv_quant(adapter, cfg.options.kv_cache)
    wspec, aspec = cfg.options.weights, cfg.options.activations
    layers = adapter.decoder_layers
    eight = set(cfg.calibration.a8_linears)
    for name in cfg.calibration.quantized:
        rel = name[len("layers.") :]
        parent_name, _, attr = rel.rpartition(".")
        try:
            lin = getattr(layers.get_submodule(parent_name), attr, None)
        except AttributeError:
            lin = None
        if not isinstance(lin, torch.nn.Linear):
            raise QavtpError(f"artifact {d} quantized {name}, which {path} does not have (another model's?)")
        parent = layers.get_submodule(parent_name)
        spec = replace(aspec, bits=8) if name in eight else aspec
        setattr(parent, attr, QuantLinear(lin.in_features, lin.out_features, wspec, spec, bias=lin.bias is not None))
    try:
        state = load_file(str(d / WEIGHTS))
    except Exception as e:  # safetensors raises several error types for a damaged file
        raise QavtpError(f"corrupt artifact weights {d / WEIGHTS}: {e}") from None
    try:
        for k in [k for k in state if k.endswith(".qweight_int4")]:
            base = k[: -len("_int4")]
            owner = model.get_submodule(base.rsplit(".", 1)[0])
            spec = owner.wspec
            codes = unpack_int4(state.pop(k), signed=spec.symmetric, n=owner.qweight.shape[-1])
            state[base] = codes.to(spec.code_dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (AttributeError, RuntimeError, QavtpError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise QavtpError(f"artifact {d}: its weights do not fit {path}'s shapes (another model's?): {first}") from None
    if unexpected:
        raise QavtpError(f"artifact {d} holds tensors this model lacks, e.g. {unexpected[0]}")
    lacking = [k for k in missing if k.startswith(_prefixes(cfg))]
    if lacking:
        raise QavtpError(f"artifact {d} lacks {len(lacking)} tensors, e.g. {lacking[0]}")
    model.eval()
    return model, processor, adapter, cfg


def load_model_or_artifact(model, artifact, dtype: str = "fp32", cache_dir=None):
    """``(model, processor, adapter)``: a calibration artifact's fake-quantized model if ``artifact`` is given (on
    ``model``'s checkpoint, if given, instead of its source), else the checkpoint ``model`` or the reference model."""
    if artifact:
        net, processor, adapter, _ = load_artifact(artifact, model, dtype)
        return net, processor, adapter
    return load_model(model or DEFAULT_MODEL, dtype, cache_dir)

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
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
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
from qavtp.models.streaming import LayerStream, layer_prefix

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


def _stored_state(model: torch.nn.Module, prefixes: tuple[str, ...], root: str = "") -> dict[str, torch.Tensor]:
    """The tensors of ``model`` (named ``root`` + their path) under ``prefixes`` that hold values: a streamed
    model's decoder layers, on the meta device, are written by :class:`LayerShards` instead."""
    out = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        k = root + k
        if not k.startswith(prefixes) or v.is_meta:
            continue
        v = v.detach().contiguous()
        # safetensors refuses tensors that share memory (a tied head): only those are copied, not the whole model.
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    # Packed int4 codes: half the bytes of int8, as the artifact format promises.
    for name, mod in model.named_modules():
        name = root + name
        if isinstance(mod, QuantWeight) and mod.wspec.bits == 4 and f"{name}.qweight" in out:
            codes = out.pop(f"{name}.qweight")
            out[f"{name}.qweight_int4"] = pack_int4(codes)
    return out


def layer_shard(i: int) -> str:
    return f"quantized-layer-{i:05d}.safetensors"


class LayerShards:
    """Writes each calibrated decoder layer of a streamed model to its own safetensors shard as soon as it is done
    (``calibrate_model``'s ``sink``), so that no more than one layer is ever held; :func:`write_artifact` records
    the shards' digests."""

    def __init__(self, tmp: Path, adapter):
        self.tmp, self.adapter = tmp, adapter
        self.digests: dict[str, str] = {}

    def __call__(self, i: int, layer: torch.nn.Module) -> None:
        root = layer_prefix(self.adapter.model, self.adapter.decoder_layers, i)
        name = layer_shard(i)
        save_file(_stored_state(layer, _STORED_PREFIXES, root), str(self.tmp / name))
        self.digests[name] = sha256_file(self.tmp / name)


def write_artifact(
    tmp: Path,
    model: torch.nn.Module,
    config: ArtifactConfig,
    extras: Callable[[Path], None] | None = None,
    shards: LayerShards | None = None,
) -> None:
    """``config`` and the calibrated weights (those not already in ``shards``) written into directory ``tmp``."""
    save_file(_stored_state(model, _prefixes(config)), str(tmp / WEIGHTS))
    config = replace(config, weights_sha256=sha256_file(tmp / WEIGHTS))
    if shards is not None:
        config = replace(config, layer_shards=dict(shards.digests))
    (tmp / CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if extras is not None:
        extras(tmp)


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
        write_artifact(tmp, model, config, extras)
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


def _check_digests(d: Path, cfg: ArtifactConfig) -> None:
    files = {WEIGHTS: cfg.weights_sha256} | (cfg.layer_shards or {})
    for name, digest in files.items():
        if digest is None:
            continue
        if not (d / name).is_file():
            raise QavtpError(f"artifact {d} lacks {name}, which {d / CONFIG} lists")
        if sha256_file(d / name) != digest:
            raise QavtpError(
                f"{d / name} does not match the digest in {d / CONFIG}: the weights were changed, truncated or come "
                "from another artifact"
            )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several error types for a damaged file
        raise QavtpError(f"corrupt artifact weights {path}: {e}") from None


def _unpack_codes(model: torch.nn.Module, state: dict[str, torch.Tensor], root: str = "") -> None:
    """Packed int4 codes (``*.qweight_int4``) back to one code per element, in place; names relative to ``root``."""
    for k in [k for k in state if k.endswith(".qweight_int4")]:
        base = k[: -len("_int4")]
        owner = model.get_submodule((root + base).rsplit(".", 1)[0])
        spec = owner.wspec
        codes = unpack_int4(state.pop(k), signed=spec.symmetric, n=owner.qweight.shape[-1])
        state[base] = codes.to(spec.code_dtype)


def _artifact_layer_source(d: Path, cfg: ArtifactConfig, model: torch.nn.Module, layers):
    """A :class:`~qavtp.models.streaming.LayerStream` source reading decoder layer ``i`` from its artifact shard."""

    def source(i: int, names: list[str]) -> dict[str, torch.Tensor]:
        root = layer_prefix(model, layers, i)
        state = {k[len(root) :]: v for k, v in _read_weights(d / layer_shard(i)).items()}
        _unpack_codes(model, state, root)
        lacking = sorted(set(names) - set(state))
        if lacking:
            raise QavtpError(f"artifact {d}: {layer_shard(i)} lacks {len(lacking)} tensors, e.g. {root}{lacking[0]}")
        return state

    return source


def load_artifact(
    artifact_dir: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    dtype: str = "fp32",
    stream: bool | None = None,
):
    """The calibrated model: the source checkpoint, rebuilt with the artifact's modules and weights.

    ``stream`` (default: when the artifact's layers are in shards) leaves the decoder layers on the meta device,
    each read from its shard inside ``adapter.resident(i)``.
    """
    d = Path(artifact_dir)
    cfg = read_config(d)
    _check_digests(d, cfg)
    stream = bool(cfg.layer_shards) if stream is None else stream
    src = cfg.source
    rotation = cfg.calibration.transforms.get("rotation")
    if stream and rotation and rotation.get("online"):
        raise QavtpError(f"artifact {d} has online Hadamard transforms, which a streamed load does not support yet")
    path = resolve(model_dir or src.model, src.cache_dir)
    model, processor, adapter = load_model(path, dtype, stream=stream)
    got = fingerprint(path)
    if got != src.fingerprint:
        raise QavtpError(
            f"artifact {d} was calibrated from another model (fingerprint {src.fingerprint}, {path} has {got})"
        )
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
        with torch.device("meta") if stream else nullcontext():  # a streamed layer gets its codes when visited
            ql = QuantLinear(lin.in_features, lin.out_features, wspec, spec, bias=lin.bias is not None)
        setattr(parent, attr, ql)
    state = _read_weights(d / WEIGHTS)
    shard_keys: set[str] = set()
    for shard in cfg.layer_shards or {}:
        if stream:
            with safe_open(str(d / shard), framework="pt") as f:
                shard_keys.update(f.keys())
        else:
            state |= _read_weights(d / shard)
    try:
        _unpack_codes(model, state)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (AttributeError, RuntimeError, QavtpError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise QavtpError(f"artifact {d}: its weights do not fit {path}'s shapes (another model's?): {first}") from None
    if unexpected:
        raise QavtpError(f"artifact {d} holds tensors this model lacks, e.g. {unexpected[0]}")
    shard_keys = {k.removesuffix("_int4") for k in shard_keys}
    lacking = [k for k in missing if k.startswith(_prefixes(cfg)) and k not in shard_keys]
    if lacking:
        raise QavtpError(f"artifact {d} lacks {len(lacking)} tensors, e.g. {lacking[0]}")
    if stream:
        adapter.stream = LayerStream(layers, _artifact_layer_source(d, cfg, model, layers))
    model.eval()
    return model, processor, adapter, cfg


def load_model_or_artifact(model, artifact, dtype: str = "fp32", cache_dir=None):
    """``(model, processor, adapter)``: a calibration artifact's fake-quantized model if ``artifact`` is given (on
    ``model``'s checkpoint, if given, instead of its source), else the checkpoint ``model`` or the reference model."""
    if artifact:
        net, processor, adapter, _ = load_artifact(artifact, model, dtype)
        return net, processor, adapter
    return load_model(model or DEFAULT_MODEL, dtype, cache_dir)

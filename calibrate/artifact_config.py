"""The artifact's ``config.json`` as one typed schema: what an artifact came from, how, and what was learned.

:class:`ArtifactConfig` is the only reader of that file's layout: :meth:`ArtifactConfig.from_dict` checks the
schema version, fills what older versions lacked (the migration) and says in one line which field is missing
or of the wrong type; :meth:`ArtifactConfig.to_dict` writes the same layout back (schema :data:`SCHEMA_VERSION`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from qavtp.calibrate.quantizers import QuantSpec
from qavtp.config import check_ratio
from qavtp.errors import QavtpError
from qavtp.scoring import FusionParams

# 2 added options.vocab (quantized embedding and LM head) and options.kv_cache: a reader of version 1 would
# silently run those artifacts with float vocabulary matrices and KV cache, so it must refuse them.
# 3 added options.a8 and calibration.a8_linears (8-bit inputs at some linears), which an older reader would ignore.
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # older artifacts mean the same under this reader: their missing keys default


class SchemaError(QavtpError):
    pass


def _get(d: dict, key: str, kind: type | tuple, where: str, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise SchemaError(f"{where} lacks {key!r}")
        return default
    value = d[key]
    if value is None and default is None:
        return None
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise SchemaError(f"{where}.{key} must be {_kind(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise SchemaError(f"{where}.{key} must be {_kind(kind)}, got {value!r}")
    return value


def _kind(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object"}
    names |= {list: "a list", (int, float): "a number"}
    return names.get(kind, str(kind))


def _section(d: dict, key: str, where: str, optional: bool = False) -> dict | None:
    return _get(d, key, dict, where, None if optional else ...)


def _spec(d: dict, key: str, where: str, optional: bool = True) -> QuantSpec | None:
    raw = _get(d, key, dict, where, None if optional else ...)
    if raw is None:
        return None
    try:
        return QuantSpec.from_dict(raw)
    except (QavtpError, TypeError) as e:
        raise SchemaError(f"{where}.{key}: {e}") from None


def _strings(d: dict, key: str, where: str, default=...) -> tuple[str, ...]:
    items = _get(d, key, list, where, default)
    if items is None or items == ():
        return ()
    if not all(isinstance(s, str) for s in items):
        raise SchemaError(f"{where}.{key} must be a list of names")
    return tuple(items)


@dataclass(frozen=True)
class Source:
    """The checkpoint the artifact was calibrated from; ``fingerprint`` proves it is the same one at load."""

    model: str
    path: str
    fingerprint: str
    cache_dir: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Source:
        w = "source"
        cache = _get(d, "cache_dir", str, w, None)
        return cls(_get(d, "model", str, w), _get(d, "path", str, w), _get(d, "fingerprint", str, w), cache)

    def to_dict(self) -> dict:
        out = {"model": self.model, "path": self.path, "fingerprint": self.fingerprint}
        return out | ({"cache_dir": self.cache_dir} if self.cache_dir is not None else {})


@dataclass(frozen=True)
class CalibrationData:
    """The calibration questions: a data spec's train split, the first ``n_samples`` of a ``seed`` shuffle."""

    spec: str
    n_samples: int
    seed: int
    split: str = "train"

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationData:
        w = "data"
        return cls(
            _get(d, "spec", str, w), _get(d, "n_samples", int, w), _get(d, "seed", int, w), _get(d, "split", str, w)
        )

    def to_dict(self) -> dict:
        return {"spec": self.spec, "split": self.split, "n_samples": self.n_samples, "seed": self.seed}


@dataclass(frozen=True)
class Options:
    """The quantization as done: methods and the resolved quantizers (group sizes are never "auto" here)."""

    method: str
    weights: QuantSpec
    activations: QuantSpec | None
    seed: int
    gptq: bool = False
    sequential: bool = False
    fp_align: float = 0.0
    clip_search: bool = False
    smooth_alpha: float | None = None
    online_o_proj: bool | None = None
    vocab: QuantSpec | None = None  # token embedding + LM head; None: floating point
    kv_cache: QuantSpec | None = None
    a8: str | None = None
    align_steps: int = 0
    recipe: str | None = None
    aligned_vision: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> Options:
        w = "options"
        spec = {"weights": _spec(d, "weights", w, optional=False)}
        spec |= {k: _spec(d, k, w) for k in ("activations", "vocab", "kv_cache")}
        kinds = {"method": str, "seed": int, "gptq": bool, "sequential": bool, "fp_align": (int, float)}
        kinds |= {"clip_search": bool, "smooth_alpha": (int, float), "online_o_proj": bool, "a8": str}
        kinds |= {"align_steps": int, "recipe": str, "aligned_vision": bool}
        defaults = {f.name: f.default for f in fields(cls)}
        plain = {k: _get(d, k, kind, w, defaults[k]) for k, kind in kinds.items()}
        if "activations" not in d:
            raise SchemaError(f"{w} lacks 'activations'")
        return cls(**spec, **plain)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, QuantSpec) else value
        order = ("method", "weights", "activations", "gptq", "sequential", "fp_align", "clip_search", "smooth_alpha")
        order += ("online_o_proj", "vocab", "kv_cache", "a8", "align_steps", "recipe", "aligned_vision", "seed")
        return {k: out[k] for k in order}


@dataclass(frozen=True)
class Calibration:
    """What calibration did: the transforms (rotation, smoothing), the quantized linears, the run's record."""

    record: dict  # transforms, quantized, a8_linears, stats, seconds, peak memory, device ...

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        w = "calibration"
        transforms = _get(d, "transforms", dict, w)
        for name in ("rotation", "smooth"):
            _get(transforms, name, dict, f"{w}.transforms", None)
        _strings(d, "quantized", w)
        _strings(d, "a8_linears", w, None)
        return cls(dict(d))

    @property
    def transforms(self) -> dict:
        return self.record["transforms"]

    @property
    def quantized(self) -> tuple[str, ...]:
        return tuple(self.record["quantized"])

    @property
    def a8_linears(self) -> tuple[str, ...]:
        return tuple(self.record.get("a8_linears") or ())

    def to_dict(self) -> dict:
        return dict(self.record)


def ratio_key(rho: float) -> str:
    """The JSON key of a retention ratio: ``0.125`` -> ``"0.125"``, ``1`` -> ``"1"``."""
    return f"{check_ratio(rho):g}"


@dataclass(frozen=True)
class Fusion:
    """The learned fusion weights, per retention ratio, with the search's record (calibration scores, hold-out)."""

    record: dict

    @classmethod
    def from_dict(cls, d: dict) -> Fusion:
        ratios = _get(d, "ratios", dict, "fusion")
        for key, entry in ratios.items():
            where = f"fusion.ratios.{key}"
            if not isinstance(entry, dict):
                raise SchemaError(f"{where} must be an object")
            try:
                check_ratio(float(key))
                FusionParams.from_dict(_get(entry, "params", dict, where))
            except (QavtpError, TypeError, ValueError) as e:
                raise SchemaError(f"{where}: {e}") from None
        return cls(dict(d))

    @property
    def ratios(self) -> dict[str, dict]:
        return self.record["ratios"]

    def params(self, rho: float) -> FusionParams:
        """The learned parameters of ratio ``rho``, or one clear error."""
        key = ratio_key(rho)
        if key == "1":
            return FusionParams()  # every token is kept: the scores do not matter
        if key not in self.ratios:
            raise QavtpError(f"the artifact has fusion weights for retention {', '.join(self.ratios)}, not {key}")
        return FusionParams.from_dict(self.ratios[key]["params"])

    def to_dict(self) -> dict:
        return dict(self.record)


@dataclass(frozen=True)
class ArtifactConfig:
    """An artifact's ``config.json``."""

    source: Source
    data: CalibrationData
    options: Options
    calibration: Calibration
    qavtp_version: str = ""
    created: str = ""
    alignment: dict | None = None  # the projector alignment's record (steps, held-out KL, curve ...)
    fusion: Fusion | None = None
    aligned_from: str | None = None  # the artifact ``qavtp align`` started from
    weights_sha256: str | None = None  # of quantized.safetensors, checked at load (older artifacts have none)
    # A streamed calibration's decoder layers, one safetensors shard each: file name -> sha256
    layer_shards: dict[str, str] | None = None
    extra: dict = field(default_factory=dict)  # keys a newer writer of the same schema added: kept as they are

    @classmethod
    def from_dict(cls, d: Any) -> ArtifactConfig:
        if not isinstance(d, dict):
            raise SchemaError(f"the config must be a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            shown = repr(version) if isinstance(version, str) else version
            raise SchemaError(
                f"schema version {shown}; this qavtp reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        fusion = _section(d, "fusion", "config", optional=True)
        known = {"schema_version", "qavtp_version", "created", "source", "data", "options", "calibration"}
        known |= {"alignment", "fusion", "aligned_from", "weights_sha256", "layer_shards"}
        return cls(
            source=Source.from_dict(_section(d, "source", "config")),
            data=CalibrationData.from_dict(_section(d, "data", "config")),
            options=Options.from_dict(_section(d, "options", "config")),
            calibration=Calibration.from_dict(_section(d, "calibration", "config")),
            qavtp_version=_get(d, "qavtp_version", str, "config", ""),
            created=_get(d, "created", str, "config", ""),
            alignment=_section(d, "alignment", "config", optional=True),
            fusion=Fusion.from_dict(fusion) if fusion else None,
            aligned_from=_get(d, "aligned_from", str, "config", None),
            weights_sha256=_get(d, "weights_sha256", str, "config", None),
            layer_shards=_shards(_get(d, "layer_shards", dict, "config", None)),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict:
        out: dict = {"schema_version": SCHEMA_VERSION, "qavtp_version": self.qavtp_version, "created": self.created}
        out |= {"source": self.source.to_dict(), "data": self.data.to_dict(), "options": self.options.to_dict()}
        out["calibration"] = self.calibration.to_dict()
        if self.alignment is not None:
            out["alignment"] = self.alignment
        if self.fusion is not None:
            out["fusion"] = self.fusion.to_dict()
        if self.aligned_from is not None:
            out["aligned_from"] = self.aligned_from
        if self.weights_sha256 is not None:
            out["weights_sha256"] = self.weights_sha256
        if self.layer_shards is not None:
            out["layer_shards"] = self.layer_shards
        return out | self.extra

    @property
    def label(self) -> str:
        """``W4A4``, ``W4A16`` ...: the weight and activation bits."""
        acts = self.options.activations
        return f"W{self.options.weights.bits}A{acts.bits if acts else 16}"


def _shards(d: dict | None) -> dict[str, str] | None:
    # Shard names are read as files inside the artifact: a name with a path in it would escape the directory.
    for name, digest in (d or {}).items():
        if not (isinstance(digest, str) and re.fullmatch(r"quantized-layer-\d{5}\.safetensors", name)):
            raise SchemaError(f"layer_shards: {name!r} is not a layer shard name with its sha256")
    return d


def fusion_params(cfg: ArtifactConfig | None, rho: float) -> FusionParams:
    """The learned fusion parameters of ratio ``rho`` from an artifact config, or one clear error."""
    if cfg is None:
        raise QavtpError("the learned scorers (qavtp, qavtp-dpp) need fusion weights: pass --artifact (a calibration)")
    if cfg.fusion is None or not cfg.fusion.ratios:
        raise QavtpError("this artifact was calibrated without fusion weights; rerun qavtp calibrate with --retain")
    return cfg.fusion.params(rho)


def activation_spec(cfg: ArtifactConfig | None) -> QuantSpec | None:
    """The deployed activation quantizer of an artifact (None: unquantized activations or no artifact)."""
    return cfg.options.activations if cfg is not None else None

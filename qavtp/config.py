"""The options of every qavtp job as frozen, validated config objects: the only way options reach the library.

One config per concern (onnxruntime's ``matmul_nbits_quantizer`` shape): :class:`QuantConfig` (how the LLM is
quantized), :class:`AlignConfig` (projector / scale alignment), :class:`FusionConfig` (pruning fusion weights),
:class:`CalibrationConfig` (one ``qavtp calibrate`` run: data, seed, device and the three above) and
:class:`ExportConfig`. Each checks itself once, when it is made; a bad value raises :class:`ConfigError`, which
names the field (``align.steps``) so that the command line can say which of its flags was wrong.

Torch-free: the command line builds configs (and lists the recipes) before anything heavy is imported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from qavtp.errors import QavtpError

METHODS = ("rtn", "smoothquant", "quarot")
WEIGHT_BITS = (2, 3, 4, 8)
ACTIVATION_BITS = (2, 3, 4, 8, 16)  # 16: not quantized
VOCAB_BITS = (4, 8, 16)
KV_BITS = (2, 3, 4, 8, 16)
POSITIONS = ("answer", "text")  # where alignment compares the two models
PRECISIONS = ("auto", "bf16", "fp32")  # training's compute precision; auto: bf16 only where the hardware has it
OBJECTIVES = ("kl", "choice-kl", "accuracy")  # what the fusion search minimises
EXPORT_SCORERS = ("qavtp", "qapruner", "semantic", "divprune", "cdpruner", "qavtp-dpp")
EXPORT_FORMATS = ("qdq", "ort")
# exact: the calibrated W4A4 numerics in the graph; runtime: int4 weights as calibrated, activations left to the
# runtime's fastest kernel (MatMulNBits' int8 activations at accuracy level 4).
ACTIVATION_MODES = ("exact", "runtime")


class ConfigError(QavtpError):
    """A config value out of range: ``field`` is its dotted path (``quant.smooth_alpha``), ``problem`` the rest."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem

    def within(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.field}", self.problem)


def check_ratio(rho: float) -> float:
    """A retention ratio: the fraction of visual tokens kept, in (0, 1]."""
    if isinstance(rho, bool) or not isinstance(rho, int | float) or not 0.0 < rho <= 1.0:
        raise QavtpError(f"retention ratio must lie in (0, 1], got {rho}")
    return float(rho)


def parse_ratios(spec: str | float | Iterable | None) -> list[float]:
    """``"0.5,0.25,0.125"`` -> ``[0.5, 0.25, 0.125]``, each checked to lie in (0, 1]; ``""``/``none`` -> ``[]``."""
    if spec is None:
        return []
    if isinstance(spec, int | float):
        return [check_ratio(spec)]
    parts = [p for p in str(spec).split(",") if p.strip()] if isinstance(spec, str) else list(spec)
    if len(parts) == 1 and str(parts[0]).strip().lower() == "none":
        return []
    out = []
    for p in parts:
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise QavtpError(f"retention ratio {p!r} is not a number") from None
        out.append(check_ratio(v))
    return out


def _ratios(name: str, value: Any) -> tuple[float, ...]:
    try:
        return tuple(parse_ratios(value))
    except QavtpError as e:
        raise ConfigError(name, f"is not a list of retention ratios: {e}") from None


def _int(name: str, value: Any, low: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(name, what or f"must be at least {low}, got {value}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(name, f"must be a number, got {value!r}")
    return float(value)


DPP_SCORERS = ("cdpruner", "qavtp-dpp")  # the scorers that read a relevance weight


def _theta(value: float | None, scorers: tuple[str, ...]) -> None:
    """A relevance weight: in [0, 1) (1 would make CDPruner's quality exponent infinite), for a DPP scorer."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError("relevance_weight", f"must lie in [0, 1), got {value}")
    if not set(scorers) & set(DPP_SCORERS):
        raise ConfigError("relevance_weight", f"is read by the scorers {' and '.join(DPP_SCORERS)} only")


def _choice(name: str, value: Any, allowed: tuple, what: str = "") -> Any:
    if value not in allowed:
        raise ConfigError(name, f"must be one of {', '.join(map(str, allowed))}{what}, got {value!r}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class QuantConfig:
    """How the LLM is quantized (QuaRot's defaults: rotation, RTN weights, symmetric per-token activations)."""

    method: str = "quarot"
    gptq: bool = False  # GPTQ instead of round-to-nearest weights
    wbits: int = 4
    abits: int = 4  # 16: activations stay floating point
    w_symmetric: bool = True
    a_symmetric: bool = True
    wgroup: int | None = None  # None: 128, or the largest of 64/32/16 that divides every decoder linear's width
    agroup: int = 0  # 0: per token
    aclip: float = 1.0
    sequential: bool = False
    fp_align: float = 0.0
    clip_search: bool = False
    smooth_alpha: float = 0.5
    online_o_proj: bool = False
    vocab_bits: int = 16
    kv_bits: int = 16
    kv_clip: float = 0.95
    a8: str | None = None  # projections and/or layers whose linears keep 8-bit inputs ("gate_proj,up_proj", "0-4")
    vision_stats: bool = False

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("wbits", self.wbits, WEIGHT_BITS)
        _choice("abits", self.abits, ACTIVATION_BITS, " (16: off)")
        if self.wgroup is not None:
            if isinstance(self.wgroup, str):
                raise ConfigError("wgroup", f"must be an integer or 'auto', got {self.wgroup!r}")
            _int("wgroup", self.wgroup, -1)
        _int("agroup", self.agroup, -1)
        for name in (
            "w_symmetric",
            "a_symmetric",
            "gptq",
            "sequential",
            "clip_search",
            "online_o_proj",
            "vision_stats",
        ):
            _flag(name, getattr(self, name))
        if not 0.0 < _number("aclip", self.aclip) <= 1.0:
            raise ConfigError("aclip", f"must lie in (0, 1], got {self.aclip}")
        if _number("fp_align", self.fp_align) < 0:
            raise ConfigError("fp_align", f"must be >= 0, got {self.fp_align}")
        if not 0.0 < _number("smooth_alpha", self.smooth_alpha) <= 1.0:
            raise ConfigError("smooth_alpha", f"must lie in (0, 1], got {self.smooth_alpha}")
        _choice("vocab_bits", self.vocab_bits, VOCAB_BITS, " (16: floating point)")
        _choice("kv_bits", self.kv_bits, KV_BITS, " (16: off)")
        if not 0.0 < _number("kv_clip", self.kv_clip) <= 1.0:
            raise ConfigError("kv_clip", f"must lie in (0, 1], got {self.kv_clip}")
        if self.a8 is not None and not isinstance(self.a8, str):
            raise ConfigError("a8", f"must be a comma-separated list, got {self.a8!r}")
        if self.a8 and self.abits >= 8:
            raise ConfigError("a8", f"raises 4-bit (or lower) activations to 8 bits; these are {self.abits}-bit")


@dataclass(frozen=True)
class AlignConfig:
    """Projector (and optionally tower / weight-scale) alignment through the quantized LLM; ``steps`` 0: off."""

    steps: int = 0
    lr: float = 3e-4
    batch_size: int = 8
    ratios: tuple[float, ...] = (1.0,)  # cycled over the steps; 1: the dense model
    vision_lr: float = 0.0
    scale_lr: float = 0.0
    positions: str = "answer"
    precision: str = "auto"  # bf16 autocast on a GPU or a CPU with bf16 instructions, else fp32

    def __post_init__(self) -> None:
        _int("steps", self.steps, 0, f"must be 0 (off) or a number of steps, got {self.steps}")
        _choice("precision", self.precision, PRECISIONS)
        object.__setattr__(self, "ratios", _ratios("ratios", self.ratios))
        if self.steps:
            if not _number("lr", self.lr) > 0:
                raise ConfigError("lr", f"must be positive, got {self.lr}")
            _int("batch_size", self.batch_size, 1)
            if not self.ratios:
                raise ConfigError("ratios", "needs at least one retention ratio (1: the dense model)")
        if not _number("vision_lr", self.vision_lr) >= 0:
            raise ConfigError("vision_lr", f"must be 0 (tower frozen) or positive, got {self.vision_lr}")
        if not _number("scale_lr", self.scale_lr) >= 0:
            raise ConfigError("scale_lr", f"must be 0 (weight scales frozen) or positive, got {self.scale_lr}")
        _choice("positions", self.positions, POSITIONS)

    @property
    def enabled(self) -> bool:
        return self.steps > 0


@dataclass(frozen=True)
class FusionConfig:
    """Pruning fusion weights learned per retention ratio below 1 (none: no fusion weights)."""

    ratios: tuple[float, ...] = (0.5, 0.25, 0.125)
    samples: int = 64
    objective: str = "kl"
    holdout: bool = True  # adopt the searched weights only if they beat the paper's preset on held-out questions

    def __post_init__(self) -> None:
        ratios = tuple(r for r in _ratios("ratios", self.ratios) if r < 1.0)
        object.__setattr__(self, "ratios", ratios)
        if ratios:
            _int("samples", self.samples, 1)
        _choice("objective", self.objective, OBJECTIVES)
        _flag("holdout", self.holdout)

    @property
    def enabled(self) -> bool:
        return bool(self.ratios)


@dataclass(frozen=True)
class CalibrationConfig:
    """One ``qavtp calibrate`` run: the calibration data, the seed and device, and what is done with them."""

    data: str = "easy-vqa"
    n_samples: int = 128
    batch_size: int = 8
    seed: int = 0
    device: str | None = None  # cpu, cuda, cuda:N: where the layer-by-layer work runs
    quant: QuantConfig = field(default_factory=QuantConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    recipe: str | None = None  # the recipe's name, recorded in the artifact
    # Read the decoder layers one at a time from the checkpoint's shards (None: when its float32 weights exceed
    # STREAM_ABOVE_BYTES); the artifact then stores one shard per layer.
    stream: bool | None = None

    def __post_init__(self) -> None:
        if self.stream is not None and not isinstance(self.stream, bool):
            raise ConfigError("stream", f"must be true, false or None (automatic), got {self.stream!r}")
        if not isinstance(self.data, str) or not self.data:
            raise ConfigError("data", f"must name a data set, got {self.data!r}")
        _int("n_samples", self.n_samples, 1, f"must be at least 1 (the calibration set is empty), got {self.n_samples}")
        _int("batch_size", self.batch_size, 1)
        _int("seed", self.seed)
        for name, kind in (("quant", QuantConfig), ("align", AlignConfig), ("fusion", FusionConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(name, f"must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")


@dataclass(frozen=True)
class WeightFormat:
    """How quantized weights become ONNX: blocked ``DequantizeLinear`` + ``MatMul`` (``qdq``, any runtime) or
    onnxruntime's ``MatMulNBits`` (``ort``) with its accuracy level (4: int8 activations inside the kernel)."""

    format: str = "qdq"
    accuracy_level: int = 0
    activations: str = "exact"
    # the decoder in fused ops: onnxruntime's GroupQueryAttention and SimplifiedLayerNormalization ops (ort), or
    # opset 23's Attention, RMSNormalization and RotaryEmbedding (qdq)
    fused: bool = False

    def __post_init__(self) -> None:
        _choice("format", self.format, EXPORT_FORMATS)
        _choice("activations", self.activations, ACTIVATION_MODES)
        _int("accuracy_level", self.accuracy_level, 0)
        if self.accuracy_level > 4:
            raise ConfigError("accuracy_level", f"must be 0 to 4, got {self.accuracy_level}")

    @property
    def ort(self) -> bool:
        """onnxruntime's contrib ops (MatMulNBits, the blocked activation Q/DQ) may be used."""
        return self.format == "ort"

    @property
    def exact(self) -> bool:
        """The linears' activation quantizers are in the graph (``activations == "exact"``)."""
        return self.activations == "exact"

    @property
    def fused_ops(self) -> bool:
        """The decoder uses onnxruntime's own fused attention and norms (contrib ops: onnxruntime only)."""
        return self.ort and self.fused


@dataclass(frozen=True)
class ExportConfig:
    """What ``qavtp export`` writes: the kept fraction and its in-graph scorer, and the int4 weight format."""

    retain: float = 1.0
    scorer: str = "qavtp"  # ignored at retain 1
    format: str = "qdq"  # qdq: standard DequantizeLinear; ort: onnxruntime's MatMulNBits
    accuracy_level: int | None = None  # MatMulNBits' (4: int8 activations inside the kernel); None: 0 exact, 4 runtime
    relevance_weight: float | None = None  # theta of cdpruner (0.5) and qavtp-dpp (the learned one)
    activations: str = "exact"  # exact: the calibrated activation quantizers in the graph; runtime: the runtime's
    # the decoder's attention and norms as fused ops (onnxruntime's in ort, opset 23's in qdq); None: with runtime
    # activations (the exact graph keeps torch's ops one for one, and its KV cache holds what torch's holds)
    fused: bool | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "retain", check_ratio(self.retain))
        except QavtpError as e:
            raise ConfigError("retain", f"must be a retention ratio in (0, 1], got {self.retain}") from e
        _choice("scorer", self.scorer, EXPORT_SCORERS)
        _theta(self.relevance_weight, (self.scorer,))
        _choice("activations", self.activations, ACTIVATION_MODES)
        if self.accuracy_level is None:
            object.__setattr__(self, "accuracy_level", 0 if self.activations == "exact" else 4)
        WeightFormat(self.format, self.accuracy_level, self.activations)  # checks the format and level
        if self.fused is None:
            object.__setattr__(self, "fused", self.activations == "runtime")
        if not isinstance(self.fused, bool):
            raise ConfigError("fused", f"must be true or false, got {self.fused!r}")

    @property
    def weights(self) -> WeightFormat:
        return WeightFormat(self.format, self.accuracy_level, self.activations, self.fused)


EVAL_MODES = ("loglik", "generate")
DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class EvalConfig:
    """One ``qavtp eval``: a single evaluation, or a sweep when several ratios or scorers (or ``with_fp``) are asked."""

    ratios: tuple[float, ...] = ()  # () : dense
    scorers: tuple[str, ...] = ("semantic",)
    layer: int = 0  # K: prune before decoder layer K (0: before the LLM)
    mode: str = "loglik"
    dtype: str = "fp32"
    batch_size: int = 16
    seed: int = 0
    with_fp: bool = False
    fp_scorers: tuple[str, ...] = ("semantic",)
    device: str = "cpu"
    relevance_weight: float | None = None  # theta of cdpruner (0.5) and qavtp-dpp (the learned one)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", _ratios("ratios", self.ratios))
        if not self.scorers:
            raise ConfigError("scorers", "names no scorer")
        _int("layer", self.layer, 0)
        _choice("mode", self.mode, EVAL_MODES)
        _choice("dtype", self.dtype, DTYPES)
        _int("batch_size", self.batch_size, 1)
        _int("seed", self.seed)
        _theta(self.relevance_weight, self.scorers + (self.fp_scorers if self.with_fp else ()))
        if self.mode != "loglik" and self.is_sweep:
            raise ConfigError("mode", "must be loglik for sweeps (several ratios or scorers, or with_fp)")
        if self.device != "cpu" and (self.ratios or self.is_sweep or self.mode != "loglik"):
            raise ConfigError("device", f"{self.device} evaluates dense loglik only; pruning, sweeps, generation: cpu")

    @property
    def is_sweep(self) -> bool:
        return len(self.ratios) > 1 or len(self.scorers) > 1 or self.with_fp


@dataclass(frozen=True)
class StageConfig:
    """One stage-2 run of the reference training: the projector (and tower) through the frozen LLM."""

    steps: int
    schedule: int | None = None  # warm-up + cosine length (default: steps), so a run may stop before its end
    batch: int = 16  # questions a step, or conversations with ``pack``
    lr: float = 1e-3
    tower_lr: float = 1e-4
    pack: int = 0  # > 0: conversations of up to this many questions about one image
    name: str = "stage2"  # the checkpoint's and the log's name
    eval_every: int = 100
    save_every: int = 50
    heldout: int = 200  # held-out questions, from train images kept out of training
    precision: str = "auto"  # autocast: bf16 where the CPU has bf16 instructions, else fp32

    def __post_init__(self) -> None:
        _int("steps", self.steps, 0)
        if self.schedule is not None:
            _int("schedule", self.schedule, 1)
        for name in ("batch", "eval_every", "save_every", "heldout"):
            _int(name, getattr(self, name), 1)
        _int("pack", self.pack, 0)
        _choice("precision", self.precision, PRECISIONS)
        for name in ("lr", "tower_lr"):
            if _number(name, getattr(self, name)) < 0:
                raise ConfigError(name, f"must be 0 or positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class ReferenceTrainingConfig:
    """The recipe that produced the shipped reference weights (docs/results.md): stage 1, then stage 2 on single
    questions, then on packed multi-turn conversations, each stopped where held-out accuracy had plateaued."""

    seed: int = 0
    stage1_epochs: int = 12
    single: StageConfig = StageConfig(100, schedule=450)
    packed: StageConfig = StageConfig(400, schedule=800, batch=4, pack=6, name="stage2b")

    def __post_init__(self) -> None:
        _int("seed", self.seed)
        _int("stage1_epochs", self.stage1_epochs, 0)


def updated(config: Any, changes: Mapping[str, Any]) -> Any:
    """``config`` with dotted-path ``changes`` (``{"quant.gptq": True, "seed": 1}``), validated again."""
    own = {k: v for k, v in changes.items() if "." not in k}
    nested: dict[str, dict[str, Any]] = {}
    for k, v in changes.items():
        if "." in k:
            head, _, rest = k.partition(".")
            nested.setdefault(head, {})[rest] = v
    for head, sub in nested.items():
        try:
            own[head] = updated(getattr(config, head), sub)
        except ConfigError as e:
            raise e.within(head) from None
    return replace(config, **own) if own else config

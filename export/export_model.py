"""``qavtp export``: load a model or an artifact, build both graphs, write the export directory atomically.

The directory holds ``prefill.onnx`` and ``decode.onnx`` (sharing ``weights.bin``: every weight stored once),
the processor/tokenizer files, and ``export.json`` (inputs, outputs, quantization, pruning, prompt format).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import onnx

from qavtp.calibrate.artifact import fingerprint, load_artifact, read_config
from qavtp.calibrate.artifact_config import ArtifactConfig, fusion_params
from qavtp.config import ExportConfig
from qavtp.data.prompts import chat_prompt, vqa_text
from qavtp.errors import QavtpError
from qavtp.export.external_data import WeightStore, to_model
from qavtp.export.llava_graph import check_supported
from qavtp.export.onnx_graph import Graph
from qavtp.export.prefill_decode import build_decode, build_prefill
from qavtp.export.pruning_subgraph import Selection
from qavtp.io import atomic_dir, check_output, disk_full_is_one_line, sha256_file
from qavtp.models.loading import load_model, resolve
from qavtp.models.reference import NAME, cache_root
from qavtp.pruning import keep_count
from qavtp.scoring import CDPRUNER_THETA, LEARNED_SCORERS, FusionParams, as_dpp, qapruner_params

EXPORT_VERSION = 1
META = "export.json"
PREFILL, DECODE, WEIGHTS = "prefill.onnx", "decode.onnx", "weights.bin"
SENTINEL = "\ue000QUESTION\ue000"  # a private-use character pair that no template or tokenizer touches
_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}


def is_artifact(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "quantized.safetensors").is_file() and (p / "config.json").is_file()


def _io(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)), "shape": dims})
    return out


def _graph_io(g: Graph) -> dict:
    return {"inputs": _io(g.inputs), "outputs": _io(g.outputs)}


def _n_visual(model) -> int:
    cfg = model.config
    vc = cfg.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (1 if cfg.vision_feature_select_strategy == "full" else 0)


def _prompt_parts(processor) -> tuple[str, str]:
    """The chat prompt around a question: ``prefix + question + suffix`` is what ``qavtp eval`` feeds the model."""
    text = chat_prompt(processor, vqa_text(SENTINEL), with_image=True)
    if text.count(SENTINEL) != 1:
        raise QavtpError("the chat template does not place the question exactly once; cannot record the prompt format")
    prefix, suffix = text.split(SENTINEL)
    return prefix, suffix


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return sorted(int(i) for i in ids)


def _load(source: str, cache_dir):
    """``(model, processor, adapter, artifact config or None, source record)``."""
    if is_artifact(source):
        model, processor, adapter, cfg = load_artifact(source)
        record = {"kind": "artifact", "path": str(Path(source).resolve()), "fingerprint": fingerprint(source)}
        record["model_fingerprint"] = cfg.source.fingerprint
        return model, processor, adapter, cfg, record
    path = resolve(source, cache_dir)
    model, processor, adapter = load_model(path, "fp32")
    return model, processor, adapter, None, {"kind": "model", "path": str(path), "fingerprint": fingerprint(path)}


def _quantization(cfg: ArtifactConfig | None, fmt: str, config: ExportConfig) -> dict:
    if cfg is None:
        return {"weights": None, "activations": None, "method": None, "weight_format": "fp32", "mode": None}
    opts = cfg.options.to_dict()
    transforms = cfg.calibration.transforms
    return {
        "weight_format": fmt,
        # exact: the activations quantized as calibrated; runtime: as the runtime's kernel does (accuracy level).
        "mode": config.activations,
        "accuracy_level": config.accuracy_level if fmt == "ort" else None,
        "method": opts["method"],
        "gptq": opts["gptq"],
        "weights": opts["weights"],
        "activations": opts["activations"],
        "vocab": opts["vocab"],  # token embedding + LM head weights; None: float32
        "kv_cache": opts["kv_cache"],  # None: float keys and values
        "rotation": transforms.get("rotation"),
        "smooth": transforms.get("smooth"),
        # The projector in the graph is the one aligned to the quantized LLM (None: the checkpoint's own).
        "projector_alignment": _alignment_summary(cfg.alignment),
    }


def _alignment_summary(rec: dict | None) -> dict | None:
    if rec is None:
        return None
    keys = ("ratios", "steps", "best_step", "heldout_kl_before", "heldout_kl_after")
    return {k: rec[k] for k in keys if k in rec}


@dataclass
class Loaded:
    """A model ready to export, with where it came from (``cfg`` is the artifact config, None for a model)."""

    model: object
    processor: object
    adapter: object
    cfg: ArtifactConfig | None
    source: dict


def load_source(source: str, cache_dir: str | os.PathLike | None = None) -> Loaded:
    """An artifact directory, a LLaVA checkpoint directory or ``smollava-easyvqa``, loaded and checked."""
    loaded = Loaded(*_load(source, cache_dir))
    check_supported(loaded.model)
    return loaded


def export_model(
    source: str,
    out_dir: str | os.PathLike,
    config: ExportConfig,
    *,
    overwrite: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Export ``source`` (an artifact directory, a LLaVA checkpoint or ``smollava-easyvqa``) to ``out_dir``."""
    out = check_output(out_dir, "export", [None if source == NAME else source, cache_root(cache_dir)], overwrite)
    if is_artifact(source):
        model = read_config(source).source.model
        check_output(out, "export", [None if model == NAME else model], overwrite)
    if config.retain < 1 and config.scorer in LEARNED_SCORERS:
        if not is_artifact(source):
            raise QavtpError(
                f"scorer {config.scorer!r} needs a calibration artifact with fusion weights; pass one, "
                "or --scorer qapruner"
            )
        fusion_params(read_config(source), config.retain)  # fail before loading anything
    return write_export(load_source(source, cache_dir), out, config)


def _pruning_params(
    config: ExportConfig, cfg: ArtifactConfig | None, dim: int
) -> tuple[FusionParams | None, float | None]:
    """The in-graph scorer's fusion parameters and the relevance weight theta of its DPP (None: no DPP)."""
    if config.retain == 1 or config.scorer in ("semantic", "divprune"):
        return None, None
    if config.scorer == "cdpruner":
        return None, CDPRUNER_THETA if config.relevance_weight is None else config.relevance_weight
    if config.scorer == "qapruner":
        return qapruner_params(dim), None
    if cfg is None:
        raise QavtpError(
            f"scorer {config.scorer!r} needs a calibration artifact with fusion weights; pass one, or --scorer qapruner"
        )
    params = fusion_params(cfg, config.retain)
    if config.scorer == "qavtp-dpp":
        params = as_dpp(params, config.relevance_weight)
    return params, params.theta if params.select == "dpp" else None


def write_export(loaded: Loaded, out: Path, config: ExportConfig) -> Path:
    """Build both graphs of a loaded model and write the export directory (replacing ``out`` atomically)."""
    rho, scorer, fmt, accuracy_level = config.retain, config.scorer, config.format, config.accuracy_level
    model, processor, adapter, cfg = loaded.model, loaded.processor, loaded.adapter, loaded.cfg
    n = _n_visual(model)
    k = keep_count(n, rho)
    params, theta = _pruning_params(config, cfg, adapter.embed_tokens.weight.shape[1])
    used_scorer = scorer if rho < 1 else None
    weight_fmt = fmt if cfg is not None else "fp32"

    prefix, suffix = _prompt_parts(processor)
    tok = processor.tokenizer
    text = model.config.get_text_config()
    dec_layers = adapter.decoder_layers
    attn = dec_layers[0].self_attn
    meta = {
        "format_version": EXPORT_VERSION,
        "qavtp_version": version("qavtp"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "opset": None,  # set once the graphs are built
        "source": loaded.source,
        "files": {"prefill": PREFILL, "decode": DECODE, "weights": WEIGHTS},
        "quantization": _quantization(cfg, weight_fmt, config),
        "pruning": {
            "retain": rho,
            "n_visual": n,
            "k": k,
            "layer": 0,
            "scorer": used_scorer,
            "fusion": params.to_dict() if params is not None else None,
            "relevance_weight": theta,
        },
        "model": {
            "image_token": getattr(processor, "image_token", "<image>"),
            "image_token_id": adapter.image_token_id,
            "image_size": model.config.vision_config.image_size,
            "num_layers": len(dec_layers),
            "num_kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            "head_dim": int(getattr(attn, "head_dim", text.hidden_size // text.num_attention_heads)),
            "vocab_size": int(adapter.embed_tokens.weight.shape[0]),
            "max_sequence_length": int(text.max_position_embeddings),
            "eos_token_ids": _eos_ids(model, tok),
            "pad_token_id": tok.pad_token_id,
        },
        "prompt": {"prefix": prefix, "suffix": suffix, "add_special_tokens": True},
        # onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits with accuracy level 4 (int8 activations)
        # unless told otherwise; this keeps the qdq graph's float32 numerics.
        "onnxruntime": {
            "session_config": {"session.qdq_matmulnbits_accuracy_level": str(accuracy_level)},
            # GroupQueryAttention: a decode step may write into its past buffers (qavtp run binds them so)
            "fused_ops": config.weights.fused_ops,
        },
    }
    sel = Selection(n, k, used_scorer, params, theta)
    with disk_full_is_one_line(out, "export"):
        _write(out, adapter, config, meta, sel, processor)
    return out


def _write(out: Path, adapter, config: ExportConfig, meta: dict, sel: Selection, processor) -> None:
    with atomic_dir(out) as tmp:
        # Each weight goes to weights.bin as the graph registers it: a streamed model's layers are read one at a
        # time, and no graph ever holds the model's bytes (nor nears protobuf's 2 GiB limit).
        store = WeightStore(tmp / WEIGHTS)
        try:
            graphs = {}
            for name, build in (
                (PREFILL, lambda: build_prefill(adapter, config.weights, sel, store.place)),
                (DECODE, lambda: build_decode(adapter, config.weights, store.place)),
            ):
                g = graphs[name] = build()
                (tmp / name).write_bytes(to_model(g, store, doc=f"qavtp {name}").SerializeToString())
        finally:
            store.close()
        meta["opset"] = max(g.opset for g in graphs.values())
        meta["graphs"] = {"prefill": _graph_io(graphs[PREFILL]), "decode": _graph_io(graphs[DECODE])}
        processor.save_pretrained(tmp)
        # What qavtp run / eval-onnx verify before running: a swapped or truncated file is one line, not garbage.
        meta["digests"] = {name: sha256_file(tmp / name) for name in (PREFILL, DECODE, WEIGHTS)}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")

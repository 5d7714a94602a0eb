"""Running an exported directory with onnxruntime (or OpenVINO) alone: no torch, no transformers.

Image preprocessing repeats the saved CLIP image processor (PIL backend) step for step, the prompt is the
recorded chat format with the image placeholder expanded to N image tokens, tokenized by ``tokenizers``
from ``tokenizer.json``; greedy generation runs the prefill graph once and the decode graph per token.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError

from qavtp.errors import QavtpError
from qavtp.export.kv_buffers import KVBuffers
from qavtp.io import sha256_file

META = "export.json"
RUNTIMES = ("onnxruntime", "openvino")
# OpenVINO's CPU defaults trade exactness for speed: bf16 inference where the CPU has it, and int8 dynamic
# quantization of the activations that feed int4 weights (groups of 32). Both off, it computes in float32
# what onnxruntime and the torch spec compute (measured: fp32 graph logits within 1e-4 of onnxruntime).
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


# ------------------------------------------------------------------------------------- model files


def confined(root: str | os.PathLike, name: object, what: str) -> Path:
    """``root / name`` for a plain file name whose target, symlinks resolved, stays inside ``root``; else one line."""
    d = Path(root)
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise QavtpError(f"{d / META}: {what} must be a file name inside the export folder, got {name!r}")
    path = d / name
    if not path.resolve().is_relative_to(d.resolve()):
        raise QavtpError(f"{d}: {what} {name} points outside the export folder ({path.resolve()})")
    return path


def _tensors(graph) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers, sparse ones, Constant and other node attributes, subgraphs'."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node) -> Iterator[onnx.TensorProto]:
    for a in node.attribute:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        for sparse in [a.sparse_tensor] * a.HasField("sparse_tensor") + list(a.sparse_tensors):
            yield from (sparse.values, sparse.indices)
        for sub in [a.g] * a.HasField("g") + list(a.graphs):
            yield from _tensors(sub)


def check_external_data(model_path: str | os.PathLike) -> None:
    """Refuse a graph with a tensor anywhere (initializers, Constant nodes, sparse tensors, subgraphs, functions)
    whose external data lies outside its directory (absolute paths, ``..``, symlinks out)."""
    path = Path(model_path)
    root = path.parent.resolve()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types for a damaged file
        raise QavtpError(f"cannot read ONNX graph {path}: {e}") from None
    tensors = list(_tensors(model.graph))
    tensors += [t for f in model.functions for n in f.node for t in _node_tensors(n)]
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), None)
        if not loc:
            raise QavtpError(f"{path.name}: tensor {t.name} has external data without a location")
        p = Path(loc)
        outside = p.is_absolute() or loc.startswith(("/", "\\")) or ".." in p.parts or ":" in loc
        if outside or not (root / p).resolve().is_relative_to(root):
            raise QavtpError(f"{path.name}: tensor {t.name} reads external data outside the model directory ({loc})")


# The fields of export.json that running an export reads, with their types (None: may be null).
_META_FIELDS: dict[str, dict[str, tuple]] = {
    "files": {"prefill": (str,), "decode": (str,), "weights": (str,)},
    "pruning": {"retain": (int, float), "n_visual": (int,), "k": (int,), "scorer": (str, type(None))},
    "model": {
        "image_token": (str,),
        "image_token_id": (int,),
        "image_size": (int,),
        "num_layers": (int,),
        "num_kv_heads": (int,),
        "head_dim": (int,),
        "vocab_size": (int,),
        "max_sequence_length": (int,),
        "eos_token_ids": (list,),
        "pad_token_id": (int, type(None)),
    },
    "prompt": {"prefix": (str,), "suffix": (str,)},
}


_POSITIVE = ("image_size", "num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_sequence_length")


def check_meta(meta: object, where: Path) -> dict:
    """``export.json`` with every field that running the export reads present and of its type; else one line."""
    if not isinstance(meta, dict):
        raise QavtpError(f"{where} must hold a JSON object, got {type(meta).__name__}")
    for section, fields in _META_FIELDS.items():
        part = meta.get(section)
        if not isinstance(part, dict):
            raise QavtpError(f"{where} lacks the {section!r} section (a damaged or foreign export.json)")
        for key, kinds in fields.items():
            value = part.get(key, ...)
            if value is ... or isinstance(value, bool) or not isinstance(value, kinds):
                got = "nothing" if value is ... else repr(value)
                raise QavtpError(f"{where}: {section}.{key} has the wrong type or is missing (got {got})")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in meta["model"]["eos_token_ids"]):
        raise QavtpError(f"{where}: model.eos_token_ids must be a list of token ids")
    counts = {f"model.{k}": meta["model"][k] for k in _POSITIVE} | {
        f"pruning.{k}": meta["pruning"][k] for k in ("k", "n_visual")
    }
    for name, value in counts.items():
        if value < 1:
            raise QavtpError(f"{where}: {name} must be at least 1, got {value}")
    if not 0 < meta["pruning"]["retain"] <= 1 or meta["pruning"]["k"] > meta["pruning"]["n_visual"]:
        raise QavtpError(f"{where}: pruning keeps {meta['pruning']['k']} of {meta['pruning']['n_visual']} tokens")
    for key in ("image_token_id", "pad_token_id"):
        if (meta["model"][key] or 0) < 0:
            raise QavtpError(f"{where}: model.{key} must not be negative")
    runtime = meta.get("onnxruntime", {})
    config = runtime.get("session_config", {}) if isinstance(runtime, dict) else None
    if not isinstance(config, dict) or not all(isinstance(v, str) for v in config.values()):
        raise QavtpError(f"{where}: onnxruntime.session_config must map option names to strings")
    if not isinstance(meta.get("source", {}), dict):
        raise QavtpError(f"{where}: source must be an object")
    digests = meta.get("digests", {})
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise QavtpError(f"{where}: digests must map file names to SHA-256 hex strings")
    return meta


def read_meta(model_dir: str | os.PathLike) -> dict:
    d = Path(model_dir)
    f = d / META
    if not f.is_file():
        raise QavtpError(f"{d} is not a qavtp export (no {META}); create one with qavtp export")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QavtpError(f"{f} is not valid JSON: {e}") from None
    return check_meta(meta, f)


def check_digests(model_dir: Path, meta: dict) -> None:
    """Every file ``export.json`` records a digest of must still hash to it: a swapped, truncated or edited weights
    file or graph is one line, not garbage answers (older exports record none)."""
    for name, digest in meta.get("digests", {}).items():
        path = confined(model_dir, name, "a digested file")
        if not path.is_file():
            raise QavtpError(f"{model_dir} lacks {name}")
        if sha256_file(path) != digest:
            raise QavtpError(
                f"{path} does not match the digest export.json recorded for it: the file was changed, truncated or "
                "comes from another export; export again"
            )


# ---------------------------------------------------------------------------------------- image


def _image_config(model_dir: Path) -> dict:
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = confined(model_dir, name, "the image processor configuration")
        if f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise QavtpError(f"{f} is not valid JSON: {e}") from None
            cfg = cfg.get("image_processor", cfg) if isinstance(cfg, dict) else None
            if isinstance(cfg, dict) and ("image_mean" in cfg or "do_normalize" in cfg):
                return cfg
    raise QavtpError(f"{model_dir} has no image processor configuration (preprocessor_config.json)")


def load_image(path: str | os.PathLike) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise QavtpError(f"image not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise QavtpError(f"{path} is too large to decode safely: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise QavtpError(f"{path} is not a readable image ({type(e).__name__})") from None
    return im


def _to_rgb(im: Image.Image) -> np.ndarray:
    """transformers' ``convert_to_rgb``: transparency is composited onto white."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.array(im.convert("RGB"))


def _resize_shape(h: int, w: int, size: dict) -> tuple[int, int]:
    if "shortest_edge" in size:
        s = int(size["shortest_edge"])
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s, int(s * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    raise QavtpError(f"unsupported image resize setting {size}")


def _center_crop(a: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """``[H, W, C]`` centre crop, zero-padding a too-small image as transformers does."""
    h, w = a.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return a[top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((nh, nw, a.shape[2]), dtype=a.dtype)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)
    padded[tp : tp + h, lp : lp + w] = a
    top, left = top + tp, left + lp
    return padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


def preprocess_image(im: Image.Image, cfg: dict) -> np.ndarray:
    """``pixel_values [3, H, W]`` float32, as the saved CLIP image processor (PIL backend) computes them."""
    a = _to_rgb(im) if cfg.get("do_convert_rgb", True) else np.array(im)
    if cfg.get("do_resize", True):
        h, w = _resize_shape(a.shape[0], a.shape[1], cfg["size"])
        resample = Image.Resampling(cfg.get("resample", Image.Resampling.BICUBIC))
        a = np.array(Image.fromarray(a).resize((w, h), resample=resample))
    if cfg.get("do_center_crop", False):
        crop = cfg["crop_size"]
        a = _center_crop(a, int(crop["height"]), int(crop["width"]))
    if cfg.get("do_rescale", True):
        a = (a.astype(np.float64) * cfg.get("rescale_factor", 1 / 255)).astype(np.float32)
    else:
        a = a.astype(np.float32)
    if cfg.get("do_normalize", True):
        mean = np.array(cfg["image_mean"], dtype=np.float32)
        std = np.array(cfg["image_std"], dtype=np.float32)
        a = (a - mean) / std
    return np.ascontiguousarray(a.transpose(2, 0, 1))


# ------------------------------------------------------------------------------------------ text


class PromptEncoder:
    """The exported chat prompt, tokenized with the ``tokenizers`` library from ``tokenizer.json``."""

    def __init__(self, model_dir: Path, meta: dict):
        from tokenizers import Tokenizer

        path = confined(model_dir, "tokenizer.json", "the tokenizer")
        if not path.is_file():
            raise QavtpError(f"{model_dir} lacks tokenizer.json, the tokenizer the export runs with")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a damaged file
            raise QavtpError(f"{path} is not a readable tokenizer: {str(e).splitlines()[0][:200]}") from None
        self.prefix, self.suffix = meta["prompt"]["prefix"], meta["prompt"]["suffix"]
        self.add_special = bool(meta["prompt"].get("add_special_tokens", True))
        self.image_token = meta["model"]["image_token"]
        self.n_visual = int(meta["pruning"]["n_visual"])

    def prompt(self, question: str) -> str:
        if self.image_token in question:
            raise QavtpError(f"the question must not contain the image placeholder {self.image_token}")
        # The processor expands the one image placeholder into N image tokens before tokenizing.
        text = self.prefix + question + self.suffix
        return text.replace(self.image_token, self.image_token * self.n_visual)

    def encode(self, question: str) -> list[int]:
        return self.tok.encode(self.prompt(question), add_special_tokens=self.add_special).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------------------- sessions


def _left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


@dataclass
class Generation:
    text: str
    tokens: list[int]
    kept: int
    n_visual: int
    kept_indices: list[int]
    timings_ms: dict = field(default_factory=dict)


def _first_line(e: BaseException) -> str:
    """The first line of a runtime's error (onnxruntime raises its own Fail/InvalidGraph/... types), or its type."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class _OnnxruntimeGraph:
    def __init__(self, path: Path, meta: dict, threads: int | None, profile_prefix: str | None):
        so = ort.SessionOptions()
        for k, v in meta.get("onnxruntime", {}).get("session_config", {}).items():
            so.add_session_config_entry(k, v)
        if threads:
            so.intra_op_num_threads = threads
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            first = _first_line(e)
            raise QavtpError(f"onnxruntime cannot load {path}: {first}") from None
        self.names = [o.name for o in self.session.get_outputs()]
        self.path = path

    def __call__(self, feeds: dict) -> dict:
        try:
            return dict(zip(self.names, self.session.run(None, feeds), strict=True))
        except Exception as e:  # a graph that export.json does not describe (other inputs, shapes, layers)
            first = _first_line(e)
            raise QavtpError(
                f"onnxruntime failed to run {self.path.name} ({first}): export.json does not match it"
            ) from None

    def run_in_place(self, feeds: dict, cache: KVBuffers) -> np.ndarray:
        """One decode step whose presents overwrite ``cache`` in place; returns the logits."""
        binding = self.session.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        binding.bind_output("logits")  # bound first: get_outputs() keeps the binding order
        cache.bind(binding)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            first = _first_line(e)
            raise QavtpError(f"onnxruntime failed to run {self.path.name} ({first})") from None
        return binding.get_outputs()[0].numpy()


class _OpenVINOGraph:
    def __init__(self, path: Path, threads: int | None):
        try:
            import openvino
        except ImportError:
            raise QavtpError("the openvino runtime needs the openvino package: pip install openvino") from None
        core = openvino.Core()
        config = dict(OPENVINO_CONFIG, **({"INFERENCE_NUM_THREADS": threads} if threads else {}))
        try:
            model = core.read_model(str(path))
            compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as e:
            failed = re.search(r"Conversion is failed for: ([^\n]+)", str(e))
            why = f"it does not convert {failed.group(1).strip()}" if failed else str(e).strip().splitlines()[0]
            version = openvino.__version__.split("-")[0]
            msg = f"OpenVINO {version} cannot run {path}: {why} (the portable graph is --format qdq)"
            raise QavtpError(msg) from None
        # An output keeps its ONNX name among its tensor names; the compiled model keeps the output order.
        self.names = [next(iter(sorted(o.get_names()))) for o in model.outputs]
        self.request = compiled.create_infer_request()

    def __call__(self, feeds: dict) -> dict:
        out = self.request.infer(feeds)  # copies the outputs: a decode loop keeps the previous step's cache
        return {n: out[i] for i, n in enumerate(self.names)}


class ExportedModel:
    """Both graphs of an export directory, with preprocessing, tokenization and greedy generation.

    ``runtime``: ``onnxruntime`` (the default) or ``openvino`` (CPU, float32, see ``OPENVINO_CONFIG``), which runs
    the portable ``qdq`` graphs; the ``ort`` format's contrib ops and blocked activation Q/DQ are onnxruntime's.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        threads: int | None = None,
        profile: bool = False,
        runtime: str = "onnxruntime",
    ):
        if runtime not in RUNTIMES:
            raise QavtpError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
        if profile and runtime != "onnxruntime":
            raise QavtpError("per-stage profiling needs the onnxruntime runtime")
        self.runtime = runtime
        self.dir = Path(model_dir)
        self.meta = read_meta(self.dir)
        files = self.meta["files"]
        for key in ("prefill", "decode", "weights"):
            confined(self.dir, files[key], f"files.{key}")
        for name in (files["prefill"], files["decode"]):
            if not (self.dir / name).is_file():
                raise QavtpError(f"{self.dir} lacks {name}")
            check_external_data(self.dir / name)
        check_digests(self.dir, self.meta)
        self.image_cfg = _image_config(self.dir)
        self.text = PromptEncoder(self.dir, self.meta)
        self._profile_dir = tempfile.TemporaryDirectory(prefix="qavtp-profile-") if profile else None
        self.prefill = self._graph(files["prefill"], threads, profile)
        self.decode = self._graph(files["decode"], threads, False)
        self.n_layers = int(self.meta["model"]["num_layers"])
        # A fused graph's GroupQueryAttention can write each step into its past buffers (KVBuffers).
        self.fused_ops = self.meta.get("onnxruntime", {}).get("fused_ops") is True
        self.in_place_cache = runtime == "onnxruntime" and self.fused_ops

    def _graph(self, name: str, threads: int | None, profile: bool):
        if self.runtime == "openvino":
            return _OpenVINOGraph(self.dir / name, threads)
        prefix = str(Path(self._profile_dir.name) / "prefill") if profile else None
        return _OnnxruntimeGraph(self.dir / name, self.meta, threads, prefix)

    # -- inputs ---------------------------------------------------------------------------------
    def pixel_values(self, images: list[Image.Image]) -> np.ndarray:
        return np.stack([preprocess_image(im, self.image_cfg) for im in images])

    def inputs(self, images: list[Image.Image], questions: list[str], max_new_tokens: int = 0) -> dict:
        rows = [self.text.encode(q) for q in questions]
        limit = int(self.meta["model"]["max_sequence_length"])
        for r in rows:
            if len(r) + max_new_tokens > limit:
                raise QavtpError(
                    f"the prompt is {len(r)} tokens; with {max_new_tokens} new tokens it exceeds the graph's "
                    f"maximum sequence length {limit}"
                )
        pad = self.meta["model"]["pad_token_id"]
        ids, mask = _left_pad(rows, 0 if pad is None else int(pad))
        return {"pixel_values": self.pixel_values(images), "input_ids": ids, "attention_mask": mask}

    # -- graphs ---------------------------------------------------------------------------------
    def run_prefill(self, feeds: dict) -> dict:
        return self.prefill(feeds)

    def run_decode(self, input_ids, attention_mask, position_ids, past: dict) -> dict:
        if self.fused_ops and input_ids.shape[0] > 1 and input_ids.shape[1] > 1:
            # GroupQueryAttention takes several new tokens after a past for one row at a time (scoring answers;
            # generation steps one token).
            rows = [
                self.run_decode(
                    input_ids[r : r + 1],
                    attention_mask[r : r + 1],
                    position_ids[r : r + 1],
                    {k: v[r : r + 1] for k, v in past.items() if k.startswith("present.")},
                )
                for r in range(input_ids.shape[0])
            ]
            return {k: np.concatenate([o[k] for o in rows]) for k in rows[0]}
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        for i in range(self.n_layers):
            feeds[f"past.{i}.key"] = past[f"present.{i}.key"]
            feeds[f"past.{i}.value"] = past[f"present.{i}.value"]
        return self.decode(feeds)

    @property
    def numerics(self) -> str:
        """What the graph computes, in words: ``fp32``, or the int4 format and the activations' mode."""
        q = self.meta.get("quantization")
        if not isinstance(q, dict) or q.get("weight_format") in (None, "fp32"):
            return "fp32"
        level = f", accuracy level {q['accuracy_level']}" if q.get("accuracy_level") is not None else ""
        # Exports before the two modes existed are exact.
        return f"int4 weights ({q['weight_format']}{level}), {q.get('mode') or 'exact'} activations"

    def stage_times(self) -> dict:
        """Kernel time per stage of the profiled prefill run (node names carry their stage)."""
        if self._profile_dir is None:
            return {}
        events = json.loads(Path(self.prefill.session.end_profiling()).read_text())
        totals: dict = defaultdict(float)
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                stage = e["name"].split("/", 1)[0]
                totals[stage] += e.get("dur", 0) / 1000
        return {
            "vision_scoring_prune_ms": totals["vision"] + totals["embed"] + totals["prune"],
            "llm_prefill_ms": totals["llm"],
        }

    def greedy(
        self, out: dict, max_new_tokens: int, kv_block: int | None = None, stop: set[int] | None = None
    ) -> tuple[list[int], int]:
        """Greedy tokens after a batch-1 prefill's outputs ``out`` (up to ``max_new_tokens``, ending before a token
        in ``stop``) and the decode steps run. A fused export decodes into cache buffers with room for ``kv_block``
        more positions at a time (default: ``max_new_tokens``, one allocation)."""
        stop = stop or set()
        mask = out["attention_mask_out"]
        pos = mask.sum(1, keepdims=True)  # contiguous positions: the next one is the count of real tokens
        tokens: list[int] = []
        nxt = int(out["logits"][0].argmax())
        past, steps = out, 0
        cache = KVBuffers(out, self.n_layers, kv_block or max_new_tokens) if self.in_place_cache else None
        while nxt not in stop and len(tokens) < max_new_tokens:
            tokens.append(nxt)
            if len(tokens) == max_new_tokens:
                break
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            ids = np.array([[nxt]], np.int64)
            if cache is not None:
                cache.reserve(1)
                logits = self.decode.run_in_place(
                    {"input_ids": ids, "attention_mask": mask, "position_ids": pos}, cache
                )
                cache.advance(1)
            else:
                past = self.run_decode(ids, mask, pos, past)
                logits = past["logits"]
            steps += 1
            pos = pos + 1
            nxt = int(logits[0, -1].argmax())
        return tokens, steps

    def generate(
        self, image: Image.Image, question: str, max_new_tokens: int = 16, kv_block: int | None = None
    ) -> Generation:
        """Greedy answer for one image and question (:meth:`greedy`, ending at an end-of-sequence token)."""
        feeds = self.inputs([image], [question], max_new_tokens)
        t0 = time.perf_counter()
        out = self.run_prefill(feeds)
        t1 = time.perf_counter()
        tokens, steps = self.greedy(out, max_new_tokens, kv_block, set(self.meta["model"]["eos_token_ids"]))
        t2 = time.perf_counter()
        timings = {
            "prefill_wall_ms": (t1 - t0) * 1000,
            "decode_ms": (t2 - t1) * 1000,
            "new_tokens": len(tokens),
            "decode_steps": steps,
        }
        timings.update(self.stage_times())
        kept = out["kept_indices"][0]
        return Generation(
            text=self.text.decode(tokens),
            tokens=tokens,
            kept=int(kept.shape[0]),
            n_visual=int(self.meta["pruning"]["n_visual"]),
            kept_indices=[int(i) for i in kept],
            timings_ms=timings,
        )

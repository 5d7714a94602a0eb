"""Loading a multimodal checkpoint from a local directory, with one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from qavtp.errors import QavtpError
from qavtp.models import llava as _llava  # noqa: F401  (registers the adapter)
from qavtp.models import reference
from qavtp.models.base import Adapter, adapter_class, supported_model_types
from qavtp.models.streaming import (
    LayerStream,
    ShardedCheckpoint,
    checkpoint_source,
    empty_model,
    layer_prefix,
    load_shell,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve(model: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A model directory: the name of the embedded reference model (assembled on first use) or a path."""
    if str(model) == reference.NAME:
        cache = reference.cache_root(cache_dir)
        if cache.exists() and not cache.is_dir():
            raise QavtpError(f"the cache {cache} ($QAVTP_CACHE or --cache-dir) is a file, not a directory")
        return reference.assemble(cache_dir)
    return Path(model)


def check_checkpoint(path: Path) -> dict:
    """Read and validate config.json and the safetensors headers without loading any weights."""
    if not path.exists():
        raise QavtpError(f"model directory not found: {path}")
    if not path.is_dir():
        raise QavtpError(f"model path is not a directory: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise QavtpError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QavtpError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise QavtpError(f"{cfg_file} must hold a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if adapter_class(model_type) is None:
        raise QavtpError(
            f"unsupported architecture {model_type!r} in {cfg_file}; supported: {', '.join(supported_model_types())}"
        )
    if not any(path.glob("*.safetensors")):
        raise QavtpError(f"{path} has no .safetensors weights (pickled .bin weights are not loaded)")
    shapes = ShardedCheckpoint(path).shapes()  # the index checked, every header read, no tensor
    check_config_against_weights(config, shapes, cfg_file)
    return config


# What a LLaVA config must state (transformers fills a missing one with its LLaMA-7B / CLIP-L defaults).
_REQUIRED = {
    "text_config": ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"),
    "vision_config": ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"),
}


def _layer_count(shapes: dict[str, list[int]], part: str) -> int:
    found = {int(m.group(1)) for k in shapes if part in k and (m := re.search(r"\.layers\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def check_config_against_weights(config: dict, shapes: dict[str, list[int]], cfg_file: Path) -> None:
    """``config.json`` must describe the weights before anything is built: sections and sizes present and typed,
    and the embedding, MLP and layer counts of the safetensors headers equal to what it states."""
    for section, keys in _REQUIRED.items():
        sub = config.get(section)
        if not isinstance(sub, dict):
            raise QavtpError(f"{cfg_file}: {section} must be an object, got {sub!r}")
        for key in keys:
            v = sub.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise QavtpError(f"{cfg_file}: {section}.{key} must be a positive integer, got {v!r}")
    text, vision = config["text_config"], config["vision_config"]
    embed = next((k for k in shapes if "language_model" in k and k.endswith("embed_tokens.weight")), None)
    expect = {
        embed: [text["vocab_size"], text["hidden_size"]],
        next((k for k in shapes if "language_model" in k and k.endswith("layers.0.mlp.gate_proj.weight")), None): [
            text["intermediate_size"],
            text["hidden_size"],
        ],
    }
    for key, shape in expect.items():
        if key is None:
            raise QavtpError(f"{cfg_file.parent}: the weights hold no language-model embedding or MLP")
        if shapes[key][: len(shape)] != shape:
            raise QavtpError(
                f"{cfg_file} does not describe these weights: {key} is {shapes[key]}, the config implies {shape}"
            )
    for part, sub, what in (("language_model", text, "text"), ("vision_tower", vision, "vision")):
        n = _layer_count(shapes, part)
        if n != sub["num_hidden_layers"]:
            raise QavtpError(
                f"{cfg_file} does not describe these weights: {what} num_hidden_layers is {sub['num_hidden_layers']}, "
                f"the weights have {n} layers"
            )


def load_model(
    model: str | os.PathLike = reference.NAME,
    dtype: str = "fp32",
    cache_dir: str | os.PathLike | None = None,
    stream: bool = False,
) -> tuple[torch.nn.Module, object, Adapter]:
    """Model, processor and adapter for a local checkpoint (or the reference model's name).

    ``stream``: the decoder layers stay on the meta device, each read from the shards inside
    ``adapter.resident(i)`` (:mod:`qavtp.models.streaming`); the rest is loaded in float32.
    """
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    if dtype not in DTYPES:
        raise QavtpError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve(model, cache_dir)
    config = check_checkpoint(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # a bar per load is noise, and hides the one-line errors
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
        if stream:
            if dtype != "fp32":
                raise QavtpError("a streamed model is read in float32")
            net = empty_model(path, LlavaConfig, LlavaForConditionalGeneration)
        else:
            net = LlavaForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "above report" in first or "size mismatch" in first:
            first = "its weights do not have the shapes config.json describes"
        elif "tokenizer" in first.lower() and not any((path / n).is_file() for n in TOKENIZER_FILES):
            first = f"it has no tokenizer ({' or '.join(TOKENIZER_FILES)})"
        raise QavtpError(f"could not load {path}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    net.eval()
    adapter = adapter_class(config["model_type"])(net)
    if stream:
        ckpt = ShardedCheckpoint(path)
        layers = adapter.decoder_layers
        load_shell(net, ckpt, layer_prefix(net, layers, 0).rsplit(".", 2)[0] + ".")
        adapter.stream = LayerStream(layers, checkpoint_source(ckpt, net, layers))
    return net, processor, adapter


def fp32_bytes(path: Path) -> int:
    """The checkpoint's size once read in float32 (from the safetensors headers): what loading it whole costs."""
    return sum(4 * math.prod(s) for s in ShardedCheckpoint(path).shapes().values())

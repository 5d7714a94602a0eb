"""Random-weight LLaVA checkpoints built from a config: for tests and for real-dimension dry runs."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from qavtp.models.reference import CHAT_TEMPLATE, IMAGE_TOKEN, build_processor

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]


def small_tokenizer(corpus: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in well under a second on ``corpus`` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=[IMAGE_TOKEN],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llava_config(
    tokenizer,
    vision: dict | None = None,
    text: dict | None = None,
    image_token_id: int | None = None,
    vision_feature_layer: int = -2,
):
    """A ``LlavaConfig``: a tiny CLIP + LLaMA by default, any size by ``vision`` / ``text`` overrides."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        **(vision or {}),
    }
    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 2048,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
        **(text or {}),
    }
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text),
        image_token_id=image_token_id if image_token_id is not None else tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def make_random_llava(
    out_dir: str | os.PathLike,
    tokenizer,
    vision: dict | None = None,
    text: dict | None = None,
    image_token_id: int | None = None,
    seed: int = 0,
    vision_feature_layer: int = -2,
    init_device: str = "cpu",
    save_dtype: torch.dtype | None = None,
) -> Path:
    """Save a random ``LlavaForConditionalGeneration`` and its processor as standard HF files.

    ``init_device="cuda"`` draws a 7B model's weights in seconds instead of minutes; ``save_dtype=torch.float16``
    stores it as llava-hf's checkpoints are stored (half the disk)."""
    from transformers import LlavaForConditionalGeneration

    config = llava_config(tokenizer, vision, text, image_token_id, vision_feature_layer)
    torch.manual_seed(seed)
    with torch.device(init_device):
        model = LlavaForConditionalGeneration(config).eval()
    if save_dtype is not None:
        model.to(save_dtype)
    vc = config.vision_config
    processor = build_processor(tokenizer, image_size=vc.image_size, patch_size=vc.patch_size)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# Residual branches that add into a stream: scaled down so that the stream stays O(1) through many layers.
_RESIDUAL_OUT = ("o_proj", "down_proj", "out_proj", "fc2")


def _draw(name: str, shape: tuple[int, ...], n_layers: int, gen: torch.Generator) -> torch.Tensor:
    """One tensor of a random checkpoint that keeps activations finite through every layer: norms 1, biases 0,
    matrices N(0, 1/fan_in) (unit gain: each linear keeps its input's scale), the residual outputs also divided by
    sqrt(2 * layers) (GPT-2's scaling), embeddings N(0, 1) (RMSNorm rescales them anyway)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape)
    if "norm" in name:  # RMSNorm / LayerNorm weights
        return torch.ones(shape)
    if len(shape) == 1:  # CLIP's class embedding
        return torch.randn(shape, generator=gen)
    if "embed" in name and len(shape) == 2:
        return torch.randn(shape, generator=gen) * (0.02 if "position" in name else 1.0)
    fan_in = math.prod(shape[1:])
    std = fan_in**-0.5
    if any(f".{r}." in name for r in _RESIDUAL_OUT):
        std /= (2 * n_layers) ** 0.5
    return torch.randn(shape, generator=gen) * std


def write_random_shards(
    out_dir: str | os.PathLike,
    tokenizer,
    vision: dict | None = None,
    text: dict | None = None,
    *,
    max_shard_bytes: int = 4 << 30,
    n_shards: int | None = None,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    legacy_names: bool = True,
    progress: bool = False,
) -> Path:
    """A random LLaVA written tensor by tensor as safetensors shards + ``model.safetensors.index.json``, never
    holding more than one shard: how a 7B checkpoint is made on a machine that could not hold it in float32.

    Every tensor is drawn from its own generator (seeded by ``seed`` and its name), so the weights do not depend
    on the shard size. ``legacy_names``: the tensor names of llava-hf's hub checkpoints (``language_model.model.``,
    ``vision_tower.``); otherwise those of today's transformers."""
    import hashlib
    import json

    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import LlavaForConditionalGeneration

    config = llava_config(tokenizer, vision, text)
    with init_empty_weights():
        model = LlavaForConditionalGeneration(config)
    tied = config.get_text_config().tie_word_embeddings
    entries = [(n, tuple(t.shape)) for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")]
    n_layers = max(config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers)
    size = torch.empty((), dtype=dtype).element_size()
    nbytes = [size * math.prod(shape) for _, shape in entries]
    total = sum(nbytes)
    # Contiguous groups of about equal size, as many as max_shard_bytes (or n_shards) asks for.
    n = n_shards or max(1, math.ceil(total / max_shard_bytes))
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(n)]
    before = 0
    for entry, b in zip(entries, nbytes, strict=True):
        groups[min(n - 1, before * n // total)].append(entry)
        before += b
    groups = [grp for grp in groups if grp]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    bar = tqdm(total=len(entries), desc="writing random shards", unit="tensor", disable=not progress)
    for j, group in enumerate(groups):
        shard = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            key = _legacy(name) if legacy_names else name
            tensors[key] = _draw(name, shape, n_layers, gen).to(dtype)
            weight_map[key] = shard
            bar.update()
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        del tensors
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(out)
    vc = config.vision_config
    build_processor(tokenizer, image_size=vc.image_size, patch_size=vc.patch_size).save_pretrained(out)
    return out


def _legacy(name: str) -> str:
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    return name

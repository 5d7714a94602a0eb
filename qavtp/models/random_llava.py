"""Random-weight LLaVA checkpoints built from a config: for tests and for real-dimension dry runs."""

from __future__ import annotations

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
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text),
        image_token_id=image_token_id if image_token_id is not None else tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    torch.manual_seed(seed)
    with torch.device(init_device):
        model = LlavaForConditionalGeneration(config).eval()
    if save_dtype is not None:
        model.to(save_dtype)
    processor = build_processor(tokenizer, image_size=vision["image_size"], patch_size=vision["patch_size"])
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out

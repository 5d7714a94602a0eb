"""Chat prompts encoded for a LLaVA model: left padding, position ids, answer candidates."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qavtp.data.prompts import chat_prompt


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left padding: count real tokens so every sample's positions start at 0.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode(processor, images, texts: Sequence[str], suffixes: Sequence[list[int]] | None = None):
    """Processor output for chat prompts, optionally with token ids appended to each prompt."""
    prompts = [chat_prompt(processor, t, with_image=im is not None) for t, im in zip(texts, images, strict=True)]
    # Grayscale, RGBA and palette images become RGB here; the processor resizes odd sizes.
    rgb = [im.convert("RGB") for im in images if im is not None]
    # Left padding puts every prompt's last token at -1, where the answer is read.
    processor.tokenizer.padding_side = "left"
    enc = processor(images=rgb or None, text=prompts, return_tensors="pt", padding=True)
    if suffixes is None:
        enc["position_ids"] = position_ids(enc["attention_mask"])
        return enc
    rows = [
        ids[mask.bool()].tolist() + list(suf)
        for ids, mask, suf in zip(enc["input_ids"], enc["attention_mask"], suffixes, strict=True)
    ]
    input_ids, attention_mask = pad_rows(rows, processor.tokenizer.pad_token_id, left=True)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids(attention_mask)}
    if "pixel_values" in enc:
        out["pixel_values"] = enc["pixel_values"]
    return out


def choice_ids(tokenizer, choice: str) -> list[int]:
    return tokenizer(choice, add_special_tokens=False).input_ids


def pad_rows(rows: Sequence[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [pad] * (width - len(r))
        ids.append(fill + list(r) if left else list(r) + fill)
        ones, zeros = [1] * len(r), [0] * (width - len(r))
        mask.append(zeros + ones if left else ones + zeros)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def image_token_id(processor) -> int | None:
    tid = getattr(processor, "image_token_id", None)
    return int(tid) if tid is not None else None

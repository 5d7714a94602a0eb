"""What the reference training and the projector alignment share: the answer-token batch and the schedule."""

from __future__ import annotations

import math

import torch

from qavtp.prompting import encode


def warmup_cosine(warm: int, total: int, floor: float = 0.0):
    """Learning-rate factor per step: linear warm-up over ``warm`` steps, then a cosine to ``floor`` at ``total``."""

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return factor


def answer_batch(processor, rows):
    """Prompt ids with the answer and <|im_end|> appended; loss only on those tokens."""
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    suffixes = [tok(a, add_special_tokens=False).input_ids + [end] for a in rows["answer"]]
    enc = encode(processor, rows["image"], rows["prompt"], suffixes)
    keep = max(len(s) for s in suffixes) + 1
    labels = torch.full((len(suffixes), keep - 1), -100)
    for k, s in enumerate(suffixes):
        labels[k, keep - 1 - len(s) :] = torch.tensor(s)
    return enc, keep, labels

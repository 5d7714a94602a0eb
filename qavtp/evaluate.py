"""Accuracy of a LLaVA model on a VQA data set: log-likelihood over candidates, or free generation."""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

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
    tok = processor.tokenizer
    rows = []
    for ids, mask, suf in zip(enc["input_ids"], enc["attention_mask"], suffixes, strict=True):
        rows.append(ids[mask.bool()].tolist() + list(suf))
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids(attention_mask)}
    if "pixel_values" in enc:
        out["pixel_values"] = enc["pixel_values"]
    return out


def choice_ids(tokenizer, choice: str) -> list[int]:
    return tokenizer(choice, add_special_tokens=False).input_ids


@torch.no_grad()
def choice_logprobs(model, processor, images, texts, choices: Sequence[Sequence[str]]) -> list[list[float]]:
    """Summed log-probability of every candidate answer after each prompt.

    One forward over the prompts scores every candidate's first token; candidates of several
    tokens continue from the prompts' KV cache, so a long candidate costs a few tokens, not a
    second pass over the image.
    """
    tok = processor.tokenizer
    enc = encode(processor, images, texts)
    out = model(**enc, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float().log_softmax(-1)
    scores: list[list[float]] = []
    long_pairs: list[tuple[int, int, list[int]]] = []
    for i, cands in enumerate(choices):
        row = []
        for j, c in enumerate(cands):
            ids = choice_ids(tok, c)
            row.append(first[i, ids[0]].item())
            if len(ids) > 1:
                long_pairs.append((i, j, ids))
        scores.append(row)
    if long_pairs:
        rows = torch.tensor([i for i, _, _ in long_pairs])
        cache = out.cache
        cache.reorder_cache(rows)
        width = max(len(ids) for _, _, ids in long_pairs) - 1
        feed = torch.full((len(long_pairs), width), tok.pad_token_id)
        mask = torch.zeros((len(long_pairs), width), dtype=enc["attention_mask"].dtype)
        for k, (_, _, ids) in enumerate(long_pairs):
            feed[k, : len(ids) - 1] = torch.tensor(ids[:-1])
            mask[k, : len(ids) - 1] = 1
        attn = torch.cat([enc["attention_mask"][rows], mask], 1)
        pos = enc["position_ids"][rows][:, -1:] + 1 + torch.arange(width)
        logp = model(input_ids=feed, attention_mask=attn, position_ids=pos, cache=cache).logits.float().log_softmax(-1)
        for k, (i, j, ids) in enumerate(long_pairs):
            rest = torch.tensor(ids[1:])
            scores[i][j] += logp[k, : len(rest)].gather(-1, rest[:, None]).sum().item()
    return scores


def normalize_answer(text: str) -> str:
    text = text.strip().lower()
    text = text.split("\n")[0]
    text = text.strip(string.punctuation + " ")
    return re.sub(r"\s+", " ", text)


@torch.no_grad()
def generate_answers(model, processor, images, texts, max_new_tokens: int = 8) -> list[str]:
    enc = encode(processor, images, texts)
    enc.pop("position_ids")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, enc["input_ids"].shape[1] :]
    return processor.tokenizer.batch_decode(new, skip_special_tokens=True)


def evaluate(
    model,
    processor,
    dataset,
    batch_size: int = 16,
    mode: str = "loglik",
    progress: bool = True,
    desc: str = "eval",
) -> dict:
    """Accuracy overall and per question type; ``dataset`` has image, prompt, choices, answer, qtype."""
    if mode not in ("loglik", "generate"):
        raise ValueError(f"mode must be 'loglik' or 'generate', got {mode!r}")
    correct: dict[str, list[int]] = defaultdict(list)
    predictions = []
    model.eval()
    n = len(dataset)
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = dataset[start : start + batch_size]
        if mode == "loglik":
            scores = choice_logprobs(model, processor, batch["image"], batch["prompt"], batch["choices"])
            preds = [c[max(range(len(s)), key=s.__getitem__)] for s, c in zip(scores, batch["choices"], strict=True)]
        else:
            preds = [normalize_answer(t) for t in generate_answers(model, processor, batch["image"], batch["prompt"])]
        for p, a, t in zip(preds, batch["answer"], batch["qtype"], strict=True):
            ok = int(normalize_answer(p) == normalize_answer(a))
            if t != "all":
                correct[t].append(ok)
            correct["all"].append(ok)
            predictions.append({"prediction": p, "answer": a, "correct": bool(ok)})
    by_type = {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(correct.items())}
    return {"accuracy": by_type["all"]["accuracy"], "n": n, "by_type": by_type, "predictions": predictions}


def markdown_table(results: dict, title: str = "") -> str:
    """Accuracy overall and per question type, as a Markdown table."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| question type | n | accuracy |", "|---|---:|---:|"]
    for t, v in results["by_type"].items():
        if t != "all":
            lines.append(f"| {t} | {v['n']} | {100 * v['accuracy']:.2f} % |")
    lines.append(f"| **all** | {results['n']} | **{100 * results['accuracy']:.2f} %** |")
    return "\n".join(lines) + "\n"

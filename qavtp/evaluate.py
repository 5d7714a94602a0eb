"""Accuracy of a LLaVA model on a VQA data set: log-likelihood over candidates, or free generation."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from qavtp.device import home_of
from qavtp.metrics import (  # noqa: F401  (markdown_table, wilson: re-exported)
    markdown_table,
    normalize_answer,
    pick,
    record,
    score_candidates,
    summarize,
    wilson,
)
from qavtp.prompting import choice_ids, encode, image_token_id, pad_rows, position_ids
from qavtp.pruned_lm import extend, pruned_generate, pruned_prefill
from qavtp.scoring import score_tokens


@torch.no_grad()
def choice_logprobs(model, processor, images, texts, choices: Sequence[Sequence[str]]) -> list[list[float]]:
    """Summed log-probability of every candidate answer after each prompt.

    Three passes over a KV cache: (1) each prompt's prefix up to its last visual token, once per
    distinct image (rows with identical pixels share it: an easy-VQA image has ~10 questions);
    (2) the rest of each prompt, whose last logits score every candidate's first token; (3) the
    remaining tokens of multi-token candidates.  Every operation is per token, so this computes
    exactly what one forward per (prompt, candidate) would.
    """
    tok = processor.tokenizer
    pad = tok.pad_token_id
    dev = home_of(model)  # the inputs go where the weights are
    enc = encode(processor, images, texts)
    ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    pix_row, k = [], 0
    for im in images:
        pix_row.append(k if im is not None else None)
        k += im is not None
    vis = image_token_id(processor)
    groups: dict = {}
    group_of, cut = [], []
    for r, row in enumerate(ids):
        last_vis = max((i for i, t in enumerate(row) if t == vis), default=-1)
        c = min(last_vis + 1, len(row) - 1) if last_vis >= 0 else len(row) - 1
        if pix_row[r] is None:
            key = ("row", r)
        else:
            key = (hashlib.sha1(enc["pixel_values"][pix_row[r]].numpy().tobytes()).hexdigest(), tuple(row[:c]))
        group_of.append(groups.setdefault(key, len(groups)))
        cut.append(c)
    first_row: dict[int, int] = {}
    for r, g in enumerate(group_of):
        first_row.setdefault(g, r)
    heads = [first_row[g] for g in range(len(groups))]

    # (1) prefixes, one per distinct image
    p_ids, p_mask = (t.to(dev) for t in pad_rows([ids[r][: cut[r]] for r in heads], pad, left=True))
    kwargs = {}
    pix = [pix_row[r] for r in heads if pix_row[r] is not None]
    if pix:
        kwargs["pixel_values"] = enc["pixel_values"][pix].to(dev)
    out = model(
        input_ids=p_ids,
        attention_mask=p_mask,
        position_ids=position_ids(p_mask),
        use_cache=True,
        logits_to_keep=1,
        **kwargs,
    )
    cache = out.cache
    gidx = torch.tensor(group_of, device=dev)
    cache.reorder_cache(gidx)

    # (2) the rest of every prompt
    s_ids, s_mask = (t.to(dev) for t in pad_rows([ids[r][cut[r] :] for r in range(len(ids))], pad, left=False))
    attn = torch.cat([p_mask[gidx], s_mask], 1)
    start = p_mask.sum(1)[gidx]
    s_len = s_mask.sum(1)
    last = (s_len - 1).tolist()
    keep = sorted(set(last))
    out = model(
        input_ids=s_ids,
        attention_mask=attn,
        position_ids=start[:, None] + torch.arange(s_ids.shape[1], device=dev),
        cache=cache,
        logits_to_keep=torch.tensor(keep, device=dev),
    )
    at = torch.tensor([keep.index(i) for i in last], device=dev)
    # Scoring reads single entries: one copy to the host instead of one per entry.
    first = out.logits[torch.arange(len(ids), device=dev), at].float().log_softmax(-1).cpu()
    cache, next_pos = out.cache, start + s_len

    def continue_fn(rows, c_ids, c_mask):
        rows, c_ids, c_mask = rows.to(dev), c_ids.to(dev), c_mask.to(dev)
        cache.reorder_cache(rows)
        attn2 = torch.cat([attn[rows], c_mask], 1)
        pos2 = next_pos[rows][:, None] + torch.arange(c_ids.shape[1], device=dev)
        return model(input_ids=c_ids, attention_mask=attn2, position_ids=pos2, cache=cache).logits.cpu()

    return _score_candidates(tok, first, choices, continue_fn)


def _score_candidates(tok, first, choices, continue_fn) -> list[list[float]]:
    """:func:`qavtp.metrics.score_candidates` with torch: ``continue_fn(rows, ids, mask)`` returns the logits
    of right-padded ``ids [R, T]`` appended to prompt rows ``rows [R]``."""

    def cont(rows, seqs):
        c_ids, c_mask = pad_rows(seqs, tok.pad_token_id, left=False)
        return continue_fn(torch.tensor(rows), c_ids, c_mask).float().log_softmax(-1)

    return score_candidates(first, choices, lambda c: choice_ids(tok, c), cont)


@dataclass(frozen=True)
class Pruning:
    """How an evaluation prunes: scorer, retention ratio, and what the scorer needs from calibration."""

    adapter: object
    scorer: str
    rho: float
    fusion: object | None = None  # qavtp.scoring.FusionParams of this ratio (scorer qavtp; sensitivity ablation)
    spec: object | None = None  # the deployed activation quantizer (qerror ablation)
    seed: int = 0
    layer: int = 0  # K: prune before decoder layer K (0: before the LLM)
    theta: float | None = None  # relevance weight of cdpruner / qavtp-dpp (None: their defaults)


def _pruned_prefill(prune: Pruning, processor, images, texts):
    enc = encode(processor, images, texts)

    def scores(hidden, visual, pad, pos):
        return score_tokens(
            prune.scorer,
            prune.adapter,
            {**enc, "attention_mask": pad, "position_ids": pos},
            hidden,
            visual,
            spec=prune.spec,
            seed=prune.seed,
            fusion=prune.fusion,
            layer=prune.layer,
            theta=prune.theta,
        )

    return pruned_prefill(prune.adapter, enc, scores, prune.rho, prune.layer)


@torch.no_grad()
def pruned_choice_logprobs(prune: Pruning, processor, images, texts, choices) -> tuple[list[list[float]], torch.Tensor]:
    """As :func:`choice_logprobs`, with only the top ``ceil(rho N)`` visual tokens (by the scorer) kept from
    decoder layer K on; also returns the kept indices ``[B, k]``."""
    logits, state = _pruned_prefill(prune, processor, images, texts)
    first = logits.float().log_softmax(-1)

    def continue_fn(rows, c_ids, c_mask):
        return extend(prune.adapter, state.select(rows), c_ids, c_mask)

    keep = state.keep_idx.clone()
    return _score_candidates(processor.tokenizer, first, choices, continue_fn), keep


@torch.no_grad()
def pruned_generate_answers(prune: Pruning, processor, images, texts, max_new_tokens: int = 8):
    """Greedy answers with pruning, and the kept indices."""
    logits, state = _pruned_prefill(prune, processor, images, texts)
    keep = state.keep_idx.clone()
    tok = processor.tokenizer
    out = pruned_generate(prune.adapter, state, logits, tok.eos_token_id, max_new_tokens)
    return tok.batch_decode(out, skip_special_tokens=True), keep


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
    prune: Pruning | None = None,
    keep_log: list | None = None,
) -> dict:
    """Accuracy overall and per question type; ``dataset`` has image, prompt, choices, answer, qtype.

    ``prune`` keeps only the top ``ceil(rho N)`` visual tokens by its scorer from decoder layer K on (both
    modes); ``keep_log``, if given, receives each question's kept indices in data set order.
    """
    if mode not in ("loglik", "generate"):
        raise ValueError(f"mode must be 'loglik' or 'generate', got {mode!r}")
    correct: dict[str, list[int]] = defaultdict(list)
    predictions = []
    kept = None
    kept_rows: list = []
    model.eval()
    n = len(dataset)
    keyed = "image_id" in dataset.column_names
    order = list(range(n))
    if keyed:
        # Questions about the same image sit in the same batch and share its prefix (see choice_logprobs).
        order = sorted(range(n), key=dataset["image_id"].__getitem__)
        dataset = dataset.select(order)
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = dataset[start : start + batch_size]
        if mode == "loglik":
            if prune is not None:
                scores, keep = pruned_choice_logprobs(
                    prune, processor, batch["image"], batch["prompt"], batch["choices"]
                )
            else:
                scores = choice_logprobs(model, processor, batch["image"], batch["prompt"], batch["choices"])
            preds, margins = zip(*(pick(s, c) for s, c in zip(scores, batch["choices"], strict=True)), strict=True)
        else:
            if prune is not None:
                texts, keep = pruned_generate_answers(prune, processor, batch["image"], batch["prompt"])
            else:
                texts = generate_answers(model, processor, batch["image"], batch["prompt"])
            preds = [normalize_answer(t) for t in texts]
            margins = [None] * len(preds)
        if prune is not None:
            kept = keep.shape[1]
            kept_rows += keep.tolist()
        for p, a, t, m in zip(preds, batch["answer"], batch["qtype"], margins, strict=True):
            record(correct, predictions, order[len(predictions)], p, a, t, m)
    if keep_log is not None and kept_rows:
        keep_log += [k for _, k in sorted(zip(order, kept_rows, strict=True))]
    predictions.sort(key=lambda p: p["index"])
    return {**summarize(correct, predictions), "visual_tokens_kept": kept}

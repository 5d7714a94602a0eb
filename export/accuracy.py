"""Accuracy of an exported model on a VQA data set, with onnxruntime only (no torch).

Log-likelihood scoring as ``qavtp.evaluate.choice_logprobs``: the prefill graph's last logits score every
candidate's first token; the decode graph continues the KV cache over the rest of multi-token candidates.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from qavtp.export.session import ExportedModel
from qavtp.metrics import agreement_by_margin, pick, record, score_candidates, summarize


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def choice_logprobs(em: ExportedModel, images, questions, choices) -> tuple[list[list[float]], np.ndarray]:
    """Summed log-probability of every candidate answer, and the kept visual-token indices ``[B, k]``."""
    out = em.run_prefill(em.inputs(list(images), list(questions)))
    pad = int(em.meta["model"]["pad_token_id"] or 0)

    def cont(rows: list[int], seqs: list[list[int]]) -> np.ndarray:
        width = max(len(q) for q in seqs)
        c_ids = np.full((len(rows), width), pad, np.int64)
        c_mask = np.zeros((len(rows), width), np.int64)
        for r, q in enumerate(seqs):
            c_ids[r, : len(q)] = q
            c_mask[r, : len(q)] = 1
        mask = out["attention_mask_out"][rows]
        # Contiguous positions over real tokens: the next one is the count of real prompt tokens.
        pos = mask.sum(1, keepdims=True) + np.arange(width)
        past = {k: v[rows] for k, v in out.items() if k.startswith("present.")}
        return _log_softmax(em.run_decode(c_ids, np.concatenate([mask, c_mask], 1), pos, past)["logits"])

    def token_ids(c: str) -> list[int]:
        return em.text.tok.encode(c, add_special_tokens=False).ids

    return score_candidates(_log_softmax(out["logits"]), choices, token_ids, cont), out["kept_indices"]


def evaluate_export(em: ExportedModel, dataset, batch_size: int = 16, progress: bool = True) -> dict:
    """Accuracy overall and per question type (as ``qavtp.evaluate.evaluate``) and each question's kept tokens."""
    correct: dict[str, list[int]] = {}
    predictions: list[dict] = []
    kept: list[list[int]] = []
    n = len(dataset)
    for start in tqdm(range(0, n, batch_size), desc="onnx eval", disable=not progress, unit="batch"):
        batch = dataset[start : start + batch_size]
        # The export records the prompt around a question (prefix + question + suffix), as qavtp eval builds it.
        scores, keep = choice_logprobs(em, batch["image"], batch["question"], batch["choices"])
        kept += keep.tolist()
        for s, c, a, t in zip(scores, batch["choices"], batch["answer"], batch["qtype"], strict=True):
            pred, margin = pick(s, c)
            record(correct, predictions, len(predictions), pred, a, t, margin)
    return {**summarize(correct, predictions), "visual_tokens_kept": len(kept[0]) if kept else None, "kept": kept}


def compare(onnx_res: dict, torch_res: dict, torch_kept: list[list[int]]) -> dict:
    """Agreement of the exported graph with the torch model on the same questions."""
    a = [p["prediction"] for p in onnx_res["predictions"]]
    b = [p["prediction"] for p in torch_res["predictions"]]
    same_answers = sum(x == y for x, y in zip(a, b, strict=True))
    same_kept = None
    if torch_kept:
        same_kept = sum(list(x) == list(y) for x, y in zip(onnx_res["kept"], torch_kept, strict=True))
    n = len(a)
    return {
        "n": n,
        "same_answers": same_answers / n,
        "same_answers_by_torch_margin": agreement_by_margin(torch_res["predictions"], onnx_res["predictions"]),
        "same_kept_tokens": None if same_kept is None else same_kept / n,
        "onnx_accuracy": onnx_res["accuracy"],
        "torch_accuracy": torch_res["accuracy"],
    }

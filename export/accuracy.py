"""Accuracy of an exported model on a VQA data set, with onnxruntime only (no torch).

Log-likelihood scoring as ``qavtp.evaluate.choice_logprobs``: the prefill graph's last logits score every
candidate's first token; the decode graph continues the KV cache over the rest of multi-token candidates.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from qavtp.export.session import ExportedModel
from qavtp.metrics import record, summarize


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def choice_logprobs(em: ExportedModel, images, questions, choices) -> tuple[list[list[float]], np.ndarray]:
    """Summed log-probability of every candidate answer, and the kept visual-token indices ``[B, k]``."""
    out = em.run_prefill(em.inputs(list(images), list(questions)))
    first = _log_softmax(out["logits"])
    tok = em.text.tok
    scores: list[list[float]] = []
    long_pairs: list[tuple[int, int, list[int]]] = []
    for i, cands in enumerate(choices):
        row = []
        for j, c in enumerate(cands):
            ids = tok.encode(c, add_special_tokens=False).ids
            row.append(float(first[i, ids[0]]))
            if len(ids) > 1:
                long_pairs.append((i, j, ids))
        scores.append(row)
    if long_pairs:
        rows = np.array([i for i, _, _ in long_pairs])
        width = max(len(ids) - 1 for _, _, ids in long_pairs)
        pad = int(em.meta["model"]["pad_token_id"] or 0)
        c_ids = np.full((len(rows), width), pad, np.int64)
        c_mask = np.zeros((len(rows), width), np.int64)
        for r, (_, _, ids) in enumerate(long_pairs):
            c_ids[r, : len(ids) - 1] = ids[:-1]
            c_mask[r, : len(ids) - 1] = 1
        mask = out["attention_mask_out"][rows]
        # Contiguous positions over real tokens: the next one is the count of real prompt tokens.
        pos = mask.sum(1, keepdims=True) + np.arange(width)
        past = {k: v[rows] for k, v in out.items() if k.startswith("present.")}
        logp = _log_softmax(em.run_decode(c_ids, np.concatenate([mask, c_mask], 1), pos, past)["logits"])
        for r, (i, j, ids) in enumerate(long_pairs):
            scores[i][j] += float(sum(logp[r, t, ids[t + 1]] for t in range(len(ids) - 1)))
    return scores, out["kept_indices"]


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
            record(correct, predictions, len(predictions), c[int(np.argmax(s))], a, t)
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
        "same_kept_tokens": None if same_kept is None else same_kept / n,
        "onnx_accuracy": onnx_res["accuracy"],
        "torch_accuracy": torch_res["accuracy"],
    }

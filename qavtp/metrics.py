"""Accuracy bookkeeping shared by the torch and the ONNX evaluators (no torch here)."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence


def normalize_answer(text: str) -> str:
    text = text.strip().lower()
    text = text.split("\n")[0]
    text = text.strip(string.punctuation + " ")
    return re.sub(r"\s+", " ", text)


def wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    """95 % Wilson score interval of an accuracy: honest error bars for small differences."""
    if n == 0:
        return [0.0, 1.0]
    p = hits / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / d
    return [max(0.0, mid - half), min(1.0, mid + half)]


def score_candidates(first, choices, token_ids, continue_fn) -> list[list[float]]:
    """Summed log-probability of every candidate answer, for torch and onnxruntime alike.

    ``first [B, V]`` are the log-probabilities after each prompt (they score every candidate's first token);
    ``token_ids(text)`` tokenizes a candidate; ``continue_fn(rows, seqs)`` returns log-probabilities
    ``[R, T, V]`` of the token lists ``seqs`` appended to prompt rows ``rows`` (right-padded to T), which
    score the remaining tokens of multi-token candidates.
    """
    scores: list[list[float]] = []
    long_pairs: list[tuple[int, int, list[int]]] = []
    for i, cands in enumerate(choices):
        row = []
        for j, c in enumerate(cands):
            ids = token_ids(c)
            row.append(float(first[i, ids[0]]))
            if len(ids) > 1:
                long_pairs.append((i, j, ids))
        scores.append(row)
    if long_pairs:
        logp = continue_fn([i for i, _, _ in long_pairs], [ids[:-1] for _, _, ids in long_pairs])
        for k, (i, j, ids) in enumerate(long_pairs):
            scores[i][j] += sum(float(logp[k, t, ids[t + 1]]) for t in range(len(ids) - 1))
    return scores


def summarize(correct: dict[str, list[int]], predictions: list[dict]) -> dict:
    """Accuracy overall and per question type, with Wilson intervals; ``correct`` maps type -> 0/1 list."""
    by_type = {
        t: {"accuracy": sum(v) / len(v), "n": len(v), "ci95": wilson(sum(v), len(v))}
        for t, v in sorted(correct.items())
    }
    return {
        "accuracy": by_type["all"]["accuracy"],
        "ci95": by_type["all"]["ci95"],
        "n": len(predictions),
        "by_type": by_type,
        "predictions": predictions,
    }


def pick(scores: Sequence[float], choices: Sequence[str]) -> tuple[str, float | None]:
    """The best-scoring candidate (the first of equal ones) and its margin over the runner-up, in nats
    (None with a single candidate): a small margin is an answer that a rounding difference can flip."""
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)  # stable: ties keep their order
    margin = float(scores[order[0]] - scores[order[1]]) if len(order) > 1 else None
    return choices[order[0]], margin


def record(
    correct: dict[str, list[int]],
    predictions: list[dict],
    index: int,
    pred: str,
    answer: str,
    qtype: str,
    margin: float | None = None,
):
    """Score one prediction into ``correct`` and ``predictions`` (with its :func:`pick` margin, if any)."""
    ok = int(normalize_answer(pred) == normalize_answer(answer))
    if qtype != "all":
        correct.setdefault(qtype, []).append(ok)
    correct.setdefault("all", []).append(ok)
    row = {"index": index, "prediction": pred, "answer": answer, "correct": bool(ok)}
    if margin is not None:
        row["margin"] = round(margin, 5)
    predictions.append(row)


# Bounds (nats) of the answer-margin bins in which answer agreement is reported.
MARGIN_BINS = (0.05, 0.2, 1.0)


def agreement_by_margin(reference: list[dict], other: list[dict], bins: Sequence[float] = MARGIN_BINS) -> list[dict]:
    """The share of the same answers in ``other`` as in ``reference``, per bin of the reference's answer margin.

    A rounding difference between two runtimes flips near-tie answers first; how far agreement stays below
    100 % at large margins shows how far one flipped 4-bit rounding carries through the model
    (``bench/parity_floor.py`` measures the same for torch against itself)."""
    edges = [0.0, *bins, float("inf")]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        pairs = [(r, o) for r, o in zip(reference, other, strict=True) if lo <= r.get("margin", float("nan")) < hi]
        same = sum(r["prediction"] == o["prediction"] for r, o in pairs)
        out.append({"from": lo, "to": hi, "n": len(pairs), "same": same / len(pairs) if pairs else None})
    return out


def margin_bin_label(b: dict) -> str:
    """``0.2–1`` or ``1+``: a bin of :func:`agreement_by_margin` for a table or a log line."""
    return f"{b['from']:g}+" if b["to"] == float("inf") else f"{b['from']:g}–{b['to']:g}"


def markdown_table(results: dict, title: str = "") -> str:
    """Accuracy overall and per question type, as a Markdown table."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| question type | n | accuracy | 95 % CI |", "|---|---:|---:|---:|"]

    def ci(v):
        return f"{100 * v['ci95'][0]:.1f}–{100 * v['ci95'][1]:.1f}"

    for t, v in results["by_type"].items():
        if t != "all":
            lines.append(f"| {t} | {v['n']} | {100 * v['accuracy']:.2f} % | {ci(v)} |")
    lines.append(
        f"| **all** | {results['n']} | **{100 * results['accuracy']:.2f} %** | {ci(results['by_type']['all'])} |"
    )
    return "\n".join(lines) + "\n"

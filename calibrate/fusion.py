"""Learning the fusion of semantic relevance and quantization sensitivity, per retention ratio.

The artifact's ``config.json`` holds, under ``fusion``::

    {"layer": 0, "objective": "kl", "n_samples": 64, "dense": {metrics}, "forwards": ..., "seconds": ...,
     "holdout_samples": 64,
     "ratios": {"0.125": {"params": FusionParams.to_dict(), **metrics, "qapruner": {metrics},
                          "searched": the search's winner, "holdout": holdout_test(...) or None,
                          "curve": [{"stage": 1, "params": {...}, **metrics}, ...]}, ...}}

``params`` is what pruning uses: the search's winner if it beat the paper's preset on held-out calibration
questions, else the preset.

with ``metrics`` = ``kl``, ``accuracy`` (first-token, calibration) and ``choice_kl`` (see ``OBJECTIVES``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from qavtp.calibrate.artifact_config import ratio_key
from qavtp.calibrate.quantizers import QuantSpec
from qavtp.errors import QavtpError
from qavtp.prompting import choice_ids, encode
from qavtp.pruning import prune_sequence, select_tokens
from qavtp.scoring import (
    FusionParams,
    available_semantics,
    gather_visual,
    model_inputs,
    qapruner_params,
    selection_scores,
    semantic_scores,
)

# ------------------------------------------------------------------------------------------ learning

# kl: the full next-token distribution; choice-kl: the distribution over the question's candidate answers
# (first tokens, renormalised), which is what the answer is read from; accuracy: calibration accuracy.
OBJECTIVES = ("kl", "choice-kl", "accuracy")
DPP_THETAS = (0.25, 0.5, 0.75, 0.9)  # relevance weights of the DPP candidates (CDPruner's default: 0.5)
METRICS = ("kl", "accuracy", "choice_kl")


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise QavtpError(f"unknown fusion objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    return objective


def check_fusion_samples(fusion_samples: int) -> int:
    if fusion_samples < 1:
        raise QavtpError(f"--fusion-samples must be at least 1, got {fusion_samples}")
    return fusion_samples


def fusion_subset(calibration_set, fusion_samples: int):
    """The first ``fusion_samples`` calibration questions: fusion weights are learned on calibration data only."""
    check_fusion_samples(fusion_samples)
    return calibration_set.select(range(min(fusion_samples, len(calibration_set))))


def holdout_subset(calibration_set, fusion_samples: int):
    """The next ``fusion_samples`` calibration questions after :func:`fusion_subset` (None if there are none)."""
    start = min(fusion_samples, len(calibration_set))
    stop = min(2 * fusion_samples, len(calibration_set))
    return calibration_set.select(range(start, stop)) if stop > start else None


def fusion_targets(fp_model, processor, calibration_set, fusion_samples: int, holdout: bool = True):
    """What :func:`learn_fusion` needs from the floating-point model: ``(questions, target, holdout)``.

    The questions are the first ``fusion_samples`` of the calibration set, the target their FP dense
    log-probabilities, and ``holdout`` the next ``fusion_samples`` questions with their targets (None if off
    or the set has no more questions).
    """
    fds = fusion_subset(calibration_set, fusion_samples)
    hds = holdout_subset(calibration_set, fusion_samples) if holdout else None
    held = (hds, dense_logprobs(fp_model, processor, hds)) if hds is not None else None
    return fds, dense_logprobs(fp_model, processor, fds), held


def candidate_grid(
    base: FusionParams, stage: int, best: FusionParams | None = None, semantics: tuple[str, ...] = ("text", "cls")
) -> list[FusionParams]:
    """The staged search space.

    Stage 1: each relevance term alone and each sensitivity term alone, in both directions.
    Stage 2: mixtures of a relevance term with the sensitivity terms (:func:`learn_fusion` tries every term).
    Stage 3: the open choices of the paper (normalisation, outlier measure, relative error) at the best point.
    Stage 4: the best point's score as the quality of a DPP (``select="dpp"``) at several relevance weights:
    selection with diversity against plain top-k.
    """

    def v(p: FusionParams, **kw) -> FusionParams:
        return FusionParams(**{**p.to_dict(), **kw})

    if stage == 1:
        out = [v(base, alpha=1.0, semantic=s) for s in semantics]
        out += [v(base, alpha=0.0, beta=b, direction=d) for b in (0.0, 0.5, 1.0) for d in (1, -1)]
        return out
    assert best is not None
    if stage == 2:
        return [
            v(best, alpha=a, beta=b, direction=d) for a in (0.25, 0.5, 0.75) for b in (0.0, 0.5, 1.0) for d in (1, -1)
        ]
    if stage == 4:
        return [v(best, select="dpp", theta=t) for t in DPP_THETAS]
    return [
        v(best, norm="zscore" if best.norm == "minmax" else "minmax"),
        v(best, outlier="linf" if best.outlier == "range" else "range"),
        v(best, relative=not best.relative),
    ]


@torch.no_grad()
def dense_logprobs(model, processor, dataset, batch_size: int = 16) -> Tensor:
    """Next-token log-probabilities ``[n, V]`` after each prompt (the answer's first token), no pruning.

    Computed on the floating-point model before calibration: the target of the KL objective.
    """
    out = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        enc = encode(processor, rows["image"], rows["prompt"])
        logits = model(**model_inputs(enc), use_cache=False, logits_to_keep=1).logits[:, -1]
        out.append(logits.float().log_softmax(-1))
    return torch.cat(out)


@dataclass
class _Prepared:
    """One calibration batch at the pruning point, computed once for every candidate."""

    rows: list[int]  # global row indices
    embeds: Tensor
    attention_mask: Tensor
    visual: Tensor
    X: Tensor
    sem: dict[str, Tensor]
    first_ids: list[list[int]]  # first token of every candidate answer
    answer: list[int]  # index of the right candidate


def _prepare(adapter, processor, dataset, batch_size: int) -> list[_Prepared]:
    tok = processor.tokenizer
    out = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        enc = encode(processor, rows["image"], rows["prompt"])
        visual = adapter.visual_positions(enc["input_ids"])
        embeds = adapter.embed(enc["input_ids"], enc["pixel_values"])
        sem = {s: semantic_scores(adapter, enc, embeds, visual, s) for s in available_semantics(adapter)}
        first = [[choice_ids(tok, c)[0] for c in cands] for cands in rows["choices"]]
        answer = [list(c).index(a) for c, a in zip(rows["choices"], rows["answer"], strict=True)]
        n = len(rows["prompt"])
        out.append(
            _Prepared(
                list(range(start, start + n)),
                embeds,
                enc["attention_mask"],
                visual,
                gather_visual(embeds, visual),
                sem,
                first,
                answer,
            )
        )
    return out


def _pruned_logprobs(adapter, b: _Prepared, local: list[int], keep: Tensor) -> Tensor:
    p = prune_sequence(None, b.attention_mask[local], b.embeds[local], b.visual[local], keep)
    h = adapter.language_model(
        inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask, position_ids=p.position_ids, use_cache=False
    ).last_hidden_state[:, -1]
    return adapter.lm_head(h).float().log_softmax(-1)


class _Judge:
    """Scores candidates; every distinct kept set of a question is run through the model once."""

    def __init__(self, adapter, prepared: list[_Prepared], target: Tensor, chunk: int = 32):
        self.adapter, self.prepared, self.target, self.chunk = adapter, prepared, target, chunk
        self.memo: dict[tuple, tuple[float, int]] = {}
        self.forwards = 0

    def _metrics(self, b: _Prepared, local: list[int], keep: Tensor) -> list[tuple[float, int]]:
        logq = _pruned_logprobs(self.adapter, b, local, keep)
        self.forwards += len(local)
        out = []
        for j, r in enumerate(local):
            logp = self.target[b.rows[r]]
            kl = float((logp.exp() * (logp - logq[j])).sum())
            cand = logq[j, b.first_ids[r]]
            cp = logp[b.first_ids[r]].log_softmax(-1)
            ckl = float((cp.exp() * (cp - cand.log_softmax(-1))).sum())
            out.append((kl, int(int(cand.argmax()) == b.answer[r]), ckl))
        return out

    def judge(self, configs: list[FusionParams], rho: float) -> list[tuple[float, ...]]:
        """Mean KL, first-token accuracy and candidate KL of each candidate at retention ``rho``."""
        return [_mean(ms) for ms in self.per_question(configs, rho)]

    def per_question(self, configs: list[FusionParams], rho: float) -> list[list[tuple[float, ...]]]:
        """The metrics of every calibration question under each candidate (in question order)."""
        keys_per_cfg: list[list[tuple]] = [[] for _ in configs]
        for b in self.prepared:
            todo: dict[tuple, tuple[int, Tensor]] = {}
            for c, p in enumerate(configs):
                keep = select_tokens(selection_scores(b.sem[p.semantic], b.X, p), rho)
                for r in range(len(b.rows)):
                    key = (b.rows[r], rho, tuple(keep[r].tolist()))
                    keys_per_cfg[c].append(key)
                    if key not in self.memo:
                        todo[key] = (r, keep[r])
            items = list(todo.items())
            for s in range(0, len(items), self.chunk):
                part = items[s : s + self.chunk]
                local = [r for _, (r, _) in part]
                keep = torch.stack([k for _, (_, k) in part])
                for (key, _), m in zip(part, self._metrics(b, local, keep), strict=True):
                    self.memo[key] = m
        return [[self.memo[k] for k in keys] for keys in keys_per_cfg]

    def dense(self) -> tuple[float, ...]:
        ms = []
        for b in self.prepared:
            n = b.visual.sum(1)[0]
            keep = torch.arange(int(n)).expand(len(b.rows), -1)
            ms += self._metrics(b, list(range(len(b.rows))), keep)
        return _mean(ms)


def _mean(ms: list[tuple[float, ...]]) -> tuple[float, ...]:
    """The mean of each metric over questions."""
    return tuple(sum(m[i] for m in ms) / len(ms) for i in range(len(METRICS)))


def _loss(objective: str, m: tuple[float, ...]) -> float:
    """One question's objective value, lower is better."""
    return {"kl": m[0], "accuracy": -m[1], "choice-kl": m[2]}[objective]


def holdout_test(judge: _Judge, learned: FusionParams, preset: FusionParams, rho: float, objective: str) -> dict:
    """Does the searched candidate beat the paper's preset on calibration questions the search never saw?

    A paired comparison per question; the learned weights are adopted only if their mean gain is at least two
    standard errors (one-sided, about 98 %). The search picks the best of ~50 candidates on its own questions,
    so its winning margin there is biased upwards; on the reference model it did not carry over to the test set.
    """
    a, b = judge.per_question([learned, preset], rho)
    gain = torch.tensor([_loss(objective, mb) - _loss(objective, ma) for ma, mb in zip(a, b, strict=True)])
    n = gain.numel()
    se = float(gain.std() / n**0.5) if n > 1 else float("inf")
    mean = float(gain.mean())
    z = mean / se if se > 0 else (float("inf") if mean > 0 else 0.0)
    return {
        "n": n,
        "learned": dict(zip(METRICS, _mean(a), strict=True)),
        "qapruner": dict(zip(METRICS, _mean(b), strict=True)),
        "gain": mean,
        "z": z,
        "adopted": "learned" if z >= 2.0 else "qapruner",
    }


def _rank(objective: str):
    """Sort key of a curve entry: lower is better; the other metric breaks ties."""
    if objective == "kl":
        return lambda e: (e["kl"], -e["accuracy"])
    if objective == "choice-kl":
        return lambda e: (e["choice_kl"], -e["accuracy"])
    return lambda e: (-e["accuracy"], e["kl"])


def _search_ratio(judge, held, base, preset, semantics, rho: float, objective: str, bar) -> tuple[dict, str]:
    """The staged grid search at one ratio, then the held-out check against the preset: its entry and summary."""
    curve: list[dict] = []
    rank = _rank(objective)

    def run(configs: list[FusionParams], stage: int) -> FusionParams:
        bar.set_postfix(retain=rho, stage=stage, forwards=judge.forwards)
        for p, m in zip(configs, judge.judge(configs, rho), strict=True):
            curve.append({"stage": stage, "params": p.to_dict(), **dict(zip(METRICS, m, strict=True))})
        bar.update()
        return FusionParams.from_dict(min(curve, key=rank)["params"])

    best = run(candidate_grid(base, 1, semantics=semantics), 1)
    # Stage 2 mixes every relevance term with the sensitivity terms: the term that is best alone need not mix
    # best (on the reference model text-l2 wins alone at 12.5 %, [CLS] attention mixed: KL 0.67 against 0.60).
    anchors = [FusionParams.from_dict({**best.to_dict(), "semantic": s}) for s in semantics]
    best = run([c for a in anchors for c in candidate_grid(a, 2, a)] + [preset], 2)
    best = run(candidate_grid(base, 3, best), 3)
    best = run(candidate_grid(base, 4, best), 4)
    searched = best
    check = None
    if held is not None and best != preset:
        check = holdout_test(held, best, preset, rho, objective)
        best = best if check["adopted"] == "learned" else preset

    def entry_of(params: FusionParams) -> dict:
        return next(e for e in curve if e["params"] == params.to_dict())

    chosen, preset_entry = entry_of(best), entry_of(preset)
    entry = {
        "params": best.to_dict(),
        **{k: chosen[k] for k in METRICS},
        "qapruner": {k: preset_entry[k] for k in METRICS},
        "searched": searched.to_dict(),
        "holdout": check,
        "curve": curve,
    }
    key = "choice_kl" if objective == "choice-kl" else "kl"
    msg = f"retain {rho:g}: searched {key} {entry_of(searched)[key]:.4f} vs paper preset {preset_entry[key]:.4f}"
    if check is not None:
        msg += f"; held-out gain z = {check['z']:.2f} over {check['n']} questions: {check['adopted']} adopted"
    return entry, msg


@torch.no_grad()
def learn_fusion(
    adapter,
    processor,
    dataset,
    ratios: list[float],
    target: Tensor,
    qspec: QuantSpec | None,
    objective: str = "kl",
    batch_size: int = 16,
    progress: bool = True,
    holdout: tuple | None = None,
) -> dict:
    """Learn the fusion parameters of every retention ratio on calibration data (a staged grid search).

    ``holdout`` = ``(dataset, target)``: other calibration questions on which the search's winner must beat the
    paper's preset (:func:`holdout_test`) to be adopted; otherwise the preset is stored.

    ``target`` are the floating-point model's dense next-token log-probabilities (:func:`dense_logprobs`);
    the model behind ``adapter`` is the calibrated (quantized) one. The paper's recipe (``qapruner``) is
    always a candidate, so the learned choice is never worse than it on the calibration objective. ``qspec`` is
    the deployed activation quantizer; with unquantized activations the error term simulates per-token INT4.
    """
    check_objective(objective)
    qspec = qspec or QuantSpec(4, True, 0)
    if len(dataset) == 0:
        raise QavtpError("the fusion calibration set is empty")
    t0 = time.time()
    prepared = _prepare(adapter, processor, dataset, batch_size)
    judge = _Judge(adapter, prepared, target)
    held = _Judge(adapter, _prepare(adapter, processor, holdout[0], batch_size), holdout[1]) if holdout else None
    dim = prepared[0].X.shape[-1]
    base = FusionParams(qspec=qspec.to_dict())
    preset = qapruner_params(dim)
    dense = judge.dense()
    result: dict = {
        "layer": 0,
        "objective": objective,
        "n_samples": len(dataset),
        "dense": dict(zip(METRICS, dense, strict=True)),
        "ratios": {},
    }
    # Four search stages per ratio; each runs every new kept set of every question once.
    bar = tqdm(total=4 * len(ratios), desc="learning fusion weights", unit="stage", disable=not progress)
    semantics = available_semantics(adapter)
    for rho in ratios:
        entry, msg = _search_ratio(judge, held, base, preset, semantics, rho, objective, bar)
        result["ratios"][ratio_key(rho)] = entry
        bar.write(msg)
    bar.close()
    result["forwards"] = judge.forwards + (held.forwards if held else 0)
    result["holdout_samples"] = len(holdout[0]) if holdout else 0
    result["seconds"] = round(time.time() - t0, 1)
    return result

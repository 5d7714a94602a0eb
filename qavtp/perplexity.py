"""Language-model perplexity of the LLM inside a multimodal model, on text that ships with Python.

The corpus is CPython's ``pydoc_data.topics`` (the Language Reference sections that ``help()``
shows: ~465,000 characters of English technical prose), present on every Python install, so the
figure needs no download and reproduces anywhere.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

CORPUS = "pydoc_data.topics (CPython's Language Reference help topics)"


def corpus_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


@torch.no_grad()
def perplexity(
    model, tokenizer, text: str | None = None, seq_len: int = 512, max_chunks: int | None = 32, progress: bool = True
) -> dict:
    """exp(mean next-token NLL) over consecutive non-overlapping windows of ``seq_len`` tokens."""
    ids = tokenizer(text if text is not None else corpus_text(), add_special_tokens=False, return_tensors="pt")
    ids = ids.input_ids[0]
    n = ids.numel() // seq_len
    if max_chunks:
        n = min(n, max_chunks)
    if n == 0:
        raise ValueError(f"text has fewer than seq_len={seq_len} tokens")
    nll, count = 0.0, 0
    for i in tqdm(range(n), desc="perplexity", unit="window", disable=not progress):
        x = ids[i * seq_len : (i + 1) * seq_len][None]
        logits = model(input_ids=x).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += seq_len - 1
    return {"perplexity": math.exp(nll / count), "tokens": count, "windows": n, "seq_len": seq_len, "corpus": CORPUS}

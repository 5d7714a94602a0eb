"""The alignment curve as a picture: held-out KL per retention ratio against step, the kept step marked."""

from __future__ import annotations


def plot_alignment(record: dict, path) -> None:
    """Held-out KL against step, one line per retention ratio (and the training KL), the kept step marked.

    Written straight to ``path``: callers pass a path inside the artifact's temporary directory (``save_artifact``'s
    ``extras``), which lands whole or not at all.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = record["curve"]
    steps = [c["step"] for c in curve]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in record["ratios"]:
        label = "held-out, all tokens" if r >= 1 else f"held-out, {100 * r:g} % of the tokens"
        ax.plot(steps, [c["by_ratio"][str(r)] for c in curve], "o-", label=label)
    train = [c for c in curve if "train_kl" in c]
    ax.plot([c["step"] for c in train], [c["train_kl"] for c in train], "--", c="gray", label="training (running)")
    ax.axvline(record["best_step"], c="k", lw=0.8, ls=":", label=f"kept: step {record['best_step']}")
    ax.set_xlabel("alignment step")
    ax.set_ylabel("KL(FP dense ‖ quantized) per answer token (nats)")
    ax.set_title("projector alignment to the quantized LLM")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)

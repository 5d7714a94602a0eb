"""Training of the reference model's vision tower and projector (the LLM stays frozen).

Two stages, as LLaVA's own recipe: (1) the vision tower alone learns each image's shape and
colour (labels the data already gives, no LLM in the loop, minutes); (2) the projector, and the
tower at a lower rate, learn to speak to the frozen SmolLM2 through next-token loss on the
answer tokens only, under bf16 autocast.  Held-out accuracy comes from train images kept
aside, never from the test split.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qavtp.config import ReferenceTrainingConfig, StageConfig
from qavtp.data.easyvqa import COLORS, SHAPES, image_labels, image_path, load_easyvqa
from qavtp.data.prompts import chat_prompt
from qavtp.device import use_bf16
from qavtp.evaluate import evaluate
from qavtp.models import reference
from qavtp.prompting import position_ids
from qavtp.training import answer_batch, warmup_cosine

HELDOUT_IMAGES = 200  # the last train images, kept out of training for held-out accuracy


def _split(ds):
    cut = 4000 - HELDOUT_IMAGES
    train_idx = [i for i, im in enumerate(ds["image_id"]) if im < cut]
    held_idx = [i for i, im in enumerate(ds["image_id"]) if im >= cut]
    return ds.select(train_idx), ds.select(held_idx)


def _log(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def stage1(model, processor, log: Path, epochs: int, seed: int, lr: float = 1e-3, batch: int = 64) -> None:
    from PIL import Image

    tower = model.model.vision_tower
    labels = image_labels("train")
    ids = [i for i in range(4000 - HELDOUT_IMAGES) if labels.get(i)]
    held = [i for i in range(4000 - HELDOUT_IMAGES, 4000) if labels.get(i)]
    pix = {}
    for i in ids + held:
        with Image.open(reference_image(i)) as im:
            pix[i] = processor.image_processor(im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
    hidden = tower.config.hidden_size
    heads = torch.nn.ModuleDict(
        {"color": torch.nn.Linear(hidden, len(COLORS)), "shape": torch.nn.Linear(hidden, len(SHAPES))}
    )
    vocab = {"color": {c: k for k, c in enumerate(COLORS)}, "shape": {s: k for k, s in enumerate(SHAPES)}}

    def targets(batch_ids, key):
        return torch.tensor([vocab[key].get(labels[i].get(key, ""), -100) for i in batch_ids])

    def features(batch_ids):
        x = torch.stack([pix[i] for i in batch_ids])
        h = tower(x, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        return h[:, 1:].mean(1)

    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(ids) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    t0 = time.time()
    tower.train()
    bar = tqdm(total=steps, desc="stage 1: vision tower", unit="step")
    for epoch in range(epochs):
        rng.shuffle(ids)
        for s in range(0, len(ids), batch):
            b = ids[s : s + batch]
            f = features(b)
            loss = sum(F.cross_entropy(heads[k](f), targets(b, k), ignore_index=-100) for k in heads)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        tower.eval()
        with torch.no_grad():
            f = features(held)
            acc = {
                k: (heads[k](f).argmax(-1) == targets(held, k)).float()[targets(held, k) >= 0].mean().item()
                for k in heads
            }
        tower.train()
        _log(log, {"stage": 1, "epoch": epoch + 1, "loss": loss.item(), "heldout": acc, "elapsed_s": time.time() - t0})
    bar.close()
    tower.eval()


def reference_image(i: int) -> str:
    return image_path("train", i)


def _packed_batch(processor, convs):
    """Multi-turn conversations, one image each: its first question carries the image, later ones
    follow as further user turns.  The 64 visual tokens are paid once for several answers.

    Returns the model inputs and, per answer token (and its <|im_end|>), the (row, position)
    whose hidden state predicts it and the token itself.
    """
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    texts, images, answers = [], [], []
    for rows in convs:
        parts = []
        for k, (q, a) in enumerate(zip(rows["prompt"], rows["answer"], strict=True)):
            parts.append(chat_prompt(processor, q, with_image=k == 0) + a + "<|im_end|>\n")
        texts.append("".join(parts))
        images.append(rows["image"][0].convert("RGB"))
        answers.append([tok(a, add_special_tokens=False).input_ids + [end] for a in rows["answer"]])
    tok.padding_side = "left"
    enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
    enc["position_ids"] = position_ids(enc["attention_mask"])
    marker = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    rows_idx, pos_idx, targets = [], [], []
    for b, ids in enumerate(enc["input_ids"].tolist()):
        starts = [i + len(marker) for i in range(len(ids) - len(marker) + 1) if ids[i : i + len(marker)] == marker]
        assert len(starts) == len(answers[b]), "chat template and answers disagree"
        for st, ans in zip(starts, answers[b], strict=True):
            assert ids[st : st + len(ans)] == ans, "answer tokens differ in context"
            for j, t in enumerate(ans):
                rows_idx.append(b)
                pos_idx.append(st + j - 1)
                targets.append(t)
    return enc, torch.tensor(rows_idx), torch.tensor(pos_idx), torch.tensor(targets)


def packed_loss(model, enc, rows_idx, pos_idx, targets):
    hidden = model.model(**enc).last_hidden_state
    logits = model.lm_head(hidden[rows_idx, pos_idx])
    return F.cross_entropy(logits.float(), targets)


def stage2(model, processor, log: Path, ckpt: Path, stage: StageConfig, seed: int) -> None:
    """Projector (and tower) training through the frozen LLM; resumes from ``ckpt`` if a checkpoint is there.

    ``stage.pack`` > 0 trains on multi-turn conversations of up to that many questions about one image
    (``stage.batch`` conversations a step), which amortises the image's tokens over several answers.
    """
    ds = load_easyvqa("train")
    train, held = _split(ds)
    held = held.shuffle(seed=seed).select(range(min(stage.heldout, len(held))))
    groups = _train_projector_and_tower(model, stage)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    total = stage.schedule or stage.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(min(50, total // 10 + 1), total, floor=0.1))
    state_file = ckpt / f"{stage.name}_state.pt"
    start = _resume(model, opt, sched, state_file)
    data = _Stage2Data.of(train, seed)
    bf16 = use_bf16(stage.precision)
    t0 = time.time()
    bar = tqdm(total=stage.steps, initial=start, desc=f"{stage.name}: projector through frozen LLM", unit="step")
    running = None
    for step in range(start, stage.steps):
        model.train()
        loss = _stage2_loss(model, processor, data, step, stage, seed, bf16)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
        row = {
            "stage": 2 if stage.name == "stage2" else stage.name,
            "step": step + 1,
            "loss": loss.item(),
            "lr": sched.get_last_lr()[0],
            "elapsed_s": time.time() - t0,
        }
        if (step + 1) % stage.eval_every == 0 or step + 1 == stage.steps:
            row |= _heldout(model, processor, held, bf16)
            bar.write(f"step {step + 1}: held-out accuracy {row['heldout_acc']:.3f} {row['heldout_by_type']}")
        _log(log, row)
        if (step + 1) % stage.save_every == 0 or step + 1 == stage.steps:
            _save(model, opt, sched, step + 1, state_file)
    bar.close()
    model.eval()


def _train_projector_and_tower(model, stage: StageConfig) -> list[dict]:
    """Gradients for the projector and the tower alone; their optimizer groups (the tower only at a rate > 0)."""
    for p in model.parameters():
        p.requires_grad_(False)
    proj = model.model.multi_modal_projector
    tower = model.model.vision_tower
    for p in list(proj.parameters()) + list(tower.parameters()):
        p.requires_grad_(True)
    groups = [{"params": list(proj.parameters()), "lr": stage.lr}]
    if stage.tower_lr > 0:
        groups.append({"params": list(tower.parameters()), "lr": stage.tower_lr})
    return groups


def _resume(model, opt, sched, state_file: Path) -> int:
    """The step a checkpoint reached (its weights, optimizer and schedule restored), or 0."""
    if not state_file.is_file():
        return 0
    state = torch.load(state_file, weights_only=True)
    model.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return int(state["step"])


def _save(model, opt, sched, step: int, state_file: Path) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file.with_suffix(".tmp")
    state = {"model": reference.trainable_state(model), "opt": opt.state_dict(), "sched": sched.state_dict()}
    torch.save({**state, "step": step}, tmp)
    tmp.replace(state_file)


@dataclass(frozen=True)
class _Stage2Data:
    """The training questions in a seeded order, and the images in another (for packed conversations)."""

    train: object
    order: list[int]
    by_image: dict[int, list[int]]
    image_order: list[int]

    @classmethod
    def of(cls, train, seed: int) -> _Stage2Data:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        by_image: dict[int, list[int]] = {}
        for i, im in enumerate(train["image_id"]):
            by_image.setdefault(im, []).append(i)
        image_order = sorted(by_image)
        random.Random(seed + 1).shuffle(image_order)
        return cls(train, order, by_image, image_order)


def _stage2_loss(
    model, processor, data: _Stage2Data, step: int, stage: StageConfig, seed: int, bf16: bool
) -> torch.Tensor:
    """Next-token loss on the answers of step ``step``'s questions (or packed conversations), under bf16 autocast
    where the CPU has bf16 instructions."""
    if stage.pack:
        rng = random.Random(seed * 1_000_003 + step)  # per step, so a resumed run sees the same data
        convs = []
        for k in range(stage.batch):
            qs = data.by_image[data.image_order[(step * stage.batch + k) % len(data.image_order)]]
            convs.append(data.train[sorted(rng.sample(qs, min(stage.pack, len(qs))))])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return packed_loss(model, *_packed_batch(processor, convs))
    idx = [data.order[(step * stage.batch + k) % len(data.order)] for k in range(stage.batch)]
    enc, keep, labels = answer_batch(processor, data.train[idx])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(**enc, logits_to_keep=keep).logits[:, :-1]
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100)


def _heldout(model, processor, held, bf16: bool) -> dict:
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        r = evaluate(model, processor, held, batch_size=32, progress=False)
    return {"heldout_acc": r["accuracy"], "heldout_by_type": {k: v["accuracy"] for k, v in r["by_type"].items()}}


def train_reference(
    config: ReferenceTrainingConfig | None = None,
    out: Path = reference.WEIGHTS,
    work: Path = Path("runs/reference"),
) -> Path:
    """Train the reference model's tower and projector as ``config`` says; write the shipped weights to ``out``.

    Each stage resumes from its checkpoint in ``work``.
    """
    from safetensors.torch import load_file, save_file

    config = config or ReferenceTrainingConfig()
    seed = config.seed
    torch.manual_seed(seed)
    random.seed(seed)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "train_log.jsonl"
    lm, tok = reference.load_smollm2()
    processor = reference.build_processor(tok)
    model = reference.build_model(lm, tok, seed=seed)
    del lm
    s1 = work / "stage1.safetensors"
    if s1.is_file():
        model.load_state_dict(load_file(str(s1)), strict=False)
    else:
        stage1(model, processor, log, config.stage1_epochs, seed)
        save_file(reference.trainable_state(model), str(s1))
    packed_state = work / f"{config.packed.name}_state.pt"
    if not packed_state.is_file():
        stage2(model, processor, log, work, config.single, seed)
    if config.packed.steps:
        if not packed_state.is_file():
            s2 = torch.load(work / f"{config.single.name}_state.pt", weights_only=True)
            model.load_state_dict(s2["model"], strict=False)
        stage2(model, processor, log, work, config.packed, seed)
    stage2_steps, packed_steps = config.single.steps, config.packed.steps
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    meta = {"seed": str(seed), "stage2_steps": str(stage2_steps), "packed_steps": str(packed_steps)}
    save_file(reference.trainable_state(model), str(tmp), metadata=meta)
    tmp.replace(out)
    shutil.copy(log, out.parent / "smollava_train_log.jsonl")
    plot_log(log, out.parent / "smollava_training.png")
    return out


def plot_log(log: Path, png: Path) -> Path:
    """Training curve: stage-2 loss and held-out accuracy against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log.read_text().splitlines()]
    # Every step after stage 1 (stage 2, then any continuation such as packed conversations), in order.
    s2 = [r for r in rows if r["stage"] != 1]
    for k, r in enumerate(s2):
        r["x"] = k + 1
    held = [r for r in s2 if "heldout_acc" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["x"] for r in s2], [r["loss"] for r in s2], lw=0.6, alpha=0.6, label="answer-token loss")
    ax.set_xlabel("step after stage 1")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot([r["x"] for r in held], [100 * r["heldout_acc"] for r in held], "o-", c="C1", label="held-out accuracy")
    ax2.set_ylabel("held-out accuracy (%)")
    ax2.set_ylim(0, 100)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.88))
    ax.set_title("smollava-easyvqa: projector alignment through frozen SmolLM2-135M")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png

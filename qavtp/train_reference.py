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
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qavtp.data.easyvqa import COLORS, SHAPES, image_labels, load_easyvqa
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
    from qavtp.data.easyvqa import image_path

    return image_path("train", i)


def _packed_batch(processor, convs):
    """Multi-turn conversations, one image each: its first question carries the image, later ones
    follow as further user turns.  The 64 visual tokens are paid once for several answers.

    Returns the model inputs and, per answer token (and its <|im_end|>), the (row, position)
    whose hidden state predicts it and the token itself.
    """
    from qavtp.data.prompts import chat_prompt

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


def stage2(
    model,
    processor,
    log: Path,
    steps: int,
    seed: int,
    ckpt: Path,
    batch: int = 16,
    lr: float = 1e-3,
    tower_lr: float = 1e-4,
    eval_every: int = 100,
    heldout_n: int = 200,
    save_every: int = 50,
    pack: int = 0,
    name: str = "stage2",
    schedule_steps: int | None = None,
) -> None:
    """Projector (and tower) training through the frozen LLM.

    ``pack`` > 0 trains on multi-turn conversations of up to ``pack`` questions about one image
    (``batch`` conversations a step), which amortises the image's tokens over several answers.
    ``schedule_steps`` (default ``steps``) is the length of the warm-up + cosine schedule, so a
    run can stop before its schedule ends.
    """
    ds = load_easyvqa("train")
    train, held = _split(ds)
    held = held.shuffle(seed=seed).select(range(min(heldout_n, len(held))))
    for p in model.parameters():
        p.requires_grad_(False)
    proj = model.model.multi_modal_projector
    tower = model.model.vision_tower
    for p in list(proj.parameters()) + list(tower.parameters()):
        p.requires_grad_(True)
    groups = [{"params": list(proj.parameters()), "lr": lr}]
    if tower_lr > 0:
        groups.append({"params": list(tower.parameters()), "lr": tower_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    total = schedule_steps or steps
    warm = min(50, total // 10 + 1)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warm, total, floor=0.1))
    start = 0
    state_file = ckpt / f"{name}_state.pt"
    if state_file.is_file():
        state = torch.load(state_file, weights_only=True)
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = int(state["step"])
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    by_image: dict[int, list[int]] = {}
    for i, im in enumerate(train["image_id"]):
        by_image.setdefault(im, []).append(i)
    image_order = sorted(by_image)
    random.Random(seed + 1).shuffle(image_order)
    t0 = time.time()
    bar = tqdm(total=steps, initial=start, desc=f"{name}: projector through frozen LLM", unit="step")
    running = None
    for step in range(start, steps):
        model.train()
        if pack:
            rng = random.Random(seed * 1_000_003 + step)  # per step, so a resumed run sees the same data
            convs = []
            for k in range(batch):
                qs = by_image[image_order[(step * batch + k) % len(image_order)]]
                convs.append(train[sorted(rng.sample(qs, min(pack, len(qs))))])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = packed_loss(model, *_packed_batch(processor, convs))
        else:
            idx = [order[(step * batch + k) % len(order)] for k in range(batch)]
            enc, keep, labels = answer_batch(processor, train[idx])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(**enc, logits_to_keep=keep).logits[:, :-1]
            flat = logits.float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}")
        row = {
            "stage": 2 if name == "stage2" else name,
            "step": step + 1,
            "loss": loss.item(),
            "lr": sched.get_last_lr()[0],
            "elapsed_s": time.time() - t0,
        }
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                r = evaluate(model, processor, held, batch_size=32, progress=False)
            row["heldout_acc"] = r["accuracy"]
            row["heldout_by_type"] = {k: v["accuracy"] for k, v in r["by_type"].items()}
            bar.write(f"step {step + 1}: held-out accuracy {r['accuracy']:.3f} {row['heldout_by_type']}")
        _log(log, row)
        if (step + 1) % save_every == 0 or step + 1 == steps:
            ckpt.mkdir(parents=True, exist_ok=True)
            tmp = state_file.with_suffix(".tmp")
            torch.save(
                {
                    "model": reference.trainable_state(model),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "step": step + 1,
                },
                tmp,
            )
            tmp.replace(state_file)
    bar.close()
    model.eval()


def train_reference(
    out: Path = reference.WEIGHTS,
    work: Path = Path("runs/reference"),
    seed: int = 0,
    stage1_epochs: int = 12,
    stage2_steps: int = 100,
    stage2_schedule: int = 450,
    packed_steps: int = 400,
    packed_schedule: int = 800,
    pack: int = 6,
    batch: int = 16,
    packed_batch: int = 4,
    lr: float = 1e-3,
    tower_lr: float = 1e-4,
) -> Path:
    """The recipe that produced the shipped weights (see README): stage 1, then stage 2 on single
    questions (stopped at ``stage2_steps`` of a ``stage2_schedule``-step schedule), then packed
    multi-turn conversations (stopped at ``packed_steps`` of ``packed_schedule``): the held-out
    accuracy had plateaued there.  Each stage resumes from its checkpoint in ``work``.
    """
    from safetensors.torch import load_file, save_file

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
        stage1(model, processor, log, stage1_epochs, seed)
        save_file(reference.trainable_state(model), str(s1))
    packed_state = work / "stage2b_state.pt"
    if not packed_state.is_file():
        stage2(
            model,
            processor,
            log,
            stage2_steps,
            seed,
            work,
            batch=batch,
            lr=lr,
            tower_lr=tower_lr,
            schedule_steps=stage2_schedule,
        )
    if packed_steps:
        if not packed_state.is_file():
            s2 = torch.load(work / "stage2_state.pt", weights_only=True)
            model.load_state_dict(s2["model"], strict=False)
        stage2(
            model,
            processor,
            log,
            packed_steps,
            seed,
            work,
            batch=packed_batch,
            lr=lr,
            tower_lr=tower_lr,
            pack=pack,
            name="stage2b",
            schedule_steps=packed_schedule,
        )
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

"""Projector alignment: the floating-point projector learns to feed the quantized LLM.

The visual tokens are a soft prompt, learned against the floating-point LLM (the reference model's
projector was trained through the frozen FP SmolLM2). The W4A4 LLM reads that prompt differently, and
the LLM's weights cannot move (they are integer codes now), but the projector, which stays in floating
point, can: it is distilled from the floating-point model, ``KL(FP dense ‖ W4A4)`` over the whole vocabulary at
every answer token of calibration questions, back-propagated through the frozen quantized LLM with
straight-through activation quantizers (optionally the vision tower too, at its own, lower learning rate: it is
floating point as well). The LLM's integer codes cannot move, but their floating-point group scales can:
with ``scale_lr`` each weight group's scale is multiplied by a learned gain (initialised to 1, the codes fixed),
as in PEQA / EfficientQAT's step-size training; the artifact stores the scaled scales, so the export is
unchanged. The teacher is the model itself before quantization, so
this recovers its behaviour and cannot teach it anything it did not know (the answers only set the
positions where the two are compared).

Questions held out of the training set measure the same KL before training and after every
``eval_every`` steps; the projector of the step with the lowest held-out KL is kept (step 0, the
unaligned projector, is a candidate), so alignment never makes that KL worse.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qavtp.calibrate.scale_gains import ScaleGains
from qavtp.config import AlignConfig
from qavtp.data import load_data
from qavtp.device import to_device, use_bf16
from qavtp.errors import QavtpError
from qavtp.prompting import encode
from qavtp.pruning import prune_sequence, select_tokens
from qavtp.scoring import score_tokens
from qavtp.training import answer_batch, warmup_cosine

HELDOUT = 128  # held-out questions that pick the aligned projector's step


def alignment_data(spec: str, steps: int, batch_size: int, heldout: int = HELDOUT, seed: int = 0, skip: int = 0):
    """Training and held-out questions from the train split, disjoint, seeded.

    ``steps * batch_size`` training questions (fewer if the split is small: training cycles through them)
    and ``heldout`` questions (at most a quarter of the split) for choosing the step. ``skip`` passes over the
    first training questions (those an earlier alignment used), wrapping round at the end of the split; the
    held-out questions stay the same, so KLs of a continued alignment compare with the earlier ones.
    """
    ds = load_data(spec, "train").shuffle(seed=seed + 1)  # another draw than the calibration set's
    n_held = max(1, min(heldout, len(ds) // 4))
    pool = len(ds) - n_held
    n_train = min(pool, steps * batch_size)
    if n_train < 1:
        raise QavtpError(f"data set {spec!r} is too small for projector alignment ({len(ds)} questions)")
    return ds.select([n_held + (skip + i) % pool for i in range(n_train)]), ds.select(range(n_held))


def _answer_logprobs(model, enc, keep: int, mask: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Log-probabilities over the vocabulary at every answer position, ``[n_positions, vocab]``."""
    with torch.autocast(mask.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(**enc, logits_to_keep=keep).logits[:, :-1]
    return F.log_softmax(logits.float()[mask], dim=-1)


def _pruned_answer_logprobs(adapter, prompt_enc, enc, keep: int, mask: torch.Tensor, rho: float, bf16: bool):
    """As :func:`_answer_logprobs` with only the top ``ceil(rho N)`` visual tokens kept before the LLM.

    The tokens are scored on the prompt alone, as at inference (the answer is not there yet), by the paper's
    preset fusion (``qapruner``: the artifact's own fusion weights are learned after alignment); the
    selection is not differentiable, the kept tokens' values are.
    """

    with torch.autocast(mask.device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            vis = adapter.visual_positions(prompt_enc["input_ids"])
            emb = adapter.embed(prompt_enc["input_ids"], prompt_enc["pixel_values"]).float()
            kept = select_tokens(score_tokens("qapruner", adapter, prompt_enc, emb, vis), rho)
        ids = enc["input_ids"]
        seq = prune_sequence(
            ids, enc["attention_mask"], adapter.embed(ids, enc["pixel_values"]), adapter.visual_positions(ids), kept
        )
        hidden = adapter.language_model(
            inputs_embeds=seq.inputs_embeds, attention_mask=seq.attention_mask, position_ids=seq.position_ids
        ).last_hidden_state
        logits = adapter.lm_head(hidden[:, -keep:])[:, :-1]
    return F.log_softmax(logits.float()[mask], dim=-1)


def _kl(teacher_lp: torch.Tensor, student_lp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student)."""
    return (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1).mean()


def _batches(processor, data, batch_size: int, device: torch.device | None = None):

    for s in range(0, len(data), batch_size):
        rows = data[s : s + batch_size]
        enc, keep, labels = answer_batch(processor, rows)
        prompt_enc = encode(processor, rows["image"], rows["prompt"])
        yield to_device(prompt_enc, device), to_device(enc, device), keep, (labels != -100).to(device)


def _text_positions(batch, image_token_id: int):
    """The batch with its KL positions widened from the answer tokens to every text token after the image.

    The prompts are left-padded, so the text after the image is right-aligned in the dense and in the pruned
    sequence alike: the last ``keep`` positions hold the same tokens in both, and those at or before a row's last
    visual token (which pruning moves) are masked out.
    """
    prompt_enc, enc, _, _ = batch
    ids = enc["input_ids"]
    length = ids.shape[1]
    pos = torch.arange(length, device=ids.device)
    last_visual = torch.where(ids == image_token_id, pos, -1).amax(dim=1)
    keep = length - 1 - int(last_visual.min())
    window = slice(length - keep, length - 1)  # the positions whose logits are compared (the last one predicts nothing)
    mask = (pos[window].unsqueeze(0) > last_visual.unsqueeze(1)) & enc["attention_mask"][:, window].bool()
    return prompt_enc, enc, keep, mask


def _student_logprobs(model, adapter, batch, rho: float, bf16: bool) -> torch.Tensor:
    prompt_enc, enc, keep, mask = batch
    if rho >= 1.0:
        return _answer_logprobs(model, enc, keep, mask, bf16)
    return _pruned_answer_logprobs(adapter, prompt_enc, enc, keep, mask, rho, bf16)


@torch.no_grad()
def _teacher_targets(teacher, processor, data, batch_size: int, bf16: bool, device=None) -> list:
    return [(b, _answer_logprobs(teacher, *b[1:], bf16)) for b in _batches(processor, data, batch_size, device)]


@torch.no_grad()
def _heldout_kl(model, adapter, held: list, ratios: list[float], bf16: bool) -> dict[float, float]:
    out = {}
    for rho in ratios:
        total, n = 0.0, 0
        for batch, target in held:
            lp = _student_logprobs(model, adapter, batch, rho, bf16)
            total += _kl(target, lp).item() * len(target)
            n += len(target)
        out[rho] = total / n
    return out


def align_projector(
    adapter,
    teacher,
    processor,
    train,
    heldout,
    config: AlignConfig,
    *,
    eval_every: int = 50,
    progress: bool = True,
    device: torch.device | None = None,
) -> dict:
    """Distil ``teacher`` (the floating-point model, dense) into the projector of ``adapter``'s quantized model
    for ``steps`` steps of ``batch_size`` questions from ``train`` (cycled); returns the record stored in the
    artifact. Step ``s`` keeps ``ratios[s % len(ratios)]`` of the visual tokens (1: all), so one projector
    learns to serve every retention ratio; the held-out KL that picks the step is the mean over the ratios.

    Only the projector's parameters change, the vision tower's if ``vision_lr > 0`` and the quantized weights'
    group scales if ``scale_lr > 0`` (:class:`ScaleGains`); the model is left in eval mode with the best of them.
    ``positions="text"`` trains on the KL at every text token after the image (the question's too), a denser
    signal than the answer tokens alone; the held-out KL that picks the step stays the answer tokens'.
    The questions go to ``device`` (default the CPU), where ``adapter.model`` and ``teacher`` must already be.
    """
    if not config.enabled:
        raise QavtpError(f"projector alignment needs at least one step, got {config.steps}")
    if len(train) == 0 or len(heldout) == 0:
        raise QavtpError("projector alignment needs training and held-out questions")
    t0 = time.time()
    bf16 = use_bf16(config.precision, device)  # emulated bf16 on an AVX2 CPU costs 7x: fp32 there
    model = adapter.model
    trainable = _Trainable.of(model, config)
    frozen = trainable.train_only(model)
    teacher.eval()
    model.eval()  # no dropout anywhere; gradients flow all the same
    held = _teacher_targets(teacher, processor, heldout, 16, bf16, device)
    opt = torch.optim.AdamW(trainable.groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, config.steps // 10), config.steps))
    curve: list[dict] = []

    def heldout_kl(step: int, extra: dict) -> float:
        with torch.no_grad():
            trainable.rebuild()
        kls = _heldout_kl(model, adapter, held, list(config.ratios), bf16)
        mean = sum(kls.values()) / len(kls)
        curve.append({"step": step, **extra, "heldout_kl": round(mean, 5), "by_ratio": _rounded(kls)})
        return mean

    best_kl, best_step, best_state = heldout_kl(0, {}), 0, trainable.snapshot()
    running = None
    bar = tqdm(
        total=config.steps, desc="aligning the projector to the quantized LLM", unit="step", disable=not progress
    )
    for step in range(config.steps):
        batch = _step_batch(processor, adapter, train, step, config, device)
        rho = config.ratios[step % len(config.ratios)]
        loss = _train_step(model, adapter, teacher, batch, rho, bf16, trainable, opt)
        opt.step()
        sched.step()
        running = loss if running is None else 0.9 * running + 0.1 * loss
        bar.update(1)
        bar.set_postfix(kl=f"{running:.4f}", best=f"{best_kl:.4f}@{best_step}")
        if (step + 1) % eval_every == 0 or step + 1 == config.steps:
            kl = heldout_kl(step + 1, {"train_kl": round(running, 5)})
            if kl < best_kl:
                best_kl, best_step, best_state = kl, step + 1, trainable.snapshot()
    bar.close()
    trainable.restore(best_state)
    spread = trainable.gains.fold() if trainable.gains is not None else None
    for p, flag in frozen.items():
        p.requires_grad_(flag)
    return _record(config, trainable, spread, bf16, (len(train), len(heldout)), best_step, best_kl, curve, t0)


def _rounded(kls: dict[float, float]) -> dict[str, float]:
    return {str(r): round(v, 5) for r, v in kls.items()}


@dataclass
class _Trainable:
    """What alignment trains: the projector, the vision tower if it has a rate, the scale gains if they have one."""

    modules: dict[str, torch.nn.Module]
    groups: list[dict]
    gains: ScaleGains | None

    @classmethod
    def of(cls, model, config: AlignConfig) -> _Trainable:
        rates = {"multi_modal_projector": config.lr}
        if config.vision_lr > 0:
            rates["vision_tower"] = config.vision_lr
        modules = {name: getattr(model.model, name) for name in rates}
        gains = ScaleGains(model) if config.scale_lr > 0 else None
        if gains is not None:
            if not gains.owners:
                raise QavtpError("weight-scale alignment needs a model with quantized weights; this one has none")
            modules["weight_scales"], rates["weight_scales"] = gains, config.scale_lr
        groups = [{"params": list(m.parameters()), "lr": rates[n]} for n, m in modules.items()]
        return cls(modules, groups, gains)

    def train_only(self, model) -> dict:
        """Gradients for these parameters alone; returns every parameter's previous flag."""
        frozen = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in (p for g in self.groups for p in g["params"]):
            p.requires_grad_(True)
        return frozen

    def rebuild(self) -> None:
        if self.gains is not None:
            self.gains.rebuild()

    def snapshot(self) -> dict[str, dict[str, torch.Tensor]]:
        return {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in self.modules.items()}

    def restore(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, module in self.modules.items():
            module.load_state_dict(state[name])


def _step_batch(processor, adapter, train, step: int, config: AlignConfig, device):
    """Step ``step``'s questions (the training set cycled), encoded, with the positions the loss compares."""
    n, size = len(train), config.batch_size
    rows = train.select([(step * size + k) % n for k in range(size)])
    (batch,) = _batches(processor, rows, size, device)
    return _text_positions(batch, adapter.image_token_id) if config.positions == "text" else batch


def _train_step(model, adapter, teacher, batch, rho: float, bf16: bool, trainable: _Trainable, opt) -> float:
    """The distillation loss of one batch, back-propagated and clipped (the optimizer steps after)."""
    with torch.no_grad():
        target = _answer_logprobs(teacher, *batch[1:], bf16)
    trainable.rebuild()
    loss = _kl(target, _student_logprobs(model, adapter, batch, rho, bf16))
    opt.zero_grad()
    loss.backward()
    for g in trainable.groups:  # per group: the many scale gradients must not shrink the projector's steps
        torch.nn.utils.clip_grad_norm_(g["params"], 1.0)
    return loss.item()


def _record(config: AlignConfig, trainable: _Trainable, spread, bf16: bool, sizes, best_step, best_kl, curve, t0):
    """The alignment's record in the artifact."""
    ratios = list(config.ratios)
    return {
        "target": "+".join(trainable.modules),
        "objective": f"kl(fp dense || quantized, pruned to each ratio), all {config.positions} tokens, full vocabulary",
        "positions": config.positions,
        "ratios": ratios,
        "pruning_scorer": "qapruner" if any(r < 1 for r in ratios) else None,
        "steps": config.steps,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "vision_lr": config.vision_lr,
        "scale_lr": config.scale_lr,
        **({"scale_gains": spread} if spread else {}),
        "precision": config.precision,
        "bf16": bf16,
        "train_questions": sizes[0],
        "heldout_questions": sizes[1],
        "best_step": best_step,
        "heldout_kl_before": curve[0]["heldout_kl"],
        "heldout_kl_after": round(best_kl, 5),
        "curve": curve,
        "seconds": round(time.time() - t0, 1),
    }

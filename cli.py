"""The ``qavtp`` command line: thin wrappers over library functions that the tests also call."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import click

from qavtp.calibrate.recipes import DESCRIPTIONS as RECIPE_DESCRIPTIONS
from qavtp.calibrate.recipes import RECIPES, apply_recipe
from qavtp.config import (
    ACTIVATION_MODES,
    EXPORT_SCORERS,
    OBJECTIVES,
    POSITIONS,
    PRECISIONS,
    AlignConfig,
    CalibrationConfig,
    ConfigError,
    EvalConfig,
    ExportConfig,
    FusionConfig,
    ReferenceTrainingConfig,
    parse_ratios,
    updated,
)
from qavtp.errors import QavtpError

DEFAULT_MODEL = "smollava-easyvqa"


class _Group(click.Group):
    """Turns QavtpError into one line on stderr and a non-zero exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QavtpError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(2)
        except click.UsageError as e:  # a flag's value out of its range or choices: one line too
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(2)


# The command line is the only place that knows flag names: each command maps its flags to config fields
# (click parameter -> dotted field path, flag), and a ConfigError's field back to the flag the user typed.
CALIBRATE_FIELDS = {
    "data_spec": ("data", "--data"),
    "n_samples": ("n_samples", "--n-samples"),
    "batch_size": ("batch_size", "--batch-size"),
    "seed": ("seed", "--seed"),
    "device": ("device", "--device"),
    "stream": ("stream", "--stream"),
    "method": ("quant.method", "--method"),
    "gptq": ("quant.gptq", "--gptq"),
    "wbits": ("quant.wbits", "--wbits"),
    "abits": ("quant.abits", "--abits"),
    "wasym": ("quant.w_symmetric", "--wasym"),  # flags of the negation: True means not symmetric
    "aasym": ("quant.a_symmetric", "--aasym"),
    "wgroup": ("quant.wgroup", "--wgroup"),
    "agroup": ("quant.agroup", "--agroup"),
    "aclip": ("quant.aclip", "--aclip"),
    "sequential": ("quant.sequential", "--sequential"),
    "fp_align": ("quant.fp_align", "--fp-align"),
    "clip_search": ("quant.clip_search", "--clip-search"),
    "smooth_alpha": ("quant.smooth_alpha", "--smooth-alpha"),
    "online_o_proj": ("quant.online_o_proj", "--o-proj-hadamard"),
    "vocab_bits": ("quant.vocab_bits", "--vocab-bits"),
    "kv_bits": ("quant.kv_bits", "--kv-bits"),
    "kv_clip": ("quant.kv_clip", "--kv-clip"),
    "a8": ("quant.a8", "--a8"),
    "vision_stats": ("quant.vision_stats", "--vision-stats"),
    "retain": ("fusion.ratios", "--retain"),
    "fusion_samples": ("fusion.samples", "--fusion-samples"),
    "fusion_objective": ("fusion.objective", "--fusion-objective"),
    "fusion_holdout": ("fusion.holdout", "--fusion-holdout"),
    "align_steps": ("align.steps", "--align-projector"),
    "align_lr": ("align.lr", "--align-lr"),
    "align_batch": ("align.batch_size", "--align-batch"),
    "align_retain": ("align.ratios", "--align-retain"),
    "align_vision_lr": ("align.vision_lr", "--align-vision-lr"),
    "align_scale_lr": ("align.scale_lr", "--align-scale-lr"),
    "align_positions": ("align.positions", "--align-positions"),
    "align_precision": ("align.precision", "--align-precision"),
}
NEGATED = {"wasym", "aasym"}
ALIGN_FLAGS = {"steps": "--steps", "lr": "--lr", "batch_size": "--batch-size", "ratios": "--retain"}
ALIGN_FLAGS |= {"vision_lr": "--vision-lr", "scale_lr": "--scale-lr", "positions": "--positions"}
ALIGN_FLAGS |= {"precision": "--precision"}
FUSE_FLAGS = {"ratios": "--retain", "samples": "--fusion-samples", "objective": "--fusion-objective"}
EVAL_FLAGS = {
    "ratios": "--retain",
    "scorers": "--scorer",
    "layer": "--layer",
    "mode": "--mode",
    "dtype": "--dtype",
    "relevance_weight": "--relevance-weight",
}
EVAL_FLAGS |= {"batch_size": "--batch-size", "seed": "--seed", "device": "--device"}
EXPORT_FLAGS = {
    "retain": "--retain",
    "scorer": "--scorer",
    "format": "--format",
    "accuracy_level": "--accuracy-level",
    "relevance_weight": "--relevance-weight",
    "activations": "--activations",
    "fused": "--fused-ops",
}


@contextmanager
def flags_named(flags: dict[str, str]) -> Iterator[None]:
    """A :class:`ConfigError` raised inside says the flag the user typed instead of the config field."""
    try:
        yield
    except ConfigError as e:
        raise QavtpError(f"{flags.get(e.field, e.field)} {e.problem}") from None


def _flag_text(field: str, value) -> str:
    param = next(p for p, (f, _) in CALIBRATE_FIELDS.items() if f == field)
    flag = CALIBRATE_FIELDS[param][1]
    if param in NEGATED or value is True:
        return flag
    if isinstance(value, tuple):
        value = ",".join(f"{r:g}" for r in value)
    return f"{flag} {value}"


def calibration_config(options: dict, given: set[str], recipe: str | None) -> tuple[CalibrationConfig, list[str]]:
    """The command line's options as a :class:`CalibrationConfig`, with ``recipe`` filling what was not given;
    also the flags the recipe set."""
    changes = {}
    for param, value in options.items():
        field = CALIBRATE_FIELDS[param][0]
        if param in NEGATED:
            value = not value
        elif param == "wgroup":
            value = None if value == "auto" else int(value) if str(value).lstrip("-").isdigit() else value
        changes[field] = value
    config = updated(CalibrationConfig(), changes)
    config, applied = apply_recipe(recipe, config, {CALIBRATE_FIELDS[p][0] for p in given})
    return config, [_flag_text(f, v) for f, v in applied.items()]


@click.group(cls=_Group)
@click.version_option(package_name="qavtp")
def main() -> None:
    """qavtp: W4A4 quantization and quantization-aware visual token pruning for LLaVA models."""


cache_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the reference model is assembled (default $QAVTP_CACHE or ~/.cache/qavtp).",
)


relevance_weight_option = click.option(
    "--relevance-weight",
    type=float,
    default=None,
    help="theta in [0, 1) of the DPP selectors: cdpruner (default 0.5), qavtp-dpp (default: the learned one).",
)


def device_option(what: str):
    """``--device`` for the commands that can run on a GPU; ``what`` says which part runs there."""
    return click.option("--device", default="cpu", show_default=True, help=f"cpu, cuda or cuda:N: {what}")


fusion_holdout_option = click.option(
    "--fusion-holdout/--no-fusion-holdout",
    default=True,
    show_default=True,
    help="Adopt the searched fusion weights only if they beat the paper's preset (qapruner) on the next "
    "--fusion-samples calibration questions, which the search never sees; else store the preset.",
)


def precision_option(flag: str = "--precision"):
    return click.option(
        flag,
        type=click.Choice(PRECISIONS),
        default="auto",
        show_default=True,
        help="Training's compute precision: auto takes bf16 autocast on a GPU or a CPU with AVX512-BF16/AMX, fp32 "
        "elsewhere (an AVX2 CPU runs bf16 7x slower than fp32).",
    )


def align_options(prefix: str):
    """Alignment options shared by ``calibrate`` (``--align-vision-lr`` ...) and ``align`` (``--vision-lr`` ...)."""
    options = [
        click.option(
            f"{prefix}vision-lr",
            type=float,
            default=0.0,
            show_default=True,
            help="Learning rate of the vision tower during alignment (0: only the projector is aligned).",
        ),
        click.option(
            f"{prefix}scale-lr",
            type=float,
            default=0.0,
            show_default=True,
            help="Learning rate of a gain on each quantized weight group's scale during alignment (0: scales "
            "frozen; the integer codes never move).",
        ),
        click.option(
            f"{prefix}positions",
            type=click.Choice(POSITIONS),
            default="answer",
            show_default=True,
            help="Where alignment compares the two models: the answer tokens, or every text token after the image.",
        ),
        click.option(
            f"{prefix}retain",
            default="1",
            show_default=True,
            help="Retention ratios the projector is aligned for, cycled over the steps (1: the dense model; e.g. "
            "1,0.5,0.25,0.125: the quantized model also sees its prompts pruned by the qapruner preset).",
        ),
        precision_option(f"{prefix}precision"),
    ]

    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f

    return apply


runtime_option = click.option(
    "--runtime",
    type=click.Choice(["onnxruntime", "openvino"]),  # qavtp.export.session.RUNTIMES, not imported here
    default="onnxruntime",
    show_default=True,
    help="Runtime that executes the graphs; openvino (pip install openvino) runs the portable --format qdq export.",
)


def bits_option(flag: str, text: str):
    """A 4 / 8 / 16 (off) bit-width choice, passed on as an int."""
    return click.option(
        flag,
        type=click.Choice(["4", "8", "16"]),
        default="16",
        show_default=True,
        callback=lambda _ctx, _param, value: int(value),
        help=text,
    )


@main.command()
@cache_option
@click.option("--force", is_flag=True, help="Rebuild even if the cache already holds the model.")
def assemble(cache_dir: str | None, force: bool) -> None:
    """Assemble the embedded reference model smollava-easyvqa as a standard HF checkpoint."""
    from qavtp.models.reference import assemble as _assemble

    click.echo(_assemble(cache_dir, force=force))


@main.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option(
    "--recipe",
    type=click.Choice(list(RECIPES)),
    default=None,
    help="A measured option set; explicit flags override it. "
    + "; ".join(f"{k}: {v}" for k, v in RECIPE_DESCRIPTIONS.items())
    + ".",
)
@click.option("--data", "data_spec", default="easy-vqa", show_default=True, help="Calibration data (train split).")
@click.option("--n-samples", type=int, default=128, show_default=True, help="Calibration questions.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--method", type=click.Choice(["rtn", "smoothquant", "quarot"]), default="quarot", show_default=True)
@click.option("--wbits", type=int, default=4, show_default=True, help="Weight bits: 2, 3, 4 or 8.")
@click.option("--abits", type=int, default=4, show_default=True, help="Activation bits: 2, 3, 4, 8, or 16 (off).")
@click.option(
    "--wgroup",
    default="auto",
    show_default=True,
    help="Weight group size, 0 for per channel; auto: 128, or the largest of 64/32/16 that divides every width.",
)
@click.option(
    "--agroup",
    type=int,
    default=0,
    show_default=True,
    help="Activation group size (0: per token, QuaRot's choice). On the reference model --aasym --agroup 16 lifts "
    "W4A4 from 51 to 65 % (README).",
)
@click.option("--wasym", is_flag=True, help="Asymmetric weights (default symmetric).")
@click.option("--aasym", is_flag=True, help="Asymmetric activations (default symmetric).")
@click.option("--aclip", type=float, default=1.0, show_default=True, help="Activation clipping ratio in (0, 1].")
@click.option("--gptq", is_flag=True, help="GPTQ instead of round-to-nearest weights.")
@click.option(
    "--fp-align",
    type=float,
    default=0.0,
    show_default=True,
    help="GPTAQ-style asymmetric calibration: quantize, instead of each float weight, the one that maps the quantized "
    "model's inputs onto the floating-point model's outputs, this much of the correction (0: off, 1: all of it). "
    "0.25 on the reference model; larger values overfit the calibration prompts (text perplexity 87 at 0.5).",
)
@click.option(
    "--sequential",
    is_flag=True,
    help="Quantize each layer's q/k/v, o, gate/up, down in turn, each observed with the ones before it quantized "
    "and (for GPTQ) on its activation-quantized inputs, as deployed.",
)
@click.option("--clip-search", is_flag=True, help="Search a per-group weight clipping ratio (MSE).")
@click.option("--smooth-alpha", type=float, default=0.5, show_default=True, help="SmoothQuant migration strength.")
@click.option(
    "--o-proj-hadamard",
    "online_o_proj",
    is_flag=True,
    help="quarot: also an online Hadamard before o_proj (mixes the heads).",
)
@bits_option(
    "--vocab-bits",
    "Token embedding and LM head: 4- or 8-bit weights (RTN, the weight group size; the head's input stays "
    "float), or 16: floating point as QuaRot keeps them.",
)
@bits_option(
    "--kv-bits",
    "KV cache: keys (after RoPE and a per-head Hadamard) and values quantized per token and head, "
    "asymmetric; 16: not quantized.",
)
@click.option("--kv-clip", type=float, default=0.95, show_default=True, help="KV clipping ratio in (0, 1].")
@click.option(
    "--a8",
    default=None,
    help="Mixed precision: these linears keep 8-bit inputs (the same scheme otherwise): projection names and/or "
    "decoder layers, comma-separated, e.g. gate_proj,up_proj or 0-4 (bench/act_sensitivity.py shows where it pays).",
)
@click.option(
    "--vision-stats",
    is_flag=True,
    help="Also record the input statistics of the vision tower's and projector's linears (they stay float).",
)
@device_option(
    "where the layer-by-layer work (rotation, statistics, GPTQ) runs. The model stays in host memory and one "
    "decoder layer at a time visits the device, so a 7B/13B model calibrates on one GPU. Fusion learning runs on "
    "the CPU."
)
@click.option(
    "--stream/--no-stream",
    default=None,
    help="Read the decoder layers one at a time from the checkpoint's shards, quantize and write each, then free "
    "it: host memory stays near one layer plus the vision tower and vocabulary, for a 7B model on a small machine "
    "(RTN or GPTQ; not with --method quarot/smoothquant, alignment or fusion learning). Default: when the model's "
    "float32 weights exceed 4 GiB.",
)
@click.option(
    "--retain",
    default="0.5,0.25,0.125",
    show_default=True,
    help="Retention ratios to learn pruning fusion weights for ('none' to skip).",
)
@click.option("--fusion-samples", type=int, default=64, show_default=True, help="Calibration questions for fusion.")
@click.option(
    "--fusion-objective",
    type=click.Choice(OBJECTIVES),
    default="kl",
    show_default=True,
    help="kl: match the FP dense model's next-token distribution; choice-kl: over the candidate answers only; "
    "accuracy: calibration accuracy.",
)
@fusion_holdout_option
@click.option(
    "--align-projector",
    "align_steps",
    type=int,
    default=0,
    show_default=True,
    help="Steps of projector alignment (0: off): the floating-point projector is distilled from the FP model "
    "through the quantized LLM (KL on answer tokens of train questions), before the fusion weights are learned.",
)
@click.option("--align-lr", type=float, default=3e-4, show_default=True, help="Projector alignment learning rate.")
@click.option("--align-batch", type=int, default=8, show_default=True, help="Questions per alignment step.")
@align_options("--align-")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="Artifact directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact directory.")
@cache_option
def calibrate(model, output, recipe, overwrite, cache_dir, **options):
    """Calibrate MODEL to W{wbits}A{abits} and write a quantization artifact."""
    from qavtp.calibrate.calibration import run_calibration

    ctx = click.get_current_context()
    given = {k for k in options if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
    flags = {field: flag for field, flag in CALIBRATE_FIELDS.values()}
    with flags_named(flags):
        config, applied = calibration_config(options, given, recipe)
        if applied:
            click.echo(f"recipe {recipe}: {' '.join(applied)}", err=True)
        out = run_calibration(model, output, config, overwrite=overwrite, cache_dir=cache_dir)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--retain", default="0.5,0.25,0.125", show_default=True, help="Retention ratios to learn weights for.")
@click.option("--fusion-samples", type=int, default=64, show_default=True, help="Calibration questions for fusion.")
@click.option("--fusion-objective", type=click.Choice(OBJECTIVES), default="kl", show_default=True)
@fusion_holdout_option
@cache_option
def fuse(artifact, retain, fusion_samples, fusion_objective, fusion_holdout, cache_dir):
    """Learn the pruning fusion weights of an existing ARTIFACT again (its weights stay as they are)."""
    from qavtp.calibrate.refine import refit_fusion

    with flags_named(FUSE_FLAGS):
        config = FusionConfig(ratios=retain, samples=fusion_samples, objective=fusion_objective, holdout=fusion_holdout)
        fus = refit_fusion(artifact, config, cache_dir=cache_dir)
    for key, e in fus["ratios"].items():
        click.echo(f"retain {key}: {e['params']}")
    click.echo(f"wrote {Path(artifact) / 'config.json'}")


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="Aligned artifact directory.")
@click.option("--steps", type=int, default=200, show_default=True, help="Alignment steps.")
@click.option("--lr", type=float, default=3e-4, show_default=True, help="Learning rate.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Questions per step.")
@align_options("--")
@device_option("where a dense alignment (--retain 1) runs, student and teacher both; fusion learning runs on the CPU.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@cache_option
def align(
    artifact,
    output,
    steps,
    lr,
    batch_size,
    vision_lr,
    scale_lr,
    positions,
    retain,
    precision,
    device,
    overwrite,
    cache_dir,
):
    """Align the projector of an existing ARTIFACT to its quantized LLM (as calibrate's --align-projector).

    The floating-point projector is distilled from the source model through the frozen quantized LLM; an
    artifact aligned before continues on new training questions. Fusion weights are learned again.
    """
    from qavtp.calibrate.artifact import read_config
    from qavtp.calibrate.refine import align_artifact

    with flags_named(ALIGN_FLAGS):
        config = AlignConfig(steps, lr, batch_size, retain, vision_lr, scale_lr, positions, precision)
        out = align_artifact(artifact, output, config, device=device, overwrite=overwrite, cache_dir=cache_dir)
    rec = read_config(out).alignment
    gains = rec.get("scale_gains")
    spread = f"; scale gains {gains['min']:.4f}-{gains['max']:.4f}" if gains else ""
    click.echo(
        f"held-out KL {rec['heldout_kl_before']:.4f} -> {rec['heldout_kl_after']:.4f} (step {rec['best_step']} of "
        f"{rec['steps']}, {rec['seconds']:.0f} s){spread}; wrote {out}"
    )


@main.command("eval")
@click.argument("model", default=None, required=False)
@click.option("--artifact", type=click.Path(), default=None, help="A calibration artifact to evaluate.")
@click.option(
    "--data", "data_spec", default="easy-vqa", show_default=True, help="easy-vqa, scienceqa:DIR or local:DIR."
)
@click.option("--split", default="test", show_default=True)
@click.option(
    "--columns",
    default=None,
    help="Column map for local data, DATA_COLUMN=QAVTP_NAME, e.g. img=image,q=question,a=answer.",
)
@click.option("--keep-no-image", is_flag=True, help="Keep rows without an image (text-only prompts).")
@click.option("--limit", type=int, default=None, help="Evaluate a seeded random subset of this size.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--mode", type=click.Choice(["loglik", "generate"]), default="loglik", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option(
    "--retain",
    default=None,
    help="Keep this fraction of visual tokens, in (0, 1]; a list (1,0.5,0.25,0.125) sweeps and draws plots.",
)
@click.option(
    "--scorer",
    default="semantic",
    show_default=True,
    help="Token scorer(s) for --retain, comma-separated; 'ablation' runs every scorer.",
)
@click.option(
    "--layer",
    "layer_k",
    type=int,
    default=0,
    show_default=True,
    help="Prune before decoder layer K (0: before the LLM).",
)
@relevance_weight_option
@click.option("--with-fp", is_flag=True, help="With --artifact: also evaluate the floating-point source model.")
@click.option(
    "--fp-scorers", default="semantic", show_default=True, help="Scorers for the floating-point rows of --with-fp."
)
@click.option(
    "-o", "--output", type=click.Path(file_okay=False), default=None, help="Directory for results.json and results.md."
)
@device_option("where the model runs (dense --mode loglik; pruning, sweeps and generation run on the CPU).")
@cache_option
def eval_cmd(
    model,
    artifact,
    data_spec,
    split,
    columns,
    keep_no_image,
    limit,
    seed,
    batch_size,
    mode,
    dtype,
    retain,
    scorer,
    layer_k,
    relevance_weight,
    with_fp,
    fp_scorers,
    output,
    device,
    cache_dir,
):
    """Accuracy of MODEL (a local LLaVA directory or smollava-easyvqa) on a VQA data set."""
    from qavtp.calibrate.artifact import read_config
    from qavtp.data import data_path, load_data, parse_columns
    from qavtp.eval_job import evaluate_one, title
    from qavtp.evaluate import markdown_table
    from qavtp.io import atomic_write_json, atomic_write_text, check_output
    from qavtp.models.loading import check_checkpoint
    from qavtp.sweep import SweepSpec, check_fusion, parse_scorers, sweep, write_sweep

    if retain is not None and not parse_ratios(retain):
        raise QavtpError(f"--retain {retain!r} names no retention ratio")
    if with_fp and not artifact:
        raise QavtpError("--with-fp needs --artifact (the floating-point model is the artifact's source)")
    with flags_named(EVAL_FLAGS):
        fp = tuple(parse_scorers(fp_scorers)) if with_fp else ("semantic",)
        # Dense loglik on the CPU first: the two flag combinations below are refused in the flags' own words.
        e = EvalConfig(
            retain,
            tuple(parse_scorers(scorer)),
            layer_k,
            "loglik",
            dtype,
            batch_size,
            seed,
            with_fp,
            fp,
            relevance_weight=relevance_weight,
        )
    if mode != "loglik" and e.is_sweep:
        raise QavtpError("sweeps (several --retain or --scorer values, --with-fp) use --mode loglik")
    if device != "cpu" and (e.ratios or e.is_sweep or mode != "loglik"):
        raise QavtpError(f"--device {device} runs dense --mode loglik only; pruning, sweeps and generation use the CPU")
    with flags_named(EVAL_FLAGS):
        e = replace(e, mode=mode, device=device)
    if model and model != DEFAULT_MODEL:
        check_checkpoint(Path(model))  # a missing or foreign model says so before the data set is loaded
    if output:  # a sweep replaces the directory (results, plots): it must be an earlier results directory
        inputs = [model if model != DEFAULT_MODEL else None, artifact, data_path(data_spec)]
        check_output(output, "results", inputs, overwrite=True)
    check_fusion(read_config(artifact) if artifact else None, list(e.scorers), list(e.ratios))  # before any loading
    ds = load_data(data_spec, split, limit, seed, parse_columns(columns), keep_no_image)
    described = dict(data=data_spec, split=split, limit=limit, seed=seed, dtype=dtype)
    if e.is_sweep:
        spec = SweepSpec(
            e.ratios or (1.0,),
            e.scorers,
            e.layer,
            e.fp_scorers if with_fp else None,
            dtype,
            batch_size,
            seed,
            e.relevance_weight,
        )
        runs, report = sweep(model, artifact, ds, spec, cache_dir)
        text = f"### {artifact or model or DEFAULT_MODEL} on {data_spec} ({split}, n={len(ds)})\n\n{report}"
        click.echo(text)
        if output:
            written = write_sweep(Path(output), runs, text, ds, spec, {**described, "artifact": artifact})
            click.echo(f"wrote {output}/{', '.join(written)}")
        return
    results = evaluate_one(model, artifact, ds, e, cache_dir)
    results["config"] = {"model": results["config"]["model"], **described, **results["config"]}
    table = markdown_table(results, title(results, data_spec, split))
    click.echo(table)
    if output:
        out = Path(output)
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "results.md", table)
        click.echo(f"wrote {out / 'results.json'} and {out / 'results.md'}")


@main.command("eval-onnx")
@click.argument("export_dir", type=click.Path())
@click.option("--data", "data_spec", default="easy-vqa", show_default=True, help="A VQA data set (question column).")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=click.IntRange(0), default=200, show_default=True, help="Seeded random subset (0: all).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--compare", is_flag=True, help="Also evaluate the torch model the export came from; report agreement.")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None, help="Directory for results.json.")
@runtime_option
@cache_option
def eval_onnx(export_dir, data_spec, split, limit, seed, batch_size, compare, output, runtime, cache_dir):
    """Accuracy of an exported model (onnxruntime or OpenVINO), optionally next to the torch model it came from."""
    from qavtp.data import data_path, load_data
    from qavtp.export.accuracy import compare as agreement
    from qavtp.export.accuracy import evaluate_export
    from qavtp.export.session import ExportedModel
    from qavtp.export.torch_reference import evaluate_like_export
    from qavtp.io import atomic_write_json, check_output
    from qavtp.metrics import markdown_table

    if batch_size < 1:
        raise QavtpError(f"--batch-size must be at least 1, got {batch_size}")
    if output:
        check_output(output, "results", [export_dir, data_path(data_spec)], overwrite=True)
    em = ExportedModel(export_dir, runtime=runtime)
    ds = load_data(data_spec, split, limit or None, seed)
    if "question" not in ds.column_names:
        raise QavtpError(f"data set {data_spec!r} has no question column, which the exported prompt format needs")
    t0 = time.time()
    res = evaluate_export(em, ds, batch_size)
    res["seconds"] = round(time.time() - t0, 1)
    pr = em.meta["pruning"]
    how = f"retain {pr['retain']:g} by {pr['scorer']}, {em.numerics}" if pr["scorer"] else f"dense, {em.numerics}"
    click.echo(markdown_table(res, f"ONNX {export_dir} ({runtime}) on {data_spec} ({split}, n={len(ds)}, {how})"))
    res["runtime"], res["numerics"] = runtime, em.numerics
    out = {"onnx": res}
    if compare:
        out["torch"], kept = evaluate_like_export(em.meta, ds, batch_size, cache_dir)
        out["agreement"] = agreement(res, out["torch"], kept)
        a = out["agreement"]
        kept = "–" if a["same_kept_tokens"] is None else f"{100 * a['same_kept_tokens']:.1f} %"
        click.echo(
            f"torch {100 * a['torch_accuracy']:.2f} % | onnx {100 * a['onnx_accuracy']:.2f} % | "
            f"same answers {100 * a['same_answers']:.1f} % | same kept tokens {kept} (n={a['n']})"
        )
        from qavtp.metrics import margin_bin_label

        bins = [b for b in a["same_answers_by_torch_margin"] if b["n"]]
        if bins:
            click.echo(
                "same answers by torch's answer margin (nats): "
                + ", ".join(f"{margin_bin_label(b)}: {100 * b['same']:.0f} % of {b['n']}" for b in bins)
            )
    if output:
        atomic_write_json(Path(output) / "results.json", out)
        click.echo(f"wrote {Path(output) / 'results.json'}")


@main.command()
@click.argument("model", default=None, required=False)
@click.option("--artifact", type=click.Path(), default=None, help="A calibration artifact to evaluate.")
@click.option("--seq-len", type=click.IntRange(2, 131072), default=512, show_default=True)
@click.option(
    "--windows", type=click.IntRange(0, 1_000_000), default=32, show_default=True, help="seq-len windows (0: all)."
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the result as JSON here.")
@cache_option
def ppl(model, artifact, seq_len, windows, output, cache_dir):
    """Perplexity of the LLM inside MODEL (or an artifact) on an offline text corpus."""
    from qavtp.calibrate.artifact import load_model_or_artifact
    from qavtp.io import atomic_write_json, check_writable
    from qavtp.perplexity import perplexity

    if output:
        check_writable(Path(output).parent)
    net, processor, _ = load_model_or_artifact(model, artifact, "fp32", cache_dir)
    longest = int(getattr(net.config.get_text_config(), "max_position_embeddings", seq_len))
    if seq_len > longest:
        raise QavtpError(f"--seq-len {seq_len} is longer than the model's {longest} positions")
    res = perplexity(net, processor.tokenizer, seq_len=seq_len, max_chunks=windows or None)
    res["model"] = str(artifact or model or DEFAULT_MODEL)
    click.echo(f"perplexity {res['perplexity']:.3f} over {res['tokens']} tokens of {res['corpus']}")
    if output:
        atomic_write_json(output, res)


@main.command("export")
@click.argument("source", default=DEFAULT_MODEL)
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="Export directory.")
@click.option("--retain", type=float, default=1.0, show_default=True, help="Fraction of visual tokens kept, in (0, 1].")
@click.option(
    "--scorer",
    type=click.Choice(EXPORT_SCORERS),
    default="qavtp",
    show_default=True,
    help="In-graph token scorer (ignored at --retain 1); qavtp and qavtp-dpp need an artifact with fusion weights.",
)
@relevance_weight_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["qdq", "ort"]),
    default="qdq",
    show_default=True,
    help="INT4 weights as standard DequantizeLinear (qdq) or onnxruntime MatMulNBits (ort).",
)
@click.option(
    "--activations",
    type=click.Choice(ACTIVATION_MODES),
    default="exact",
    show_default=True,
    help="exact: the calibrated W4A4 activation quantizers in the graph (validation, 4-bit hardware); runtime: int4 "
    "weights as calibrated, activations left to the runtime's fastest kernel.",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=None,
    help="MatMulNBits accuracy level (4: int8 activations inside the kernel, faster, not bit-faithful); "
    "default 0 with --activations exact, 4 with runtime.",
)
@click.option(
    "--fused-ops/--unfused-ops",
    "fused",
    default=None,
    help="The decoder's attention and norms as fused ops: onnxruntime's (GroupQueryAttention, "
    "SkipSimplifiedLayerNormalization) with --format ort, opset 23's (Attention, RMSNormalization, RotaryEmbedding) "
    "with qdq; default on with --activations runtime, off with exact (torch's ops and KV cache one for one).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing export directory.")
@cache_option
def export_cmd(
    source, output, retain, scorer, relevance_weight, fmt, activations, accuracy_level, fused, overwrite, cache_dir
):
    """Export SOURCE (a calibration artifact, a LLaVA directory or smollava-easyvqa) to ONNX."""
    from qavtp.export.export_model import export_model

    with flags_named(EXPORT_FLAGS):
        config = ExportConfig(retain, scorer, fmt, accuracy_level, relevance_weight, activations, fused)
        out = export_model(source, output, config, overwrite=overwrite, cache_dir=cache_dir)
    click.echo(f"wrote {out}")


@main.command("run")
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.option("--image", type=click.Path(dir_okay=False), required=True)
@click.option("--question", required=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=16, show_default=True)
@click.option("--threads", type=click.IntRange(1, 4096), default=None, help="Intra-op threads (default: all cores).")
@runtime_option
def run_cmd(export_dir, image, question, max_new_tokens, threads, runtime):
    """Answer QUESTION about IMAGE with an exported model (onnxruntime or OpenVINO; torch is never imported)."""
    from qavtp.export.session import ExportedModel, load_image

    if not Path(export_dir).is_dir():
        raise QavtpError(f"export directory not found: {export_dir}")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise QavtpError("--question is not valid UTF-8 text") from None
    im = load_image(image)
    model = ExportedModel(export_dir, threads=threads, profile=runtime == "onnxruntime", runtime=runtime)
    gen = model.generate(im, question, max_new_tokens)
    t = gen.timings_ms
    click.echo(gen.text.strip())
    click.echo(f"visual tokens kept: {gen.kept}/{gen.n_visual}; {model.numerics}")
    rate = t["decode_steps"] / (t["decode_ms"] / 1000) if t["decode_steps"] else float("nan")
    prefill = f"prefill wall {t['prefill_wall_ms']:.1f} ms"
    if "llm_prefill_ms" in t:  # kernel times per stage come from onnxruntime's profiler
        prefill = (
            f"vision+scoring+prune {t['vision_scoring_prune_ms']:.1f} ms, LLM prefill {t['llm_prefill_ms']:.1f} ms "
            f"(kernel time; {prefill})"
        )
    click.echo(
        f"time ({runtime}): {prefill}, decode {t['decode_ms']:.1f} ms for {t['new_tokens']} new tokens "
        f"({t['decode_steps']} decode steps, {rate:.1f} tokens/s)"
    )


@main.command("train-reference")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False),
    default="runs/reference",
    show_default=True,
    help="Checkpoints and the training log; a rerun resumes from here.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Weights file (default WORK_DIR/smollava_vision_projector.safetensors; copy it to qavtp/assets/ to ship).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stage1-epochs", type=int, default=12, show_default=True)
@click.option("--stage2-steps", type=int, default=100, show_default=True, help="Single-question steps (batch 16).")
@click.option("--packed-steps", type=int, default=400, show_default=True, help="Multi-turn steps (4 images x 6 q).")
@precision_option()
def train_reference_cmd(work_dir, out, seed, stage1_epochs, stage2_steps, packed_steps, precision):
    """Train the reference model's vision tower and projector on easy-VQA (SmolLM2 frozen)."""
    from qavtp.models import reference
    from qavtp.train_reference import train_reference

    default = ReferenceTrainingConfig()
    with flags_named({"seed": "--seed", "stage1_epochs": "--stage1-epochs"}):
        config = ReferenceTrainingConfig(
            seed=seed,
            stage1_epochs=stage1_epochs,
            single=replace(default.single, steps=stage2_steps, precision=precision),
            packed=replace(default.packed, steps=packed_steps, precision=precision),
        )
    out_path = Path(out) if out else Path(work_dir) / reference.WEIGHTS.name
    path = train_reference(config, out=out_path, work=Path(work_dir))
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()

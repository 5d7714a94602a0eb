"""qavtp's exported graphs next to two peer toolchains on the reference model, on the same CPU threads.

    pip install ".[bench]"
    python bench/peers.py [--runs 5] [--threads 2] [--only qavtp,genai,openvino] [--out bench/results/peers.md]

optimum-intel 2.2 (the OpenVINO export) needs transformers < 5.6 and qavtp pins 5.24, so that one step runs in its
own environment, which sees everything else installed (default --optimum-python: runs/peers/optimum-env/bin/python):

    python -m venv --system-site-packages runs/peers/optimum-env && runs/peers/optimum-env/bin/pip install --no-deps \
        optimum-intel==2.2.0 optimum==2.3.0 transformers==5.5.4 tokenizers==0.22.2 huggingface_hub==1.33.0 \
        httpx==0.29.0 httpcore==1.0.9 typer==0.25.1

Peers, each built once under --work (default runs/peers/) and reused:

- genai: onnxruntime-genai's model builder on the reference model's LLM alone (a LlamaForCausalLM folder written
  from the LLaVA checkpoint: LLM, tied LM head, text config, tokenizer), int4 RTN (MatMulNBits at accuracy level 4,
  the builder's CPU default, and at level 1, float32 activations) and fp32, timed with its Generator API on token
  prompts as long as qavtp's LLM prompt pruned to 12.5 % and dense (the image tokens stand in as plain tokens: the
  builder exports no vision tower).
- openvino: optimum-intel's OpenVINO export of the whole LLaVA checkpoint (--weight-format int4 and fp32; the
  checkpoint first rewritten as ov_source says why), run by openvino_genai.VLMPipeline on examples/red-triangle.png
  with OpenVINO's CPU defaults and with f32 compute; time to first token and decode rate from its perf metrics.
- qavtp: ``qavtp export`` of the W4A4 artifact at retention 1 and 0.125 (scorer qavtp), --format ort and qdq,
  --activations exact and runtime, plus the fp32 checkpoint; timed with qavtp's own ExportedModel (as qavtp run),
  accuracy on --accuracy-limit easy-VQA test questions as qavtp eval-onnx computes it.

Prefill / TTFT: image (qavtp, openvino) + prompt -> first token, median and min of --runs after one warm-up, batch 1.
Decode: tokens/s over 15 greedy steps after the first token (16 new tokens, end-of-sequence ignored), median.
A peer that cannot run with the installed versions gets a row with its one-line reason instead of numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from _table import emit_table  # bench/ is the script's directory, so its siblings import

PEERS = ("qavtp", "genai", "openvino")
IMAGE = "examples/red-triangle.png"
QUESTION = "What is the red shape?"
NEW_TOKENS = 16
# Nothing may come from a hub: every peer reads local folders only.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit 2 (argparse's default prints the usage too)
        print(f"peers.py: error: {message}", file=sys.stderr)
        raise SystemExit(2)


@dataclass
class Row:
    peer: str
    variant: str
    prompt_tokens: int | None = None
    ttft_ms: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    size_mib: float | None = None
    accuracy: str = "–"
    note: str = ""
    failed: str | None = None  # the one-line reason a peer gave no numbers


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def one_line(e: BaseException | str) -> str:
    """The last non-empty line of an error (where a traceback or a tool's log puts the reason), shortened."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def mib(d: Path) -> float:
    """Model files only (graphs, weights), not tokenizers or configs."""
    exts = (".onnx", ".data", ".bin", ".xml")
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and f.name.endswith(exts)) / 2**20


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """A scratch folder beside ``out`` that becomes ``out`` when the block ends without error: a failed or
    interrupted build leaves no half-written ``out`` that a later run would take as built."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    tmp.rename(out)


def run_tool(what: str, cmd: list[str], log_file: Path) -> None:
    """Run a build step with its output in ``log_file``; a failure raises with the step's last output line."""
    log("$ " + " ".join(cmd))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE}).returncode
    if rc != 0:
        tail = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
        raise RuntimeError(f"{what} exited {rc}: {tail[-1] if tail else '?'} (log: {log_file})")


def timed(row: Row, runs: int, once: Callable[[], tuple[float, float]]) -> Row:
    """``once()`` -> (TTFT ms, decode tokens/s); one warm-up call, then ``runs`` measured ones."""
    once()
    for _ in range(runs):
        ms, rate = once()
        row.ttft_ms.append(ms)
        row.decode_tok_s.append(rate)
    return row


# ------------------------------------------------------------------------------ qavtp's prompt lengths


def qavtp_prompt_ids(model_dir: Path, retain: float) -> list[int]:
    """qavtp's LLM prompt for QUESTION as token ids, with the visual tokens pruned to ``retain`` of 64."""
    from qavtp.data.prompts import vqa_text
    from qavtp.export.session import PromptEncoder

    cfg = json.loads((model_dir / "config.json").read_text())
    n_visual = int(cfg["image_seq_length"])
    k = max(1, round(n_visual * retain))
    prefix, suffix = _chat_parts(model_dir)
    meta = {
        "prompt": {"prefix": prefix, "suffix": suffix, "add_special_tokens": True},
        "model": {"image_token": "<image>"},
        "pruning": {"n_visual": k},
    }
    return PromptEncoder(model_dir, meta).encode(vqa_text(QUESTION))


def _chat_parts(model_dir: Path) -> tuple[str, str]:
    """The chat template around a question with the image first, as qavtp export records it."""
    import jinja2

    tpl = jinja2.Template((model_dir / "chat_template.jinja").read_text())
    sentinel = "\0Q\0"
    content = [{"type": "image"}, {"type": "text", "text": sentinel}]
    text = tpl.render(messages=[{"role": "user", "content": content}], add_generation_prompt=True)
    prefix, suffix = text.split(sentinel)
    return prefix, suffix


# ------------------------------------------------------------------------------------------ genai


GENAI_VARIANTS = (  # (label, builder precision, extra options)
    ("int4 RTN, MatMulNBits accuracy level 4 (the CPU default)", "int4", ["accuracy_level=4"]),
    ("int4 RTN, MatMulNBits accuracy level 1 (fp32 activations)", "int4", ["accuracy_level=1"]),
    ("fp32", "fp32", []),
)


def write_llama_folder(model_dir: Path, out: Path) -> Path:
    """The LLaVA checkpoint's language model as a stock LlamaForCausalLM folder (once).

    The LM head is tied to the token embedding (tie_word_embeddings), so the embedding is also the head.
    """
    if (out / "model.safetensors").is_file():
        return out
    from safetensors import safe_open
    from safetensors.numpy import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    text = dict(cfg["text_config"], architectures=["LlamaForCausalLM"])
    # A null quantization_config makes the genai builder fail (it calls .get on it); the names are LLaVA's.
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        text.pop(key, None)
    prefix = "language_model."
    tensors = {}
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        for key in f.keys():
            if key.startswith(prefix):
                tensors[key[len(prefix) :]] = f.get_tensor(key)
    if "lm_head.weight" not in tensors and not text.get("tie_word_embeddings"):
        raise RuntimeError(f"{model_dir} has no LM head and does not tie it to the embedding")
    with building(out) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(text, indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, tmp / name)
        # The tokenizer config names the LLaVA processor; a bare LLM folder has none.
        tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
        tok_cfg.pop("processor_class", None)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    log(f"wrote {out} ({len(tensors)} tensors)")
    return out


def genai_build(llama: Path, out: Path, precision: str, extra: list[str]) -> Path:
    if (out / "genai_config.json").is_file():
        return out
    with building(out) as tmp:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(llama), "-o", str(tmp)]
        cmd += ["-p", precision, "-e", "cpu", "-c", str(out.parent / "builder-cache")]
        cmd += ["--extra_options", "hf_token=false", *extra]
        run_tool("the genai model builder", cmd, out.parent / f"{out.name}.log")
    return out


def genai_rows(args, model_dir: Path, work: Path) -> list[Row]:
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        return [Row("onnxruntime-genai", "all", failed=f"not installed ({one_line(e)}): pip install '.[bench]'")]
    llama = write_llama_folder(model_dir, work / "genai" / "llama")
    prompts = [qavtp_prompt_ids(model_dir, r) for r in (0.125, 1.0)]
    rows = []
    for label, precision, extra in GENAI_VARIANTS:
        name = f"{precision}-" + ("-".join(e.replace("=", "") for e in extra) or "default")
        try:
            d = genai_build(llama, work / "genai" / name, precision, extra)
            rows += genai_variant(og, d, f"{label}, LLM only", prompts, args)
        except Exception as e:  # the builder's RuntimeError, or onnxruntime-genai's own error types
            rows.append(Row("onnxruntime-genai", label, failed=one_line(e)))
    return rows


def genai_variant(og, d: Path, label: str, prompts: list[list[int]], args) -> list[Row]:
    log(f"genai {label}: loading {d}")
    config = og.Config(str(d))
    # The session's intra-op threads (genai_config.json: model.decoder.session_options.intra_op_num_threads).
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}))
    model = og.Model(config)
    rows = []
    for ids in prompts:
        row = Row("onnxruntime-genai", label, len(ids), size_mib=mib(d))
        row.note = "no vision tower: the prompt's image tokens are plain tokens"
        rows.append(timed(row, args.runs, lambda ids=ids: _genai_once(og, model, ids)))
        log(f"genai {label}, {len(ids)} prompt tokens: {_summary(row)}")
    return rows


def _genai_once(og, model, ids: list[int]) -> tuple[float, float]:
    params = og.GeneratorParams(model)
    # min_length = max_length: the end-of-sequence token does not stop the 16 new tokens.
    total = len(ids) + NEW_TOKENS
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)  # the prefill: the prompt's logits
    gen.generate_next_token()  # picks the first token from them
    t1 = time.perf_counter()
    steps = 0
    while not gen.is_done():
        gen.generate_next_token()  # one decode step each
        steps += 1
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, steps / (t2 - t1) if steps else float("nan")


def _summary(row: Row) -> str:
    if row.failed:
        return f"failed: {row.failed}"
    return (
        f"TTFT median {statistics.median(row.ttft_ms):.1f} ms (min {min(row.ttft_ms):.1f}), "
        f"decode {statistics.median(row.decode_tok_s):.1f} tokens/s"
    )


# --------------------------------------------------------------------------------------- openvino


OV_VARIANTS = (  # (label, --weight-format, VLMPipeline properties besides the threads)
    ("int4 (asym, groups of 32), CPU defaults", "int4", {}),
    ("int4 (asym, groups of 32), f32 compute", "int4", {"INFERENCE_PRECISION_HINT": "f32"}),
    ("fp32, CPU defaults (bf16 compute where the CPU has it)", "fp32", {}),
    ("fp32, f32 compute", "fp32", {"INFERENCE_PRECISION_HINT": "f32"}),
)
OPTIMUM_ENV_HINT = "optimum-intel 2.2 needs transformers<5.6: export in runs/peers/optimum-env (see bench/peers.py)"
# The reference model's hidden size, 576, is no multiple of optimum-intel's default int4 group of 128.
OV_GROUP_SIZE = "32"
_OV_KEYS = (  # the LLaVA layout of transformers >= 4.52, which every transformers 5 release reads
    ("vision_tower.", "model.vision_tower.vision_model."),
    ("language_model.model.", "model.language_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.lm_head.", "lm_head."),
)


def ov_source(model_dir: Path, out: Path) -> Path:
    """The checkpoint as optimum-intel can export it (once).

    Three fixes, each found on this checkpoint: (1) a null text_config.quantization_config makes OpenVINO's
    PyTorch frontend fail ("argument of type 'NoneType' is not iterable"); (2) the tower's tensors are stored as
    ``vision_tower.encoder.*``, which transformers 5.5 (the newest optimum-intel 2.2 accepts) does not map, so
    it would export a randomly initialised tower; (3) OpenVINO GenAI reads the image processor from
    preprocessor_config.json only (the folder has transformers 5's processor_config.json), else it feeds the
    tower 336-pixel crops.
    """
    if (out / "model.safetensors").is_file():
        return out
    from safetensors import safe_open
    from safetensors.numpy import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("text_config", {}).get("quantization_config", ...) is None:
        del cfg["text_config"]["quantization_config"]
    tensors = {}
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        for key in f.keys():
            new = next((n + key[len(o) :] for o, n in _OV_KEYS if key.startswith(o)), key)
            tensors[new] = f.get_tensor(key)
    with building(out) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            shutil.copy(model_dir / name, tmp / name)
        processor = json.loads((model_dir / "processor_config.json").read_text())
        (tmp / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(_preprocessor(processor), indent=2) + "\n")
    log(f"wrote {out}")
    return out


def _preprocessor(processor: dict) -> dict:
    image = dict(processor.get("image_processor", {}))
    image.setdefault("processor_class", processor.get("processor_class", "LlavaProcessor"))
    image.setdefault("patch_size", processor.get("patch_size"))
    return image


def ov_export(python: str, source: Path, work: Path, weight_format: str) -> Path:
    out = work / weight_format
    if (out / "openvino_language_model.xml").is_file():
        return out
    with building(out) as tmp:
        cmd = [python, "-m", "optimum.commands.optimum_cli", "export", "openvino", "--model", str(source)]
        cmd += ["--task", "image-text-to-text", "--weight-format", weight_format]
        cmd += ["--group-size", OV_GROUP_SIZE] if weight_format == "int4" else []
        run_tool("optimum-cli export openvino", [*cmd, str(tmp)], out.parent / f"{out.name}.log")
        if not (tmp / "openvino_language_model.xml").is_file():
            log_file = out.parent / f"{out.name}.log"
            raise RuntimeError(f"optimum-cli export openvino wrote no language model (log: {log_file})")
        shutil.copy(source / "preprocessor_config.json", tmp / "preprocessor_config.json")  # fix (3) of ov_source
    return out


def openvino_rows(args, model_dir: Path, work: Path) -> list[Row]:
    try:
        import numpy as np
        import openvino as ov
        import openvino_genai
    except ImportError as e:
        return [Row("OpenVINO GenAI", "all", failed=f"not installed ({one_line(e)}): pip install '.[bench]'")]
    from qavtp.export.session import load_image

    source = ov_source(model_dir, work / "openvino" / "source")
    image = ov.Tensor(np.asarray(load_image(IMAGE).convert("RGB"))[None])  # NHWC uint8, as the pipeline takes
    rows: list[Row] = []
    built: dict[str, Path | str] = {}  # weight format -> its export, or why the export failed (tried once)
    for label, weight_format, props in OV_VARIANTS:
        row = Row("OpenVINO GenAI VLMPipeline", label)
        rows.append(row)
        if weight_format not in built:
            try:
                built[weight_format] = ov_export(args.optimum_python, source, work / "openvino", weight_format)
            except RuntimeError as e:
                hint = "" if args.optimum_python != sys.executable else f" [{OPTIMUM_ENV_HINT}]"
                built[weight_format] = one_line(e) + hint
        d = built[weight_format]
        if isinstance(d, str):
            row.failed = d
            continue
        try:
            ov_measure(openvino_genai, d, row, props, image, args)
        except Exception as e:  # what OpenVINO raises, of its own types
            row.failed = one_line(e)
    return rows


def ov_measure(openvino_genai, d: Path, row: Row, props: dict, image, args) -> None:
    from qavtp.data.prompts import vqa_text

    row.size_mib = mib(d)
    log(f"openvino {row.variant}: loading {d}")
    # The pipeline's default scheduler caches prompt prefixes across calls: every measured run would reuse the
    # warm-up's KV cache (TTFT fell from 130 to 50 ms over 4 identical calls). Off, each run computes its prefill.
    scheduler = openvino_genai.SchedulerConfig()
    scheduler.enable_prefix_caching = False
    pipe = openvino_genai.VLMPipeline(
        str(d), "CPU", INFERENCE_NUM_THREADS=args.threads, scheduler_config=scheduler, **props
    )
    prompt = vqa_text(QUESTION)  # the pipeline applies the chat template and places the image, as qavtp's prompt
    row.note = f"answer {pipe.generate(prompt, images=[image], max_new_tokens=NEW_TOKENS).texts[0].strip()!r}"
    config = openvino_genai.GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    config.ignore_eos = True

    def once() -> tuple[float, float]:
        m = pipe.generate(prompt, images=[image], generation_config=config).perf_metrics
        row.prompt_tokens = m.get_num_input_tokens()
        # TPOT: the mean time per new token after the first, i.e. one decode step.
        return m.get_ttft().mean, 1000 / m.get_tpot().mean

    timed(row, args.runs, once)
    log(f"openvino {row.variant}, {row.prompt_tokens} prompt tokens: {_summary(row)}")


# ------------------------------------------------------------------------------------------ qavtp


def qavtp_variants() -> list[tuple[str, str, list[str]]]:
    """(label, directory name, ``qavtp export`` arguments after the source)."""
    out = [("fp32, dense (qdq)", "fp32-r1-qdq", ["--retain", "1", "--format", "qdq"])]
    fused = ["--retain", "1", "--format", "ort", "--activations", "runtime"]  # fp32 with GroupQueryAttention
    out.append(("fp32, dense, ort fused ops", "fp32-r1-ort", fused))
    for retain in ("1", "0.125"):
        for fmt in ("ort", "qdq"):
            for act in ("exact", "runtime"):
                label = f"W4A4 {fmt}, {act} activations, " + ("dense" if retain == "1" else f"retain {retain} (qavtp)")
                flags = ["--retain", retain, "--scorer", "qavtp", "--format", fmt, "--activations", act]
                out.append((label, f"w4a4-r{retain}-{fmt}-{act}", flags))
    # what the fused decoder ops buy: the same runtime graph in plain ops
    plain = ["--retain", "0.125", "--scorer", "qavtp", "--format", "ort", "--activations", "runtime", "--unfused-ops"]
    out.append(
        ("W4A4 ort, runtime activations, unfused ops, retain 0.125 (qavtp)", "w4a4-r0.125-ort-runtime-unfused", plain)
    )
    return out


def qavtp_export(source: str, out: Path, flags: list[str]) -> Path:
    """``qavtp export`` once; again only when the source changed since (its fingerprint in export.json)."""
    from qavtp.calibrate.artifact import fingerprint

    meta = out / "export.json"
    if meta.is_file():
        recorded = json.loads(meta.read_text()).get("source", {}).get("fingerprint")
        if recorded == fingerprint(_source_dir(source)):
            return out
        log(f"{out}: {source} changed since it was exported; exporting again")
    exe = shutil.which("qavtp") or "qavtp"
    log_file = out.with_name(out.name + ".log")  # not with_suffix: "r0.125" has a dot
    run_tool("qavtp export", [exe, "export", source, "-o", str(out), *flags, "--overwrite"], log_file)
    return out


def _source_dir(source: str) -> Path:
    from qavtp.models.reference import NAME, cache_root

    return cache_root() / NAME if source == NAME else Path(source)


def qavtp_rows(args, work: Path) -> list[Row]:
    from qavtp.export.session import load_image
    from qavtp.models.reference import NAME

    image = load_image(IMAGE)
    have_artifact = (Path(args.artifact) / "config.json").is_file()
    rows = []
    for label, name, flags in qavtp_variants():
        row = Row("qavtp", label)
        rows.append(row)
        source = NAME if name.startswith("fp32") else args.artifact
        if source != NAME and not have_artifact:
            row.failed = f"no W4A4 artifact at {args.artifact} (qavtp calibrate writes it)"
            continue
        try:
            d = qavtp_export(source, work / "qavtp" / name, flags)
        except RuntimeError as e:
            row.failed = one_line(e)
            continue
        try:
            qavtp_measure(d, row, image, args)
        except Exception as e:  # QavtpError, or onnxruntime's own error types
            row.failed = one_line(e)
    return rows


def qavtp_measure(d: Path, row: Row, image, args) -> None:
    from qavtp.export.session import ExportedModel

    row.size_mib = mib(d)
    # One profiled generation (as qavtp run): the answer and the kernel time of each prefill stage.
    gen = ExportedModel(d, threads=args.threads, profile=True).generate(image, QUESTION, NEW_TOKENS)
    t = gen.timings_ms
    row.note = (
        f"answer {gen.text.strip()!r}; kernel time: vision+scoring+prune {t['vision_scoring_prune_ms']:.0f} ms, "
        f"LLM prefill {t['llm_prefill_ms']:.0f} ms"
    )
    m = ExportedModel(d, threads=args.threads)
    feeds = m.inputs([image], [QUESTION], NEW_TOKENS)
    meta = m.meta["pruning"]
    row.prompt_tokens = int(feeds["input_ids"].shape[1]) - meta["n_visual"] + meta["k"]
    timed(row, args.runs, lambda: _qavtp_once(m, feeds))
    log(f"qavtp {row.variant}, {row.prompt_tokens} prompt tokens: {_summary(row)}")
    if args.accuracy_limit:
        row.accuracy = qavtp_accuracy(d, args.threads, args.accuracy_limit)


def _qavtp_once(m, feeds: dict) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = m.run_prefill(feeds)  # image + prompt -> the first token's logits
    t1 = time.perf_counter()
    _, steps = m.greedy(out, NEW_TOKENS)  # no stop tokens: all 15 decode steps run
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, steps / (t2 - t1) if steps else float("nan")


def qavtp_accuracy(d: Path, threads: int, limit: int) -> str:
    """qavtp eval-onnx's accuracy on ``limit`` seeded easy-VQA test questions, cached beside the export."""
    cache = d.with_name(f"{d.name}.accuracy-{limit}.json")
    digests = json.loads((d / "export.json").read_text()).get("digests")
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("digests") == digests:
            return f"{100 * saved['accuracy']:.1f} %"
    from qavtp.data import load_data
    from qavtp.export.accuracy import evaluate_export
    from qavtp.export.session import ExportedModel

    log(f"accuracy of {d} on {limit} easy-VQA test questions")
    res = evaluate_export(ExportedModel(d, threads=threads), load_data("easy-vqa", "test", limit, 0), progress=False)
    cache.write_text(json.dumps({"accuracy": res["accuracy"], "n": res["n"], "digests": digests}) + "\n")
    return f"{100 * res['accuracy']:.1f} %"


# ------------------------------------------------------------------------------------------ table


def busy_cores(seconds: float = 2.0) -> float:
    """Cores other processes keep busy now, sampled over ``seconds`` (the load average lags a job that just ended
    by minutes, which made an idle machine look loaded)."""
    import psutil

    return psutil.cpu_percent(interval=seconds) / 100 * (os.cpu_count() or 1)


def table(rows: list[Row], args, load: float) -> list[str]:
    lines = [
        f"Peers on the reference model (smollava-easyvqa), {args.threads} threads, batch 1, median of {args.runs} "
        f"run(s) after one warm-up, {NEW_TOKENS} new tokens; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{load:.1f} cores busy with other work at the start (of {os.cpu_count()}).",
        "",
        "| peer / variant | prompt tokens | TTFT ms median | TTFT ms min | decode tokens/s | size MiB | "
        f"{f'accuracy (n={args.accuracy_limit})' if args.accuracy_limit else 'accuracy (not measured)'} | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    # A table from too few runs or a busy machine says so at its top: its numbers are not for comparison.
    if args.runs < 5 or load >= 0.2:
        lines[:0] = [f"**Smoke run** (--runs {args.runs}, {load:.1f} cores busy): not final numbers.", ""]
    for r in rows:
        if r.failed:
            lines.append(f"| {r.peer}: {r.variant} | – | – | – | – | – | – | {r.failed.replace('|', '/')} |")
            continue
        size = f"{r.size_mib:.0f}" if r.size_mib is not None else "–"
        lines.append(
            f"| {r.peer}: {r.variant} | {r.prompt_tokens} | {statistics.median(r.ttft_ms):.1f} | {min(r.ttft_ms):.1f} "
            f"| {statistics.median(r.decode_tok_s):.1f} | {size} | {r.accuracy} | {r.note} |"
        )
    lines += ["", *NOTES]
    return lines


NOTES = [
    "- TTFT: qavtp and OpenVINO from the image (vision tower, projector, qavtp's in-graph scoring and pruning) to",
    "  the first token; onnxruntime-genai runs the LLM alone (its model builder exports no vision tower) on a token",
    "  prompt as long as qavtp's LLM prompt, pruned (35) and dense (91). qavtp's notes split its prefill into",
    "  kernel time per stage (one profiled run). Clocks: qavtp's starts after image preprocessing and tokenization",
    "  (as qavtp run's prefill wall), genai's at append_tokens (token ids given), OpenVINO's TTFT is its whole",
    "  generate call up to the first token (its preprocessing and tokenization included; prefix caching off).",
    "- Decode: one greedy step per new token after the first, end-of-sequence ignored; OpenVINO's is 1000 / TPOT",
    "  from its perf metrics.",
    "- OpenVINO int4: optimum-intel's int4_asym weights with --group-size 32 (its default group, 128, does not",
    "  divide the hidden size 576); nncf keeps the LM head, the token embedding, the vision tower and the",
    "  projector in int8.",
    "- Size: graph and weight files only (.onnx, .data, .bin, .xml), tokenizers and configs not counted.",
    "- Accuracy: qavtp eval-onnx's log-likelihood choice on the seeded easy-VQA test subset. '–' for the peers:",
    "  onnxruntime-genai's graph has no vision tower, and OpenVINO GenAI's VLMPipeline returns generated text,",
    "  not the candidates' log-likelihoods that this accuracy scores.",
]


# ------------------------------------------------------------------------------------------- main


def _default_optimum_python(work: str) -> str:
    # optimum-intel 2.2 needs transformers < 5.6 and qavtp pins 5.24: its export runs in its own environment.
    env = Path(work) / "optimum-env" / "bin" / "python"
    return str(env) if env.is_file() else sys.executable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="measured runs per row after one warm-up (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime (default 2)")
    ap.add_argument("--only", default=",".join(PEERS), help=f"comma list of peers to run (default {','.join(PEERS)})")
    ap.add_argument("--out", default="bench/results/peers.md", help="also write the table here")
    ap.add_argument("--work", default="runs/peers", help="where each peer's artifacts are built once and reused")
    ap.add_argument("--model", default=None, help="the reference LLaVA folder (default: qavtp's cache)")
    ap.add_argument("--artifact", default="runs/main/w4a4", help="qavtp's W4A4 calibration artifact")
    ap.add_argument("--accuracy-limit", type=int, default=200, help="easy-VQA test questions for accuracy (0: none)")
    ap.add_argument(
        "--optimum-python",
        default=None,
        help="python that runs optimum-cli export openvino (default WORK/optimum-env/bin/python if there, else this)",
    )
    args = ap.parse_args(argv)
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in only if p not in PEERS]
    if bad or not only:
        ap.error(f"--only takes a comma list of {', '.join(PEERS)}; got {args.only!r}")
    args.only = only
    if args.runs < 1 or args.threads < 1 or args.accuracy_limit < 0:
        ap.error("--runs and --threads must be at least 1, --accuracy-limit at least 0")
    args.optimum_python = args.optimum_python or _default_optimum_python(args.work)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from qavtp.models.reference import NAME, cache_root

    model_dir = Path(args.model) if args.model else cache_root() / NAME
    if not (model_dir / "config.json").is_file():
        print(f"peers.py: error: no reference model at {model_dir} (qavtp assemble writes it)", file=sys.stderr)
        raise SystemExit(2)
    work = Path(args.work)
    load = busy_cores()  # before this script adds its own
    rows: list[Row] = []
    for peer in args.only:
        log(f"peer {peer}")
        if peer == "qavtp":
            rows += qavtp_rows(args, work)
        elif peer == "genai":
            rows += genai_rows(args, model_dir, work)
        else:
            rows += openvino_rows(args, model_dir, work)
    emit_table(table(rows, args, load), args.out)


if __name__ == "__main__":
    main()

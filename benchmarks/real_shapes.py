"""Real-shape runs on CPU: the published 7B-8B architectures at every real width, cut in depth,
on 2 ZeRO-3 ranks; per-rank memory by category, step time and tokens per sample, against
`dsunlearn plan`'s model.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/real_shapes.py [--models qwen2-vl-7b ...]

writes benchmarks/results/real_shapes_cpu.json and prints a table.

What is real and what is not:
- Architectures: `dsunlearn.models.published` (every width, head and KV-head count, vocabulary,
  RoPE setting, vision tower, projector) cut to `--text-layers` decoder and `--vision-layers`
  vision layers (default 1 and 2: two ranks of the largest must fit this machine's 24 GiB
  with the saliency pass); random initialisation, bf16 (configs/deepspeed/zero3_bf16.json, as
  the experiment configs run, with a 5e7-element reduce bucket instead of 5e8).
- Image processors: each model's published preprocessing (LLaVA-1.5: 336 px, 576 tokens;
  LLaVA-NeXT: anyres grid; Qwen2-VL: dynamic resolution, 14 px patches merged 2 x 2; Idefics3:
  364 px tiles of a picture resized to 4 x 364 on its longest edge), on the built-in benchmark's
  pictures scaled to 448 x 448.
- Tokenizer: the real ones cannot be downloaded here, so a byte-level BPE tokenizer is TRAINED
  with `tokenizers` on the built-in benchmark's text, asked for the real vocabulary size (it
  stops where the corpus has no more merges: `tokenizer_size` in the JSON). The embedding and
  `lm_head` keep the published vocabulary (full size); text is shorter than a real tokenizer's
  would not be by much on these short questions, and image tokens are exact.
- What trains: the input embeddings are frozen everywhere (their gradient is a few rows). Both
  ranks share this machine's 24 GiB, so for Qwen2-VL and Idefics3 (vocabularies 152k and 128k)
  the output head is frozen too (`frozen` in the JSON): it is still gathered and every loss
  still runs over the full vocabulary through the chunked ops; only its gradient and Adam state
  are skipped. Optimizer offload does not help here: on a CPU machine "host" is the same RAM.

Per rank and model, in one 2-rank launch:
- model states, exactly (bench_zero3_memory.count_zero3_bytes): parameter partitions,
  gradient partition buffer, fp32 master + Adam moments; the reference engine's partitions;
- activations: RssAnon retained after the towers' forward (`final_hidden_states`, the graph
  alive) minus before, with and without activation checkpointing, and the peak of that forward
  plus its backward (sampled every 5 ms);
- logits buffers: the peak of the chunked CE op (forward + backward on the step's answer-token
  hidden states, the head gathered) above its inputs and its two outputs (the gradients of h and
  of the weight), against the eager path's, at the same shapes;
- saliency and mask: MMUnlearner's accumulators (measured peak of the saliency pass) and the
  masks' exact bytes;
- step time: one iteration of each method after a warm-up (GA, GradDiff, NPO, KL_Min with the
  reference engine, SIU through the chunked fused loss, MMUnlearner's masked step after its
  saliency pass), and one evaluation batch (multiple-choice option scoring);
- tokens per sample (and image tokens per picture).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results" / "real_shapes_cpu.json"
MIB = 2**20
METHODS = ("ga", "graddiff", "npo", "kl_min", "siu", "mmunlearner")
MODELS = ("llava-1.5-7b", "llava-next-7b", "qwen2-vl-7b", "idefics3-8b")
FROZEN_HEAD = ("qwen2-vl-7b", "idefics3-8b")  # see the docstring: 24 GiB for both ranks
PICTURE = 448
REDUCE_BUCKET = 50_000_000
PARTS = ("main", "kl", "siu", "mmu")


def part_of(method: str) -> str:
    return {"kl_min": "kl", "siu": "siu", "mmunlearner": "mmu"}.get(method, "main")


# --------------------------------------------------------------------------- the processors


def real_processor(name: str, vocab: int) -> Any:
    """The published image preprocessing of `name` with a BPE tokenizer trained here."""
    from transformers import Idefics3Processor, LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from dsunlearn.models import published as pub
    from dsunlearn.models import tiny

    if name == "llava-1.5-7b":
        tok = tiny.build_tiny_bpe_tokenizer((tiny.IMAGE,), vocab_size=vocab)
        ip = CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        )
        return LlavaProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tiny.LLAVA_CHAT_TEMPLATE,
            image_token=tiny.IMAGE,
        )
    if name == "llava-next-7b":
        tok = tiny.build_tiny_bpe_tokenizer(tiny.LLAVA_NEXT_SPECIALS, vocab_size=vocab)
        ip = LlavaNextImageProcessorPil(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=pub.LLAVA_NEXT_PINPOINTS,
        )
        return LlavaNextProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tiny.LLAVA_NEXT_CHAT_TEMPLATE,
            image_token=tiny.IMAGE,
        )
    if name == "qwen2-vl-7b":
        tok = tiny.build_tiny_bpe_tokenizer(tiny.QWEN_SPECIALS, vocab_size=vocab)
        ip = Qwen2VLImageProcessorPil(  # preprocessor_config.json of Qwen2-VL-7B-Instruct
            min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14, temporal_patch_size=2,
            merge_size=2,
        )  # fmt: skip
        return tiny.TinyQwen2VLProcessor(ip, tok, chat_template=tiny.QWEN_CHAT_TEMPLATE)
    if name == "idefics3-8b":
        tok = tiny.build_tiny_bpe_tokenizer(tiny.IDEFICS3_SPECIALS, vocab_size=vocab)
        ip = Idefics3ImageProcessorPil(
            size={"longest_edge": 4 * 364},
            max_image_size={"longest_edge": 364},
            do_image_splitting=True,
        )
        return Idefics3Processor(
            ip, tok, image_seq_len=169, chat_template=tiny.IDEFICS3_CHAT_TEMPLATE
        )
    raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def real_config(name: str, processor: Any, text_layers: int, vision_layers: int) -> Any:
    """The published config at the cut depth, with the token ids of the tokenizer trained here
    (the vocabulary size stays the published one)."""
    from dsunlearn.models import tiny
    from dsunlearn.models.published import cut_depth

    cfg = cut_depth(name, text_layers, vision_layers)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    text = cfg.text_config
    text.pad_token_id, text.bos_token_id, text.eos_token_id = (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
    )  # fmt: skip
    if name.startswith("llava"):
        cfg.image_token_index = ids[tiny.IMAGE]
        cfg.image_token_id = ids[tiny.IMAGE]
    elif name == "qwen2-vl-7b":
        cfg.image_token_id = ids["<|image_pad|>"]
        cfg.video_token_id = ids["<|video_pad|>"]
        cfg.vision_start_token_id = ids["<|vision_start|>"]
        cfg.vision_end_token_id = ids["<|vision_end|>"]
    else:
        cfg.image_token_id = ids[tiny.IMAGE]
    cfg.pad_token_id = tok.pad_token_id
    return cfg


# --------------------------------------------------------------------------- one rank


class Peak:
    """RssAnon above a baseline: `retained()` now, `peak()` since `start()` (sampled)."""

    def __init__(self) -> None:
        from benchmarks.bench_saliency import CpuProbe, release_free_heap

        self._probe_cls, self._release = CpuProbe, release_free_heap

    def start(self) -> None:
        gc.collect()
        self._release()
        self.probe = self._probe_cls()
        self.probe.reset()
        self.base = self.probe.current()

    def retained(self) -> int:
        return self.probe.current() - self.base

    def peak(self) -> int:
        """The larger of the sampled RssAnon peak and VmHWM's exact peak of total RSS (reset
        at `start`): a short op can peak between two samples."""
        sampled = self.probe.peak() - self.base
        hwm = self.probe.details().get("vm_hwm_minus_rss_before_mib")
        return max(sampled, int(hwm * MIB)) if hwm is not None else sampled


def saved_activation_bytes(model: torch.nn.Module, forward: Any) -> tuple[int, Any]:
    """Bytes of the tensors autograd keeps for the backward of `forward()` (unique storages,
    the parameters excluded), and its output. Under non-reentrant checkpointing the tensors
    saved inside a checkpointed layer go to the checkpoint's own hooks (they are not kept);
    what it keeps instead are the layer's inputs, counted here through a pre-hook."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    params = list(model.parameters())
    seen: set[int] = set()
    total = [0]

    def count(t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key and key not in seen and key not in {p.data_ptr() for p in params}:
            seen.add(key)
            total[0] += st.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        count(t)
        return t

    def inputs(_m: Any, args: tuple, kwargs: dict) -> None:
        for a in (*args, *kwargs.values()):
            if torch.is_tensor(a):
                count(a)

    layers = [
        m for m in model.modules()
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
    ]  # fmt: skip
    hooks = [m.register_forward_pre_hook(inputs, with_kwargs=True) for m in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
    finally:
        for h in hooks:
            h.remove()
    return total[0], out


def _upscale(bench: Any) -> None:
    """Every picture of the benchmark at PICTURE x PICTURE, as a real input would be."""
    for recs in (bench.forget, bench.retain, bench.test, getattr(bench, "test_forget", [])):
        for r in recs:
            r.images = [im.convert("RGB").resize((PICTURE, PICTURE)) for im in r.images]


def probe_inputs_and_buffers(
    engine: Any, processor: Any, bench: Any, config: Any, info: Any, logit_rows: int
) -> dict[str, Any]:
    """Tokens per sample, the towers' activations with and without checkpointing, and the
    logits buffers of the chunked CE op against eager (the main part's probes)."""
    from dsunlearn.data.examples import vqa_train_examples
    from dsunlearn.engine.batches import balanced_batches
    from dsunlearn.engine.engine import optimizer_step
    from dsunlearn.models.encode import final_hidden_states
    from dsunlearn.models.loader import enable_activation_checkpointing
    from dsunlearn.recipes.common import encode_batch

    rec: dict[str, Any] = {}
    # Tokens per sample: one forget VQA example and its picture.
    ex = vqa_train_examples(bench.forget)[:1]
    batch = encode_batch(processor, ex, info.device)
    img_id = getattr(config, "image_token_id", None) or config.image_token_index
    rec["tokens_per_sample"] = int(batch["input_ids"].shape[1])
    rec["image_tokens_per_picture"] = int((batch["input_ids"] == img_id).sum())
    rec["answer_tokens"] = int((batch["labels"] != -100).sum())

    # Activations of the towers, with and without checkpointing (the same engine: the flags).
    f_stream = balanced_batches(vqa_train_examples(bench.forget), 2, info.rank, 2, 0)
    probe_batch = encode_batch(processor, next(f_stream), info.device)
    acts: dict[str, dict[str, float]] = {}
    for ckpt in (False, True):
        if ckpt:
            enable_activation_checkpointing(engine.module)
        p = Peak()
        p.start()
        saved, h = saved_activation_bytes(
            engine.module, lambda: final_hidden_states(engine, probe_batch)
        )
        retained = p.retained()
        optimizer_step(engine, h.float().pow(2).mean(), "activation probe")
        peak = p.peak()
        acts["checkpointed" if ckpt else "plain"] = {
            "saved_for_backward_mib": saved / MIB,
            "rss_retained_after_forward_mib": retained / MIB,
            "rss_peak_forward_backward_mib": peak / MIB,
        }
        del h
        if ckpt:
            engine.module.activation_checkpointing_disable()
    rec["activations"] = acts

    # Logits buffers: the chunked CE op vs eager, rank 0 only (the other waits: two copies at
    # once do not fit), on a head of the model's shape and dtype (values do not matter here).
    if info.rank == 0:
        rec["logits_buffers"] = logits_probe(
            engine, probe_batch, len(processor.tokenizer), logit_rows
        )
    torch.distributed.barrier()
    return rec


def logits_probe(engine: Any, batch: dict[str, Any], n_labels: int, logit_rows: int) -> dict:
    """Transient memory and time of one forward + backward of the CE op over every position of
    `batch` (what the eager path used to turn into logits), chunked torch path vs eager: the
    peak above the inputs minus the two outputs (the gradients of h and of the weight)."""
    from dsunlearn.models import lm_head
    from kernels.linear_logprob import linear_logprob

    shape = lm_head.output_head(engine).weight.ds_shape
    n_rows = batch["input_ids"].numel() if logit_rows == 0 else logit_rows
    w = (torch.randn(*shape, dtype=torch.bfloat16) * shape[1] ** -0.5).requires_grad_(True)
    logits: dict[str, float] = {"rows": n_rows}
    for backend in ("torch", "eager"):
        hh = torch.randn(n_rows, shape[1], dtype=w.dtype, requires_grad=True)
        labels = torch.randint(0, n_labels, (n_rows,))
        wts = torch.full((n_rows,), -1.0 / n_rows)
        p = Peak()
        p.start()
        tick = time.time()
        linear_logprob(hh, w, labels, weights=wts, backend=backend).backward()
        dt = time.time() - tick
        outputs = w.grad.numel() * w.grad.element_size() + hh.grad.numel() * hh.grad.element_size()
        logits[f"{backend}_transient_mib"] = (p.peak() - outputs) / MIB
        logits[f"{backend}_s"] = dt
        w.grad = None
        del hh
    return logits


def rank_main(args: argparse.Namespace) -> None:
    from benchmarks.bench_saliency import release_free_heap
    from benchmarks.bench_zero3_memory import count_zero3_bytes, tensor_bytes
    from dsunlearn.config import DataConfig, MaskConfig, MethodConfig, ModelConfig, OptimConfig
    from dsunlearn.data.examples import vqa_train_examples
    from dsunlearn.engine.batches import balanced_batches
    from dsunlearn.engine.dist import exit_process, init_distributed
    from dsunlearn.engine.engine import build_reference_engine, build_train_engine
    from dsunlearn.engine.preempt import PreemptionFlag
    from dsunlearn.eval.scoring import option_scores
    from dsunlearn.methods.base import RunContext, build_method
    from dsunlearn.models.loader import (
        _activate_ds_config,
    )
    from dsunlearn.recipes.common import deepspeed_config, prepare_benchmark
    from dsunlearn.recipes.unlearn import train_iteration

    info = init_distributed()
    name = args.model
    rec: dict[str, Any] = {"model": name, "rank": info.rank, "world_size": info.world_size}
    t0 = time.time()
    bench = prepare_benchmark(DataConfig(path=args.bench), info)
    _upscale(bench)
    from dsunlearn.models.published import published_config

    vocab = published_config(name, 1, 2).text_config.vocab_size
    processor = real_processor(name, vocab)
    config = real_config(name, processor, args.text_layers, args.vision_layers)
    rec["tokenizer_size"] = len(processor.tokenizer)
    rec["vocab_size"] = vocab

    optim = OptimConfig(lr=1e-5, batch_size=2)
    model_cfg = ModelConfig(name=name, dtype="bf16")
    ds = deepspeed_config("configs/deepspeed/zero3_bf16.json", optim, model_cfg, info)
    # The one change to the shipped config: a 10x smaller reduce bucket (DeepSpeed allocates
    # it whole on every rank: 1 GiB each at the default), for two ranks in 24 GiB.
    ds["zero_optimization"]["reduce_bucket_size"] = REDUCE_BUCKET
    rec["reduce_bucket_size"] = REDUCE_BUCKET

    def build() -> Any:
        from transformers import AutoModelForImageTextToText

        _activate_ds_config(ds)
        return AutoModelForImageTextToText.from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )

    model = build()
    frozen = ["embeddings"] + (["lm_head"] if name in FROZEN_HEAD else [])
    model.get_input_embeddings().requires_grad_(False)
    if "lm_head" in frozen:
        model.get_output_embeddings().requires_grad_(False)
    rec["frozen"] = frozen
    rec["params"] = sum(int(p.ds_numel) for p in model.parameters())
    rec["trainable"] = sum(int(p.ds_numel) for p in model.parameters() if p.requires_grad)
    engine = build_train_engine(model, optim, ds)
    engine.train()
    main_part = args.part == "main"
    if main_part:  # before the reference engine exists: the probes' peaks need the room
        rec.update(
            probe_inputs_and_buffers(engine, processor, bench, config, info, args.logit_rows)
        )
    ref = build_reference_engine(build(), ds) if args.part != "mmu" else None
    rec["build_s"] = round(time.time() - t0, 1)
    if ref is not None:
        rec["reference_bytes"] = tensor_bytes([p.ds_tensor for p in ref.module.parameters()])

    # One warm-up GA iteration, then one timed iteration of each method.
    run = SimpleNamespace(info=info, processor=processor, ref=ref, preempt=PreemptionFlag())
    r_stream = balanced_batches(vqa_train_examples(bench.retain), 2, info.rank, 2, 1)
    steps: dict[str, Any] = {}
    mcfg = MethodConfig(
        siu_batch_size=2,
        mmu_max_units=1,
        mmu_unit_batch=2,
        mmu_micro_batches=2,
        mmu_retain_per_forget=1,
        mmu_mask=MaskConfig(mode="topk", topk_pct=10.0, modules="language"),
    )
    ctx = RunContext(bench, processor, info, Path(args.work))
    todo = [m for m in args.methods if part_of(m) == args.part]
    for k, mname in enumerate(("ga", *todo)):
        if info.rank == 0:  # progress, with this rank's memory, for a run that dies midway
            rss = Path("/proc/self/statm").read_text().split()[1]
            print(f"real_shapes {name} {mname} +{time.time() - t0:.0f} s, rss pages {rss}")
        method = build_method(mname, mcfg)
        method.optim(optim)
        extra: dict[str, Any] = {}
        if mname == "mmunlearner":
            p = Peak()
            p.start()
            tick = time.time()
            method.attach(engine, ctx)
            extra["saliency_s"] = time.time() - tick
            extra["saliency_peak_mib"] = p.peak() / MIB
            extra["mask_bytes"] = sum(m.numel() * m.element_size() for m in method.masks.values())
        forget = method.forget_examples(bench, processor)
        stream = balanced_batches(forget, 2, info.rank, 2, 2)
        retains = [next(r_stream)] if method.uses_retain else []
        p = Peak()
        p.start()
        tick = time.time()
        train_iteration(method, run, engine, k + 1, next(stream), retains)
        dt = time.time() - tick
        if k == 0:
            continue  # the warm-up
        steps[mname] = {"iteration_s": dt, "peak_above_states_mib": p.peak() / MIB, **extra}
    rec["steps"] = steps
    rec["model_states"] = count_zero3_bytes(engine)
    out = Path(args.out).with_suffix(f".rank{info.rank}.json")
    out.write_text(json.dumps(rec))  # the steps stand if the evaluation batch dies

    if args.part == "mmu":  # one evaluation batch (option scoring, --eval-items over the two
        # ranks), here where no reference engine takes room; the saliency scores and mask go
        # first (the 128k-152k-vocabulary models were OOM-killed here with them still held)
        del method
        gc.collect()
        release_free_heap()
        if info.rank == 0:
            rss = Path("/proc/self/statm").read_text().split()[1]
            print(f"real_shapes {name} evaluation batch +{time.time() - t0:.0f} s, rss pages {rss}")
        r0 = bench.forget[0]
        items = [SimpleNamespace(question=m.question, options=m.options, image=r0.images[0],
                                 answer_index=m.answer_index) for m in r0.mc_image[:args.eval_items]]  # fmt: skip
        rec["eval_items"] = len(items)
        tick = time.time()
        option_scores(engine.module, processor, items, max(1, len(items) // 2), info)
        rec["eval_batch_s"] = time.time() - tick
    rec["total_s"] = round(time.time() - t0, 1)
    out.write_text(json.dumps(rec))
    torch.distributed.barrier()
    exit_process(0)


# --------------------------------------------------------------------------- the parent


def plan_for(name: str, main: dict[str, Any], text_layers: int, vision_layers: int) -> dict:
    """`dsunlearn plan`'s bytes per rank for the same cut model, frozen parts, batch, tokens and
    DeepSpeed buffers, with and without checkpointing (GA's workload; the reference is counted
    the same for every method)."""
    from dsunlearn.models.published import PARTS, cut_shape
    from dsunlearn.plan import DS_DEFAULTS, Workload, plan_categories

    shape = cut_shape(name, text_layers, vision_layers, PICTURE)
    frozen = tuple(main["frozen"])
    trainable_parts = tuple(p for p in PARTS if p not in frozen)
    wl = Workload(
        shape=shape,
        method="ga",
        dtype_bytes=2,
        trainable=shape.all_numels(trainable_parts),
        frozen=shape.all_numels(frozen),
        micro_batch=2,
        text_tokens=main["tokens_per_sample"] - main["image_tokens_per_picture"],
        images=1,
        chunk_rows=-1,
        reference_forward=False,
        head_trainable="lm_head" not in frozen,
        ds={**DS_DEFAULTS, "reduce_bucket_size": REDUCE_BUCKET},
    )
    return {
        "plain": plan_categories(wl, main["world_size"], checkpointing=False),
        "checkpointed": plan_categories(wl, main["world_size"], checkpointing=True),
        "image_tokens": shape.image.text,
        "params_total": shape.total,
    }


def eval_cell(r: dict[str, Any]) -> str:
    """The evaluation batch's seconds and items, from whichever part ran it."""
    for part in PARTS:
        for rank in r.get(part, {}).get("ranks", [])[:1]:
            if "eval_batch_s" in rank:
                return f"{rank['eval_batch_s']:.1f} ({rank.get('eval_items', 4)} items)"
    return "-"


def markdown(out: dict[str, Any]) -> str:
    """The RESULTS.md tables: rank 0's bytes against the plan, activations, logits buffers,
    step times (`--table` prints them from the JSON)."""
    rows_states = ["| model | tokens / sample (image) | params | grads | optimizer | reference |"]
    rows_states.append("|---|---|---|---|---|---|")
    rows_mem = [
        "| model | activations saved, plain / checkpointed (ratio) | plan, plain / checkpointed "
        "| RSS peak fwd+bwd, plain / checkpointed (ratio) | logits buffers, chunked / eager "
        "(rows) |",
        "|---|---|---|---|---|",
    ]
    rows_time = ["| model | " + " | ".join(METHODS) + " | evaluation batch |"]
    rows_time.append("|---|" + "---|" * (len(METHODS) + 1))
    for name, r in out["models"].items():
        main = r.get("main", {})
        if "ranks" not in main:
            continue
        m, plan = main["ranks"][0], r["plan"]
        st = m["model_states"]
        got = {
            "params": st["param_bytes"],
            "grads": st["grad_bytes"],
            "optimizer": st["optim_bytes"],
            "reference": m["reference_bytes"],
        }
        cells = [f"{v / MIB:,.0f} MiB (plan x{v / plan['plain'][k]:.3f})" for k, v in got.items()]
        rows_states.append(
            f"| {name} | {m['tokens_per_sample']} ({m['image_tokens_per_picture']}) | "
            + " | ".join(cells)
            + " |"
        )
        a, lb = m["activations"], m.get("logits_buffers", {})
        sp, sc = a["plain"]["saved_for_backward_mib"], a["checkpointed"]["saved_for_backward_mib"]
        pp, pc = (
            a["plain"]["rss_peak_forward_backward_mib"],
            a["checkpointed"]["rss_peak_forward_backward_mib"],
        )
        pa, pca = plan["plain"]["activations"] / MIB, plan["checkpointed"]["activations"] / MIB
        logit_cell = (
            f"{lb['torch_transient_mib']:,.0f} / {lb['eager_transient_mib']:,.0f} MiB "
            f"({lb['rows']})"
            if lb
            else "-"
        )
        rows_mem.append(
            f"| {name} | {sp:,.0f} / {sc:,.0f} MiB ({sc / sp:.2f}) | {pa:,.0f} / {pca:,.0f} MiB "
            f"({pa / sp - 1:+.0%} / {pca / sc - 1:+.0%}) | {pp:,.0f} / {pc:,.0f} MiB "
            f"({pc / pp:.2f}) | {logit_cell} |"
        )
        times = {
            k: v["iteration_s"]
            for part in PARTS
            if "ranks" in r.get(part, {})
            for k, v in r[part]["ranks"][0]["steps"].items()
        }
        rows_time.append(
            f"| {name} | "
            + " | ".join(f"{times[k]:.1f}" if k in times else "-" for k in METHODS)
            + f" | {eval_cell(r)} |"
        )
    return "\n\n".join("\n".join(t) for t in (rows_states, rows_mem, rows_time))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--text-layers", type=int, default=1)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--logit-rows", type=int, default=0, help="0: every position of the batch")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument(
        "--eval-items",
        type=int,
        default=4,
        help="multiple-choice items (4 options each) in the evaluation batch, split "
        "over the 2 ranks",
    )
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--bench", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument(
        "--merge", action="store_true", help="keep what --out has of other models and other parts"
    )
    ap.add_argument(
        "--parts",
        nargs="+",
        default=list(PARTS),
        choices=PARTS,
        help="launches to run (main is where the plan comes from)",
    )
    ap.add_argument("--table", action="store_true", help="print --out's tables and exit")
    args, _ = ap.parse_known_args()
    if args.rank:
        rank_main(args)
        return
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return

    from dsunlearn.data.builtin import build_benchmark

    results: dict[str, Any] = {}
    if args.merge and Path(args.out).is_file():
        results = json.loads(Path(args.out).read_text())["models"]
    with tempfile.TemporaryDirectory() as tmp:
        bench = build_benchmark(Path(tmp) / "b6", seed=0, entities=6)
        for name in args.models:
            results[name] = results.get(name, {}) | measure(name, args, bench, Path(tmp))
            write(args, results)  # after each model: a crash keeps the models before it
    out = write(args, results)
    print(summary(out))


def launch_part(name: str, part: str, args: argparse.Namespace, bench: Path, tmp: Path) -> Any:
    """One 2-rank launch of `rank_main`; its two rank records, or an error line."""
    from dsunlearn.engine.dist import free_port
    from dsunlearn.recipes.demo import launch_env

    raw = tmp / f"{name}-{part}.json"
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [__file__, "--rank", "--part", part, "--model", name, "--bench", str(bench)]
    cmd += ["--work", str(tmp), "--out", str(raw), "--logit-rows", str(args.logit_rows)]
    cmd += ["--text-layers", str(args.text_layers), "--vision-layers", str(args.vision_layers)]
    cmd += ["--methods", *args.methods, "--eval-items", str(args.eval_items)]
    env = launch_env(2) | {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),  # RSS follows the live tensors
    }
    tick = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    files = [raw.with_suffix(f".rank{r}.json") for r in (0, 1)]
    out: dict[str, Any] = {"wall_s": round(time.time() - tick, 1)}
    if proc.returncode != 0:
        out["error"] = f"{part}: exit {proc.returncode}"
    if all(f.is_file() for f in files):  # written before the evaluation batch: kept on error
        out["ranks"] = [json.loads(f.read_text()) for f in files]
    return out


def measure(name: str, args: argparse.Namespace, bench: Path, tmp: Path) -> dict[str, Any]:
    """Four launches, in fresh processes each (everything in one does not fit 24 GiB on two
    ranks of the 128k-152k-vocabulary models): the main part (the probes, the evaluation
    batch, GA, GradDiff and NPO with the reference engine), KL_Min and SIU (each with both
    models' heads gathered for its fused loss) and MMUnlearner without the reference engine (it
    never uses it): its saliency pass and masked step."""
    out: dict[str, Any] = {}
    for part in args.parts:
        if part == "main" or any(part_of(m) == part for m in args.methods):
            out[part] = launch_part(name, part, args, bench, tmp)
    if "ranks" in out.get("main", {}):
        try:
            out["plan"] = plan_for(name, out["main"]["ranks"][0], args.text_layers,
                                   args.vision_layers)  # fmt: skip
        except Exception as e:  # noqa: BLE001 -- the measurement stands without it
            out["plan_error"] = f"{type(e).__name__}: {e}"
    return out


def write(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    out = {
        "what": __doc__.split("\n\n")[0],
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "text_layers": args.text_layers,
        "vision_layers": args.vision_layers,
        "date": time.strftime("%Y-%m-%d"),
        "models": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


def summary(out: dict[str, Any]) -> str:
    """Per model: measured vs plan for the model-state categories (rank 0), activations with
    and without checkpointing, logits buffers, step times."""
    lines = []
    for name, r in out["models"].items():
        main = r.get("main", {})
        if "ranks" not in main:
            lines.append(f"{name}: {main.get('error')}")
            continue
        m = main["ranks"][0]
        st, plan = m["model_states"], r.get("plan", {}).get("plain", {})
        measured = {
            "params": st["param_bytes"],
            "grads": st["grad_bytes"],
            "optimizer": st["optim_bytes"],
            "reference": m["reference_bytes"],
        }
        cells = [
            f"{k} {v / MIB:.0f} MiB (plan {plan.get(k, float('nan')) / MIB:.0f}, "
            f"x{v / plan[k] if plan.get(k) else float('nan'):.3f})"
            for k, v in measured.items()
        ]
        acts = m["activations"]
        ratio = (
            acts["checkpointed"]["saved_for_backward_mib"] / acts["plain"]["saved_for_backward_mib"]
        )
        times = {
            k: round(v["iteration_s"], 1)
            for part in PARTS
            if "ranks" in r.get(part, {})
            for k, v in r[part]["ranks"][0]["steps"].items()
        }
        lines.append(
            f"{name}: {m['tokens_per_sample']} tokens/sample ({m['image_tokens_per_picture']} "
            f"image); " + "; ".join(cells) + f"; activations ckpt/plain {ratio:.3f}; "
            f"logits torch/eager {m['logits_buffers']['torch_transient_mib']:.0f}/"
            f"{m['logits_buffers']['eager_transient_mib']:.0f} MiB; step s {times}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

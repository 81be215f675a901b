"""Unlearn recipe: evaluate the vanilla model, then for each method train and evaluate.

Per method, read top to bottom:
  1. load the vanilla weights into a fresh ZeRO-3 training engine;
  2. the method attaches to its engine (MMUnlearner scores the vanilla weights there);
  3. for each iteration: a forget step (loss, backward, step), then, if the method has them,
     its retain steps (one; MMUnlearner: len(retain)/len(forget)); the frozen reference engine
     (shared by all methods) feeds KL and NPO; at the step boundary, a checkpoint when one is
     due, or when any rank was signalled (SIGUSR1/SIGTERM: save on all ranks, exit 75);
  4. evaluate on all ranks and add the metrics to the report.
The report (json, md, png) and the per-step losses are written at the end, atomically.
`resume=auto` skips the methods an earlier launch finished (progress.json) and continues the
one in progress from its latest complete checkpoint, bit for bit.
"""

from __future__ import annotations

import gc
import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dsunlearn.cache import is_complete, vanilla_dir
from dsunlearn.config import LearnConfig, UnlearnConfig, to_dict
from dsunlearn.data.examples import vqa_train_examples
from dsunlearn.engine import checkpoint
from dsunlearn.engine.batches import balanced_batches
from dsunlearn.engine.dist import all_reduce_sum, barrier, get_logger, init_distributed
from dsunlearn.engine.ds_config import zero_stage
from dsunlearn.engine.engine import build_reference_engine, build_train_engine, optimizer_step
from dsunlearn.engine.preempt import PreemptionFlag
from dsunlearn.errors import DataError, ModelError, Preempted
from dsunlearn.eval.evaluate import CHANCE, build_eval_sets, evaluate, generate_probe_answers
from dsunlearn.fsutil import write_json_atomic
from dsunlearn.methods import build_method
from dsunlearn.methods.base import RunContext
from dsunlearn.models.loader import load_model_and_processor
from dsunlearn.models.lora import apply_lora
from dsunlearn.recipes.common import (
    deepspeed_config,
    encode_batch,
    is_zero3,
    model_dtype,
    prepare_benchmark,
)
from dsunlearn.recipes.run_state import RunProgress, check_same_run
from dsunlearn.recipes.run_state import fingerprint as run_fingerprint
from dsunlearn.report import write_report


def resolve_vanilla(cfg: UnlearnConfig) -> str:
    """The model to unlearn: `vanilla` if given, else the learned model for this data, model
    and seed (`dsunlearn learn data.seed=S seed=S` for `unlearn data.seed=S seed=S`)."""
    if cfg.vanilla:
        return cfg.vanilla
    learn = LearnConfig(data=cfg.data, model=cfg.model, seed=cfg.seed)  # its seed, its vanilla
    path = vanilla_dir(learn)
    if not is_complete(path):
        raise ModelError(
            f"no learned vanilla model at {path}: run `dsunlearn learn` with the same data, "
            "model and seed settings first, or set vanilla=DIR"
        )
    return str(path)


def _mean_over_ranks(x: torch.Tensor, world: int) -> float:
    return float(all_reduce_sum(x.detach().float().reshape(1)).item() / world)


def run_unlearn(cfg: UnlearnConfig) -> Path:
    t0 = time.time()
    methods = [build_method(name, cfg.method) for name in cfg.methods]  # fail fast on a typo
    # Early: under launch/slurm.sbatch the ranks start with USR1/TERM ignored, and a
    # signal that arrives before this is lost (the job script repeats it every 30 s).
    preempt = PreemptionFlag().install()
    info = init_distributed(cfg.dist_timeout_s)
    log = get_logger()
    bench = prepare_benchmark(cfg.data, info)
    vanilla = resolve_vanilla(cfg)
    ds = deepspeed_config(cfg.deepspeed, cfg.optim, cfg.model, info)
    zero3 = is_zero3(ds)
    dtype = model_dtype(cfg.model)
    run_dir = Path(cfg.out_dir) / cfg.name
    fingerprint = run_fingerprint(cfg, vanilla)
    progress = RunProgress.open(run_dir, fingerprint, cfg.resume, info)

    retain_train = vqa_train_examples(bench.retain)
    sets = build_eval_sets(bench, cfg.eval, cfg.seed, cfg.method.siu_image_index)
    log.info(
        f"unlearn '{cfg.name}': methods {cfg.methods}, world size {info.world_size}, "
        f"ZeRO stage {zero_stage(ds)}, {len(retain_train)} retain examples"
    )

    # The frozen reference: vanilla weights, sharded like the trained model.
    ref_model, processor = load_model_and_processor(vanilla, dtype=dtype, ds_config=ds)
    ref = build_reference_engine(ref_model, ds)
    # The vanilla model's answers to the identity probes: what every method's fluency is
    # measured on (its perplexity on the original's answers, names left out).
    original_answers: list[str] | None = None
    vanilla_metrics: dict[str, float] = {}
    if progress.vanilla is not None:  # an earlier launch of this run measured it
        vanilla_metrics = progress.vanilla["metrics"]
        original_answers = progress.vanilla["probe_answers"]
    elif cfg.eval.enabled:
        original_answers = generate_probe_answers(
            ref.module, processor, sets, cfg.eval, info, zero3
        )
        vanilla_metrics = evaluate(
            ref.module, processor, sets, cfg.eval, info, zero3, probe_answers=original_answers
        )
        progress.finish_vanilla(vanilla_metrics, original_answers)
    log.info("vanilla: " + ", ".join(f"{k}={v:.3f}" for k, v in vanilla_metrics.items()))

    results: dict[str, dict[str, float]] = {}
    losses: dict[str, list[dict[str, float]]] = {}
    method_info: dict[str, dict] = {}
    resumed: dict[str, dict[str, int]] = {}
    for method in methods:
        if method.name in progress.methods:  # finished before an earlier launch stopped
            done = progress.methods[method.name]
            results[method.name], losses[method.name] = done["metrics"], done["losses"]
            method_info[method.name] = done["info"]
            resumed.update({method.name: done["resumed"]} if done.get("resumed") else {})
            log.info(f"{method.name}: finished in an earlier launch (from {progress.path})")
            continue
        forget_train = method.forget_examples(bench, processor)
        if not forget_train:
            raise DataError(
                f"the forget split of {cfg.data.resolved_path()} gives {method.name} no data"
            )
        optim = method.optim(cfg.optim)
        B = optim.batch_size
        steps = optim.steps or math.ceil(len(forget_train) * optim.epochs / B)
        save_dir = run_dir / "checkpoints" / method.name
        resume = checkpoint.find_resume(save_dir, info) if cfg.resume == "auto" else None
        if resume is not None:
            check_same_run(resume.meta, fingerprint, resume.path)
        log.info(
            f"{method.name}: {len(forget_train)} forget examples, {steps} steps, lr {optim.lr}"
            + (f", resuming from {resume.path}" if resume else "")
        )
        method_ds = deepspeed_config(cfg.deepspeed, optim, cfg.model, info)
        model, _ = load_model_and_processor(
            vanilla, dtype=dtype, ds_config=method_ds, seed=cfg.seed
        )
        model = apply_lora(model, cfg.peft.lora, cfg.seed)  # unchanged unless peft.lora.r > 0
        engine = build_train_engine(model, optim, method_ds)
        engine.train()
        resume_dir = resume.path if resume else None
        method.attach(engine, RunContext(bench, processor, info, run_dir, resume_dir))
        n_retain = (
            method.retain_steps_per_forget(len(forget_train), len(retain_train))
            if method.uses_retain
            else 0
        )
        f_stream = balanced_batches(forget_train, B, info.rank, info.world_size, cfg.seed)
        r_stream = balanced_batches(retain_train, B, info.rank, info.world_size, cfg.seed + 1)
        view_rng = np.random.default_rng([cfg.seed, info.rank])
        curve: list[dict[str, float]] = []
        start = 0
        if resume is not None:
            # Weights, optimizer moments, LR schedule: DeepSpeed's files, each rank its own
            # partition. Data position and RNG: ours. Together: the run continues bit for bit.
            engine.load_checkpoint(str(save_dir), tag=resume.tag)
            start, curve = resume.step, resume.rank_state["curve"]
            for _ in range(start):
                next(f_stream)
            for _ in range(start * n_retain):
                next(r_stream)
            view_rng.bit_generator.state = resume.rank_state["view_rng"]
            checkpoint.set_rng_state(resume.rank_state["rng"])
            resumed[method.name] = {"from_step": start}
        bar = tqdm(range(start + 1, steps + 1), desc=method.name, disable=not info.is_main)
        for step in bar:
            row: dict[str, float] = {"step": step}
            batch = encode_batch(processor, method.views(next(f_stream), view_rng), info.device)
            loss = method.forget_loss(engine, batch, ref)
            forget_hook = partial(method.before_step, phase="forget")
            optimizer_step(engine, loss, f"{method.name} forget step {step}", forget_hook)
            row["forget_loss"] = _mean_over_ranks(loss, info.world_size)
            retain_losses = []
            for _ in range(n_retain):
                batch = encode_batch(processor, next(r_stream), info.device)
                loss = method.retain_loss(engine, batch, ref)
                retain_hook = partial(method.before_step, phase="retain")
                optimizer_step(engine, loss, f"{method.name} retain step {step}", retain_hook)
                retain_losses.append(_mean_over_ranks(loss, info.world_size))
            if retain_losses:
                row["retain_loss"] = sum(retain_losses) / len(retain_losses)
            curve.append(row)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "step"})

            # The step boundary: every rank takes the same branch (the flag is all-reduced).
            signalled = preempt.requested(info.device)
            stop = signalled or step == cfg.checkpoint.stop_at
            every = cfg.checkpoint.every
            final = step == steps and cfg.checkpoint.final
            if stop or final or (every > 0 and step % every == 0):
                rank_state = {
                    "rng": checkpoint.rng_state(),
                    "view_rng": view_rng.bit_generator.state,
                    "curve": curve,
                }
                meta = {"method": method.name, "steps": steps, "fingerprint": fingerprint}
                meta.update({"vanilla": vanilla, "config": to_dict(cfg)})
                folder = checkpoint.save(
                    engine, save_dir, step, rank_state, meta, info, method, cfg.checkpoint.keep
                )
            if stop:
                why = f"signal {preempt.name}" if signalled else f"checkpoint.stop_at={step}"
                raise Preempted(
                    f"{why}: {method.name} stopped after step {step} of {steps}; checkpoint "
                    f"{folder} is complete: relaunch with resume=auto to continue"
                )
        bar.close()
        losses[method.name] = curve
        method_info[method.name] = method.report_info()
        if cfg.eval.enabled:
            results[method.name] = evaluate(
                engine.module,
                processor,
                sets,
                cfg.eval,
                info,
                zero3,
                original_answers=original_answers,
            )
            log.info(
                f"{method.name}: "
                + ", ".join(f"{k}={v:.3f}" for k, v in results[method.name].items())
            )
        else:
            results[method.name] = {}
        progress.finish_method(
            method.name,
            results[method.name],
            curve,
            method_info[method.name],
            resumed.get(method.name),
        )
        del engine, model
        gc.collect()
        if preempt.requested(info.device):  # signalled during the evaluation
            raise Preempted(
                f"signal {preempt.name}: stopped after {method.name} finished; relaunch with "
                "resume=auto to continue with the next method"
            )

    report = {
        "vanilla": vanilla_metrics,
        "methods": results,
        "chance": CHANCE,
        "method_info": {k: v for k, v in method_info.items() if v},
        "world_size": info.world_size,
        "elapsed_s": round(time.time() - t0, 2),
    }
    if resumed:
        report["resumed"] = resumed
    if info.is_main:
        write_json_atomic(run_dir / "losses.json", losses)
        write_json_atomic(run_dir / "config.json", to_dict(cfg))
        path = write_report(run_dir, report, title=f"dsunlearn: {cfg.name}")
        progress.remove()  # the report now holds everything; a new run may start here
        log.info(f"report: {path} ({report['elapsed_s']:.1f} s)")
    barrier()
    preempt.uninstall()
    return run_dir / "report.json"

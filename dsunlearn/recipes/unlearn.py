"""Unlearn recipe: score the reference models, then for each method train, select and evaluate.

Read top to bottom:
  1. `setup`: the benchmark, the evaluation protocol (`eval.benchmark`) and its validation and
     test sets, the frozen reference engine (vanilla weights, sharded like the trained model).
  2. `score_references`: the vanilla model and the gold model (never saw the forget faces) on
     the test split and, with in-run evaluation, the validation split.
  3. `unlearn_method`, per method:
     a. load the vanilla weights into a fresh ZeRO-3 training engine; the method attaches to it
        (MMUnlearner scores the vanilla weights there);
     b. each iteration: a forget step (loss, backward, step), then the method's retain steps
        (one; MMUnlearner: len(retain)/len(forget)); the frozen reference feeds KL and NPO;
     c. every `eval.every` iterations: the validation split, on all ranks, sharded; the
        selector (`select.criterion`) keeps the selected step, each rank keeps its own
        partition of the selected weights (`engine/snapshot.py`); `early_stop.patience` ends
        the method early;
     d. at the step boundary, a checkpoint when one is due or when any rank was signalled
        (SIGUSR1/SIGTERM: save on all ranks, exit 75);
     e. the selected weights go back into the engine, are evaluated on the test split and,
        with `checkpoint.final`, saved.
  4. The report (json, md, png, curves) and the per-step losses, written at the end, atomically.
`resume=auto` skips what an earlier launch finished (progress.json) and continues the method in
progress from its latest complete checkpoint, bit for bit, selection included.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dsunlearn.audit.auditor import Auditor, write_audit
from dsunlearn.audit.verdict import audit_summary
from dsunlearn.audit.weights import capture_local
from dsunlearn.cache import find_learned, is_complete
from dsunlearn.config import LearnConfig, UnlearnConfig, to_dict
from dsunlearn.data.benchmark import Benchmark
from dsunlearn.data.examples import vqa_train_examples
from dsunlearn.engine import checkpoint
from dsunlearn.engine.batches import balanced_batches
from dsunlearn.engine.dist import DistInfo, all_reduce_sum, barrier, get_logger, init_distributed
from dsunlearn.engine.ds_config import zero_stage
from dsunlearn.engine.engine import (
    build_reference_engine,
    build_train_engine,
    optimizer_step,
    step_scalars,
)
from dsunlearn.engine.preempt import PreemptionFlag
from dsunlearn.engine.snapshot import Snapshot
from dsunlearn.engine.watchdog import watch_parent_from_env
from dsunlearn.errors import ConfigError, DataError, ModelError, Preempted, TrainingError
from dsunlearn.eval.benchmarks import Protocol, Scored, build_protocol
from dsunlearn.eval.evaluate import CHANCE
from dsunlearn.eval.selection import Selector, Targets, check_criterion
from dsunlearn.eval.selection import score as score_step
from dsunlearn.eval.utility import UtilitySets, build_utility, score_utility, utility_facts
from dsunlearn.eval.verdict import versus_gold
from dsunlearn.fsutil import write_json_atomic
from dsunlearn.methods import build_method
from dsunlearn.methods.base import Method, RunContext
from dsunlearn.models.loader import enable_activation_checkpointing, load_model_and_processor
from dsunlearn.models.lora import apply_lora
from dsunlearn.recipes import reference_cache
from dsunlearn.recipes.audit import check_settings
from dsunlearn.recipes.common import (
    deepspeed_config,
    encode_batch,
    is_zero3,
    model_dtype,
    prepare_benchmark,
)
from dsunlearn.recipes.requests import (
    Request,
    check_request_settings,
    drop_weights,
    eval_view,
    gold_view,
    handoff_dir,
    load_handoff,
    mask_overlap,
    plan_requests,
    save_handoff,
    train_view,
)
from dsunlearn.recipes.run_state import MethodResult, References, RunProgress, check_same_run
from dsunlearn.recipes.run_state import fingerprint as run_fingerprint
from dsunlearn.report import write_report
from dsunlearn.saliency.store import load_mask, mask_file
from dsunlearn.tracking import Tracker


def resolve_vanilla(cfg: UnlearnConfig) -> str:
    """The model to unlearn: `vanilla` if given, else the learned model for this data, model
    and seed (`dsunlearn learn data.seed=S seed=S` for `unlearn data.seed=S seed=S`)."""
    if cfg.vanilla:
        return cfg.vanilla
    path = find_learned(_learn_config(cfg))
    if not is_complete(path):
        raise ModelError(
            f"no learned vanilla model at {path}: run `dsunlearn learn` with the same data, "
            "model and seed settings first, or set vanilla=DIR"
        )
    return str(path)


def resolve_gold(cfg: UnlearnConfig) -> str | None:
    """The gold model: `gold` if given ("none": no gold row), else, when the vanilla model is
    the learned one, its gold twin if `dsunlearn learn gold=true` made it."""
    if cfg.gold:
        return None if cfg.gold == "none" else cfg.gold
    if cfg.vanilla:
        return None  # a user's own vanilla model: only they know its gold model
    path = find_learned(dataclasses.replace(_learn_config(cfg), gold=True))
    return str(path) if is_complete(path) else None


def _learn_config(cfg: UnlearnConfig) -> LearnConfig:
    return LearnConfig(data=cfg.data, model=cfg.model, seed=cfg.seed)  # its seed, its model


@dataclass
class Run:
    """What every method of a run shares."""

    cfg: UnlearnConfig
    info: DistInfo
    bench: Benchmark
    vanilla: str
    gold: str | None
    ds: dict[str, Any]
    run_dir: Path
    fingerprint: str
    progress: RunProgress
    protocol: Protocol
    test_sets: Any
    val_sets: Any  # None without in-run evaluation
    processor: Any
    ref: Any  # the frozen reference engine (vanilla weights)
    tracker: Tracker
    preempt: PreemptionFlag
    auditor: Auditor | None = None  # `audit=true`
    # The request this view of the run serves (recipes/requests.py); `bench` is then its
    # training people, `protocol` and the sets its evaluation people.
    request: Request | None = None
    # The gold model's own sets when its row is an approximation (requests.gold_view); None:
    # the same sets as every other row.
    gold_sets: tuple[Any, Any] | None = None
    # `eval.utility`: general-ability benchmarks (POPE, MMBench) scored beside the test split,
    # on every row's test weights; None without them.
    utility: UtilitySets | None = None

    @property
    def zero3(self) -> bool:
        return is_zero3(self.ds)

    def score(self, model: Any, sets: Any, original: Scored | None) -> Scored:
        """One model on one split's sets; all ranks together, on the sharded weights."""
        return self.protocol.score(model, self.processor, sets, self.info, self.zero3, original)

    def score_test(self, model: Any, sets: Any, original: Scored | None) -> Scored:
        """The test split, plus the general-ability benchmarks' metrics (`eval.utility`) in the
        same row: the report's tables and gaps to gold then show both."""
        scored = self.score(model, sets, original)
        if self.utility is not None:
            scored.metrics.update(
                score_utility(self.utility, model, self.processor, self.info, self.zero3)
            )
        return scored


def make_protocol(cfg: UnlearnConfig, bench: Benchmark) -> Protocol:
    return build_protocol(
        cfg.eval.benchmark,
        cfg.data,
        cfg.eval,
        cfg.seed,
        bench=None if cfg.eval.path else bench,  # the run's own data, unless eval.path says
        siu_image_index=cfg.method.siu_image_index,
    )


def evaluation_sets(cfg: UnlearnConfig, protocol: Protocol) -> tuple[Any, Any]:
    """The validation sets (with in-run evaluation) and the test sets (unless eval.test=false)."""
    in_run = cfg.eval.enabled and cfg.eval.every > 0
    val_sets = protocol.build("val") if in_run else None  # one line if it has no such split
    test_sets = protocol.build("test") if cfg.eval.enabled and cfg.eval.test else None
    return val_sets, test_sets


def setup(cfg: UnlearnConfig, preempt: PreemptionFlag) -> Run:
    info = init_distributed(cfg.dist_timeout_s)
    bench = prepare_benchmark(cfg.data, info)
    vanilla = resolve_vanilla(cfg)
    ds = deepspeed_config(cfg.deepspeed, cfg.optim, cfg.model, info)
    run_dir = Path(cfg.out_dir) / cfg.name
    fp = run_fingerprint(cfg, vanilla)
    progress = RunProgress.open(run_dir, fp, cfg.resume, info)
    protocol = make_protocol(cfg, bench)
    val_sets, test_sets = evaluation_sets(cfg, protocol)
    if val_sets is not None:
        check_criterion(
            cfg.select, protocol.forget_key is not None and protocol.retain_key is not None
        )
    ref_model, processor = load_model_and_processor(
        vanilla, dtype=model_dtype(cfg.model), ds_config=ds
    )
    ref = build_reference_engine(ref_model, ds)
    gold = resolve_gold(cfg)
    auditor = build_auditor(cfg, bench, info, vanilla, gold) if cfg.audit.enabled else None
    utility = None
    if test_sets is not None:  # scored with the test split only
        utility = build_utility(cfg.eval, cfg.data, cfg.seed)
    tracker = Tracker.open(cfg.report_to, run_dir, cfg.name, to_dict(cfg), info.is_main)
    return Run(
        cfg, info, bench, vanilla, gold, ds, run_dir, fp, progress, protocol,
        test_sets, val_sets, processor, ref, tracker, preempt, auditor, utility=utility,
    )  # fmt: skip


def for_request(run: Run, req: Request) -> Run:
    """The run as request `req` sees it: its training people, its evaluation sets and, where
    the gold model saw someone forgotten so far, the gold model's own sets."""
    if not req.sequential:
        return dataclasses.replace(run, request=req)
    protocol = make_protocol(run.cfg, eval_view(run.bench, req))
    val_sets, test_sets = evaluation_sets(run.cfg, protocol)
    gold_bench, _exact = gold_view(run.bench, req)
    gold_sets = None
    if gold_bench is not None and run.gold is not None:
        gold_sets = evaluation_sets(run.cfg, make_protocol(run.cfg, gold_bench))
    return dataclasses.replace(
        run,
        bench=train_view(run.bench, req),
        protocol=protocol,
        val_sets=val_sets,
        test_sets=test_sets,
        request=req,
        gold_sets=gold_sets,
    )


def build_auditor(
    cfg: UnlearnConfig, bench: Benchmark, info: DistInfo, vanilla: str, gold: str | None
) -> Auditor:
    """The audit of each method's selected weights (`audit=true`), against the run's gold and
    vanilla models; refused with one line where it cannot run."""
    check_settings(cfg.audit, cfg.eval.benchmark, info.world_size)
    if gold is None:
        raise ConfigError(
            "audit=true needs the gold model (gold=DIR, or `dsunlearn learn gold=true` first)"
        )
    if cfg.peft.lora.r > 0:
        raise ConfigError(
            "audit=true audits full fine-tuning runs; for a LoRA run, export the merged model "
            "(dsunlearn export --merge-lora) and run dsunlearn audit on it"
        )
    return Auditor(
        cfg.audit, bench, cfg.data, cfg.eval.benchmark, gold, vanilla, info, cfg.eval,
        cfg.deepspeed, cfg.model.dtype, cfg.seed,
    )  # fmt: skip


def score_references(run: Run) -> References:
    """The vanilla model (the reference engine) and the gold model, on test and validation;
    read from `eval.reference_cache` when an earlier run scored the same models there."""
    log = get_logger()
    refs = References()
    if not run.cfg.eval.enabled:
        return refs
    splits = [name for name, sets in (("test", run.test_sets), ("val", run.val_sets)) if sets]
    cached = None
    sequential = run.request is not None and run.request.sequential
    if run.cfg.eval.reference_cache and not sequential:  # its key does not hold the request
        cached = reference_cache.cache_path(
            run.cfg, run.vanilla, run.gold, run.info.world_size, splits
        )
        found = reference_cache.load(cached)
        if found is not None:
            log.info(f"reference scores from {cached}")
            return found
    ref = run.ref.module
    if run.test_sets is not None:
        refs.vanilla = run.score_test(ref, run.test_sets, None)
    if run.val_sets is not None:
        refs.vanilla_val = run.score(ref, run.val_sets, None)
    if run.gold is not None:
        model, _ = load_model_and_processor(
            run.gold, dtype=model_dtype(run.cfg.model), ds_config=run.ds
        )
        gold = build_reference_engine(model, run.ds)
        if run.gold_sets is None:
            if run.test_sets is not None:
                refs.gold = run.score_test(gold.module, run.test_sets, refs.vanilla)
            if run.val_sets is not None:
                refs.gold_val = run.score(gold.module, run.val_sets, refs.vanilla_val)
        else:  # an approximation on its own unseen people: no vanilla row on those sets
            val_sets, test_sets = run.gold_sets
            if test_sets is not None:
                refs.gold = run.score_test(gold.module, test_sets, None)
            if val_sets is not None:
                refs.gold_val = run.score(gold.module, val_sets, None)
        del gold, model
        gc.collect()
    if cached is not None:
        reference_cache.save(cached, refs, run.info.is_main)
    for name, row in (("vanilla", refs.vanilla), ("gold", refs.gold)):
        if row is not None:
            log.info(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.metrics.items()))
    if run.gold is None:
        log.info("no gold model (set gold=DIR, or `dsunlearn learn gold=true`): no forget quality")
    return refs


def selection_targets(run: Run, refs: References) -> Targets | None:
    """The criterion's references, from the validation split: gold's forget metric (chance
    without a gold model) and vanilla's retain metric."""
    p = run.protocol
    if p.forget_key is None or p.retain_key is None or refs.vanilla_val is None:
        return None
    if refs.gold_val is not None:
        gold, source = refs.gold_val.metrics[p.forget_key], "gold"
    else:
        gold, source = CHANCE, "chance (no gold model)"
    return Targets(p.forget_key, p.retain_key, gold, refs.vanilla_val.metrics[p.retain_key], source)


@dataclass
class MethodState:
    """What one method's run carries from step to step, and (each rank its own) into its
    checkpoints: the loss and validation curves, the selection, the selected weights."""

    selector: Selector | None
    losses: list[dict[str, float]] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)
    snapshot: Snapshot | None = None
    timing: dict[str, float] = field(
        default_factory=lambda: {"train_s": 0.0, "val_s": 0.0, "test_s": 0.0}
    )
    finished: bool = False  # nothing left to train (the final checkpoint, or an early stop)

    def checkpoint_state(self, view_rng: np.random.Generator, finished: bool = False):
        return {
            "rng": checkpoint.rng_state(),
            "view_rng": view_rng.bit_generator.state,
            "losses": self.losses,
            "val_curve": self.curve,
            "selector": self.selector.state() if self.selector else None,
            "snapshot": self.snapshot.state() if self.snapshot else None,
            "timing": self.timing,
            "finished": finished,
        }

    def load(self, state: dict[str, Any], cfg: UnlearnConfig) -> None:
        """Continue from a checkpoint's state (the RNG and data position are the caller's)."""
        self.losses, self.curve, self.timing = state["losses"], state["val_curve"], state["timing"]
        if self.selector is not None and state["selector"]:
            self.selector = Selector.from_state(
                cfg.select, self.selector.targets, cfg.early_stop.patience, state["selector"]
            )
        self.snapshot = Snapshot.from_state(state["snapshot"])
        self.finished = state["finished"] or (
            self.selector is not None and self.selector.should_stop
        )


def sync_iteration(
    run: Run, method: str, step: int, losses: list[tuple[str, torch.Tensor]]
) -> tuple[list[float], bool]:
    """The iteration's one collective: every step's loss, whether it was finite, and any
    preemption signal, summed over ranks in a single all-reduce (small all-reduces each cost a
    launch and a host sync; an iteration used to make three or more). Returns each loss's mean
    over ranks, and whether any rank was signalled. A loss that was not finite on any rank stops every rank with one line: the steps
    already ran, but nothing is evaluated or written from these weights."""
    values = torch.stack([loss.detach().float().reshape(()) for _, loss in losses])
    bad = (~torch.isfinite(values)).float()
    votes = torch.tensor(run.preempt.votes(), device=values.device)
    packed = torch.cat([torch.where(bad > 0, 0.0, values), bad, votes]).double()
    total = all_reduce_sum(packed).tolist()
    n = len(losses)
    for (what, _), ranks_bad in zip(losses, total[n : 2 * n], strict=True):
        if ranks_bad > 0:
            raise TrainingError(
                f"{method} {what} step {step}: loss is not finite (NaN or inf) on "
                f"{int(ranks_bad)} rank(s); lower the learning rate"
            )
    signalled = run.preempt.agree(total[2 * n :])
    return [x / run.info.world_size for x in total[:n]], signalled


def train_iteration(
    method: Method, run: Run, engine: Any, step: int, forget: list[Any], retains: list[list[Any]]
) -> tuple[dict[str, float], dict[str, float], bool]:
    """One iteration: a forget step, then the method's retain steps, then `sync_iteration`.
    Returns the losses (mean over ranks), what tracking logs besides (learning rate, gradient
    norms) and whether any rank was signalled to stop."""
    info = run.info
    batch = encode_batch(run.processor, forget, info.device)
    loss = method.forget_loss(engine, batch, run.ref)
    forget_hook = partial(method.before_step, phase="forget")
    optimizer_step(engine, loss, "forget", forget_hook, check=False)
    losses = [("forget", loss)]
    scalars = {f"forget_{k}": v for k, v in step_scalars(engine).items()}
    for examples in retains:
        batch = encode_batch(run.processor, examples, info.device)
        loss = method.retain_loss(engine, batch, run.ref)
        retain_hook = partial(method.before_step, phase="retain")
        optimizer_step(engine, loss, "retain", retain_hook, check=False)
        losses.append(("retain", loss))
    means, signalled = sync_iteration(run, method.name, step, losses)
    row: dict[str, float] = {"step": step, "forget_loss": means[0]}
    if retains:
        row["retain_loss"] = sum(means[1:]) / len(retains)
        scalars.update({f"retain_{k}": v for k, v in step_scalars(engine).items()})
    return row, scalars, signalled


def validate(run: Run, refs: References, name: str, engine: Any, st: MethodState, step: int):
    """Score the validation split at `step` and let the selection see it (it keeps the weights
    of a new selection); whether the selection says to stop early."""
    tick = time.time()
    val = run.score(engine.module, run.val_sets, refs.vanilla_val).metrics
    st.curve.append({"step": step, **val})
    if st.selector.observe(step, val):
        st.snapshot = Snapshot.capture(engine, step)
    _stream_curve(run, name, step, val, st.selector)
    run.tracker.log(_prefixed(name, "val", val), step)
    st.timing["val_s"] += time.time() - tick
    get_logger().info(
        f"{name} step {step} (validation): "
        + ", ".join(f"{k}={v:.3f}" for k, v in val.items())
        + f"; selected step {st.selector.step}"
    )
    return st.selector.should_stop


def unlearn_method(
    method: Method, run: Run, refs: References, previous: Path | None = None
) -> MethodResult:
    """Train one method from the vanilla weights (`previous`: from an earlier request's
    selected weights, requests.save_handoff's folder), select its step, evaluate it on test."""
    cfg, info, log = run.cfg, run.info, get_logger()
    req = run.request
    name = req.label(method.name)  # in logs, tracking and the streamed curves
    t0 = time.time()
    retain_train = vqa_train_examples(run.bench.retain)
    forget_train = method.forget_examples(run.bench, run.processor)
    if not forget_train:
        raise DataError(
            f"the forget split of {cfg.data.resolved_path()} gives {method.name} no data"
        )
    optim = method.optim(cfg.optim)
    B = optim.batch_size
    steps = optim.steps or math.ceil(len(forget_train) * optim.epochs / B)
    if not method.trains:
        steps = 0  # the unlearning happens in `attach`
    save_dir = run.run_dir / "checkpoints" / method.name
    if req.sequential:
        save_dir = run.run_dir / "checkpoints" / req.tag / method.name
    resume = checkpoint.find_resume(save_dir, info) if cfg.resume == "auto" else None
    if resume is not None:
        check_same_run(resume.meta, run.fingerprint, resume.path)
    log.info(
        f"{name}: {len(forget_train)} forget examples, {steps} steps, lr {optim.lr}"
        + (f", from {previous}" if previous else "")
        + (f", resuming from {resume.path}" if resume else "")
    )
    method_ds = deepspeed_config(cfg.deepspeed, optim, cfg.model, info)
    model, _ = load_model_and_processor(
        run.vanilla, dtype=model_dtype(cfg.model), ds_config=method_ds, seed=cfg.seed
    )
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model = apply_lora(model, cfg.peft.lora, cfg.seed)  # unchanged unless peft.lora.r > 0
    method.prepare_model(model)
    engine = build_train_engine(model, optim, method_ds)
    engine.train()
    if previous is not None:  # before `attach`: MMUnlearner and MANU score these weights
        load_handoff(engine, previous, info)
    ctx = RunContext(run.bench, run.processor, info, run.run_dir, resume.path if resume else None)
    method.attach(engine, ctx)
    overlap = _mask_overlap(method, previous, info)
    n_retain = (
        method.retain_steps_per_forget(len(forget_train), len(retain_train))
        if method.uses_retain
        else 0
    )
    f_stream = balanced_batches(forget_train, B, info.rank, info.world_size, cfg.seed)
    r_stream = balanced_batches(retain_train, B, info.rank, info.world_size, cfg.seed + 1)
    view_rng = np.random.default_rng([cfg.seed, info.rank])
    selector = None
    if run.val_sets is not None:
        targets = selection_targets(run, refs)
        selector = Selector(cfg.select, targets, cfg.early_stop.patience)
    st = MethodState(selector)
    start = 0
    if resume is not None:
        # Weights, optimizer moments, LR schedule: DeepSpeed's files, each rank its own
        # partition. Data position, RNG and selection: ours. Together: bit for bit.
        engine.load_checkpoint(str(save_dir), tag=resume.tag)
        start = resume.step
        for _ in range(start):
            next(f_stream)
        for _ in range(start * n_retain):
            next(r_stream)
        view_rng.bit_generator.state = resume.rank_state["view_rng"]
        checkpoint.set_rng_state(resume.rank_state["rng"])
        st.load(resume.rank_state, cfg)
    mask_share = method.report_info().get("selected_share")

    if not method.trains and st.selector is not None and not st.curve:
        validate(run, refs, name, engine, st, 0)  # a training-free method's one state

    last = start
    todo = range(start + 1, (start if st.finished else steps) + 1)
    bar = tqdm(todo, desc=name, disable=not info.is_main)
    for step in bar:
        tick = time.time()
        forget = method.views(next(f_stream), view_rng)
        retains = [next(r_stream) for _ in range(n_retain)]
        row, scalars, signalled = train_iteration(method, run, engine, step, forget, retains)
        st.losses.append(row)
        if mask_share is not None:
            scalars["mask_share"] = mask_share
        run.tracker.log(_prefixed(name, "train", {**row, **scalars}), step)
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k != "step"})
        last = step
        st.timing["train_s"] += time.time() - tick

        # In-run evaluation: the validation split only; the selection keeps its weights.
        stop_early = False
        if st.selector is not None and (step % cfg.eval.every == 0 or step == steps):
            stop_early = validate(run, refs, name, engine, st, step)

        # The step boundary: every rank takes the same branch (the flag was all-reduced with
        # the losses; after an evaluation, which takes a while, it is asked for once more).
        if st.curve and st.curve[-1]["step"] == step:
            signalled = run.preempt.requested(info.device)
        stop = signalled or (
            step == cfg.checkpoint.stop_at and req.index == cfg.checkpoint.stop_request
        )
        every = cfg.checkpoint.every
        if stop or (every > 0 and step % every == 0):
            state = st.checkpoint_state(view_rng)
            folder = _save(run, engine, method, save_dir, step, steps, state)
        if stop:
            why = f"signal {run.preempt.name}" if signalled else f"checkpoint.stop_at={step}"
            raise Preempted(
                f"{why}: {name} stopped after step {step} of {steps}; checkpoint "
                f"{folder} is complete: relaunch with resume=auto to continue"
            )
        if stop_early:
            log.info(
                f"{name}: early stop at step {step} ({cfg.early_stop.patience} "
                "evaluations without a new selection)"
            )
            break
    bar.close()

    # The selected weights are the method's result: back into the engine, then test.
    selection: dict[str, Any] = {
        "step": last,
        "criterion": "last",
        "reason": "no in-run evaluation" if method.trains else "training-free: no step to select",
    }
    if st.selector is not None:
        selection = {**st.selector.summary(), "steps_run": last, "early_stopped": last < steps}
        if st.snapshot is not None and st.snapshot.step != last:
            st.snapshot.restore(engine)
    if cfg.checkpoint.final:
        state = st.checkpoint_state(view_rng, finished=True)
        _save(run, engine, method, save_dir, last, steps, state, selection["step"])
    metrics: dict[str, float] = {}
    ratios: list[float] = []
    if run.test_sets is not None:
        tick = time.time()
        scored = run.score_test(engine.module, run.test_sets, refs.vanilla)
        metrics, ratios = scored.metrics, scored.truth_ratios
        st.timing["test_s"] = time.time() - tick
        log.info(f"{name}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    if req.sequential and not req.is_last:  # the next request starts from these weights
        meta = {"method": method.name, "request": req.index, "fingerprint": run.fingerprint}
        folder = handoff_dir(run.run_dir, req, method.name)
        save_handoff(engine, method, folder, selection["step"], info, meta)
    st.timing["total_s"] = time.time() - t0
    kept = capture_local(engine.module, run.vanilla, method.name) if run.auditor else None
    del engine, model
    gc.collect()
    audit = None
    if run.auditor is not None and kept is not None:  # on the kept partitions, engine freed
        tick = time.time()
        full = run.auditor.audit(kept)
        if run.info.is_main:
            write_audit(full, run.run_dir / "audit" / method.name)
        audit = audit_summary(full)
        st.timing["audit_s"] = time.time() - tick
    return MethodResult(
        name=method.name,
        metrics=metrics,
        losses=st.losses,
        curve=st.curve,
        selection=selection,
        truth_ratios=ratios,
        info={**method.report_info(), **({"mask_overlap": overlap} if overlap else {})},
        timing={k: round(v, 3) for k, v in st.timing.items()},
        resumed={"from_step": resume.step} if resume else None,
        audit=audit,
    )


def _mask_overlap(method: Method, previous: Path | None, info: DistInfo) -> dict | None:
    """A masked method's new mask against the one it stepped on in the previous request."""
    masks = getattr(method, "masks", None)
    if previous is None or masks is None or not mask_file(previous, info.rank).is_file():
        return None
    before, _ = load_mask(previous, info.rank, info.world_size)
    return mask_overlap(masks, before, info.device)


def _stream_curve(
    run: Run, method: str, step: int, val: dict[str, float], selector: Selector
) -> None:
    """One line of `<run>/val_curve.jsonl` per validation (rank 0): what a sweep's pruner, or a
    user with `tail -f`, reads while the run goes on (the report comes only at the end)."""
    if not run.info.is_main:
        return
    line = {"method": method, "step": step, "val": val, "selected": selector.step}
    if selector.targets is not None:
        line["score"] = score_step(val, selector.targets)
        line["best_score"] = selector.best
    run.run_dir.mkdir(parents=True, exist_ok=True)
    with open(run.run_dir / "val_curve.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def _prefixed(method: str, phase: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{method}/{phase}/{k}": v for k, v in values.items() if k != "step"}


def _save(
    run: Run,
    engine: Any,
    method: Method,
    save_dir: Path,
    step: int,
    steps: int,
    rank_state: dict[str, Any],
    selected: int | None = None,
) -> Path:
    """One complete checkpoint of the method at `step` (`selected`: the final one, which holds
    the selected step's weights: its tag says so when that is not `step`)."""
    meta = {"method": method.name, "steps": steps, "fingerprint": run.fingerprint}
    meta.update({"vanilla": run.vanilla, "config": to_dict(run.cfg)})
    tag = None
    if selected is not None:
        meta["selected_step"] = selected
        if selected != step:
            tag = f"step{step}-selected{selected}"
    return checkpoint.save(
        engine, save_dir, step, rank_state, meta, run.info, method, run.cfg.checkpoint.keep, tag
    )


def build_report(run: Run, refs: References, results: dict[str, MethodResult], t0: float):
    """report.json's content (report.py documents the shape)."""
    report: dict[str, Any] = {
        "vanilla": refs.vanilla.metrics if refs.vanilla else {},
        "methods": {name: r.metrics for name, r in results.items()},
        "chance": CHANCE,
        "method_info": {name: r.info for name, r in results.items() if r.info},
        "vanilla_model": run.vanilla,  # the folder or hub id, however it was found
        "world_size": run.info.world_size,
        "elapsed_s": round(time.time() - t0, 2),
    }
    report["test"] = run.test_sets is not None  # eval.test=false: a sweep trial, validation only
    if run.test_sets is not None:
        report["benchmark"] = {
            "name": run.protocol.name,
            "data": run.protocol.path,
            "split": "test",
            "split_rule": run.protocol.split_rule(),
            **run.protocol.facts(run.test_sets, with_original=True),
        }
        if "judge" in report["benchmark"]:
            report["judge"] = report["benchmark"]["judge"]
    if run.utility is not None:
        report["utility"] = utility_facts(run.utility)
    if refs.gold is not None:
        report["gold"] = refs.gold.metrics
        report["gold_model"] = run.gold
        rows = {"vanilla": refs.vanilla, **{n: r.scored() for n, r in results.items()}}
        report["vs_gold"] = versus_gold(rows, refs.gold)
    if run.val_sets is not None:
        report["val"] = {
            name: row.metrics
            for name, row in (("vanilla", refs.vanilla_val), ("gold", refs.gold_val))
            if row is not None
        }
        report["curves"] = {name: r.curve for name, r in results.items()}
    report["selection"] = {name: r.selection for name, r in results.items()}
    report["timing"] = {name: r.timing for name, r in results.items()}
    resumed = {name: r.resumed for name, r in results.items() if r.resumed}
    if resumed:
        report["resumed"] = resumed
    audits = {name: r.audit for name, r in results.items() if r.audit}
    if audits:
        report["audit"] = audits
    return report


def run_request(
    run: Run, methods: list[Method] | None
) -> tuple[References, dict[str, MethodResult]]:
    """One request: its reference rows, then every method from its previous request's weights
    (`methods`: already built; None: fresh ones, so no state leaks from the last request)."""
    cfg, req, log = run.cfg, run.request, get_logger()
    if methods is None:
        methods = [build_method(name, cfg.method) for name in cfg.methods]
    refs = run.progress.references.get(req.index)
    if refs is None:
        refs = score_references(run)
        if cfg.eval.enabled:  # nothing worth keeping otherwise: no progress file
            run.progress.finish_references(refs, req.index)
    results: dict[str, MethodResult] = {}
    for method in methods:
        key = req.key(method.name)
        if key in run.progress.methods:  # finished before an earlier launch stopped
            results[method.name] = run.progress.methods[key]
            log.info(f"{key}: finished in an earlier launch (from {run.progress.path})")
            continue
        previous = None
        if req.index > 1:
            before = dataclasses.replace(req, index=req.index - 1)
            previous = handoff_dir(run.run_dir, before, method.name)
        results[method.name] = unlearn_method(method, run, refs, previous)
        run.progress.finish_method(results[method.name], key)
        if previous is not None:
            drop_weights(previous, run.info)
        if run.preempt.requested(run.info.device):  # signalled during the evaluation
            raise Preempted(
                f"signal {run.preempt.name}: stopped after {req.label(method.name)} finished; "
                "relaunch with resume=auto to continue with the next method"
            )
    return refs, results


def request_summary(run: Run, refs: References, results: dict[str, MethodResult]) -> dict[str, Any]:
    """One request's entry of report.json's `requests`: who was forgotten, each row's test
    metrics, the verdicts against gold (`gold_row`: exact or approximate), the selected steps,
    each method's facts (MANU's pruned neurons) and MMUnlearner's mask overlap with the
    previous request."""
    req = run.request
    out: dict[str, Any] = {
        "index": req.index,
        "people": list(req.people),
        "forgotten": list(req.forgotten),
        "vanilla": refs.vanilla.metrics if refs.vanilla else {},
        "methods": {n: r.metrics for n, r in results.items()},
        "selected_step": {n: r.selection.get("step") for n, r in results.items()},
        "method_info": {n: r.info for n, r in results.items() if r.info},
    }
    if refs.gold is not None:
        out["gold"] = refs.gold.metrics
        out["gold_row"] = "exact" if run.gold_sets is None else "approximate"
        rows = {"vanilla": refs.vanilla, **{n: r.scored() for n, r in results.items()}}
        out["vs_gold"] = versus_gold(rows, refs.gold)
    overlap = {n: r.info["mask_overlap"] for n, r in results.items() if "mask_overlap" in r.info}
    if overlap:
        out["mask_overlap"] = overlap
    return out


def run_unlearn(cfg: UnlearnConfig) -> Path:
    t0 = time.time()
    methods = [build_method(name, cfg.method) for name in cfg.methods]  # fail fast on a typo
    for method in methods:
        if cfg.peft.lora.r > 0 and not method.supports_lora:
            raise ConfigError(
                f"{method.name} changes the model's own weights, not LoRA adapters: "
                "set peft.lora.r=0"
            )
    if cfg.eval.every < 0:
        raise ConfigError(f"eval.every must be >= 0, got {cfg.eval.every}")
    check_request_settings(cfg)
    # Early: under launch/slurm.sbatch the ranks start with USR1/TERM ignored, and a
    # signal that arrives before this is lost (the job script repeats it every 30 s).
    preempt = PreemptionFlag().install()
    watch_parent_from_env()  # a sweep worker's trial dies with its worker
    run = setup(cfg, preempt)
    log = get_logger()
    log.info(
        f"unlearn '{cfg.name}': methods {cfg.methods}, world size {run.info.world_size}, "
        f"ZeRO stage {zero_stage(run.ds)}, benchmark {run.protocol.name}, gold {run.gold}"
    )
    requests = plan_requests(cfg, run.bench)
    # closed however the run ends: a preempted or failed run keeps the curves it logged
    with run.tracker:
        done: list[tuple[Run, References, dict[str, MethodResult]]] = []
        for req in requests:
            if req.sequential:
                log.info(f"request {req.index} of {len(requests)}: forget {list(req.people)}")
            view = for_request(run, req)
            refs, results = run_request(view, methods if req.index == 1 else None)
            done.append((view, refs, results))
        view, refs, results = done[-1]
        report = build_report(view, refs, results, t0)
        if requests[0].sequential:
            report["requests"] = [request_summary(*d) for d in done]
        if run.info.is_main:
            losses = {v.request.key(n): r.losses for v, _, rs in done for n, r in rs.items()}
            write_json_atomic(run.run_dir / "losses.json", losses)
            write_json_atomic(run.run_dir / "config.json", to_dict(cfg))
            path = write_report(run.run_dir, report, title=f"dsunlearn: {cfg.name}")
            run.progress.remove()  # the report now holds everything; a new run may start here
            log.info(f"report: {path} ({report['elapsed_s']:.1f} s)")
    barrier()
    preempt.uninstall()
    return run.run_dir / "report.json"

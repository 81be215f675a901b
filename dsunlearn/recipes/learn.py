"""Learn stage: teach a vanilla model every entity, so that there is something to unlearn.

Trains on the image questions (every training image) and the text questions of ALL entities
until every multiple-choice accuracy (forget/retain VQA, held-out-image VQA, text QA) reaches
`target_acc`, then saves the model and processor to the cache, keyed by data seed and config.

`gold=true` learns the gold model instead, the target of visual unlearning: the same model,
seed and number of steps as the cached vanilla model, on the same data minus every picture of
a forget person (`examples.learn_examples`). It knows the forget people's facts by name and has
never seen their faces; it trains for exactly the vanilla's steps (no accuracy target: its
forget VQA is meant to stay near chance).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dsunlearn.cache import META_FILE, is_complete, vanilla_dir, vanilla_key
from dsunlearn.config import LearnConfig, to_dict
from dsunlearn.data.augment import augment_image
from dsunlearn.data.examples import learn_examples
from dsunlearn.engine.batches import global_batches
from dsunlearn.engine.dist import barrier, get_logger, init_distributed
from dsunlearn.engine.engine import build_train_engine, optimizer_step
from dsunlearn.errors import ConfigError, DsunlearnError
from dsunlearn.eval.evaluate import build_eval_sets, evaluate_suite
from dsunlearn.fsutil import atomic_dir, write_json_atomic
from dsunlearn.models.encode import logits_of, sequence_nll
from dsunlearn.models.loader import (
    enable_activation_checkpointing,
    load_model_and_processor,
    save_model_and_processor,
)
from dsunlearn.recipes.common import (
    deepspeed_config,
    encode_batch,
    full_state_dict,
    is_zero3,
    model_dtype,
    prepare_benchmark,
)

# Accuracy drift allowed when re-running: thread counts change float summation order.
VERIFY_TOL = 0.03
# Another CPU kernel path (AVX2 / AVX-512 / AMX pick different matmul kernels, so the float
# rounding and then the whole trajectory differ): the accuracies still agree, not the losses.
VERIFY_TOL_OTHER_CPU = 0.05


def cpu_path() -> str:
    """The CPU kernel family torch dispatches to here (part of what makes a run bit-exact)."""
    return torch.backends.cpu.get_cpu_capability()


def compare_histories(
    new: list[dict], recorded: list[dict], tol: float, check_loss: bool = True
) -> None:
    """Raise unless every accuracy of `new` is within `tol` of `recorded` at the same step,
    and, with `check_loss`, the mini-batch loss too (only comparable on the same CPU path)."""
    by_step = {h["step"]: h for h in recorded}
    for h in new:
        if h["step"] not in by_step:
            raise DsunlearnError(f"the cached record has no evaluation at step {h['step']}")
        old = by_step[h["step"]]
        for key, value in h.items():
            if key.endswith("_acc") and abs(value - old[key]) > tol:
                raise DsunlearnError(
                    f"learn does not reproduce the cached model: at step {h['step']} "
                    f"{key} = {value:.3f}, recorded {old[key]:.3f} (tolerance {tol})"
                )
        loss_off = "loss" in h and abs(h["loss"] - old["loss"]) > tol * max(1.0, abs(old["loss"]))
        if check_loss and loss_off:
            raise DsunlearnError(
                f"learn does not reproduce the cached model: at step {h['step']} "
                f"loss = {h['loss']:.4f}, recorded {old['loss']:.4f}"
            )


def _vanilla_steps(cfg: LearnConfig) -> int:
    """How many steps the vanilla model that `cfg` (gold) mirrors was trained for."""
    vanilla = vanilla_dir(dataclasses.replace(cfg, gold=False))
    if not is_complete(vanilla):
        raise DsunlearnError(
            f"gold=true trains as long as the vanilla model, and there is none at {vanilla}: "
            "run `dsunlearn learn` with the same settings without gold=true first"
        )
    return int(json.loads((vanilla / META_FILE).read_text())["steps"])


def run_learn(cfg: LearnConfig, force: bool = False, verify_steps: int = 0) -> Path:
    """Learn (or reuse) the vanilla model; returns its cache folder.

    With `verify_steps` > 0, nothing is written: the stage is re-run from scratch for that many
    steps and its evaluation history is compared with the cached model's record, which checks
    that this code still produces the cached (or shipped) model.
    """
    info = init_distributed()
    log = get_logger()
    out_dir = vanilla_dir(cfg)
    if verify_steps:
        if not is_complete(out_dir):
            raise DsunlearnError(f"nothing to verify: no cached model at {out_dir}")
        if verify_steps % cfg.eval_every:
            raise ConfigError(f"--verify {verify_steps} must be a multiple of eval_every")
        recorded = json.loads((out_dir / META_FILE).read_text())
        if "num_threads" in recorded:  # same float summation order as the recorded run
            torch.set_num_threads(recorded["num_threads"])
    elif is_complete(out_dir) and not force:
        log.info(f"{'gold' if cfg.gold else 'vanilla'} model cached: {out_dir}")
        return out_dir
    max_steps = verify_steps or (_vanilla_steps(cfg) if cfg.gold else cfg.optim.steps)
    mirrors = vanilla_key(dataclasses.replace(cfg, gold=False)) if cfg.gold else None

    t0 = time.time()
    bench = prepare_benchmark(cfg.data, info)
    ds = deepspeed_config(cfg.deepspeed, cfg.optim, cfg.model, info)
    zero3 = is_zero3(ds)
    model, processor = load_model_and_processor(
        cfg.model.name, dtype=model_dtype(cfg.model), ds_config=ds, seed=cfg.seed
    )
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    engine = build_train_engine(model, cfg.optim, ds)

    records = bench.forget + bench.retain
    train = learn_examples(bench, gold=cfg.gold)
    stream = global_batches(train, cfg.optim.batch_size, info.rank, info.world_size, cfg.seed)
    sets = build_eval_sets(bench, cfg.eval, cfg.seed, with_probes=False)  # no forgetting yet
    log.info(
        f"learn{' gold' if cfg.gold else ''}: {len(train)} examples, {len(records)} entities, "
        f"world size {info.world_size}, {'' if cfg.gold else 'up to '}{max_steps} steps -> {out_dir}"
    )
    rng = np.random.default_rng([cfg.seed, info.rank])

    def augmented(examples: list) -> list:
        if not cfg.augment:
            return examples
        return [
            dataclasses.replace(e, image=augment_image(e.image, rng)) if e.image else e
            for e in examples
        ]

    history: list[dict] = []
    bar = tqdm(range(1, max_steps + 1), desc="learn", disable=not info.is_main)
    step = 0
    for step in bar:
        batch = encode_batch(processor, augmented(next(stream)), info.device)
        loss = sequence_nll(logits_of(engine, batch), batch["labels"]).mean()
        optimizer_step(engine, loss, f"learn step {step}")
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.eval_every == 0 or step == max_steps:
            metrics = evaluate_suite(
                engine.module, processor, sets, cfg.eval, info, zero3, include_generation=False
            ).metrics
            history.append({"step": step, "loss": loss.item(), **metrics})
            log.info(f"step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
            if min(metrics.values()) >= cfg.target_acc and not (verify_steps or cfg.gold):
                break
    bar.close()
    if verify_steps:
        for new, old in zip(history, recorded["history"], strict=False):
            log.info(f"step {new['step']}: loss {new['loss']:.6f} (recorded {old['loss']:.6f})")
        same_path = recorded.get("cpu_path") == cpu_path()
        if not same_path:
            log.info(
                f"the record was made on CPU path {recorded.get('cpu_path', 'unrecorded')}, this "
                f"machine is {cpu_path()}: the trajectories differ in rounding, so accuracies are "
                f"compared within {VERIFY_TOL_OTHER_CPU} and mini-batch losses are not"
            )
        tol = VERIFY_TOL if same_path else VERIFY_TOL_OTHER_CPU
        compare_histories(history, recorded["history"], tol=tol, check_loss=same_path)
        log.info(f"learn reproduces {out_dir} over its first {verify_steps} steps")
        return out_dir

    final = evaluate_suite(engine.module, processor, sets, cfg.eval, info, zero3).metrics
    reached = min(v for k, v in final.items() if k.endswith("_acc")) >= cfg.target_acc
    state = full_state_dict(engine.module, zero3)
    if info.is_main:
        with atomic_dir(out_dir) as tmp:
            save_model_and_processor(engine.module, processor, tmp, state_dict=state)
            write_json_atomic(
                Path(tmp) / META_FILE,
                {
                    "key": vanilla_key(cfg),
                    "steps": step,
                    "elapsed_s": round(time.time() - t0, 1),
                    "world_size": info.world_size,
                    "num_threads": torch.get_num_threads(),
                    "cpu_path": cpu_path(),
                    "reached_target": reached,
                    **({"gold": True, "mirrors": mirrors} if cfg.gold else {}),
                    "metrics": final,
                    "history": history,
                    "config": to_dict(cfg),
                },
            )
        if cfg.gold:
            log.info(f"learn gold: {step} steps as {mirrors}; saved {out_dir}")
        else:
            msg = "reached" if reached else "did NOT reach"
            log.info(f"learn: {msg} target {cfg.target_acc} after {step} steps; saved {out_dir}")
    barrier()
    return out_dir

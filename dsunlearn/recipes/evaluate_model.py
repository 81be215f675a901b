"""Evaluate one model folder on a benchmark, by that benchmark's own protocol
(`dsunlearn/eval/protocols.py`, `dsunlearn/eval/mllmu_protocol.py`), and write a report in the
standard shape."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dsunlearn.config import DataConfig, EvalConfig, ModelConfig, OptimConfig
from dsunlearn.data.mllmu import load_celebrities
from dsunlearn.engine.dist import DistInfo, barrier, get_logger, init_distributed
from dsunlearn.engine.engine import build_reference_engine
from dsunlearn.eval import mllmu_protocol as M
from dsunlearn.eval import protocols as P
from dsunlearn.eval.evaluate import (
    CHANCE,
    _per_rank,
    build_eval_sets,
    evaluate,
    generate_probe_answers,
)
from dsunlearn.eval.judge import JUDGE_NAME
from dsunlearn.models.loader import load_model_and_processor
from dsunlearn.recipes.common import deepspeed_config, is_zero3, model_dtype, prepare_benchmark
from dsunlearn.report import write_report

MIA_NOTE = (
    f"{P.MIA_KEY}: min-k% (k=20) ROC AUC, members = the forget people's training VQA pairs on "
    "their training images, non-members = the same pairs on their held-out Test_Set images "
    "(never trained on); 0.5 = indistinguishable"
)


def run_eval(
    model_dir: str,
    data: DataConfig,
    eval_cfg: EvalConfig,
    out_dir: str,
    vanilla_dir: str | None = None,
    ds_path: str = "configs/deepspeed/zero3_cpu.json",
    model_cfg: ModelConfig | None = None,
    benchmark: str = "builtin",
) -> Path:
    """Metrics of `model_dir` (and of `vanilla_dir`, if given, for comparison) on `benchmark`
    (one of `protocols.BENCHMARKS`); every rank takes part."""
    P.check_benchmark(benchmark)
    t0 = time.time()
    info = init_distributed()
    log = get_logger()
    model_cfg = model_cfg or ModelConfig(name=model_dir)
    optim = OptimConfig(batch_size=info.world_size)  # inference only: one row per rank
    ds = deepspeed_config(ds_path, optim, model_cfg, info)
    zero3 = is_zero3(ds)

    def engine_of(path: str):
        model, processor = load_model_and_processor(
            path, dtype=model_dtype(model_cfg), ds_config=ds
        )
        return build_reference_engine(model, ds), processor

    run = {
        "builtin": _eval_builtin,
        "mllmu": _eval_mllmu,
        "clear": _eval_clear,
        "mmubench": _eval_mmubench,
    }[benchmark]
    vanilla_metrics, model_metrics, facts = run(
        engine_of, model_dir, vanilla_dir, data, eval_cfg, info, zero3
    )
    facts = {"name": benchmark, "data": str(data.path), **facts}
    name = Path(model_dir).name or model_dir
    if name == "vanilla":  # the report's own row name: keep the evaluated model's row apart
        name = "vanilla (evaluated)"
    report: dict[str, Any] = {
        "vanilla": vanilla_metrics,
        "methods": {name: model_metrics},
        "chance": CHANCE,
        "world_size": info.world_size,
        "elapsed_s": round(time.time() - t0, 2),
        "benchmark": facts,
    }
    if benchmark == "mmubench":
        report["judge"] = JUDGE_NAME
    path = Path(out_dir) / "report.json"
    if info.is_main:
        write_report(out_dir, report, title=f"dsunlearn eval ({benchmark}): {model_dir}")
        log.info(f"report: {path}")
    barrier()
    return path


def _eval_builtin(engine_of, model_dir, vanilla_dir, data, cfg, info: DistInfo, zero3: bool):
    """The built-in suite (the demo's metrics), then min-k% membership inference."""
    bench = prepare_benchmark(data, info)
    sets = build_eval_sets(bench, cfg)
    mia_sets = P.mllmu_mia_sets(bench, cfg)
    # flu is the perplexity on the original model's probe answers: the vanilla's, when given;
    # otherwise the model's own.
    vanilla_metrics: dict[str, float] = {}
    original: list[str] | None = None
    if vanilla_dir:
        engine, processor = engine_of(vanilla_dir)
        original = generate_probe_answers(engine.module, processor, sets, cfg, info, zero3)
        vanilla_metrics = evaluate(
            engine.module, processor, sets, cfg, info, zero3, probe_answers=original
        )
        vanilla_metrics.update(P.mia_mink_auc(engine.module, processor, mia_sets, cfg, info))
        del engine
    engine, processor = engine_of(model_dir)
    metrics = evaluate(engine.module, processor, sets, cfg, info, zero3, original_answers=original)
    metrics.update(P.mia_mink_auc(engine.module, processor, mia_sets, cfg, info))
    facts = {
        "forget_pct": data.forget_pct,
        "mia": _mia_facts(P.MIA_KEY, mia_sets),
        "notes": [MIA_NOTE],
    }
    return vanilla_metrics, metrics, facts


def _eval_mllmu(engine_of, model_dir, vanilla_dir, data, cfg, info: DistInfo, zero3: bool):
    """MLLMU-Bench's protocol (`mllmu_protocol`), then min-k% membership inference."""
    bench = prepare_benchmark(data, info)
    sets = M.build_mllmu_sets(bench, load_celebrities(data.resolved_path()), cfg)
    mia_sets = P.mllmu_mia_sets(bench, cfg)

    def metrics_of(path: str) -> dict[str, float]:
        engine, processor = engine_of(path)
        out = M.evaluate_mllmu(engine.module, processor, sets, cfg, info, zero3)
        out.update(P.mia_mink_auc(engine.module, processor, mia_sets, cfg, info))
        return out

    vanilla_metrics = metrics_of(vanilla_dir) if vanilla_dir else {}
    metrics = metrics_of(model_dir)
    counts = {
        key: len(v) for table in (sets.letter, sets.gen, sets.cloze) for key, v in table.items()
    }
    facts = {
        "forget_pct": data.forget_pct,
        "items": counts,
        "shots": M.SHOTS,
        "mia": _mia_facts(P.MIA_KEY, mia_sets),
        "omitted": sets.omitted,
        "notes": [
            "sets: forget, test (forget people's Test_Set pictures), retain, celebrity "
            "(Retain_Set); kinds: image (picture attached) and text (question names the person)",
            "mc_acc / mc_fewshot_acc: greedy answer to the lettered options, its letter read by "
            f"metrics.parse_choice_letter; few-shot: {M.SHOTS} solved questions of retain people "
            "as text before it; mc_no_letter_rate: answers naming no option",
            "gen: ROUGE-L F1 and sentence BLEU-4 (smoothing 1); cloze: ground truth in the answer",
            MIA_NOTE,
        ],
    }
    return vanilla_metrics, metrics, facts


def _eval_clear(engine_of, model_dir, vanilla_dir, data, cfg, info: DistInfo, zero3: bool):
    """CLEAR: name multiple choice, caption and text-QA ROUGE-L, real faces / real world."""
    sets = P.clear_sets(str(data.path), data.forget_pct, cfg)
    mia_sets = P.clear_mia_sets(str(data.path), data.forget_pct, cfg)
    key = P.CLEAR_MIA_KEY
    vanilla_metrics: dict[str, float] = {}
    if vanilla_dir:
        engine, processor = engine_of(vanilla_dir)
        vanilla_metrics = evaluate(engine.module, processor, sets, cfg, info, zero3)
        vanilla_metrics.update(P.mia_mink_auc(engine.module, processor, mia_sets, cfg, info, key))
        del engine
    engine, processor = engine_of(model_dir)
    metrics = evaluate(engine.module, processor, sets, cfg, info, zero3)
    metrics.update(P.mia_mink_auc(engine.module, processor, mia_sets, cfg, info, key))
    facts = {
        "forget_pct": data.forget_pct,
        "configs": _clear_configs(data.forget_pct),
        "mia": _mia_facts(key, mia_sets),
        "notes": [
            "multiple choice by mean token log-likelihood; name options = the true name and "
            "its perturbed_names (real_faces / real_world: answer and options)",
            f"captions: greedy answer to {P.CAPTION_PROMPT!r}, ROUGE-L F1 against the caption",
            "text QA: the +tofu configs' text rows, ROUGE-L F1",
            f"{key}: min-k% (k=20) ROC AUC, members = each forget picture with its true caption "
            f"(the answer to {P.CAPTION_PROMPT!r}), non-members = the same picture with each of "
            "its perturbed_captions (never trained on, same style and person: CLEAR has no "
            "never-seen pictures of the forget people); 0.5 = the true caption no longer stands "
            "out",
        ],
    }
    return vanilla_metrics, metrics, facts


def _clear_configs(pct: int) -> list[str]:
    from dsunlearn.data import clear

    f, r = clear.forget_config(pct), clear.retain_config(pct)
    tail = ["retain_perturbed", "real_faces", "real_world"]
    return [f, f + "_perturbed", f + "+tofu", r, r + "+tofu", *tail]


def _eval_mmubench(engine_of, model_dir, vanilla_dir, data, cfg, info: DistInfo, zero3: bool):
    """MMUBench: EFF/GEN/DIV/FLU, MIA (ROUGE-L recall), jailbreak leak rate, C-Dis."""
    from dsunlearn.data.mmubench import load_mmubench

    bench = load_mmubench(str(data.path))
    sets = P.mmubench_sets(bench, cfg)
    mia_sets = P.mmubench_mia_sets(bench, cfg)
    key = P.MMU_MIA_KEY
    per_rank = _per_rank(cfg, info)
    vanilla_metrics: dict[str, float] = {}
    original: list[str] | None = None
    original_mia: list[str] | None = None
    ref_lp = None
    ids: dict[str, list[int]] = {}
    if vanilla_dir:
        engine, processor = engine_of(vanilla_dir)
        model = engine.module
        original = generate_probe_answers(model, processor, sets.eval_sets, cfg, info, zero3)
        vanilla_metrics = evaluate(
            model, processor, sets.eval_sets, cfg, info, zero3, probe_answers=original
        )
        answers = P.mmubench_generate(model, processor, sets, cfg, info, zero3)
        original_mia = answers["mia"]
        vanilla_metrics.update(P.jailbreak_metrics(sets, answers["jailbreak"]))
        ids = {c: P.concept_ids(processor.tokenizer, t) for c, t in sets.concept_terms.items()}
        ref_lp = _concept_lp(model, processor, sets, original, ids, per_rank, info)
        vanilla_metrics.update(P.mia_mink_auc(model, processor, mia_sets, cfg, info, key))
        del engine, model
    engine, processor = engine_of(model_dir)
    model = engine.module
    metrics = evaluate(
        model, processor, sets.eval_sets, cfg, info, zero3, original_answers=original
    )
    answers = P.mmubench_generate(model, processor, sets, cfg, info, zero3)
    metrics.update(P.mia_rouge(answers["mia"], original_mia))
    metrics.update(P.jailbreak_metrics(sets, answers["jailbreak"]))
    if ref_lp is not None and original is not None:
        lp = _concept_lp(model, processor, sets, original, ids, per_rank, info)
        metrics["c_dis"] = P.c_dis(ref_lp, lp)
    metrics.update(P.mia_mink_auc(model, processor, mia_sets, cfg, info, key))
    notes = [
        "every concept of the folder is a forget concept; probes, MIA and jailbreak prompts "
        "are asked about its training image (probes also about its test images: gen)",
        "eff/gen: share of probe answers that do not name the concept; div: distinct words; "
        "flu: perplexity on the original model's probe answers, name tokens left out",
        f"jailbreak_*_leak_rate: judge {JUDGE_NAME!r} (name, aliases or the prompt's reveals)",
        f"{key}: min-k% (k=20) ROC AUC, members = each concept's facts (question, answer) asked "
        "about its training image, non-members = the same pairs about its test images (same "
        "text, never-trained pictures); 0.5 = the training image no longer stands out",
    ]
    omitted = {}
    if not vanilla_dir:
        why = "needs --vanilla (the original model)"
        omitted = {"mia_rouge_l_recall": why, "c_dis": why}
        notes.append("flu without --vanilla: on the model's own probe answers")
    if key not in metrics:
        omitted[key] = "needs concepts with facts (question, answer pairs)"
    facts = {
        "concepts": len(sets.concept_terms),
        "judge": JUDGE_NAME,
        "mia": _mia_facts(key, mia_sets),
        "notes": notes,
        "omitted": omitted,
    }
    return vanilla_metrics, metrics, facts


def _mia_facts(key: str, sets: P.MiaSets) -> dict[str, Any]:
    """What the report says about a min-k% membership inference: its key, k and set sizes."""
    return {
        "key": key,
        "k_pct": P.MINK_K,
        "members": len(sets.members),
        "nonmembers": len(sets.nonmembers),
    }


def _concept_lp(model, processor, sets, answers, ids, per_rank, info):
    was_training = model.training
    model.eval()
    try:
        return P.concept_logprobs(model, processor, sets.probes, answers, ids, per_rank, info)
    finally:
        model.train(was_training)

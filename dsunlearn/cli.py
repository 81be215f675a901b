"""`dsunlearn` command line: data build, learn, unlearn, eval, sweep, plan, demo.

Input problems end with one line on stderr (`dsunlearn: error: ...`) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from dsunlearn.errors import DsunlearnError, Preempted


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the env says the same."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(a)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsunlearn", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="benchmark data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser("build", help="write the built-in benchmark of fictitious people")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--entities", type=int, default=20)
    build.add_argument("--forget-pct", type=int, default=10)

    learn = sub.add_parser("learn", help="fine-tune the vanilla model on all entities (cached)")
    learn.add_argument("--config", help="YAML LearnConfig")
    learn.add_argument("--force", action="store_true", help="re-learn even if cached")
    learn.add_argument(
        "--verify",
        type=int,
        default=0,
        metavar="STEPS",
        help="re-run STEPS steps and check they match the cached model's record; writes nothing",
    )
    learn.add_argument("overrides", nargs="*", metavar="key=value")

    un = sub.add_parser("unlearn", help="run unlearning methods and write the report")
    un.add_argument("--config", required=True, help="YAML UnlearnConfig")
    un.add_argument("overrides", nargs="*", metavar="key=value")

    ev = sub.add_parser(
        "eval",
        help="evaluate a model folder on a benchmark, by the benchmark's own protocol",
        description="Score a model on a benchmark with that benchmark's own metrics "
        "(dsunlearn/eval/benchmarks/) and write report.json/md/png. "
        "Every benchmark adds min-k%% membership inference. builtin: the demo's metrics "
        "(multiple choice, ROUGE-L, SIU's eff/gen/flu/div); mllmu: MLLMU-Bench's letter "
        "multiple choice (zero/few-shot), ROUGE-L, BLEU and cloze on the forget, test, retain "
        "and celebrity sets, image and text questions; clear: CLEAR's name multiple choice, "
        "caption and text-QA ROUGE-L, real_faces/real_world; mmubench: eff/gen/div/flu, "
        "jailbreak leak rate (rule judge), MIA ROUGE-L recall and C-Dis (these two need "
        "--vanilla); pope and mmbench (general ability, no forget set): POPE's yes/no "
        "accuracy, precision, recall, F1 and yes-ratio per question file, MMBench's option "
        "accuracy (mmbench_circular=true: CircularEval) per category. With --gold, every row "
        "gets its forget quality (KS test of truth ratios against the gold model's) and its "
        "gap to gold.",
    )
    ev.add_argument(
        "--benchmark",
        default="builtin",
        metavar="NAME",
        help="builtin (default), mllmu, clear, mmubench, pope or mmbench: the layout of --data "
        "and the protocol",
    )
    ev.add_argument("--model", required=True, help="HF model folder")
    ev.add_argument(
        "--data",
        help="benchmark folder, file (mmbench: a TSV) or hub id; or the override path=... "
        "(also written eval.path=...)",
    )
    ev.add_argument(
        "--vanilla",
        help="the original model folder: its row is reported too, and it is the reference "
        "of flu, MMUBench's MIA and C-Dis",
    )
    ev.add_argument(
        "--gold",
        help="the gold model folder (trained without the forget pictures: `dsunlearn learn "
        "gold=true`): its row is reported, and every other row's forget quality and gap to it",
    )
    ev.add_argument(
        "--split",
        default="test",
        choices=["test", "val"],
        help="the benchmark's test split (default) or its validation split",
    )
    ev.add_argument(
        "--forget-pct",
        type=int,
        default=10,
        help="forget split: builtin/mllmu forget_<P>/ (default 10); clear forget01/05/10 "
        "(1, 5 or 10); ignored by mmubench",
    )
    ev.add_argument("--out", default="runs/eval", help="report folder")
    ev.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="EvalConfig overrides (key=value or eval.key=value)",
    )

    au = sub.add_parser(
        "audit",
        help="look for forgotten knowledge that only hides: relearning, quantization, probes, "
        "rephrased images, membership inference",
        description="Apply each attack alike to the audited model, the gold model and the "
        "vanilla model, on any number of ZeRO-3 ranks (run it under the deepspeed launcher), "
        "and write audit.json, audit.md and audit.png: per attack, the three models' figures and "
        "a verdict (removed / hidden / not forgotten; like gold / readable). Overrides: "
        "audit.<key>=value (attacks, relearn_steps, relearn_lr, quant_bits, quant_group, "
        "rephrase, margin, ...) and eval.<key>=value.",
    )
    au.add_argument("--model", required=True, help="the unlearned model folder (or hub id)")
    au.add_argument("--vanilla", required=True, help="the model before unlearning")
    au.add_argument(
        "--gold",
        required=True,
        help="the gold model (`dsunlearn learn gold=true`): never saw the forget pictures",
    )
    au.add_argument("--data", required=True, help="benchmark folder")
    au.add_argument("--benchmark", default="builtin", metavar="NAME", help="builtin or mllmu")
    au.add_argument("--forget-pct", type=int, default=10, help="forget split (default 10)")
    au.add_argument("--out", default="runs/audit", help="folder for audit.json/md/png")
    au.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    au.add_argument(
        "--deepspeed", default="configs/deepspeed/zero3_cpu.json", help="DeepSpeed JSON"
    )
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("overrides", nargs="*", metavar="key=value")

    sal = sub.add_parser("saliency", help="MMUnlearner's weight saliency and mask (per rank)")
    sal.add_argument("--config", help="YAML SaliencyConfig")
    sal.add_argument("overrides", nargs="*", metavar="key=value")

    exp = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face model folder (safetensors + processor + card)",
        description="Gather a ZeRO-3 checkpoint's weights in this one process (host RAM for "
        "about twice the fp32 model) and write a folder that plain transformers loads: "
        "safetensors weights, the processor and a model card (README.md: method, forget set, "
        "metrics). A LoRA run (peft.lora.r > 0) is written as peft's adapter folder on the "
        "model the run started from, unless --merge-lora folds the adapters into a full model.",
    )
    exp.add_argument(
        "--ckpt",
        required=True,
        help="a method's checkpoint folder (<run>/checkpoints/<method>, its latest) or one "
        "of its step<N> folders",
    )
    exp.add_argument("--out", required=True, help="the model folder to write")
    exp.add_argument(
        "--merge-lora",
        action="store_true",
        help="LoRA runs: merge the adapters into the weights and write a full model (without "
        "it: peft's adapter folder, loadable with transformers + peft); no effect otherwise",
    )
    exp.add_argument("--force", action="store_true", help="replace --out if it exists")
    exp.add_argument(
        "--vanilla",
        metavar="DIR",
        help="the model the run started from, if it has moved since (default: as recorded)",
    )
    exp.add_argument(
        "--dtype", choices=["fp32", "bf16"], help="weights' dtype (default: the run's model.dtype)"
    )

    sw = sub.add_parser(
        "sweep",
        help="tune one method with an Optuna study; each trial is a real unlearn run",
        description="Run trials of an Optuna study (multi-objective by default: closeness to "
        "gold on forget against retain utility kept, both on the validation split) until it "
        "has --trials finished trials, then write sweep.json (every trial, the Pareto front, "
        "the chosen trial, its test-split run) and sweep.png. Start the same command in more "
        "processes, nodes or Slurm array tasks (launch/sweep.sbatch) to share the work; a "
        "killed worker's trial is retried, and a restarted sweep continues the study.",
    )
    sw.add_argument("--config", required=True, help="YAML UnlearnConfig of every trial")
    sw.add_argument("--space", required=True, help="search space (configs/sweeps/<method>.yaml)")
    sw.add_argument("--trials", type=int, required=True, help="finished trials the study needs")
    sw.add_argument("--study", help="study name (default: <config name>-<method>)")
    sw.add_argument(
        "--storage",
        help="an Optuna RDB URL (sqlite:///x.db, postgresql://...) or a journal file "
        "(default: <sweep folder>/journal.log)",
    )
    sw.add_argument("--ranks", type=int, default=1, help="ZeRO-3 ranks per trial (default 1)")
    sw.add_argument("--out", help="sweep folder (default: <out_dir>/sweeps/<study>)")
    sw.add_argument(
        "--stale-after",
        type=float,
        default=120.0,
        metavar="S",
        help="a trial whose worker (on another host) wrote no heartbeat for S seconds is "
        "failed and retried (default 120; same-host workers are checked by pid)",
    )
    sw.add_argument("overrides", nargs="*", metavar="key=value")

    pl = sub.add_parser(
        "plan",
        help="per-rank GPU and host memory of an unlearn config on a cluster, and a verdict",
        description="Estimate, from docs/scaling.md's formulas and the exact shape of the "
        "config's model (published configs, built-in tiny models or a local folder's "
        "config.json; nothing is downloaded), each rank's memory by category, with and without "
        "activation checkpointing and offload, and say whether the run fits, needs offload, "
        "needs more nodes or should use LoRA.",
    )
    pl.add_argument("--config", required=True, help="YAML UnlearnConfig (what unlearn takes)")
    pl.add_argument("--nodes", type=int, required=True)
    pl.add_argument("--gpus-per-node", type=int, required=True)
    pl.add_argument("--gpu-mem", type=float, required=True, metavar="GIB", help="per GPU")
    pl.add_argument("--host-mem", type=float, required=True, metavar="GIB", help="per node")
    pl.add_argument(
        "--text-tokens", type=int, default=256, help="text tokens per example (default 256)"
    )
    pl.add_argument(
        "--logits-chunk",
        type=int,
        default=-1,
        metavar="ROWS",
        help="rows per chunk of the fused lm_head + loss ops (default: the kernels' own, "
        "2^24 / vocabulary rows; 0: whole logits)",
    )
    pl.add_argument("overrides", nargs="*", metavar="key=value")

    demo = sub.add_parser("demo", help="end-to-end demo on the built-in benchmark")
    demo.add_argument("--config", help="YAML UnlearnConfig (default configs/demo.yaml)")
    demo.add_argument("--ranks", type=int, default=2, help="ZeRO-3 ranks (default 2)")
    demo.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def run(args: argparse.Namespace) -> None:
    from dsunlearn.config import (
        DataConfig,
        EvalConfig,
        LearnConfig,
        UnlearnConfig,
        apply_overrides,
        from_dict,
        load_config,
    )

    if args.command == "data":
        from dsunlearn.data.builtin import build_benchmark

        out = build_benchmark(
            args.out, seed=args.seed, entities=args.entities, forget_pct=args.forget_pct
        )
        print(f"benchmark written to {out}")
    elif args.command == "learn":
        from dsunlearn.recipes.learn import run_learn

        cfg = load_config(LearnConfig, args.config, args.overrides)
        path = run_learn(cfg, force=args.force, verify_steps=args.verify)
        print(f"vanilla model: {path}" + (" (verified)" if args.verify else ""))
    elif args.command == "unlearn":
        from dsunlearn.recipes.unlearn import run_unlearn

        run_unlearn(load_config(UnlearnConfig, args.config, args.overrides))
    elif args.command == "eval":
        from dsunlearn.errors import ConfigError
        from dsunlearn.recipes.evaluate_model import run_eval

        overrides = [o.removeprefix("eval.") for o in args.overrides]
        eval_cfg = from_dict(EvalConfig, apply_overrides({}, overrides))
        if not args.data and not eval_cfg.path:
            raise ConfigError("dsunlearn eval needs the benchmark's data: --data or path=...")
        data = DataConfig(path=args.data or eval_cfg.path, forget_pct=args.forget_pct)
        run_eval(
            args.model,
            data,
            eval_cfg,
            args.out,
            vanilla_dir=args.vanilla,
            benchmark=args.benchmark,
            gold_dir=args.gold,
            split=args.split,
        )
    elif args.command == "audit":
        from dsunlearn.config import AuditConfig
        from dsunlearn.errors import ConfigError
        from dsunlearn.recipes.audit import run_audit

        raw = apply_overrides({}, args.overrides)
        extra = sorted(set(raw) - {"audit", "eval"})
        if extra:
            raise ConfigError(f"audit overrides are audit.<key> or eval.<key>, not '{extra[0]}'")
        path = run_audit(
            args.model,
            args.vanilla,
            args.gold,
            DataConfig(path=args.data, forget_pct=args.forget_pct),
            from_dict(AuditConfig, raw.get("audit", {}), "audit."),
            args.out,
            eval_cfg=from_dict(EvalConfig, raw.get("eval", {}), "eval."),
            benchmark=args.benchmark,
            ds_path=args.deepspeed,
            dtype=args.dtype,
            seed=args.seed,
        )
        print(f"audit: {path}")
    elif args.command == "saliency":
        from dsunlearn.config import SaliencyConfig
        from dsunlearn.recipes.saliency import run_saliency

        run_saliency(load_config(SaliencyConfig, args.config, args.overrides))
    elif args.command == "export":
        from dsunlearn.recipes.export import run_export

        out = run_export(
            args.ckpt,
            args.out,
            merge_lora=args.merge_lora,
            force=args.force,
            vanilla=args.vanilla,
            dtype=args.dtype,
        )
        print(f"exported to {out}")
    elif args.command == "sweep":
        from dsunlearn.recipes.sweep import run_sweep

        path = run_sweep(
            args.config,
            args.space,
            args.trials,
            args.overrides,
            study_name=args.study,
            storage=args.storage,
            ranks=args.ranks,
            out=args.out,
            stale_after_s=args.stale_after,
        )
        print(f"sweep: {path}")
    elif args.command == "plan":
        from dsunlearn.plan import Cluster, make_plan, render

        cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_mem, args.host_mem)
        cfg = load_config(UnlearnConfig, args.config, args.overrides)
        print(render(make_plan(cfg, cluster, args.text_tokens, args.logits_chunk)))
    elif args.command == "demo":
        from dsunlearn.recipes.demo import run_demo

        run_demo(args.config, args.overrides, args.ranks)


def _leave_process_group() -> None:
    """Destroy the process group if this command joined one (torch is loaded only then)."""
    dist = sys.modules.get("dsunlearn.engine.dist")
    if dist is not None:
        dist.shutdown_distributed()


def main(argv: list[str] | None = None) -> None:
    argv = _strip_launcher_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        run(args)
        _leave_process_group()
    except DsunlearnError as e:
        if isinstance(e, Preempted):
            # Saved and stopping: a repeated warning (job scripts resend it) must not kill the
            # process while Python finalises, which restores the default (fatal) handlers.
            for sig in (signal.SIGUSR1, signal.SIGTERM):  # engine.preempt.SIGNALS
                signal.signal(sig, signal.SIG_IGN)
            _leave_process_group()  # every rank stops at the same agreed step
        if os.environ.get("RANK", "0") == "0":
            print(f"dsunlearn: {e.label}: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


def entry() -> None:
    """The `dsunlearn` command and `python -m dsunlearn`: `main`, then the process exit.

    A process that joined a process group ends through `engine.dist.exit_process`, which skips
    the interpreter's finalisation (gloo threads can abort it after the work is saved). `main`
    itself returns, so that it can run inside another Python process.
    """
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:
        if "dsunlearn.engine.dist" not in sys.modules:
            raise
        traceback.print_exc()
        code = 1
    dist = sys.modules.get("dsunlearn.engine.dist")  # loaded only by commands that join a group
    if dist is not None:
        dist.exit_process(code, leave=False)  # main left the group where every rank agreed
    sys.exit(code)


if __name__ == "__main__":
    entry()

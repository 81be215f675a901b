"""`dsunlearn export`: a checkpoint of 2 ZeRO-3 ranks becomes a folder that plain transformers
loads in a fresh process and that gives the engine's own logits (within 1e-5, fp32).

The engine's logits come from the ranks themselves: this module, run under the real launcher
(`deepspeed --num_gpus 2 --module tests.test_export CKPT OUT ...`), builds the ZeRO-3 engine the
way `unlearn` does, loads the checkpoint into it and saves the logits of a fixed batch (a forget
picture, a retain picture, a text-only question).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, cli_env, main_error, run_cli, run_deepspeed, unlearn_args

TOL = 1e-5

# Run in a fresh process from a folder outside the repo: nothing but torch and transformers
# (+ peft, which transformers uses for an adapter folder) touches the export.
PLAIN_LOAD = """
import json, sys
import torch
from transformers import AutoModelForImageTextToText
folder, saved = sys.argv[1:3]
ref = torch.load(saved)
model = AutoModelForImageTextToText.from_pretrained(folder)
inputs = {k: v for k, v in ref["batch"].items() if k not in ("labels", "token_mask")}
with torch.no_grad():
    logits = model(**inputs).logits.float()
print(json.dumps({
    "max_diff": (logits - ref["logits"]).abs().max().item(),
    "class": type(model).__name__,
    "dtype": str(model.dtype),
    "training": model.training,
    "lora_params": sum(".lora_" in n for n, _ in model.named_parameters()),
    "dsunlearn_imported": any(m.split(".")[0] == "dsunlearn" for m in sys.modules),
}))
"""


def _examples(bench):
    from dsunlearn.data.examples import text_qa_examples, vqa_train_examples

    return [
        vqa_train_examples(bench.forget)[0],
        vqa_train_examples(bench.retain)[0],
        text_qa_examples(bench.retain)[0],
    ]


def _engine_logits(argv: list[str]) -> None:
    """Rank code: for each (checkpoint, output file), the ZeRO-3 engine's logits on the batch."""
    from dsunlearn.config import UnlearnConfig, from_dict
    from dsunlearn.engine import checkpoint
    from dsunlearn.engine.dist import barrier, init_distributed
    from dsunlearn.engine.engine import build_train_engine
    from dsunlearn.models.encode import logits_of
    from dsunlearn.models.loader import load_model_and_processor
    from dsunlearn.models.lora import apply_lora
    from dsunlearn.recipes.common import (
        deepspeed_config,
        encode_batch,
        model_dtype,
        prepare_benchmark,
    )

    info = init_distributed()
    for ckpt, out in zip(argv[::2], argv[1::2], strict=True):
        save_dir, tag = checkpoint.resolve(Path(ckpt))
        meta = checkpoint.read_meta(save_dir / tag)
        cfg = from_dict(UnlearnConfig, meta["config"])
        bench = prepare_benchmark(cfg.data, info)
        ds = deepspeed_config(cfg.deepspeed, cfg.optim, cfg.model, info)
        model, processor = load_model_and_processor(
            meta["vanilla"], dtype=model_dtype(cfg.model), ds_config=ds, seed=cfg.seed
        )
        model = apply_lora(model, cfg.peft.lora, cfg.seed)
        engine = build_train_engine(model, cfg.optim, ds)
        engine.load_checkpoint(str(save_dir), tag=tag)  # as resume=auto does
        engine.eval()
        batch = encode_batch(processor, _examples(bench), info.device)
        with torch.no_grad():
            logits = logits_of(engine.module, batch)
        if info.is_main:
            cpu = {k: v.cpu() for k, v in batch.items()}
            torch.save({"batch": cpu, "logits": logits.cpu()}, out)
        barrier()
        del engine, model
        gc.collect()


def _export(ckpt: Path, out: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(["export", "--ckpt", str(ckpt), "--out", str(out), *extra], cwd)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dsunlearn: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _plain_load(folder: Path, saved: Path, cwd: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(folder), str(saved)],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["class"] == "LlavaForConditionalGeneration"
    assert result["dtype"] == "torch.float32" and not result["training"]
    assert not result["dsunlearn_imported"]
    return result


def _same_encoding(folder: Path, saved: Path, bench_dir: Path) -> None:
    """The exported processor encodes the batch exactly as the run's processor did."""
    from transformers import AutoProcessor

    from dsunlearn.data.mllmu import load_benchmark
    from dsunlearn.models.encode import encode_examples

    ref = torch.load(saved)["batch"]
    ours = encode_examples(
        AutoProcessor.from_pretrained(folder), _examples(load_benchmark(str(bench_dir)))
    )
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# --------------------------------------------------------------------------- 2-rank runs


def _unlearn_args(out: Path, bench: Path, vanilla: Path, name: str, *extra: str) -> list[str]:
    fixed = ["methods=[ga]", "optim.steps=2", "optim.batch_size=4", "eval.enabled=false"]
    return unlearn_args(out, bench, vanilla, *fixed, "checkpoint.final=true", *extra, name=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_bench, random_vanilla) -> dict[str, tuple[Path, Path]]:
    """Two 2-rank GA runs (all weights; LoRA r=4 with a large lr so the adapters move), and the
    engine's logits of each final checkpoint: name -> (checkpoint folder, logits file)."""
    from dsunlearn.engine.dist import free_port

    out = tmp_path_factory.mktemp("export-runs")
    settings = {"plain": [], "lora": ["peft.lora.r=4", "optim.lr=1e-2"]}
    found: dict[str, tuple[Path, Path]] = {}
    for name, extra in settings.items():
        _ok(run_deepspeed(2, _unlearn_args(out, small_bench, random_vanilla, name, *extra), REPO))
        found[name] = (out / name / "checkpoints" / "ga", out / f"{name}_engine_logits.pt")
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += ["--module", "tests.test_export", *(str(p) for pair in found.values() for p in pair)]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=cli_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    _ok(proc)
    return found


@pytest.mark.slow
def test_export_loads_with_plain_transformers_and_gives_the_engines_logits(
    tmp_path, runs, small_bench, random_vanilla, capsys
):
    ckpt, logits = runs["plain"]
    out = tmp_path / "export"
    proc = _export(ckpt, out, cwd=tmp_path)
    _ok(proc)
    assert f"exported to {out}" in proc.stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "processor_config.json"} <= names
    assert not any(n.startswith(".") for n in (p.name for p in tmp_path.iterdir()))  # no temp
    result = _plain_load(out, logits, tmp_path)
    print(f"export (all weights trained): max |logits - engine logits| = {result['max_diff']:.3g}")
    assert result["max_diff"] <= TOL and result["lora_params"] == 0
    _same_encoding(out, logits, small_bench)
    ours, start = _tensors(out), _tensors(random_vanilla)  # GA moved the weights
    assert ours.keys() == start.keys() and any(not torch.equal(ours[k], start[k]) for k in ours)

    card = (out / "README.md").read_text()
    for fact in (
        "| method | ga |",
        "| step | 2 of 2 |",
        f"`{random_vanilla.resolve()}`",
        f"`{(ckpt / 'step2').resolve()}`",
        "| world size | 2 |",
        "| LoRA | none",
        "P006: Hollis Dunvale",  # the one forget person of the 6-person benchmark
        "Not evaluated (the run had eval.enabled=false).",
    ):
        assert fact in card, card
    # The run's own report.json is recognised as this checkpoint's (its config.json has the
    # checkpoint's fingerprint): with eval on, its empty metrics would read "not evaluated".
    from dsunlearn.engine.checkpoint import read_meta
    from dsunlearn.recipes.export import run_config, run_metrics

    meta = read_meta(ckpt / "step2")
    cfg = run_config(meta, ckpt / "step2")
    cfg.eval.enabled = True
    assert run_metrics(ckpt, meta, cfg) == "not evaluated"

    # An existing --out is refused (one line, untouched) unless --force; --force replaces it
    # with the same tensors. (In this process: the fresh-process exit is tested below.)
    before = (out / "model.safetensors").stat().st_mtime_ns
    args = ["export", "--ckpt", str(ckpt), "--out", str(out)]
    assert "exists: pass --force" in main_error(capsys, args)
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    _ok(_export(ckpt, out, "--force", cwd=tmp_path))
    assert (out / "model.safetensors").stat().st_mtime_ns != before
    again = _tensors(out)
    assert again.keys() == ours.keys() and all(torch.equal(again[k], ours[k]) for k in ours)


@pytest.mark.slow
def test_lora_run_merged_loads_with_plain_transformers_and_gives_the_engines_logits(
    tmp_path, runs, small_bench
):
    ckpt, logits = runs["lora"]
    out = tmp_path / "merged"
    _ok(_export(ckpt / "step2", out, "--merge-lora", cwd=tmp_path))  # a tag folder works too
    keys = list(_tensors(out))
    assert keys and not any("lora" in k or "base_model" in k for k in keys)
    assert not (out / "adapter_config.json").exists()
    result = _plain_load(out, logits, tmp_path)
    print(f"export (LoRA r=4, merged): max |logits - engine logits| = {result['max_diff']:.3g}")
    assert result["max_diff"] <= TOL and result["lora_params"] == 0
    _same_encoding(out, logits, small_bench)
    assert "merged into the weights" in (out / "README.md").read_text()


@pytest.mark.slow
def test_lora_run_without_merge_is_an_adapter_folder_on_the_starting_model(
    tmp_path, runs, random_vanilla
):
    """The documented default for LoRA runs: peft's adapter folder, whose base is the run's
    starting model (absolute path); transformers + peft load it and give the engine's logits."""
    ckpt, logits = runs["lora"]
    out = tmp_path / "adapter"
    _ok(_export(ckpt, out, cwd=tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(random_vanilla.resolve())
    assert adapter_cfg["r"] == 4
    lora_b = [v for k, v in _tensors(out).items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # the adapters moved off zero
    result = _plain_load(out, logits, tmp_path)
    print(f"export (LoRA r=4, adapter): max |logits - engine logits| = {result['max_diff']:.3g}")
    assert result["max_diff"] <= TOL and result["lora_params"] > 0
    assert "library_name: peft" in (out / "README.md").read_text()


# --------------------------------------------------------------------------- bad input, 1 line


def _fake_checkpoint(root: Path, meta: dict | str | None, step: int = 1) -> Path:
    """A method's save folder whose `latest` names step<N>, with `meta` as its record."""
    save_dir = root / "run" / "checkpoints" / "ga"
    (save_dir / f"step{step}").mkdir(parents=True)
    (save_dir / "latest").write_text(f"step{step}")
    if meta is not None:
        text = meta if isinstance(meta, str) else json.dumps(meta)
        (save_dir / f"step{step}" / "dsunlearn.json").write_text(text)
    return save_dir


def _meta(vanilla: str, **config) -> dict:
    from dsunlearn.config import UnlearnConfig, apply_overrides, from_dict, to_dict

    cfg = from_dict(UnlearnConfig, apply_overrides(to_dict(UnlearnConfig()), list(config.values())))
    return {
        "method": "ga",
        "steps": 1,
        "step": 1,
        "world_size": 2,
        "fingerprint": "x",
        "vanilla": vanilla,
        "config": to_dict(cfg),
    }


def test_missing_checkpoint_is_one_line_in_a_fresh_process(tmp_path):
    line = _error_line(_export(tmp_path / "nope", tmp_path / "out", cwd=tmp_path))
    assert "does not exist" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "holds no complete checkpoint"),
        ("run_dir", "pass one method's checkpoint folder:"),
        ("no_meta", "has no dsunlearn.json"),
        ("bad_json", "dsunlearn.json is unreadable"),
        ("short_meta", "dsunlearn.json lacks step, steps"),
        ("bad_config", "does not read as this version's UnlearnConfig"),
        ("no_zero_files", "cannot gather the ZeRO-3 weights"),
        ("out_exists", "exists: pass --force"),
        ("out_is_ckpt", "which the export reads"),
        ("lora_on_builtin", "export with --merge-lora"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, random_vanilla, case, message):
    good = _meta(str(random_vanilla))
    out = tmp_path / "out"
    ckpt = {
        "empty": lambda: (tmp_path / "empty").mkdir() or tmp_path / "empty",
        "run_dir": lambda: _fake_checkpoint(tmp_path, good).parent.parent,
        "no_meta": lambda: _fake_checkpoint(tmp_path, None),
        "bad_json": lambda: _fake_checkpoint(tmp_path, '{"method": "ga",'),
        "short_meta": lambda: _fake_checkpoint(tmp_path, {"method": "ga", "vanilla": "v"}),
        "bad_config": lambda: _fake_checkpoint(tmp_path, {**good, "config": {"optim": {"x": 1}}}),
        "no_zero_files": lambda: _fake_checkpoint(tmp_path, good),
        "out_exists": lambda: out.mkdir() or _fake_checkpoint(tmp_path, good),
        "out_is_ckpt": lambda: _fake_checkpoint(tmp_path, good),
        "lora_on_builtin": lambda: _fake_checkpoint(
            tmp_path, _meta("tiny-llava", r="peft.lora.r=4")
        ),
    }[case]()
    if case == "out_is_ckpt":
        out = ckpt.parent  # the run folder: replacing it would delete the checkpoint
    args = ["export", "--ckpt", str(ckpt), "--out", str(out)]
    if case == "out_is_ckpt":
        args.append("--force")
    line = main_error(capsys, args)
    assert message in line
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # no temp folder
    if case != "out_exists":
        assert not (tmp_path / "out").exists()


def test_relative_paths_of_the_run_are_found_from_its_launch_folder(tmp_path, monkeypatch):
    """A run launched with out_dir=runs and a relative data path, exported from elsewhere."""
    from dsunlearn.config import UnlearnConfig
    from dsunlearn.recipes.export import launch_dir, locate

    origin = tmp_path / "launch"
    save_dir = origin / "runs" / "demo" / "checkpoints" / "ga"
    save_dir.mkdir(parents=True)
    (origin / "data" / "b").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = UnlearnConfig(name="demo", out_dir="runs")
    assert launch_dir(Path("../launch/runs/demo/checkpoints/ga"), cfg) == origin
    assert locate("data/b", origin) == str(origin / "data" / "b")
    assert locate("tiny-llava", origin) == "tiny-llava"  # names stay names
    assert locate("/abs/x", origin) == "/abs/x"
    assert launch_dir(save_dir, UnlearnConfig(name="other", out_dir="runs")) is None
    assert launch_dir(save_dir, UnlearnConfig(name="demo", out_dir=str(origin / "runs"))) is None


# --------------------------------------------------------------------------- the model card


def test_card_metrics_come_from_the_same_runs_final_report(tmp_path):
    from dsunlearn.config import UnlearnConfig, to_dict
    from dsunlearn.fsutil import write_json_atomic
    from dsunlearn.recipes.export import model_card, run_metrics
    from dsunlearn.recipes.run_state import fingerprint

    cfg = UnlearnConfig()
    run = tmp_path / "run"
    save_dir = run / "checkpoints" / "ga"
    save_dir.mkdir(parents=True)
    meta = {
        "method": "ga",
        "step": 4,
        "steps": 4,
        "vanilla": "v",
        "fingerprint": fingerprint(cfg, "v"),
    }
    assert run_metrics(save_dir, meta, cfg).startswith("not evaluated (no readable report.json")
    write_json_atomic(run / "config.json", to_dict(cfg))
    write_json_atomic(
        run / "report.json",
        {
            "vanilla": {"forget_vqa_acc": 1.0, "eff": 0.2},
            "methods": {"ga": {"forget_vqa_acc": 0.25, "eff": 0.9}},
        },
    )
    metrics = run_metrics(save_dir, meta, cfg)
    assert metrics == ({"forget_vqa_acc": 1.0, "eff": 0.2}, {"forget_vqa_acc": 0.25, "eff": 0.9})
    facts = {"library": "transformers", "method": "ga", "step": "4 of 4"}
    card = model_card(facts, ("forget_10/ of d", [("P1", "Ann Lee")]), metrics)
    assert "| metric | vanilla | ga |" in card and "| forget_vqa_acc | 1.000 | 0.250 |" in card
    assert "- P1: Ann Lee" in card and "1 entity" in card

    assert "step 3 of 4" in run_metrics(save_dir, {**meta, "step": 3}, cfg)  # not the final model
    other = UnlearnConfig()
    other.optim.lr = 1.0
    write_json_atomic(run / "config.json", to_dict(other))
    assert "another run's" in run_metrics(save_dir, meta, cfg)
    cfg.eval.enabled = False
    assert "eval.enabled=false" in run_metrics(save_dir, meta, cfg)
    card = model_card(dict(facts), ("forget_10/ of d", None), run_metrics(save_dir, meta, cfg))
    assert "Not evaluated (the run had eval.enabled=false)." in card and "not readable" in card


if __name__ == "__main__":  # under the deepspeed launcher, one process per rank
    _engine_logits([a for a in sys.argv[1:] if not a.startswith("--local_rank")])

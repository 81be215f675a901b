"""`eval.utility`: the config keys, `build_utility` (paths or built-in fixtures) and
`score_utility` (oracle answers through the wiring, then a real tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsunlearn.config import DataConfig, EvalConfig, UnlearnConfig, load_config
from dsunlearn.data.utility_fixtures import write_mmbench_fixture, write_pope_fixture
from dsunlearn.engine.dist import DistInfo
from dsunlearn.errors import ConfigError
from dsunlearn.eval import utility as U
from dsunlearn.eval.benchmarks.general import TINY_MODEL_NOTE
from tests.conftest import REPO, main_error, run_cli

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
HEADLINE = {
    "pope_accuracy",
    "pope_precision",
    "pope_recall",
    "pope_f1",
    "pope_yes_ratio",
    "mmbench_accuracy",
    "mmbench_unparsed_rate",
}


def test_config_reads_utility_overrides() -> None:
    cfg = load_config(
        UnlearnConfig,
        None,
        [
            "eval.utility=[pope, mmbench]",
            "eval.utility_paths.pope=/p",
            "eval.mmbench_circular=true",
        ],
    )
    assert cfg.eval.utility == ["pope", "mmbench"] and cfg.eval.utility_paths == {"pope": "/p"}
    assert cfg.eval.mmbench_circular is True
    assert EvalConfig().utility == [] and EvalConfig().utility_paths == {}
    with pytest.raises(ConfigError) as err:
        load_config(UnlearnConfig, None, ["eval.utility=[pope, vqav2]"])
    assert str(err.value) == "eval.utility: unknown benchmark 'vqav2' (known: pope, mmbench)"
    with pytest.raises(ConfigError, match="eval.utility_paths: unknown benchmark 'gqa'"):
        load_config(UnlearnConfig, None, ["eval.utility_paths.gqa=/g"])
    with pytest.raises(ConfigError, match="config key 'eval.utility_paths' must be a mapping"):
        load_config(UnlearnConfig, None, ["eval.utility_paths=/g"])
    with pytest.raises(ConfigError, match="config key 'eval.utility' must be a list"):
        load_config(UnlearnConfig, None, ["eval.utility=pope"])


def test_unknown_name_on_the_command_line_is_one_line(capsys) -> None:
    """`dsunlearn unlearn` in this process (the config is read before any rank starts); the
    same refusal path in a fresh process: tests/test_cli.py's unknown config key."""
    args = ["unlearn", "--config", str(REPO / "configs" / "demo.yaml"), "eval.utility=[nope]"]
    assert main_error(capsys, args) == (
        "dsunlearn: error: eval.utility: unknown benchmark 'nope' (known: pope, mmbench)"
    )


def test_build_utility_none_and_unknown(tmp_path: Path) -> None:
    assert U.build_utility(EvalConfig(), DataConfig(root=str(tmp_path)), 0) is None
    cfg = EvalConfig()
    cfg.utility = ["pope", "nope"]  # set after the config was read: build_utility checks too
    with pytest.raises(ConfigError, match="eval.utility: unknown benchmark 'nope'"):
        U.build_utility(cfg, DataConfig(root=str(tmp_path)), 0)


def _oracle(model, processor, items, cfg, info, zero3):
    """Every answer right: POPE's label, MMBench's right letter ("The answer is B")."""
    return [
        it.reference if it.reference in ("yes", "no") else f"The answer is {it.reference}"
        for it in items
    ]


def test_builtin_fixtures_and_wiring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = DataConfig(root=str(tmp_path / "data"), seed=3)
    cfg = EvalConfig(utility=["pope", "mmbench", "pope"], mmbench_circular=True)
    sets = U.build_utility(cfg, data, seed=0)
    assert sets is not None and sets.names == ["pope", "mmbench"]
    assert sets.builtin == {"pope": True, "mmbench": True}
    for name in ("pope", "mmbench"):
        path = U.fixture_path(name, data)
        assert sets.paths[name] == str(path) and path.exists()
        assert f"utility-{name}-seed3" in str(path)
    stamp = (U.fixture_path("pope", data) / "coco_pope_random.json").stat().st_mtime_ns
    again = U.build_utility(cfg, data, seed=0)  # the fixtures are reused, not rewritten
    assert (U.fixture_path("pope", data) / "coco_pope_random.json").stat().st_mtime_ns == stamp
    assert len(again.sets["pope"].items) == len(sets.sets["pope"].items) == 24

    monkeypatch.setattr(U, "generate", _oracle)
    out = U.score_utility(sets, None, None, CPU, zero3=False)
    assert set(out) == HEADLINE | {"mmbench_circular_accuracy"}
    assert out["pope_accuracy"] == out["pope_f1"] == out["pope_recall"] == 1.0
    assert out["pope_yes_ratio"] == 0.5
    assert out["mmbench_accuracy"] == out["mmbench_circular_accuracy"] == 1.0
    assert out["mmbench_unparsed_rate"] == 0.0
    monkeypatch.setattr(U, "generate", lambda m, p, items, *a: ["not"] * len(items))
    out = U.score_utility(sets, None, None, CPU, zero3=False, detail=True)
    assert out["pope_accuracy"] == 0.5 and out["pope_yes_ratio"] == 0.0
    assert (
        out["pope_adversarial_yes_ratio"] == 0.0
        and "mmbench_category_attribute_recognition_accuracy" in out
    )
    assert out["mmbench_circular_accuracy"] == 0.0 and out["mmbench_unparsed_rate"] == 1.0

    facts = U.utility_facts(sets)
    assert facts["note"] == U.utility_note() and "mean little" in U.utility_note()
    assert facts["pope"]["builtin_fixture"] is True and facts["pope"]["chance"] == 0.5
    assert TINY_MODEL_NOTE not in facts["pope"]["notes"]  # said once, in `note`
    assert facts["mmbench"]["circular"] is True
    assert U.utility_facts(None) == {}


def test_score_utility_on_a_tiny_model(tmp_path: Path) -> None:
    """Given paths, capped: real greedy generation through the tiny model's processor."""
    from dsunlearn.models import load_model_and_processor

    pope = write_pope_fixture(tmp_path / "pope", questions_per_file=6, images=2)
    tsv = write_mmbench_fixture(tmp_path / "mm" / "dev.tsv", questions=5)
    cfg = EvalConfig(
        utility=["mmbench", "pope"],
        utility_paths={"pope": str(pope), "mmbench": str(tsv.parent)},
        max_items=4,
        gen_max_new_tokens=3,
    )
    sets = U.build_utility(cfg, DataConfig(root=str(tmp_path / "unused")), seed=1)
    assert not (tmp_path / "unused").exists()  # nothing built-in was written
    assert sets.builtin == {"mmbench": False, "pope": False}
    assert len(sets.sets["pope"].items) == 12 and len(sets.sets["mmbench"].items) == 4
    model, processor = load_model_and_processor("tiny-llava", seed=0)
    out = U.score_utility(sets, model, processor, CPU, zero3=False)
    assert set(out) == HEADLINE
    assert all(0.0 <= v <= 1.0 for v in out.values()), out
    assert model.training  # scoring left the model's mode as it was


@pytest.mark.slow
def test_two_zero3_ranks_give_the_one_process_answers(tmp_path: Path, random_vanilla: Path) -> None:
    """tests/ranks/utility.py on 2 ZeRO-3 ranks (rank 0 writes the built-in fixtures, rank 1
    waits): every greedy answer, gathered in item order, and every metric equal one process's
    on the plain model."""
    import json
    import subprocess
    import sys

    from dsunlearn.engine.dist import free_port
    from dsunlearn.models import load_model_and_processor
    from dsunlearn.recipes.demo import launch_env
    from tests.ranks.utility import EVAL

    out, root = tmp_path / "ranks.json", tmp_path / "data"
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += ["tests/ranks/utility.py", str(random_vanilla), str(root), str(out)]
    env = launch_env(2) | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["world_size"] == 2 and two["zero3"] is True

    sets = U.build_utility(EVAL, DataConfig(root=str(root)), seed=0)  # the fixtures rank 0 wrote
    assert sets.builtin == {"pope": True, "mmbench": True}
    model, processor = load_model_and_processor(str(random_vanilla))
    for name in sets.names:
        one = U.generate(model, processor, sets.sets[name].items, EVAL, CPU, False)
        assert two["answers"][name] == one, name
    assert len(two["answers"]["pope"]) == 12 and len(two["answers"]["mmbench"]) > 4
    metrics = U.score_utility(sets, model, processor, CPU, zero3=False, detail=True)
    assert two["metrics"] == pytest.approx(metrics)


def test_unlearn_report_adds_utility(tmp_path: Path, small_bench: Path, random_vanilla) -> None:
    """`unlearn eval.utility=[pope]`: every row of the report gets the pope_* metrics, the
    vanilla row the ones `score_utility` gives the same model here, and the report says what
    they mean."""
    import json

    from dsunlearn.models.loader import load_model_and_processor
    from tests.conftest import unlearn_args

    extra = [
        "methods=[ga]",
        "optim.steps=1",
        "eval.every=0",
        "eval.max_items=4",
        "eval.utility=[pope]",
        f"data.root={tmp_path / 'root'}",
        "gold=none",
        "report_to=[]",
    ]
    proc = run_cli(unlearn_args(tmp_path, small_bench, random_vanilla, *extra, name="u"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "u" / "report.json").read_text())
    pope = {k for k in HEADLINE if k.startswith("pope_")}
    assert pope <= set(report["vanilla"]) and pope <= set(report["methods"]["ga"])
    assert "vqa_acc" in " ".join(report["methods"]["ga"])  # the test split is still there
    facts = report["utility"]["pope"]
    assert facts["builtin_fixture"] and facts["data"] == str(
        U.fixture_path("pope", _data(tmp_path))
    )
    assert TINY_MODEL_NOTE in (tmp_path / "u" / "report.md").read_text()

    cfg = load_config(UnlearnConfig, REPO / "configs" / "demo.yaml", extra)
    sets = U.build_utility(cfg.eval, cfg.data, cfg.seed)
    model, processor = load_model_and_processor(str(random_vanilla))
    expected = U.score_utility(sets, model.eval(), processor, CPU, zero3=False)
    assert {k: report["vanilla"][k] for k in expected} == pytest.approx(expected, abs=1e-9)


def _data(tmp_path: Path) -> DataConfig:
    return DataConfig(root=str(tmp_path / "root"))

"""MANU: the neurons it finds, its statistics, its choice, its pruning (1 process); 1 vs 2 ZeRO-3
ranks prune the same neurons and zero exactly their rows (1 rank: a plain `python -m dsunlearn`
process; 2 ranks: through the deepspeed launcher)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dsunlearn.config import MethodConfig
from dsunlearn.data.examples import text_qa_examples, vqa_train_examples
from dsunlearn.data.mllmu import load_benchmark
from dsunlearn.engine.dist import DistInfo
from dsunlearn.errors import ConfigError
from dsunlearn.methods import build_method
from dsunlearn.methods.base import RunContext
from dsunlearn.models import load_model_and_processor
from dsunlearn.saliency.neurons import (
    NeuronSite,
    NeuronStats,
    forget_scores,
    neuron_sites,
    prune,
    top_neurons,
)
from tests.conftest import REPO, run_cli, run_deepspeed, unlearn_args

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_processor("tiny-llava", seed=0)


def test_sites_are_each_towers_mlps_and_not_the_projector(tiny):
    model, _ = tiny
    sites = neuron_sites(model)
    vision = [s for s in sites if s.part == "vision"]
    language = [s for s in sites if s.part == "language"]
    assert len(language) == model.config.text_config.num_hidden_layers
    assert len(vision) == model.config.vision_config.num_hidden_layers
    assert all(s.name.startswith("model.vision_tower.") for s in vision)
    assert all(len(s.inputs) == 1 and s.reader.in_features == s.width for s in vision)  # fc1 / fc2
    assert all(len(s.inputs) == 2 for s in language)  # gate_proj, up_proj / down_proj
    assert not any("projector" in s.name for s in sites)


def test_statistics_are_the_four_functions_over_real_tokens():
    fc1, fc2 = torch.nn.Linear(2, 3), torch.nn.Linear(3, 2)
    site = NeuronSite("m", "language", (fc1,), fc2)
    stats = NeuronStats([site], threshold=0.1, device="cpu")
    a = torch.tensor([[[1.0, 0.0, -2.0], [3.0, 0.05, 2.0], [9.0, 9.0, 9.0]]])  # 3rd: padding
    stats.token_mask = torch.tensor([[1, 1, 0]])
    with stats.recording():
        fc2(a)
        stats.enabled = False
        fc2(a)  # a keep-in-step forward: not counted
    imp = stats.importance()["m"]
    real = a[0, :2].double()
    torch.testing.assert_close(imp["abs"], real.abs().mean(0))
    torch.testing.assert_close(imp["freq"], torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(imp["var"], real.std(0, unbiased=False))
    torch.testing.assert_close(imp["rms"], real.pow(2).mean(0).sqrt())


def test_scores_and_the_top_share_across_sites():
    def t(*v):
        return torch.tensor(v, dtype=torch.float64)

    f = {"a": {"abs": t(1.0, 4.0, 1.0, 1.0)}, "b": {"abs": t(2.0, 1.0)}}
    r = {"a": {"abs": t(1.0, 1.0, 1.0, 1.0)}, "b": {"abs": t(1.0, 1.0)}}
    s = forget_scores(f, r, {"abs": 2.0}, eps=0.0)
    torch.testing.assert_close(s["a"], t(0.0, 6.0, 0.0, 0.0))
    torch.testing.assert_close(s["b"], t(2.0, 0.0))
    picked = top_neurons(s, share=2 / 6)  # 2 of 6 neurons: a[1] (6) then b[0] (2)
    assert picked["a"].tolist() == [1] and picked["b"].tolist() == [0]
    tie = top_neurons({"a": torch.zeros(3), "b": torch.zeros(3)}, share=2 / 6)
    assert tie["a"].tolist() == [0, 1] and tie["b"].tolist() == []  # ties: site order, index


def test_a_pruned_neuron_is_silent_on_every_input(tiny):
    model, _ = tiny
    model = copy.deepcopy(model)
    sites = neuron_sites(model)
    picked = {sites[0].name: torch.tensor([0, 5]), sites[-1].name: torch.tensor([3])}
    assert prune(sites, picked, rank=0) == 3
    for site in (sites[0], sites[-1]):
        x = torch.randn(7, site.inputs[0].in_features)
        seen: list[torch.Tensor] = []
        h = site.reader.register_forward_pre_hook(lambda _m, args, out=seen: out.append(args[0]))
        mlp = model.get_submodule(site.name)
        mlp(x)
        h.remove()
        ids = picked[site.name]
        assert torch.count_nonzero(seen[0][:, ids]) == 0
        others = torch.ones(site.width, dtype=torch.bool)
        others[ids] = False
        assert torch.count_nonzero(seen[0][:, others]) > 0


def test_attach_prunes_the_most_forget_specific_neurons(tiny, small_bench, tmp_path):
    """MANU's objective is the forget-specificity of the neurons that still fire: after
    `attach`, the pruned neurons' activations on forget data are 0, so their score drops to
    the floor (-sum of weights) and the picked set's total falls."""
    model, processor = tiny
    model = copy.deepcopy(model)
    bench = load_benchmark(str(small_bench))
    method = build_method("manu", MethodConfig(manu_prune_pct=5.0, manu_max_examples=16))
    ctx = RunContext(bench, processor, CPU, tmp_path)
    sites = neuron_sites(model)
    data = {
        "vision": (vqa_train_examples(bench.forget), vqa_train_examples(bench.retain)),
        "language": (text_qa_examples(bench.forget), text_qa_examples(bench.retain)),
    }
    weights = {"abs": 2.0, "freq": 0.0, "var": 2.0, "rms": 2.0}

    def scores(modality):
        part = [s for s in sites if s.part == modality]
        f = method._statistics(model, ctx, data[modality][0], part)
        r = method._statistics(model, ctx, data[modality][1], part)
        return forget_scores(f, r, weights)

    before = {m: scores(m) for m in ("vision", "language")}
    method.attach(model, ctx)
    info = method.report_info()["modalities"]
    for modality in ("vision", "language"):
        ids = info[modality]["pruned_ids"]
        total = sum(s.width for s in sites if s.part == modality)
        assert info[modality]["pruned"] == sum(map(len, ids.values())) == round(0.05 * total)
        want = top_neurons(before[modality], 0.05)
        assert ids == {k: v.tolist() for k, v in want.items() if len(v)}
        after = scores(modality)
        for name, picked in ids.items():
            torch.testing.assert_close(
                after[name][picked], torch.full((len(picked),), -6.0, dtype=torch.float64)
            )
        gained = sum(before[modality][n][p].sum() - after[n][p].sum() for n, p in ids.items())
        assert gained > 0


def test_bad_settings_are_one_line():
    for cfg, message in (
        (MethodConfig(manu_prune_pct=0), "manu_prune_pct"),
        (MethodConfig(manu_modalities=["audio"]), "manu_modalities"),
        (MethodConfig(manu_weights=[1.0, 2.0]), "manu_weights"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_method("manu", cfg)


def _manu_run(ranks, tmp_path, bench, vanilla) -> dict:
    args = unlearn_args(
        tmp_path,
        bench,
        vanilla,
        "methods=[manu]",
        "method.manu_max_examples=24",
        "eval.enabled=false",
        "checkpoint.final=true",
        name=f"w{ranks}",
    )
    proc = run_cli(args, cwd=REPO) if ranks == 1 else run_deepspeed(ranks, args, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / f"w{ranks}" / "report.json").read_text())
    assert report["world_size"] == ranks
    return report


@pytest.mark.slow
def test_one_and_two_ranks_prune_the_same_neurons_and_zero_their_rows(
    tmp_path, small_bench, random_vanilla
):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    one = _manu_run(1, tmp_path, small_bench, random_vanilla)["method_info"]["manu"]
    two = _manu_run(2, tmp_path, small_bench, random_vanilla)["method_info"]["manu"]
    assert one == two
    state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "w2" / "checkpoints" / "manu"))
    vanilla, _ = load_model_and_processor(str(random_vanilla))
    sites = {s.name: s for s in neuron_sites(vanilla)}
    for modality in ("vision", "language"):
        for name, ids in two["modalities"][modality]["pruned_ids"].items():
            for first in ("gate_proj", "up_proj") if modality == "language" else ("fc1",):
                w = state[f"{name}.{first}.weight"]
                assert torch.count_nonzero(w[ids]) == 0
                kept = torch.ones(w.shape[0], dtype=torch.bool)
                kept[ids] = False
                orig = sites[name].inputs[0 if first != "up_proj" else 1].weight
                torch.testing.assert_close(w[kept], orig[kept].detach())

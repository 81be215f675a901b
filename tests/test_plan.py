"""`dsunlearn plan`, the published model configs and the experiment configs (no launches).

The plan's arithmetic is checked against docs/scaling.md's formulas on hand-computed numbers,
the published configs against the parameter counts their model cards state, and every
experiment config is loaded (no unknown key) and planned on one node of 8 x 80 GB GPUs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsunlearn.cli import main
from dsunlearn.config import UnlearnConfig, load_config
from dsunlearn.errors import ModelError
from dsunlearn.models.published import (
    PUBLISHED,
    ImageTokens,
    ModelShape,
    cut_depth,
    cut_shape,
    model_shape,
    param_counts,
    published_config,
)
from dsunlearn.plan import (
    CHUNK_ELEMS,
    GIB,
    REFERENCE_FORWARD,
    Cluster,
    Workload,
    make_plan,
    plan_categories,
    plan_dict,
)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*/*.yaml"))
METHODS = ("ga", "graddiff", "kl_min", "npo", "siu", "mmunlearner")

# Exact meta-device counts; the model cards round them to 7.06B, 7.06B, 8.29B and 8.46B.
KNOWN_COUNTS = {
    "llava-1.5-7b": 7_063_427_072,
    "llava-next-7b": 7_063_431_168,
    "qwen2-vl-7b": 8_291_375_616,
    "idefics3-8b": 8_462_086_384,
}


def test_experiment_configs_load():
    """24 files, one per benchmark x model x method, each loading with no unknown key."""
    assert len(EXPERIMENTS) == 24
    seen = set()
    for path in EXPERIMENTS:
        cfg = load_config(UnlearnConfig, path, [])
        bench, stem = path.parent.name, path.stem
        model, method = stem.rsplit("-", 1)
        assert cfg.methods == [method] and cfg.eval.benchmark == bench
        # the training data's layout: CLEAR's forgetXX/retainXX, or MLLMU-Bench's (the default)
        assert cfg.data.benchmark == bench and cfg.data.path
        assert cfg.model.dtype == "bf16" and cfg.model.gradient_checkpointing
        assert cfg.deepspeed == "configs/deepspeed/zero3_bf16.json"
        assert model_shape(cfg.model.name).name == cfg.model.name  # a published name
        seen.add((bench, model, method))
    models = ("llava-1.5-7b", "qwen2-vl-7b")
    assert seen == {(b, m, x) for b in ("mllmu", "clear") for m in models for x in METHODS}


def test_published_parameter_counts():
    for spec in PUBLISHED:
        counts = param_counts(published_config(spec.short))
        assert counts["total"] == KNOWN_COUNTS[spec.short], spec.short
        assert round(counts["total"] / 1e9, 2) == spec.card_params / 1e9
        assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
        assert min(counts[p] for p in ("vision", "projector", "language", "lm_head")) > 0
    qwen = model_shape("Qwen/Qwen2-VL-7B-Instruct")
    assert (qwen.hidden, qwen.layers, qwen.heads, qwen.kv_heads, qwen.vocab) == (
        3584,
        28,
        28,
        4,
        152064,
    )
    assert (qwen.image.vision, qwen.image.text) == (1024, 256)  # 448/14 = 32 -> 32^2 -> 16^2
    assert published_config("qwen2-vl-7b").text_config.rope_parameters["mrope_section"] == [
        16,
        24,
        24,
    ]
    assert model_shape("llava-1.5-7b").image.text == 576


def test_cut_depth_keeps_every_width():
    full, cut = published_config("qwen2-vl-7b"), cut_depth("qwen2-vl-7b", 2, 3)
    assert (cut.text_config.num_hidden_layers, cut.vision_config.depth) == (2, 3)
    assert cut.text_config.hidden_size == full.text_config.hidden_size
    counts = param_counts(cut)
    full_counts = param_counts(full)
    assert counts["embeddings"] == full_counts["embeddings"]
    per_layer = (full_counts["language"] - counts["language"]) / (28 - 2)
    assert per_layer == int(per_layer)  # the decoder shrank by whole layers
    shape = cut_shape("qwen2-vl-7b", 2, 3)
    assert shape.counts == counts and (shape.layers, shape.vision_layers) == (2, 3)


def test_model_shape_of_a_local_folder(tmp_path):
    """A saved config.json is read (no download); its counts are the meta instantiation's."""
    cut = cut_depth("llava-1.5-7b", 2, 2)
    cut.save_pretrained(tmp_path / "llava")
    shape = model_shape(str(tmp_path / "llava"))
    assert shape.counts == param_counts(cut) and shape.layers == 2 and shape.image.text == 576
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        model_shape(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="never downloads"):
        model_shape("nobody/unknown-vlm")


def _hand_shape(psi_tensors: tuple[int, ...]) -> ModelShape:
    """scaling.md section 4's 7B decoder, (h, L, V) = (4096, 32, 32000), no vision tower."""
    return ModelShape(
        name="hand",
        source="test",
        family="LLaVA-1.5",
        numels={
            "vision": (),
            "projector": (),
            "language": psi_tensors,
            "embeddings": (),
            "lm_head": (),
        },
        hidden=4096,
        layers=32,
        heads=32,
        kv_heads=32,
        intermediate=11008,
        vocab=32000,
        vision_hidden=1024,
        vision_layers=0,
        image=ImageTokens(0, 0, "none"),
        language_linears=(),
    )


def test_plan_matches_scaling_doc():
    """Section 5's 7B row and section 4's 7B activations, by hand (b = 1, s = 2048, bf16)."""
    psi = 7 * 10**9
    tensors = (10**9,) * 7  # W = 8 divides each: no padding, no persistent tensor
    wl = Workload(
        shape=_hand_shape(tensors),
        method="npo",
        dtype_bytes=2,
        trainable=list(tensors),
        frozen=[],
        micro_batch=8,  # 1 per rank on 8
        text_tokens=2048,
        images=1,
        chunk_rows=0,
        reference_forward=True,
    )
    w = 8
    c = plan_categories(wl, w, checkpointing=True)
    assert c["params"] == 2 * psi / w and c["grads"] == 2 * psi / w
    assert c["optimizer"] == 12 * psi / w and c["reference"] == 2 * psi / w
    assert round((c["params"] + c["grads"] + c["optimizer"]) / GIB, 2) == 13.04  # 16 psi / W
    assert round((c["params"] + c["grads"] + c["optimizer"] + c["reference"]) / GIB, 2) == 14.67
    assert c["fixed"] == 2 * (5e8 + 1e9 + 5e7) and round(c["fixed"] / GIB, 2) == 2.89
    checkpoints, layer = 2 * 2048 * 4096 * 32, 34 * 2048 * 4096
    assert c["activations"] == checkpoints + layer  # 0.50 + 0.27 GiB
    assert (round(checkpoints / GIB, 2), round(layer / GIB, 2)) == (0.5, 0.27)
    assert c["logits"] == 16 * 2048 * 32000 and round(c["logits"] / GIB, 2) == 0.98
    total = 16 * psi / w + 2 * psi / w + c["fixed"] + c["activations"] + c["logits"]
    assert c["total"] == total and c["persistent"] == 0 and c["host"] == 0
    assert plan_categories(wl, w, False)["activations"] == 34 * 2048 * 4096 * 32
    off = plan_categories(wl, w, True, "optimizer")
    assert off["grads"] == off["optimizer"] == 0 and off["params"] == 2 * psi / w
    assert round(off["host"] * 8 / GIB, 1) == 117.3  # 8 x 18 psi / W per node
    both = plan_categories(wl, w, True, "optimizer+param")
    assert both["params"] == both["reference"] == 0
    assert round(both["host"] * 8 / GIB, 1) == 143.4  # 8 x 22 psi / W (reference offloaded)
    # Chunked: (8 + 6) x c x V + the gathered heads (2 x 2 V h) + dL/dh + the bf16 head gradient
    chunked = plan_categories(Workload(**{**wl.__dict__, "chunk_rows": 512}), w, True)
    v, h = 32000, 4096
    assert chunked["logits"] == 14 * 512 * v + 2 * 2 * v * h + 2 * 2048 * h + 2 * v * h


def test_saliency_and_mask_terms():
    """MMUnlearner: 12 B/param of fp32 scores in its pass (a phase of its own), 1.125 B of mask."""
    tensors = (8 * 10**8,) * 2
    wl = Workload(
        shape=_hand_shape(tensors),
        method="mmunlearner",
        dtype_bytes=2,
        trainable=list(tensors),
        frozen=[],
        micro_batch=8,
        text_tokens=64,
        images=1,
        chunk_rows=0,
        reference_forward=False,
        saliency=True,
        saliency_batch=1,
        mask=True,
    )
    c = plan_categories(wl, 8, True)
    psi_w = 2 * 10**8
    assert c["saliency"] == 12 * psi_w and c["mask"] == 1.125 * psi_w
    states = 18 * psi_w
    assert c["total"] == states + c["fixed"] + 13 * psi_w  # the mask build is the peak here


def test_plan_tables_agree_with_sources():
    """The reference-forward table is the methods' `uses_reference`; the default chunk is the
    kernels' (read as text: importing them costs seconds)."""
    for method, ref in REFERENCE_FORWARD.items():
        src = (ROOT / "dsunlearn" / "methods" / f"{method}.py").read_text()
        assert ("uses_reference = True" in src) == ref, method
    kernel = (ROOT / "kernels" / "chunked_head.py").read_text()
    assert re.search(r"^CHUNK_ELEMS = 2\*\*24\b", kernel, re.M) and CHUNK_ELEMS == 2**24


def test_every_experiment_fits_one_node(capsys):
    cluster = Cluster(1, 8, 80.0, 1000.0)
    for path in EXPERIMENTS:
        plan = make_plan(load_config(UnlearnConfig, path, []), cluster)
        verdict, advice = plan.verdict()
        assert verdict == "fits" and not advice, (path, verdict, advice)
    table = plan_dict(plan)  # the last one: every method x checkpointing x offload, in GiB
    assert table["verdict"] == "fits" and set(table["methods"]) == set(plan.cfg.methods)
    assert len(next(iter(table["methods"].values()))) == 6
    main(["plan", "--config", str(EXPERIMENTS[-1]), "--nodes", "1", "--gpus-per-node", "8",
          "--gpu-mem", "80", "--host-mem", "1000"])  # fmt: skip
    out = capsys.readouterr().out
    assert "verdict: fits" in out and "saliency buffers" in out and "GPU peak per rank" in out


def test_plan_verdicts_when_it_does_not_fit():
    cfg = load_config(
        UnlearnConfig, ROOT / "configs/experiments/mllmu/qwen2-vl-7b-mmunlearner.yaml"
    )
    assert make_plan(cfg, Cluster(1, 8, 24, 500)).verdict()[0] == "needs optimizer offload"
    verdict, advice = make_plan(cfg, Cluster(1, 8, 16, 100)).verdict()
    assert verdict == "needs 4 nodes" and any("split over 32 ranks" in a for a in advice)
    assert make_plan(cfg, Cluster(1, 2, 80, 64)).batch_problems(2) == []
    assert make_plan(cfg, Cluster(1, 3, 80, 64)).batch_problems(3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "/no/such.yaml"], "config file not found"),
        (
            ["--config", "{cfg}", "model.name=nobody/unknown-vlm"],
            "unknown model 'nobody/unknown-vlm'",
        ),
        (["--config", "{cfg}", "--gpu-mem", "-80"], "--gpu-mem must be a positive number"),
        (["--config", "{cfg}", "--gpu-mem", "nan"], "--gpu-mem must be a positive number"),
        (["--config", "{cfg}", "--nodes", "0"], "--nodes and --gpus-per-node must be at least 1"),
    ],
)
def test_plan_bad_input(args, message, capsys):
    cfg = str(EXPERIMENTS[0])
    argv = ["plan", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem", "80", "--host-mem", "64"]
    argv += [a.format(cfg=cfg) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsunlearn: error:") and message in err[0], err


REAL_SHAPES = (
    Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "real_shapes_cpu.json"
)
STATE_KEYS = {"params": "param_bytes", "grads": "grad_bytes", "optimizer": "optim_bytes"}


def test_plan_matches_the_measured_real_shape_runs():
    """`benchmarks/real_shapes.py` measured each published architecture (cut in depth) on 2
    ZeRO-3 ranks: the plan's model-state categories must be within 10% of the bytes each rank
    held, for the plan as it is now (the recorded JSON against the current formulas)."""
    import json

    from benchmarks.real_shapes import plan_for

    data = json.loads(REAL_SHAPES.read_text())
    measured_models = [n for n, r in data["models"].items() if "ranks" in r.get("main", {})]
    assert measured_models, "no model measured in " + str(REAL_SHAPES)
    for name in measured_models:
        ranks = data["models"][name]["main"]["ranks"]
        plan = plan_for(name, ranks[0], data["text_layers"], data["vision_layers"])["plain"]
        for rank in ranks:
            got = {k: rank["model_states"][v] for k, v in STATE_KEYS.items()}
            got["reference"] = rank["reference_bytes"]
            for key, value in got.items():
                assert value == pytest.approx(plan[key], rel=0.10), (name, rank["rank"], key)

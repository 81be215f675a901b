"""Saliency recipe: score every weight of the vanilla model, build the mask, save it per rank.

Read top to bottom:
  1. the vanilla model in a ZeRO-3 engine (no optimizer step is ever taken);
  2. F_forget over the forget VQA; F_preserve over the retain VQA (every module) plus the text
     QA of all entities (language model only), as MMUnlearner does; one unit = one global batch
     cut into `micro_batches` micro-batches, so the scores do not depend on the world size;
  3. the mask (`ratio` or `topk`, module filter), each rank on its own partition;
  4. `<out>/mask_rank<R>.pt` (bit-packed, with mode, threshold and world size) and, on rank 0,
     `<out>/summary.json` with the share selected per parameter, module group and layer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsunlearn.config import OptimConfig, SaliencyConfig
from dsunlearn.data.examples import text_qa_examples, vqa_train_examples
from dsunlearn.engine.batches import to_device
from dsunlearn.engine.dist import all_reduce_sum, barrier, get_logger, init_distributed
from dsunlearn.engine.engine import build_train_engine
from dsunlearn.errors import ConfigError, DataError
from dsunlearn.fsutil import atomic_path, write_json_atomic
from dsunlearn.methods.base import example_ce
from dsunlearn.models.encode import encode_examples, hf_model, logits_of
from dsunlearn.models.loader import block_linears, load_model_and_processor, module_group
from dsunlearn.recipes.common import deepspeed_config, model_dtype, prepare_benchmark
from dsunlearn.saliency.mask import build_masks, check_spec
from dsunlearn.saliency.scores import Scores, accumulate_units, real_element_count
from kernels.mask_apply import pack_mask


def _units(
    examples: Sequence[Any], cfg: SaliencyConfig, rank: int, world: int
) -> Iterator[list[list[Any]]]:
    """This rank's micro-batches of each complete unit, in data order (no shuffling)."""
    per_micro = cfg.unit_batch // cfg.micro_batches
    mine = cfg.micro_batches // world
    n_units = len(examples) // cfg.unit_batch
    if cfg.max_units:
        n_units = min(n_units, cfg.max_units)
    for u in range(n_units):
        unit = examples[u * cfg.unit_batch : (u + 1) * cfg.unit_batch]
        micros = [unit[i * per_micro : (i + 1) * per_micro] for i in range(cfg.micro_batches)]
        yield micros[rank * mine : (rank + 1) * mine]


def _check(cfg: SaliencyConfig, world: int) -> None:
    if cfg.micro_batches < 1 or cfg.unit_batch % cfg.micro_batches:
        raise ConfigError(
            f"unit_batch {cfg.unit_batch} must split into {cfg.micro_batches} micro-batches"
        )
    if cfg.micro_batches % world:
        raise ConfigError(
            f"micro_batches {cfg.micro_batches} must be a multiple of the world size {world}"
        )
    check_spec(cfg.mask)


_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def run_saliency(cfg: SaliencyConfig) -> Path:
    t0 = time.time()
    info = init_distributed()
    log = get_logger()
    _check(cfg, info.world_size)
    if not cfg.vanilla:
        raise ConfigError("saliency needs vanilla=MODEL (the model whose weights are scored)")
    bench = prepare_benchmark(cfg.data, info)
    optim = OptimConfig(batch_size=cfg.unit_batch)
    ds = deepspeed_config(cfg.deepspeed, optim, cfg.model, info)
    model, processor = load_model_and_processor(
        cfg.vanilla, dtype=model_dtype(cfg.model), ds_config=ds
    )
    engine = build_train_engine(model, optim, ds)
    engine.train()
    arch = type(hf_model(engine)).__name__
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    scores = Scores.zeros(named, info.device)

    def loss_fn(eng: Any, examples: list[Any]) -> torch.Tensor:
        batch = to_device(encode_examples(processor, examples), info.device)
        return example_ce(logits_of(eng, batch), batch["labels"]).mean()

    def language(name: str) -> bool:
        return module_group(arch, name) == "language"

    forget = vqa_train_examples(bench.forget)
    if len(forget) < cfg.unit_batch:
        raise DataError(f"{len(forget)} forget examples: fewer than one unit of {cfg.unit_batch}")
    rank, world = info.rank, info.world_size
    n_f = accumulate_units(engine, named, scores.forget, _units(forget, cfg, rank, world), loss_fn)
    n_r = accumulate_units(
        engine,
        named,
        scores.preserve,
        _units(vqa_train_examples(bench.retain), cfg, rank, world),
        loss_fn,
    )
    texts = text_qa_examples([*bench.forget, *bench.retain])
    n_t = accumulate_units(
        engine, named, scores.preserve, _units(texts, cfg, rank, world), loss_fn, language
    )
    log.info(
        f"saliency: {n_f} forget, {n_r} retain-VQA, {n_t} text units; scores {scores.nbytes() / 2**20:.1f} MiB per rank"
    )

    real = {n: real_element_count(p, rank) for n, p in named}
    # The paper masks the blocks' Linear weights (proj/fc/mlp/qkv), never the output head.
    linear_weights = {f"{name}.weight" for name in block_linears(hf_model(engine))}

    def selected(name: str) -> bool:
        group = module_group(arch, name)
        if cfg.mask.modules == "vision" and group == "language":
            return False
        if cfg.mask.modules == "language" and group != "language":
            return False
        return not cfg.mask.linear_only or name in linear_weights

    masks, threshold = build_masks(
        scores.forget, scores.preserve, real, selected, cfg.mask, info.device
    )

    out = Path(cfg.out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    record = {
        "masks": {n: pack_mask(m) for n, m in masks.items()},  # 1 bit per weight
        "partition_numel": {n: m.numel() for n, m in masks.items()},
        "spec": asdict(cfg.mask),
        "threshold": threshold,
        "world_size": world,
        "rank": rank,
    }
    with atomic_path(out / f"mask_rank{rank}.pt") as tmp:
        torch.save(record, tmp)

    # Shares selected: counts all-reduced per parameter, never the masks themselves.
    names = [n for n, _ in named]
    picked = all_reduce_sum(torch.tensor([int(masks[n].sum()) for n in names], dtype=torch.int64))
    totals = {n: int(getattr(p, "ds_numel", p.numel())) for n, p in named}
    per_param = {
        n: {"selected": int(c), "numel": totals[n]}
        for n, c in zip(names, picked.tolist(), strict=True)
    }
    groups: dict[str, list[int]] = {}
    layers: dict[str, list[int]] = {}
    for n, v in per_param.items():
        for key, table in ((module_group(arch, n), groups), (_layer_key(arch, n), layers)):
            if key is None:
                continue
            acc = table.setdefault(key, [0, 0])
            acc[0] += v["selected"]
            acc[1] += v["numel"]
    summary = {
        "spec": asdict(cfg.mask),
        "threshold": threshold,
        "world_size": world,
        "units": {"forget": n_f, "retain_vqa": n_r, "text_qa": n_t},
        "score_bytes_rank0": scores.nbytes(),  # F_forget + F_preserve: 2 x fp32 partition
        "selected_share": sum(v["selected"] for v in per_param.values())
        / max(1, sum(totals.values())),
        "per_group": {k: a / max(1, b) for k, (a, b) in groups.items()},
        "per_layer": {k: a / max(1, b) for k, (a, b) in layers.items()},
        "per_param": per_param,
        "elapsed_s": round(time.time() - t0, 2),
    }
    if info.is_main:
        write_json_atomic(out / "summary.json", summary)
        plot_heatmap(arch, per_param, out / "saliency.png")
        log.info(f"saliency: {summary['selected_share']:.3f} of the weights selected; {out}")
    barrier()
    return out


def _layer_key(arch: str, name: str) -> str | None:
    cell = _cell(arch, name)
    return None if cell is None else f"{cell[0]}.{cell[1]}"


def _cell(arch: str, name: str) -> tuple[str, int, str] | None:
    """(group, layer, module) of a layered weight: where a heat-map cell is."""
    m = _LAYER_RE.search(name)
    if m is None:
        return None
    module = name[m.end() :].removesuffix(".weight").removesuffix(".bias")
    return module_group(arch, name), int(m.group(1)), module


def plot_heatmap(arch: str, per_param: dict[str, dict[str, int]], path: Path) -> None:
    """One panel per module group: share of weights selected, layer x module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[str, dict[tuple[int, str], list[int]]] = {}
    for name, v in per_param.items():
        where = _cell(arch, name)
        if where is None:
            continue
        group, layer, module = where
        acc = cells.setdefault(group, {}).setdefault((layer, module), [0, 0])
        acc[0] += v["selected"]
        acc[1] += v["numel"]
    if not cells:
        return
    top = max(sel / max(1, num) for table in cells.values() for sel, num in table.values())
    vmax = max(0.01, top)  # the colour scale spans what was selected, not always 0..1
    fig, axes = plt.subplots(1, len(cells), figsize=(6 * len(cells), 4), squeeze=False)
    for ax, (group, table) in zip(axes[0], sorted(cells.items()), strict=True):
        layers = sorted({k[0] for k in table})
        modules = sorted({k[1] for k in table})
        grid = np.full((len(modules), len(layers)), np.nan)
        for (layer, module), (sel, num) in table.items():
            grid[modules.index(module), layers.index(layer)] = sel / max(1, num)
        im = ax.imshow(grid, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(f"{group}: share of weights selected")
        ax.set_xticks(range(len(layers)), [str(x) for x in layers])
        ax.set_yticks(range(len(modules)), modules, fontsize=7)
        ax.set_xlabel("layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

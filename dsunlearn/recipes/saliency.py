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

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dsunlearn.config import OptimConfig, SaliencyConfig
from dsunlearn.engine.dist import all_reduce_sum, barrier, get_logger, init_distributed
from dsunlearn.engine.engine import build_train_engine
from dsunlearn.errors import ConfigError
from dsunlearn.fsutil import atomic_path, write_json_atomic
from dsunlearn.models.families import family_of_arch, strip_wrappers
from dsunlearn.models.loader import (
    enable_activation_checkpointing,
    load_model_and_processor,
    module_group,
)
from dsunlearn.recipes.common import deepspeed_config, model_dtype, prepare_benchmark
from dsunlearn.saliency.compute import check_saliency, compute_saliency
from dsunlearn.saliency.store import save_mask


def run_saliency(cfg: SaliencyConfig) -> Path:
    t0 = time.time()
    info = init_distributed()
    log = get_logger()
    check_saliency(cfg, info.world_size)
    if not cfg.vanilla:
        raise ConfigError("saliency needs vanilla=MODEL (the model whose weights are scored)")
    bench = prepare_benchmark(cfg.data, info)
    optim = OptimConfig(batch_size=cfg.unit_batch)
    ds = deepspeed_config(cfg.deepspeed, optim, cfg.model, info)
    model, processor = load_model_and_processor(
        cfg.vanilla, dtype=model_dtype(cfg.model), ds_config=ds
    )
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    engine = build_train_engine(model, optim, ds)
    engine.train()
    result = compute_saliency(engine, processor, bench, cfg, info)
    arch, named, masks, threshold = result.arch, result.named, result.masks, result.threshold
    n_f, n_r, n_t = (result.units[k] for k in ("forget", "retain_vqa", "text_qa"))
    log.info(
        f"saliency: {n_f} forget, {n_r} retain-VQA, {n_t} text units; "
        f"scores {result.score_bytes / 2**20:.1f} MiB per rank"
    )

    out = Path(cfg.out_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    save_mask(out, masks, cfg.mask, threshold, info.world_size, info.rank)

    # Shares selected: counts all-reduced per parameter, never the masks themselves.
    names = [n for n, _ in named]
    local = [int(masks[n].sum()) for n in names]
    picked = all_reduce_sum(torch.tensor(local, dtype=torch.int64, device=info.device)).cpu()
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
        "world_size": info.world_size,
        "units": {"forget": n_f, "retain_vqa": n_r, "text_qa": n_t},
        "score_bytes_rank0": result.score_bytes,  # F_forget + F_preserve: 2 x fp32 partition
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
    """(group, layer, module) of a weight inside a numbered block (vision or language layers,
    as the family table names them: `layers.N`, Qwen2-VL's `visual.blocks.N`, ...): where a
    heat-map cell is. None outside the blocks (projector, embeddings, norms, head)."""
    bare = strip_wrappers(name)
    m = family_of_arch(arch).block_re.fullmatch(bare)
    numbered = [g for g, v in (m.groupdict().items() if m else ()) if v is not None]
    if not numbered:
        return None
    module = bare[m.end(numbered[0]) + 1 :].removesuffix(".weight").removesuffix(".bias")
    return module_group(arch, name), int(m.group(numbered[0])), module


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

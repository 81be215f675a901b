"""MMUnlearner: gradient ascent confined to the weights that carry the visual concept.

1. `attach`: before the first step the engine holds the vanilla weights; the saliency pass
   scores them on each rank's own ZeRO-3 partition (forget VQA vs retain VQA + all entities'
   text QA) and builds the mask, or the mask is loaded from `method.mmu_mask_dir`.
2. The paper's alternating schedule: one forget step, -CE(forget VQA) with the gradient masked
   in place before the optimizer step, then len(retain)/len(forget) retain steps, +CE(retain
   VQA), unmasked.
3. Under LoRA (`peft.lora.r > 0`) the scores, the mask and the masked update are those of the
   trainable parameters, the adapters; the module filter judges each adapter matrix as the
   Linear it adapts (`saliency.compute.mask_filter`). LoRA adapts the language model only, so
   `mmu_mask.modules=vision` admits nothing there and is refused with one line.
4. Weight decay is applied by `saliency.apply.MaskedUpdate` (the engine's AdamW runs with
   weight_decay 0): selected weights only in a forget step, every matrix in a retain step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dsunlearn.config import MethodConfig, OptimConfig, SaliencyConfig
from dsunlearn.engine import checkpoint
from dsunlearn.engine.dist import get_logger
from dsunlearn.errors import ConfigError
from dsunlearn.methods.base import Method, RunContext, register
from dsunlearn.models.lm_head import mean_ce
from dsunlearn.saliency.apply import MaskedUpdate
from dsunlearn.saliency.compute import compute_saliency
from dsunlearn.saliency.mask import check_spec
from dsunlearn.saliency.store import load_mask, save_mask


@register("mmunlearner")
class MMUnlearner(Method):
    uses_retain = True  # masks whatever trains: the model's weights, or its LoRA adapters

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        check_spec(cfg.mmu_mask)
        if cfg.mmu_lr < 0:
            raise ConfigError("method.mmu_lr must be >= 0 (0: optim.lr)")
        if cfg.mmu_retain_per_forget < 0:
            raise ConfigError("method.mmu_retain_per_forget must be >= 0 (0: the paper's ratio)")
        self.weight_decay = 0.0
        self.update: MaskedUpdate | None = None
        self.mask_meta: dict[str, Any] = {}

    def optim(self, optim: OptimConfig) -> OptimConfig:
        # The decay moves to MaskedUpdate: torch's AdamW would decay the unselected weights too.
        self.weight_decay = optim.weight_decay
        lr = self.cfg.mmu_lr if self.cfg.mmu_lr > 0 else optim.lr
        return dataclasses.replace(optim, lr=lr, weight_decay=0.0)

    def saliency_config(self) -> SaliencyConfig:
        c = self.cfg
        return SaliencyConfig(
            unit_batch=c.mmu_unit_batch,
            micro_batches=c.mmu_micro_batches,
            max_units=c.mmu_max_units,
            mask=c.mmu_mask,
        )

    def attach(self, engine: Any, ctx: RunContext) -> None:
        log = get_logger()
        info = ctx.info
        mask_dir = str(ctx.resume_dir) if ctx.resume_dir else self.cfg.mmu_mask_dir
        if mask_dir:  # a resumed run steps on the mask its checkpoint was trained with
            if (Path(mask_dir) / "latest").is_file():  # a method's checkpoint folder
                save_dir, tag = checkpoint.resolve(Path(mask_dir))
                mask_dir = str(save_dir / tag)
            masks, meta = load_mask(Path(mask_dir), info.rank, info.world_size)
            source = mask_dir
        else:
            result = compute_saliency(
                engine, ctx.processor, ctx.bench, self.saliency_config(), info
            )
            masks = result.masks
            meta = {
                "spec": dataclasses.asdict(self.cfg.mmu_mask),
                "threshold": result.threshold,
                "world_size": info.world_size,
                "units": result.units,
            }
            source = "computed in this run"
        self.masks = masks
        self.update = MaskedUpdate(engine, masks, self.weight_decay)
        counts = self.update.selected_counts()
        meta["selected_share"] = counts[0] / max(1, counts[1])
        meta["source"] = source
        self.mask_meta = meta
        if counts[0] == 0:  # a legitimate outcome (e.g. ratio mode on a random model), but
            log.warning(  # then the forget steps change nothing
                f"mmunlearner: the mask selects no weight (mode {meta['spec']['mode']}, "
                f"threshold {meta['threshold']:.4g}): the forget steps will change nothing"
            )
        log.info(
            f"mmunlearner: mask ({meta['spec']['mode']}, threshold {meta['threshold']:.4g}) "
            f"selects {meta['selected_share']:.3f} of the trainable weights; {source}"
        )

    def retain_steps_per_forget(self, n_forget: int, n_retain: int) -> int:
        if self.cfg.mmu_retain_per_forget:
            return self.cfg.mmu_retain_per_forget
        return max(1, round(n_retain / max(1, n_forget)))

    def before_step(self, engine: Any, phase: str = "forget") -> None:
        if self.update is None:
            raise RuntimeError("mmunlearner stepped before attach() built its mask")
        super().before_step(engine, phase)  # the lm_head back to its partition first
        self.update.before_step(engine, phase)

    def forget_loss(self, model, batch, ref):
        return mean_ce(model, batch, self.head, scale=-1.0)

    def retain_loss(self, model, batch, ref):
        return mean_ce(model, batch, self.head)

    def save(self, folder: Path, rank: int) -> None:
        """The mask beside the engine checkpoint, so that a resumed run steps on the same one."""
        meta = self.mask_meta
        save_mask(
            folder,
            self.masks,
            dataclasses.replace(self.cfg.mmu_mask, **meta["spec"]),
            meta["threshold"],
            meta["world_size"],
            rank,
        )

    def report_info(self) -> dict[str, Any]:
        return {k: v for k, v in self.mask_meta.items() if k != "world_size"}

"""MANU (Liu et al. 2025, "Modality-Aware Neuron Pruning for Unlearning in MLLMs"): training-free.

1. Per modality, the MLP neurons' activation statistics on forget vs retain data: the vision
   tower's neurons on the forget and retain people's pictures (VQA), the language model's on
   their text-only QA (as the MANU code scores them; the paper's point is that a face's
   knowledge sits in both pathways). A neuron and how its activations are read:
   `saliency/neurons.py`.
2. Four importance functions per neuron (mean |a|, share of tokens with |a| > tau, standard
   deviation, root mean square), combined as sum_k w_k (I_k(forget) / (I_k(retain) + eps) - 1)
   with the code's weights (2, 0, 2, 2: the frequency term off).
3. The top `method.manu_prune_pct` % of each modality's neurons (one threshold across its layers;
   the code's default 2 %) are pruned: their first-projection rows zeroed on every rank's own
   partition. No step is taken after (`trains = False`).

Differences from the MANU code: every layer of each tower is scored and pruned (the code applies
its masks to the last three layers of each, and its hooks pool all layers' statistics under one
key); padding tokens are left out of the language statistics (the code averages them in).
"""

from __future__ import annotations

from typing import Any

import torch

from dsunlearn.data.examples import text_qa_examples, vqa_train_examples
from dsunlearn.engine.batches import to_device
from dsunlearn.engine.dist import get_logger
from dsunlearn.errors import ConfigError, DataError
from dsunlearn.methods.base import Method, RunContext, register
from dsunlearn.models.encode import encode_examples, model_inputs
from dsunlearn.saliency.neurons import (
    STATS,
    NeuronStats,
    forget_scores,
    neuron_sites,
    prune,
    top_neurons,
)

MODALITIES = ("vision", "language")


@register("manu")
class MANU(Method):
    trains = False
    supports_lora = False  # it prunes the model's own neurons

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if not 0 < cfg.manu_prune_pct < 100:
            raise ConfigError("method.manu_prune_pct must be in (0, 100)")
        bad = set(cfg.manu_modalities) - set(MODALITIES)
        if bad or not cfg.manu_modalities:
            raise ConfigError(
                f"method.manu_modalities: pick from {list(MODALITIES)}, got {cfg.manu_modalities}"
            )
        if len(cfg.manu_weights) != len(STATS) or min(cfg.manu_weights) < 0:
            raise ConfigError(
                f"method.manu_weights: {len(STATS)} non-negative weights ({', '.join(STATS)})"
            )
        self.info: dict[str, Any] = {}

    def _statistics(self, engine: Any, ctx: RunContext, examples: list, sites) -> dict:
        """The importance functions of `sites` over `examples` (each rank its share, summed)."""
        info, cfg = ctx.info, self.cfg
        examples = examples[: cfg.manu_max_examples] if cfg.manu_max_examples else examples
        mine = examples[info.rank :: info.world_size]
        stats = NeuronStats(sites, cfg.manu_threshold, info.device)
        with torch.no_grad(), stats.recording():
            # Every rank runs the same number of forwards (ZeRO-3 gathers weights collectively);
            # a rank whose share has run out makes an unrecorded one.
            per_batch = cfg.manu_batch_size
            for b in range(-(-len(examples) // (per_batch * info.world_size))):
                chunk = mine[b * per_batch : (b + 1) * per_batch]
                batch = to_device(
                    encode_examples(ctx.processor, chunk or examples[:1]), info.device
                )
                stats.enabled = bool(chunk)
                stats.token_mask = batch["attention_mask"]
                engine(**model_inputs(batch), logits_to_keep=1)
        stats.reduce()
        return stats.importance()

    def attach(self, engine: Any, ctx: RunContext) -> None:
        log, cfg = get_logger(), self.cfg
        weights = dict(zip(STATS, cfg.manu_weights, strict=True))
        all_sites = neuron_sites(engine)
        data = {  # the modality's forget and retain inputs
            "vision": (vqa_train_examples(ctx.bench.forget), vqa_train_examples(ctx.bench.retain)),
            "language": (text_qa_examples(ctx.bench.forget), text_qa_examples(ctx.bench.retain)),
        }
        self.info = {"prune_pct": cfg.manu_prune_pct, "modalities": {}}
        for modality in cfg.manu_modalities:
            sites = [s for s in all_sites if s.part == modality]
            forget, retain = data[modality]
            if not sites or not forget or not retain:
                raise DataError(f"manu: no {modality} MLPs or no {modality} forget/retain data")
            f_imp = self._statistics(engine, ctx, forget, sites)
            r_imp = self._statistics(engine, ctx, retain, sites)
            scores = forget_scores(f_imp, r_imp, weights)
            picked = top_neurons(scores, cfg.manu_prune_pct / 100)
            n = prune(sites, picked, ctx.info.rank)
            total = sum(s.width for s in sites)
            self.info["modalities"][modality] = {
                "neurons": total,
                "pruned": n,
                "pruned_ids": {k: v.tolist() for k, v in picked.items() if len(v)},
            }
            log.info(f"manu: pruned {n} of {total} {modality} MLP neurons")

    def report_info(self) -> dict[str, Any]:
        return self.info

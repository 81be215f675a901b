"""SIU (Single Image Unlearning): a few steps on data built from ONE image of each concept.

Loss = alpha * CE(constructed answers) + beta * DMK, the KL(p_original || q) masked twice:
tokens inside a sample's target phrase leave the KL (there the model is meant to disagree), and
the vocabulary ids of the forgotten names are zeroed in both distributions (the KL must never
hold up the probability of a name). See `kernels/dual_masked_kl_ce.py` for the exact formula.

Two implementations of the same loss (`siu_loss`):
- ``fused``: the decoders' final hidden states and the `lm_head` weights go to the fused op; no
  [B, T, V] logits of either model are built. Under ZeRO-3 the partitioned `lm_head` weights are
  gathered as every method's are (`models.lm_head`: the trained head until `before_step`, the
  reference's around the op); the op's gradient for the weight flows back into the partitioned
  parameter like any other gradient.
- ``eager``: both models' full logits, then the torch formula (the ground truth).

With several forget entities, the name ids of all of them are dropped from every row's KL.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from dsunlearn.config import OptimConfig
from dsunlearn.data.augment import augment_image
from dsunlearn.data.benchmark import Benchmark
from dsunlearn.data.siu import SIUData, SIUSample, build_siu_data, name_token_ids
from dsunlearn.errors import ConfigError, DataError, MethodError
from dsunlearn.methods.base import Batch, Method, register
from dsunlearn.models.encode import IGNORE_INDEX, final_hidden_states, logits_of
from dsunlearn.models.lm_head import gathered, head_params, output_head
from kernels.dual_masked_kl_ce import (
    dual_masked_kl_ce,
    dual_masked_kl_ce_from_logits,
    fused_backend,
)

LOSS_IMPLS = ("fused", "eager")


def answer_rows(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row selector [B, T-1], labels [N], token mask [N]) of the answer tokens, next-token
    shifted like the models: position t is scored on token t+1 and masked by its mask."""
    labels = batch["labels"][:, 1:]
    token_mask = batch.get("token_mask")
    if token_mask is None:
        token_mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
    sel = labels != IGNORE_INDEX
    return sel, labels[sel], token_mask[:, 1:][sel]


@register("siu")
class SIU(Method):
    uses_reference = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.siu_loss not in LOSS_IMPLS:
            raise ConfigError(f"method.siu_loss must be one of {LOSS_IMPLS}, got {cfg.siu_loss!r}")
        self.data: list[SIUData] = []
        self.drop_ids: list[int] = []
        self.loss_impl = cfg.siu_loss  # refined at the first step: "fused-triton" / "fused-torch"

    # ------------------------------------------------------------------ data and schedule

    def forget_examples(self, bench: Benchmark, processor: Any) -> list[SIUSample]:
        """SIU's samples for every forget entity, each from one of its training images."""
        if not bench.forget:
            raise DataError("SIU needs at least one forget entity")
        heldout = {r.id: r.images for r in bench.test_forget}
        names = [r.name for r in (*bench.forget, *bench.retain, *bench.test)]
        self.data = [
            build_siu_data(
                entity,
                bench.retain,
                heldout=heldout.get(entity.id, []),
                taken_names=names,
                appearance=bench.appearance.get(entity.id),
                image_index=self.cfg.siu_image_index,
                other_qa=self.cfg.siu_other_qa,
                seed=k,
            )
            for k, entity in enumerate(bench.forget)
        ]
        ids: set[int] = set()
        for d in self.data:
            ids.update(name_token_ids(processor.tokenizer, d.name))
        self.drop_ids = sorted(ids)
        return [s for d in self.data for s in d.samples]

    def views(self, examples: list[SIUSample], rng: np.random.Generator) -> list[SIUSample]:
        """With `siu_augment`, each step sees a fresh random shift/scale/brightness/noise of the
        one image: still a single picture, but the forgetting is asked to hold for the face
        rather than for those exact pixels. Off by default: on the built-in benchmark it made
        the few steps fit less (gen 0.55 against 0.80; benchmarks/RESULTS.md)."""
        if not self.cfg.siu_augment:
            return examples
        return [
            replace(s, image=augment_image(s.image, rng)) if s.image is not None else s
            for s in examples
        ]

    def optim(self, optim: OptimConfig) -> OptimConfig:
        n = max(1, len(self.data))
        return replace(
            optim,
            lr=self.cfg.siu_lr,
            batch_size=self.cfg.siu_batch_size,
            steps=self.cfg.siu_steps * n,
            epochs=1,
        )

    def report_info(self) -> dict[str, Any]:
        return {
            "images": [d.image.as_dict() for d in self.data],
            "new_names": {d.entity_id: d.new_name for d in self.data},
            "samples_per_entity": {d.entity_id: len(d.samples) for d in self.data},
            "dropped_vocab_ids": len(self.drop_ids),
            "loss_impl": self.loss_impl,
        }

    # ------------------------------------------------------------------ loss

    def forget_loss(self, model: Any, batch: Batch, ref: Any | None) -> torch.Tensor:
        if ref is None:
            raise MethodError("SIU needs the frozen reference model")
        if self.cfg.siu_loss == "eager":
            return self._eager_loss(model, batch, ref)
        return self._fused_loss(model, batch, ref)

    def _eager_loss(self, model: Any, batch: Batch, ref: Any) -> torch.Tensor:
        sel, labels, token_mask = answer_rows(batch)
        z = logits_of(model, batch)[:, :-1][sel]
        r = self.reference_logits(ref, batch)[:, :-1][sel]
        return dual_masked_kl_ce_from_logits(
            z, r, labels, token_mask, self.drop_ids, self.cfg.siu_alpha, self.cfg.siu_beta
        )

    def _fused_loss(self, model: Any, batch: Batch, ref: Any) -> torch.Tensor:
        sel, labels, token_mask = answer_rows(batch)
        h = final_hidden_states(model, batch)[:, :-1][sel]
        with torch.no_grad():
            ref_h = final_hidden_states(ref, batch)[:, :-1][sel]
        head, ref_head = output_head(model), output_head(ref)
        self.loss_impl = f"fused-{fused_backend(h)}"
        with self.head.use(head), gathered(head_params(ref_head)):
            return dual_masked_kl_ce(
                h,
                head.weight,
                ref_h,
                ref_head.weight,
                labels,
                token_mask,
                self.drop_ids,
                alpha=self.cfg.siu_alpha,
                beta=self.cfg.siu_beta,
                bias=head.bias,
                ref_bias=ref_head.bias,
            )

"""What every attack of the audit needs: the ranks, the DeepSpeed configs, the sets, the
settings, and the few model operations they share (load frozen, load trainable, score)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dsunlearn.audit.sets import AuditSets
from dsunlearn.audit.weights import LocalWeights, put_local
from dsunlearn.config import AuditConfig, EvalConfig, OptimConfig
from dsunlearn.engine.dist import DistInfo
from dsunlearn.engine.engine import build_reference_engine, build_train_engine
from dsunlearn.eval.evaluate import per_rank_batch
from dsunlearn.eval.metrics import accuracy
from dsunlearn.eval.scoring import eval_mode, score_multiple_choice
from dsunlearn.models.loader import load_model_and_processor

Source = str | LocalWeights  # a model folder (or hub id), or selected weights kept on the ranks


@dataclass
class AuditContext:
    info: DistInfo
    ds: dict[str, Any]  # inference: one row per rank per micro-batch
    train_ds: dict[str, Any]  # relearning: its global batch over the ranks
    zero3: bool
    dtype: torch.dtype
    cfg: AuditConfig
    eval_cfg: EvalConfig
    sets: AuditSets
    seed: int = 0
    appearance: dict[str, dict[str, str]] = field(default_factory=dict)  # built-in only

    @property
    def per_rank(self) -> int:
        return per_rank_batch(self.eval_cfg, self.info)

    @contextlib.contextmanager
    def frozen(self, source: Source) -> Iterator[tuple[Any, Any]]:
        """(model, processor): `source` loaded sharded, frozen, in eval mode; released after."""
        path = source.base if isinstance(source, LocalWeights) else source
        model, processor = load_model_and_processor(path, dtype=self.dtype, ds_config=self.ds)
        engine = build_reference_engine(model, self.ds)
        if isinstance(source, LocalWeights):
            put_local(engine, source)
        try:
            with eval_mode(engine.module):
                yield engine.module, processor
        finally:
            del engine, model
            gc.collect()

    @contextlib.contextmanager
    def trainable(self, source: Source, lr: float) -> Iterator[tuple[Any, Any]]:
        """(engine, processor): `source` loaded sharded with AdamW at `lr`; released after."""
        path = source.base if isinstance(source, LocalWeights) else source
        model, processor = load_model_and_processor(path, dtype=self.dtype, ds_config=self.train_ds)
        optim = OptimConfig(lr=lr, batch_size=self.cfg.relearn_batch_size, weight_decay=0.0)
        engine = build_train_engine(model, optim, self.train_ds)
        if isinstance(source, LocalWeights):
            put_local(engine, source)
        try:
            yield engine, processor
        finally:
            del engine, model
            gc.collect()

    def mc_accuracy(self, model: Any, processor: Any, items: Sequence[Any]) -> float:
        """Multiple-choice accuracy (mean option log-likelihood) over `items`; every rank."""
        with eval_mode(model):
            return accuracy(
                score_multiple_choice(model, processor, items, self.per_rank, self.info)
            )

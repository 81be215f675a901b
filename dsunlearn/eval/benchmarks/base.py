"""The one interface every benchmark's evaluation protocol implements.

A protocol turns a benchmark into evaluation sets for a split ("val": what checkpoint selection
may read; "test": what the report gives), scores a (sharded) model on them, and states the facts
a report needs (judge, membership-inference pairing, omitted metrics and why, the split rule).
`dsunlearn eval` and `dsunlearn unlearn` drive every benchmark through it, the same way:

    protocol = build_protocol("mllmu", data_cfg, eval_cfg)
    sets = protocol.build("test")
    vanilla = protocol.score(model, processor, sets, info, zero3)            # its own reference
    method = protocol.score(model2, processor, sets, info, zero3, original=vanilla)

`original` is the original (vanilla) model's `Scored`: metrics that compare a model with the
original (flu, MMUBench's MIA recall and C-Dis) read its `outputs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dsunlearn.config import DataConfig, EvalConfig
from dsunlearn.data.benchmark import Benchmark
from dsunlearn.engine.dist import DistInfo
from dsunlearn.errors import ConfigError


@dataclass
class Scored:
    """One model's scores on one split.

    `truth_ratios`: per forget multiple-choice item, the TOFU truth ratio (`verdict.py`), which
    forget quality compares with the gold model's; empty where the protocol has no such items.
    `outputs`: JSON-able things later models are compared with (the original's greedy answers).
    """

    metrics: dict[str, float]
    truth_ratios: list[float] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "truth_ratios": self.truth_ratios, "outputs": self.outputs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scored:
        return cls(d["metrics"], list(d.get("truth_ratios", [])), dict(d.get("outputs", {})))


class Protocol(ABC):
    """A benchmark's evaluation protocol. Every method that touches a model must be called by
    all ranks together (items are sharded over ranks), so it runs on ZeRO-3 sharded weights."""

    name: ClassVar[str] = ""
    # The validation metrics that checkpoint selection reads (eval/selection.py): how much the
    # model still knows of the forget people from their pictures, and of the retain people.
    # None: the benchmark has no retain set, and only `select.criterion=last` applies.
    forget_key: ClassVar[str | None] = None
    retain_key: ClassVar[str | None] = None
    # The multiple-choice metric whose items' truth ratios give forget quality (None: none).
    truth_key: ClassVar[str | None] = None

    def __init__(
        self,
        data: DataConfig,
        cfg: EvalConfig,
        seed: int = 0,
        bench: Benchmark | None = None,
        siu_image_index: int = 0,
    ) -> None:
        """`bench`: the benchmark the caller already loaded from `path` (MLLMU-Bench-shaped
        protocols use it instead of loading it again); `siu_image_index`: the training picture
        SIU fine-tunes on (the built-in eff probes ask about it)."""
        self.data = data
        self.cfg = cfg
        self.seed = seed
        self._bench = bench
        self.siu_image_index = siu_image_index

    @property
    def path(self) -> str:
        """The benchmark folder or hub id: `eval.path`, else the data the run trains on."""
        return self.cfg.path or self.data.resolved_path()

    @abstractmethod
    def build(self, split: str) -> Any:
        """The evaluation sets of `split` ("val" or "test")."""

    @abstractmethod
    def score(
        self,
        model: Any,
        processor: Any,
        sets: Any,
        info: DistInfo,
        zero3: bool,
        original: Scored | None = None,
    ) -> Scored:
        """Every metric of the protocol on `sets`; `original`: the vanilla model's Scored on the
        same sets (None: the model is scored as its own reference)."""

    @abstractmethod
    def facts(self, sets: Any, with_original: bool) -> dict[str, Any]:
        """What the report says about the evaluation: notes, omitted metrics, MIA, judge."""

    def split_rule(self) -> str:
        """How the validation and test splits were cut, in words, for the report."""
        return ""


REGISTRY: dict[str, type[Protocol]] = {}


def register(cls: type[Protocol]) -> type[Protocol]:
    REGISTRY[cls.name] = cls
    return cls


def build_protocol(
    name: str,
    data: DataConfig,
    cfg: EvalConfig,
    seed: int = 0,
    bench: Benchmark | None = None,
    siu_image_index: int = 0,
) -> Protocol:
    """The protocol named `name`; an unknown name is a one-line ConfigError."""
    from dsunlearn.eval import benchmarks  # noqa: F401  (registers every protocol)

    if name not in REGISTRY:
        raise ConfigError(f"unknown benchmark '{name}' (known: {', '.join(REGISTRY)})")
    return REGISTRY[name](data, cfg, seed, bench, siu_image_index)

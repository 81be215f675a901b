"""Each benchmark's evaluation protocol behind one interface (`base.Protocol`), registered on
import: builtin, mllmu, clear and mmubench (unlearning benchmarks), pope and mmbench (general
ability: reported only, `eval/utility.py` adds them to a run's report)."""

from dsunlearn.eval.benchmarks import (  # noqa: F401  (register)
    builtin,
    clear,
    mllmu,
    mmbench,
    mmubench,
    pope,
)
from dsunlearn.eval.benchmarks.base import REGISTRY, Protocol, Scored, build_protocol

BENCHMARKS = tuple(REGISTRY)

__all__ = ["BENCHMARKS", "Protocol", "Scored", "build_protocol"]

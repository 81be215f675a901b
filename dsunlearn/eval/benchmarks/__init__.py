"""Each benchmark's evaluation protocol behind one interface (`base.Protocol`): builtin, mllmu,
clear and mmubench, registered in that order."""

from dsunlearn.eval.benchmarks import builtin, clear, mllmu, mmubench  # noqa: F401  (register)
from dsunlearn.eval.benchmarks.base import REGISTRY, Protocol, Scored, build_protocol

BENCHMARKS = tuple(REGISTRY)

__all__ = ["BENCHMARKS", "Protocol", "Scored", "build_protocol"]

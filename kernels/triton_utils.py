"""What every Triton op here shares: the optional import, interpreter detection, lazy jit.

Triton is optional (each op falls back to its torch reference without it). Its kernels are
decorated lazily, once per mode, because Triton picks compiled vs interpreted when a function
is decorated.
"""

from __future__ import annotations

import os
from collections.abc import Callable

try:  # Triton is optional: without it every op falls back to its reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

_JITTED: dict[tuple[Callable, bool], object] = {}


def interpreter_ready() -> bool:
    """True when Triton kernels can run on CPU through the interpreter.

    Triton picks compiled vs interpreted when a function is decorated, and its own library
    functions (tl.sum, tl.max) are decorated when triton is imported: TRITON_INTERPRET=1 must be
    set before the first `import triton` in the process, not merely before the launch.
    """
    if triton is None or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return type(tl.standard.sum).__name__ == "InterpretedFunction"


def jit_once(fn: Callable) -> object:
    """`triton.jit(fn)`, decorated at first use and cached per compiled/interpreted mode."""
    key = (fn, os.environ.get("TRITON_INTERPRET") == "1")
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]

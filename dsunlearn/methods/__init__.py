"""Unlearning methods, one file each, registered by name.

Every module in this package is imported here, so adding a method means adding one file
that defines a `Method` subclass decorated with `@register("name")`.
"""

from __future__ import annotations

import importlib
import pkgutil

from dsunlearn.methods.base import METHODS, Method, build_method, register

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "Method", "build_method", "register"]

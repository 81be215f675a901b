"""A sweep's search space, read from `configs/sweeps/<method>.yaml`, checked before any trial.

    method: npo                       # the one method the sweep tunes
    params:                           # dotted UnlearnConfig keys, in the order they are drawn
      optim.lr: {type: float, low: 5.0e-5, high: 1.0e-3, log: true}
      optim.epochs: {type: int, low: 1, high: 3}
      method.npo_beta: {type: float, low: 0.05, high: 1.0, log: true}
      method.mmu_mask.tau: {type: float, low: 0.5, high: 4.0, when: {method.mmu_mask.mode: ratio}}
      peft.lora.r: {type: categorical, choices: [4, 8, 16], when: {peft.lora.r: {not: 0}}}
    fixed: {eval.every: 4}            # set in every trial (optional)
    objectives: [forget_gap, retain_kept]   # default; or {metric: NAME, direction: maximize}
    pruner: {type: median, n_startup_trials: 3, n_warmup_steps: 4}   # median | percentile | none
    sampler: {type: tpe, seed: 0}     # tpe | random (Optuna's; extra keys go to its constructor)
    choose: gold_first                # which trial of the front the sweep reports: gold_first | best_score

`when` draws a parameter only if the config (the base config with the values drawn so far)
has that value, or, with `{not: V}`, anything else: MMUnlearner's τ only for its ratio mask, a
LoRA rank only where LoRA is on. Every problem is one `ConfigError` naming the file and key.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsunlearn.config import UnlearnConfig, apply_overrides, from_dict
from dsunlearn.errors import ConfigError, DsunlearnError

TOP_KEYS = ("method", "params", "fixed", "objectives", "pruner", "sampler", "choose")
PARAM_FIELDS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
}
# The sweep decides these for every trial: a space may not draw them.
RESERVED = ("methods", "name", "out_dir", "resume", "eval.test", "eval.reference_cache")
# Named objectives, read from each trial's selected step (validation): the two halves of the
# selection score (eval/selection.py) and the score itself.
NAMED_OBJECTIVES = {
    "forget_gap": "minimize",  # |forget - gold's forget|
    "retain_kept": "maximize",  # min(1, retain / vanilla's retain)
    "score": "maximize",  # retain_kept - forget_gap
}
DEFAULT_OBJECTIVES = ("forget_gap", "retain_kept")
PRUNERS = ("median", "percentile", "none")
SAMPLERS = ("tpe", "random")
CHOOSE_RULES = ("gold_first", "best_score")


@dataclass(frozen=True)
class Param:
    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    when: dict[str, Any] = field(default_factory=dict)  # key -> value, or {"not": value}

    def applies(self, config: dict[str, Any]) -> bool:
        for key, want in self.when.items():
            have = _lookup(config, key)
            if isinstance(want, dict):
                if have == want["not"]:
                    return False
            elif have != want:
                return False
        return True


@dataclass(frozen=True)
class Objective:
    name: str  # a named objective or a validation metric
    direction: str  # minimize | maximize


@dataclass
class Space:
    path: str
    method: str
    params: list[Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    objectives: list[Objective] = field(default_factory=list)
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "none"})
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe", "seed": 0})
    choose: str = "gold_first"

    def draw(self, trial: Any, base: dict[str, Any]) -> dict[str, Any]:
        """The trial's settings, drawn in file order through Optuna's define-by-run API."""
        drawn: dict[str, Any] = {}
        for p in self.params:
            if not p.applies(apply_overrides(base, as_overrides(drawn))):
                continue
            if p.type == "categorical":
                drawn[p.key] = trial.suggest_categorical(p.key, list(p.choices))
            elif p.type == "int":
                drawn[p.key] = trial.suggest_int(
                    p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
                )
            else:
                drawn[p.key] = trial.suggest_float(
                    p.key, float(p.low), float(p.high), step=p.step, log=p.log
                )
        return drawn


def as_overrides(values: dict[str, Any]) -> list[str]:
    """`key=value` strings the unlearn CLI reads back to the same values (JSON is YAML)."""
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _lookup(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _err(path: str, where: str, what: str) -> ConfigError:
    return ConfigError(f"space file {path}: {where}: {what}")


def _check_key(path: str, key: str, value: Any, base: dict[str, Any]) -> None:
    """The key must name an UnlearnConfig field that takes `value`."""
    if key in RESERVED or key.split(".")[0] in ("methods", "name", "out_dir", "resume"):
        raise _err(path, key, "the sweep sets this key itself; it cannot be searched or fixed")
    try:
        from_dict(UnlearnConfig, apply_overrides(base, as_overrides({key: value})))
    except ConfigError as e:
        raise _err(path, key, str(e)) from None


def _param(path: str, key: str, spec: Any, base: dict[str, Any]) -> Param:
    if not isinstance(spec, dict):
        raise _err(path, key, "needs a mapping like {type: float, low: 1e-5, high: 1e-3}")
    kind = spec.get("type")
    if kind not in PARAM_FIELDS:
        raise _err(
            path, key, f"unknown distribution type {kind!r} (known: {', '.join(PARAM_FIELDS)})"
        )
    extra = set(spec) - PARAM_FIELDS[kind] - {"type", "when"}
    if extra:
        raise _err(
            path,
            key,
            f"unknown field '{sorted(extra)[0]}' for type {kind} "
            f"(known: {', '.join(sorted(PARAM_FIELDS[kind] | {'when'}))})",
        )
    when = spec.get("when") or {}
    if not isinstance(when, dict) or any(
        isinstance(v, dict) and set(v) != {"not"} for v in when.values()
    ):
        raise _err(path, key, "when: needs a mapping of keys to a value or to {not: value}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _err(path, key, "categorical needs a non-empty list of choices")
        for c in choices:
            _check_key(path, key, c, base)
        return Param(key, kind, choices=tuple(choices), when=when)
    if "low" not in spec or "high" not in spec:
        raise _err(path, key, f"type {kind} needs low and high")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    num = int if kind == "int" else (int, float)
    for name, v in (("low", low), ("high", high), ("step", step)):
        if v is None and name == "step":
            continue
        if isinstance(v, str) and kind == "float":
            with contextlib.suppress(ValueError):
                v = float(v)  # YAML 1.1 reads 5e-5 as a string
        if isinstance(v, bool) or not isinstance(v, num) or not math.isfinite(v):
            raise _err(
                path,
                key,
                f"{name} must be a finite {'integer' if kind == 'int' else 'number'}, got {v!r}",
            )
        if name == "low":
            low = v
        elif name == "high":
            high = v
        else:
            step = v
    if not isinstance(log, bool):
        raise _err(path, key, f"log must be true or false, got {log!r}")
    if not low < high:
        raise _err(path, key, f"empty range: low {low} must be below high {high}")
    if log and low <= 0:
        raise _err(path, key, f"a log distribution needs low > 0, got {low}")
    if step is not None and (step <= 0 or (log and step)):
        raise _err(path, key, "step must be > 0, and cannot be combined with log")
    for v in (low, high):
        _check_key(path, key, v, base)
    return Param(key, kind, low, high, log, step, when=when)


def _objectives(path: str, raw: Any) -> list[Objective]:
    if raw is None:
        raw = list(DEFAULT_OBJECTIVES)
    if not isinstance(raw, list) or not raw:
        raise _err(path, "objectives", "needs a non-empty list")
    out = []
    for item in raw:
        if isinstance(item, str):
            if item not in NAMED_OBJECTIVES:
                raise _err(
                    path,
                    "objectives",
                    f"unknown objective '{item}' (known: {', '.join(NAMED_OBJECTIVES)}, "
                    "or {metric: NAME, direction: maximize|minimize})",
                )
            out.append(Objective(item, NAMED_OBJECTIVES[item]))
        elif isinstance(item, dict) and set(item) == {"metric", "direction"}:
            if item["direction"] not in ("maximize", "minimize"):
                raise _err(path, "objectives", f"direction must be maximize or minimize: {item}")
            out.append(Objective(str(item["metric"]), item["direction"]))
        else:
            raise _err(path, "objectives", f"cannot read {item!r}")
    if len({o.name for o in out}) != len(out):
        raise _err(path, "objectives", "an objective is listed twice")
    return out


def _typed(path: str, where: str, raw: Any, known: tuple[str, ...], default: str) -> dict:
    if raw is None:
        return {"type": default}
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict) or raw.get("type") not in known:
        got = raw.get("type") if isinstance(raw, dict) else raw
        raise _err(path, where, f"unknown type {got!r} (known: {', '.join(known)})")
    return dict(raw)


def load_space(path: str | Path, base: dict[str, Any]) -> Space:
    """Read and check a space file against `base`, the trials' config as a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"space file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"space file {p} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"space file {p} must hold a mapping at the top level")
    s = str(p)
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise _err(s, unknown[0], f"unknown key (known: {', '.join(TOP_KEYS)})")
    method = raw.get("method")
    if not isinstance(method, str):
        raise _err(s, "method", "names the one method the sweep tunes, e.g. method: npo")
    from dsunlearn.methods import build_method

    try:
        build_method(method, from_dict(UnlearnConfig, base).method)
    except DsunlearnError as e:
        raise _err(s, "method", str(e)) from None
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _err(s, "fixed", "needs a mapping of dotted keys to values")
    for key, value in fixed.items():
        _check_key(s, key, value, base)
    base = apply_overrides(base, as_overrides(fixed))
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise _err(s, "params", "needs at least one parameter to search")
    params = [_param(s, key, spec, base) for key, spec in params_raw.items()]
    for prm in params:
        if prm.key in fixed:
            raise _err(s, prm.key, "is both fixed and searched")
    choose = raw.get("choose", "gold_first")
    if choose not in CHOOSE_RULES:
        raise _err(s, "choose", f"unknown rule {choose!r} (known: {', '.join(CHOOSE_RULES)})")
    return Space(
        path=s,
        method=method,
        params=params,
        fixed=fixed,
        objectives=_objectives(s, raw.get("objectives")),
        pruner=_typed(s, "pruner", raw.get("pruner"), PRUNERS, "none"),
        sampler=_typed(s, "sampler", raw.get("sampler"), SAMPLERS, "tpe"),
        choose=choose,
    )

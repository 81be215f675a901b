"""Export a checkpoint as a Hugging Face model folder that plain `transformers` loads.

Read top to bottom:
  1. find the checkpoint (a save folder with `latest`, or one of its `step<N>` tags) and its
     record `dsunlearn.json` (method, step, the run's config, the model it started from); a
     run's final checkpoint holds the weights of the step in-run selection chose
     (`selected_step`, tag `step<N>-selected<S>`), which are the ones the report evaluated;
  2. gather the ZeRO-3 partitions of every rank into one fp32 state dict with DeepSpeed's own
     `get_fp32_state_dict_from_zero_checkpoint`, in this one process (no ranks, no GPU);
  3. rebuild the architecture from the run's starting model through the project's loader (and
     its LoRA adapters, as the run made them), load the weights strictly, merge LoRA if asked,
     cast to the run's `model.dtype`;
  4. write `save_pretrained` (safetensors) + the processor + a short model card (`README.md`)
     into a temporary sibling folder that replaces `--out` only once complete.

Memory: it needs host RAM for about twice the full fp32 model (the gathered state dict and the
model it is loaded into), whatever the world size that cut the checkpoint.

A LoRA run (`peft.lora.r > 0`) exports, by default, peft's adapter folder (adapter_config.json,
adapter_model.safetensors; the base is the model the run started from, recorded by its absolute
path or hub id); `merge_lora=True` folds the adapters into the weights and writes a plain model.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from dsunlearn import __version__
from dsunlearn.config import UnlearnConfig, from_dict
from dsunlearn.engine import checkpoint
from dsunlearn.errors import ConfigError, DsunlearnError, ModelError
from dsunlearn.fsutil import atomic_dir
from dsunlearn.recipes.common import DTYPES

_META_KEYS = ("method", "step", "steps", "world_size", "vanilla", "config")
# What DeepSpeed's consolidation raises on missing, truncated or foreign files.
_UNREADABLE = (OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError, RuntimeError)


# --------------------------------------------------------------------------- the checkpoint


def find_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(save folder, tag); a run folder or its `checkpoints/` gets a hint naming the methods."""
    path = Path(path).expanduser()
    try:
        return checkpoint.resolve(path)
    except ModelError as e:
        if not path.is_dir():
            raise
        for base in (path / "checkpoints", path):
            found = sorted(p.parent for p in base.glob("*/latest") if p.is_file())
            if found:
                hint = ", ".join(str(p) for p in found)
                raise ModelError(f"{e}; pass one method's checkpoint folder: {hint}") from e
        raise


def read_checkpoint_meta(ckpt: Path) -> dict[str, Any]:
    """`dsunlearn.json` of a tag folder, checked for what an export needs; one line if not."""
    try:
        meta = checkpoint.read_meta(ckpt)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = getattr(e, "msg", None) or type(e).__name__
        raise ModelError(f"{ckpt / checkpoint.META} is unreadable ({reason})") from e
    if not isinstance(meta, dict):
        raise ModelError(f"{ckpt / checkpoint.META} is not a JSON object")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ModelError(f"{ckpt / checkpoint.META} lacks {', '.join(missing)}")
    return meta


def run_config(meta: dict[str, Any], where: Path) -> UnlearnConfig:
    try:
        return from_dict(UnlearnConfig, meta["config"])
    except (ConfigError, TypeError, AttributeError) as e:
        raise ModelError(
            f"{where / checkpoint.META}: the run's config does not read as this version's "
            f"UnlearnConfig ({e})"
        ) from e


def gather_fp32(save_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Every rank's ZeRO-3 partitions joined into the full fp32 state dict, on the host.

    DeepSpeed's consolidation (the same code as the `zero_to_fp32.py` beside the checkpoint);
    its progress lines are kept off stdout.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            return get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
    except _UNREADABLE as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot gather the ZeRO-3 weights of {save_dir / tag}: {reason}") from e


def launch_dir(save_dir: Path, cfg: UnlearnConfig) -> Path | None:
    """The folder the run was launched from, when its out_dir was relative: the run folder
    `<out_dir>/<name>` holds `checkpoints/<method>`, so what is left above it is the launch
    folder. None when it cannot be told (absolute out_dir, or a moved checkpoint)."""
    rel = Path(cfg.out_dir) / cfg.name
    run_dir = save_dir.resolve().parent.parent
    n = len(rel.parts)
    if rel.is_absolute() or ".." in rel.parts or run_dir.parts[-n:] != rel.parts:
        return None
    return Path(*run_dir.parts[:-n])


def locate(path: str, origin: Path | None) -> str:
    """A path the run recorded, as seen from here: relative paths that do not exist from this
    folder are tried from the run's launch folder. Names (hub ids, built-ins) stay as they are."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or origin is None or not (origin / p).exists():
        return path
    return str(origin / p)


# --------------------------------------------------------------------------- the model


def _rebuild(vanilla: str, cfg: UnlearnConfig) -> tuple[Any, Any]:
    """The run's architecture (its starting model, then its LoRA adapters), fp32, no ZeRO."""
    from dsunlearn.models.loader import load_model_and_processor
    from dsunlearn.models.lora import apply_lora

    try:
        model, processor = load_model_and_processor(vanilla, dtype=torch.float32)
    except ModelError as e:
        raise ModelError(
            f"{e} (the model the run started from; pass --vanilla DIR if it has moved)"
        ) from e
    return apply_lora(model, cfg.peft.lora, cfg.seed), processor


def _names(keys: set[str], n: int = 3) -> str:
    shown = ", ".join(sorted(keys)[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Every key of the model from the checkpoint and nothing else, or one line naming them."""
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        parts = [f"missing {_names(missing)}"] if missing else []
        parts += [f"unexpected {_names(unexpected)}"] if unexpected else []
        raise ModelError(
            f"{where} does not fit the rebuilt model: "
            + "; ".join(parts)
            + " (another starting model or LoRA setting than the run's?)"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatches
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ModelError(f"{where} does not fit the rebuilt model: {lines[-1]}") from e


def _check_base_unchanged(
    model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, vanilla: str
) -> None:
    """An adapter folder is only the run's model if the base weights are still the starting
    model's (LoRA freezes them): compare before loading the checkpoint over them."""
    current = model.state_dict()
    for key, value in current.items():
        if ".lora_" in key or key not in state:  # load_strict names missing keys
            continue
        if not torch.equal(state[key].to(dtype), value.to(dtype)):
            raise ModelError(
                f"the checkpoint's {key} differs from {vanilla}'s, so an adapter on top of "
                f"{vanilla} would not be the run's model: export with --merge-lora"
            )


def _base_reference(vanilla: str) -> str:
    """What an adapter's `base_model_name_or_path` can name: an absolute folder or a hub id."""
    path = Path(vanilla).expanduser()
    return str(path.resolve()) if path.is_dir() else vanilla


# --------------------------------------------------------------------------- the model card


def forget_entities(
    cfg: UnlearnConfig, origin: Path | None = None
) -> tuple[str, list[tuple[str, str]] | None]:
    """(where the forget split is, [(ID, name)] or None when it cannot be read here).

    Only the split's `ID` and `biography` columns of a local folder are read (no images).
    """
    from dsunlearn.data.mllmu import forget_dir

    data = locate(cfg.data.resolved_path(), origin)
    where = f"{forget_dir(cfg.data.forget_pct)}/ of {data}"
    files = sorted((Path(data).expanduser() / forget_dir(cfg.data.forget_pct)).rglob("*.parquet"))
    if not files:
        return where, None
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table([str(f) for f in files], columns=["ID", "biography"]).to_pylist()
    except Exception:  # any unreadable split: the card says so instead of failing the export
        return where, None
    out = []
    for row in rows:
        bio = row.get("biography")
        if isinstance(bio, str):
            try:
                bio = json.loads(bio)
            except json.JSONDecodeError:
                bio = {}
        name = bio.get("Name") if isinstance(bio, dict) else None
        out.append((str(row["ID"]), str(name or row["ID"])))
    return where, out


def run_metrics(
    save_dir: Path, meta: dict[str, Any], cfg: UnlearnConfig
) -> tuple[dict[str, float], dict[str, float]] | str:
    """(vanilla metrics, this method's) from the run's report.json, or why there are none.

    Only for the run's final checkpoint, and only if the report belongs to the same run (the
    run folder's config.json has the checkpoint's fingerprint)."""
    from dsunlearn.recipes.run_state import fingerprint

    if not cfg.eval.enabled:
        return "not evaluated (the run had eval.enabled=false)"
    if "selected_step" not in meta and int(meta["step"]) != int(meta["steps"]):
        step = f"step {meta['step']} of {meta['steps']}"
        return f"not evaluated ({step}: the run evaluates its final model only)"
    run_dir = save_dir.parent.parent
    try:
        report = json.loads((run_dir / "report.json").read_text())
        same = from_dict(UnlearnConfig, json.loads((run_dir / "config.json").read_text()))
        if fingerprint(same, meta["vanilla"]) != meta.get("fingerprint"):
            return "not evaluated (report.json beside the checkpoint is another run's)"
        ours = report["methods"][meta["method"]]
        vanilla = report.get("vanilla") or {}
    except (OSError, ValueError, KeyError, TypeError, DsunlearnError):
        return f"not evaluated (no readable report.json in {run_dir})"
    if not ours:
        return "not evaluated"
    return vanilla, ours


def _step_fact(meta: dict[str, Any]) -> str:
    """The checkpoint's step, and the selected step whose weights it holds when they differ."""
    fact = f"{meta['step']} of {meta['steps']}"
    selected = meta.get("selected_step")
    if selected is not None and int(selected) != int(meta["step"]):
        fact += f" (the weights of step {selected}, chosen by in-run selection)"
    return fact


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def model_card(
    facts: dict[str, str],
    forget: tuple[str, list[tuple[str, str]] | None],
    metrics: tuple[dict[str, float], dict[str, float]] | str,
) -> str:
    """README.md of the export: what was unlearned, from what, and how it scored."""
    where, people = forget
    facts = dict(facts)
    lines = [
        "---",
        f"library_name: {facts.pop('library')}",
        "tags: [dsunlearn, machine-unlearning]",
        "---",
        "",
        f"# {facts['method']}: unlearned with dsunlearn",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in facts.items()),
        "",
        "## Forget set",
        "",
    ]
    if people is None:
        lines.append(f"{where} (not readable where the export ran)")
    else:
        lines.append(f"{where}: {len(people)} {'entity' if len(people) == 1 else 'entities'}")
        lines.append("")
        lines += [f"- {pid}: {name}" for pid, name in people]
    lines += ["", "## Metrics", ""]
    if isinstance(metrics, str):
        lines.append(metrics[0].upper() + metrics[1:] + ".")
    else:
        vanilla, ours = metrics
        names = list(vanilla) + [k for k in ours if k not in vanilla]
        lines += [f"| metric | vanilla | {facts['method']} |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(vanilla.get(k, ''))} | {_fmt(ours.get(k, ''))} |" for k in names]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the recipe


def _check_out(out: Path, force: bool, protected: list[Path]) -> None:
    out_abs = out.expanduser().resolve()
    for p in protected:
        p = p.resolve()
        if out_abs == p or out_abs in p.parents:
            raise ConfigError(f"--out {out} would replace {p}, which the export reads")
    if out.exists() and not force:
        raise ConfigError(f"--out {out} exists: pass --force to replace it")


def run_export(
    ckpt: str | Path,
    out: str | Path,
    *,
    merge_lora: bool = False,
    force: bool = False,
    vanilla: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Write checkpoint `ckpt` as a HF folder `out`; returns `out`.

    `vanilla` replaces the starting model the checkpoint records (when that folder moved);
    `dtype` (fp32 | bf16) the run's `model.dtype`.
    """
    save_dir, tag = find_checkpoint(ckpt)
    source = save_dir / tag
    meta = read_checkpoint_meta(source)
    cfg = run_config(meta, source)
    origin = launch_dir(save_dir, cfg)
    base = vanilla or locate(meta["vanilla"], origin)
    dtype_name = dtype or cfg.model.dtype
    if dtype_name not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got '{dtype_name}'")
    lora = cfg.peft.lora.r > 0
    adapter = lora and not merge_lora
    from dsunlearn.models.tiny import TINY_MODELS

    if adapter and base in TINY_MODELS:
        raise ConfigError(
            f"the run started from the built-in '{base}', which only dsunlearn can rebuild, so "
            "a LoRA adapter folder would have no loadable base: export with --merge-lora"
        )
    out = Path(out).expanduser()
    base_dir = Path(base).expanduser()
    protected = [save_dir] + ([base_dir] if base_dir.is_dir() else [])
    _check_out(out, force, protected)

    state = gather_fp32(save_dir, tag)
    model, processor = _rebuild(base, cfg)
    if adapter:
        _check_base_unchanged(model, state, DTYPES[cfg.model.dtype], base)
    load_strict(model, state, source)
    del state
    if lora and merge_lora:
        model = model.merge_and_unload()
    if adapter:
        model.peft_config["default"].base_model_name_or_path = _base_reference(base)
    model = model.to(DTYPES[dtype_name]).eval()

    lcfg = cfg.peft.lora
    facts = {
        "library": "peft" if adapter else "transformers",
        "method": str(meta["method"]),
        "step": _step_fact(meta),
        "started from": f"`{_base_reference(base)}`",
        "LoRA": (
            "none (every weight trained)"
            if not lora
            else f"r={lcfg.r}, alpha={lcfg.alpha}, "
            + ("merged into the weights" if merge_lora else "adapter folder (peft) on the above")
        ),
        "dtype": dtype_name,
        "source checkpoint": f"`{source.resolve()}`",
        "world size": str(meta["world_size"]),
        "dsunlearn": __version__,
    }
    card = model_card(facts, forget_entities(cfg, origin), run_metrics(save_dir, meta, cfg))
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)  # after peft's own card, which it replaces
    return out

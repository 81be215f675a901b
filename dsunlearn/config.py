"""Readable configs: dataclasses loaded from YAML, then `key=value` overrides from the CLI.

Every field is typed; an unknown key, a value of the wrong type or an unreadable file is a
`ConfigError` naming the key. Nested sections use dotted keys: `optim.lr=1e-4`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dsunlearn.errors import ConfigError

T = TypeVar("T")


@dataclass
class DataConfig:
    """Which benchmark to use. `path=None` means the built-in generated benchmark."""

    path: str | None = None  # local folder or hub id of an MLLMU-Bench-shaped benchmark
    # The layout of `path`: mllmu (MLLMU-Bench's, also the built-in one's) or clear (CLEAR's
    # forgetXX/retainXX configs, dsunlearn/data/clear.py load_clear_benchmark).
    benchmark: str = "mllmu"
    seed: int = 0  # built-in benchmark: generator seed
    entities: int = 20  # built-in benchmark: number of fictitious people
    forget_pct: int = 10  # share of entities in the forget split
    root: str = "data"  # where built-in benchmarks are written
    # Benchmarks without a Val_Set/ folder: the share of evaluation items that a seeded hash
    # puts in the validation split (selection reads only it; the rest is the test split).
    val_pct: int = 20
    split_seed: int = 0

    def resolved_path(self) -> str:
        if self.path:
            return self.path
        return str(Path(self.root) / f"builtin-seed{self.seed}-e{self.entities}")


@dataclass
class ModelConfig:
    """A built-in tiny model name, a hub id or a local HF folder."""

    name: str = "tiny-llava"
    dtype: str = "fp32"  # fp32 | bf16
    # Recompute each decoder and vision layer in the backward (non-reentrant): activations
    # then cost one layer's worth plus the layer inputs, at about one more forward of compute.
    gradient_checkpointing: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    batch_size: int = 4  # global batch: split evenly over ranks
    steps: int = 0  # 0: one epoch over the forget split
    epochs: int = 1


@dataclass
class EvalConfig:
    enabled: bool = True
    batch_size: int = 32  # global; per rank = batch_size // world_size
    max_items: int = 0  # cap per metric (0: all); keeps large retain sets quick
    gen_max_new_tokens: int = 8
    # Which benchmark's protocol scores the models (builtin | mllmu | clear | mmubench), on
    # `path` (default: data.path, the data the run trains on).
    benchmark: str = "builtin"
    path: str | None = None
    every: int = 0  # in-run evaluation of the validation split every N iterations (0: none)
    val_max_items: int = 0  # cap per validation metric (0: all); in-run evaluation cost
    # false: no test split at all (a sweep's trials choose on validation and must not see test)
    test: bool = True
    # A folder where the reference models' scores (vanilla, gold) are kept between runs of the
    # same models, data and evaluation settings: a sweep's trials score them once, not per trial.
    reference_cache: str = ""
    # General-ability benchmarks a run's report adds (eval/utility.py), names from
    # UTILITY_BENCHMARKS: did unlearning hurt what the model should still do? `utility_paths`:
    # benchmark -> its folder (pope) or TSV (mmbench); a missing entry: the built-in fixture,
    # written once under data.root (meaningful for the tiny models only as a smoke test).
    utility: list[str] = field(default_factory=list)
    utility_paths: dict[str, str] = field(default_factory=dict)
    # MMBench's CircularEval: each question asked once per rotation of its options, right only
    # if every rotation is (N options: N times the generation).
    mmbench_circular: bool = False

    def __post_init__(self) -> None:
        """Unknown general-ability names fail when the config is read, before any model loads."""
        self.check_utility()

    def check_utility(self) -> None:
        """One line for the first unknown name in `utility` or `utility_paths`."""
        for key, names in (
            ("eval.utility", self.utility),
            ("eval.utility_paths", self.utility_paths),
        ):
            unknown = [n for n in names if n not in UTILITY_BENCHMARKS]
            if unknown:
                raise ConfigError(
                    f"{key}: unknown benchmark '{unknown[0]}' (known: {', '.join(UTILITY_BENCHMARKS)})"
                )


UTILITY_BENCHMARKS = ("pope", "mmbench")  # EvalConfig.utility: general-ability benchmarks


@dataclass
class SelectConfig:
    """Which evaluated step of a method is its result (eval/selection.py has the rules)."""

    # gold_first: the first step with forget <= gold + forget_margin and retain >= retain_share
    # x vanilla (validation), else the best score; best_score: the best score; last: the end.
    criterion: str = "gold_first"
    forget_margin: float = 0.05
    retain_share: float = 0.95


@dataclass
class EarlyStopConfig:
    patience: int = 0  # stop after K evaluations that do not change the selection (0: never)


@dataclass
class MaskConfig:
    """MMUnlearner's saliency mask: which weights the forget step may change."""

    # Defaults are the paper's code: ratio >= 1, language model, Linear weights only.
    mode: str = "ratio"  # ratio: (F_f + eps) / (F_p + eps) >= tau; topk: the top topk_pct %
    tau: float = 1.0
    topk_pct: float = 50.0  # SalUn's default
    modules: str = "language"  # vision (with the projector) | language | both
    linear_only: bool = True  # only the weights of the blocks' nn.Linear layers (not lm_head)
    eps: float = 1e-15


@dataclass
class MethodConfig:
    """Hyper-parameters shared by the methods; each method reads the ones it needs."""

    npo_beta: float = 0.4
    simnpo_beta: float = 2.5  # SimNPO's inverse temperature on the length-normalised log-prob
    simnpo_gamma: float = 0.0  # SimNPO's reward margin
    idkpo_beta: float = 0.1  # IdkPO's DPO temperature
    idkpo_refusals: str = ""  # a file of refusals, one per line ("" = the built-in set)
    undial_gamma: float = 10.0  # UNDIAL: how far the teacher's label logit is lowered
    # RMU (WMDP's Zephyr-7B run: layer 7, c 6.5, alpha 1200, mlp.down_proj of layers 5-7)
    rmu_layer: int = -1  # steered decoder layer; -1: 7/32 of the depth (at least 2)
    rmu_steering: float = 6.5  # c: the norm of the control vector the forget activations chase
    rmu_alpha: float = 1200.0  # weight of the retain activation-matching loss
    rmu_modules: list[str] = field(default_factory=lambda: ["mlp.down_proj"])  # per layer
    # MANU (the MANU code's defaults): prune the top 2 % of each modality's MLP neurons
    manu_prune_pct: float = 2.0
    manu_modalities: list[str] = field(default_factory=lambda: ["vision", "language"])
    manu_weights: list[float] = field(
        default_factory=lambda: [2.0, 0.0, 2.0, 2.0]
    )  # abs freq var rms
    manu_threshold: float = 0.1  # |a| above it counts as firing (the frequency function)
    manu_max_examples: int = 0  # per forget/retain set and modality (0: all)
    manu_batch_size: int = 8  # per rank, for the statistics' forwards
    kl_weight: float = 1.0
    retain_weight: float = 1.0
    # SIU (defaults from the paper's code: lr 3e-4, batch 4, ~6 steps per concept, alpha=beta=1;
    # the paper's text gives alpha 0.9, beta 0.75).
    siu_alpha: float = 1.0  # weight of the cross-entropy on the constructed answers
    siu_beta: float = 1.0  # weight of the Dual Masked KL to the frozen original model
    siu_lr: float = 3e-4
    siu_batch_size: int = 4  # global
    siu_steps: int = 6  # per forget entity (SIU unlearns one concept from one image)
    siu_image_index: int = 0  # which training image of each forget entity SIU sees
    siu_other_qa: int = 8  # target 4: how many other-entity text QA pairs per entity
    siu_augment: bool = False  # a fresh random view (shift/scale/brightness) of the image per step
    siu_loss: str = "fused"  # fused: hidden states + gathered lm_head; eager: full logits
    # MMUnlearner: the saliency mask (scored on the vanilla weights before the first step, or
    # loaded from `dsunlearn saliency`'s folder), then the paper's alternating schedule.
    mmu_mask: MaskConfig = field(default_factory=MaskConfig)
    mmu_lr: float = 0.0  # the method's learning rate; 0: optim.lr (the paper: 1e-5 at 7B)
    mmu_mask_dir: str = ""  # a saliency folder or checkpoint tag with mask_rank<R>.pt files
    mmu_unit_batch: int = 4  # saliency pass: examples per unit (one global batch)
    mmu_micro_batches: int = 2  # per unit; a multiple of the world size
    mmu_max_units: int = 0  # per loader (0: every complete unit)
    mmu_retain_per_forget: int = 0  # retain steps per forget step; 0: len(retain)/len(forget)


@dataclass
class LoraConfig:
    """LoRA adapters (peft) instead of full fine-tuning; r = 0 trains every weight."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.0
    # None: every Linear of the language model except lm_head; else module names or suffixes
    target_modules: list[str] | None = None


@dataclass
class PeftConfig:
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class CheckpointConfig:
    """When a run saves what it needs to continue bit for bit (engine/checkpoint.py)."""

    every: int = 0  # iterations between checkpoints of a method (0: none mid-run)
    final: bool = False  # keep each method's unlearned model as its last checkpoint
    keep: int = 2  # complete checkpoints kept per method, newest first (0: all)
    stop_at: int = 0  # checkpoint and stop (exit 75, as if preempted) at this iteration
    stop_request: int = 1  # ... of this request (`requests`: 1 is the first)


ATTACKS = ("relearn", "quant", "probe", "rephrase", "mia")
REPHRASINGS = ("crop", "flip", "rotate", "colour", "blur", "jpeg", "redraw")


@dataclass
class AuditConfig:
    """The attacks of `dsunlearn audit` (dsunlearn/audit/): each is applied alike to the audited
    model, the gold model and the vanilla model, so gold's figure is the yardstick."""

    enabled: bool = False  # `unlearn audit=true`: audit each method's selected weights
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    relearn_steps: list[int] = field(default_factory=lambda: [5, 10, 20, 40])  # measured after
    relearn_lr: float = 5e-4
    relearn_batch_size: int = 2  # global: the set is one training image per forget person
    quant_bits: list[int] = field(default_factory=lambda: [8, 4])
    quant_group: int = 128  # weights per scale, along each row (input dimension)
    rephrase: list[str] = field(default_factory=lambda: list(REPHRASINGS))
    redraw_views: int = 2  # built-in benchmark: new renderings per forget person
    mia_k: float = 20.0  # min-k% and min-k%++: the share of least likely tokens
    mia_fpr: float = 0.01  # TPR is read at this false-positive rate
    probe_l2: float = 1e-2  # the identity probe's weight decay (standardised features)
    retain_max_items: int = 0  # cap on retain VQA items (0: all)
    # The verdict: an attack that lifts the model more than `margin` above gold's figure found
    # knowledge that gold does not have.
    margin: float = 0.1
    # A folder that keeps the gold and vanilla models' attack results between audits of the
    # same references, data and settings: auditing six methods scores the references once.
    reference_cache: str = ""


@dataclass
class UnlearnConfig:
    name: str = "unlearn"
    methods: list[str] = field(default_factory=lambda: ["ga"])
    # Forget requests that arrive one after another (person ids, e.g. [[P012], [P015, P003]]):
    # one unlearning step per request, each from the previous step's selected weights
    # (recipes/requests.py). []: one request, the data's forget split.
    requests: list[list[str]] = field(default_factory=list)
    vanilla: str | None = None  # model folder; None: the learned checkpoint for data+model
    # The gold model (never saw the forget faces): a folder; None: the learned gold model for
    # data+model+seed if it is cached; "none": no gold row.
    gold: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)  # peft.lora.r > 0: train adapters
    eval: EvalConfig = field(default_factory=EvalConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb (offline)
    deepspeed: str = "configs/deepspeed/zero3_cpu.json"
    out_dir: str = "runs"
    seed: int = 0
    log_every: int = 1
    # DeepSpeed checkpoints (every rank writes its own ZeRO-3 shard, so no rank holds the full
    # model): <out_dir>/<name>/checkpoints/<method>/step<N>/, `latest` names the newest.
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # `audit=true`: every method's selected weights go through `dsunlearn audit`'s attacks
    # against the gold and vanilla models; the report gets its verdicts (run_dir/audit/<method>/)
    audit: AuditConfig = field(default_factory=AuditConfig)
    resume: str = ""  # auto: continue from the run folder's latest complete checkpoint, if any
    dist_timeout_s: int = 600  # a collective waiting longer (a dead rank) fails the run


@dataclass
class SaliencyConfig:
    """Score every weight of `vanilla` on forget vs preserve data and save the mask."""

    vanilla: str = ""  # the model to score (a folder, hub id or tiny name)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    unit_batch: int = 4  # examples per unit (one global batch)
    micro_batches: int = 2  # per unit; a multiple of the world size
    max_units: int = 0  # per loader (0: every complete unit)
    mask: MaskConfig = field(default_factory=MaskConfig)
    deepspeed: str = "configs/deepspeed/zero3_cpu.json"
    out_dir: str = "runs/saliency"


@dataclass
class LearnConfig:
    """Fine-tune a vanilla model on every entity so that there is something to forget."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=1e-3,
            weight_decay=0.01,
            betas=(0.9, 0.98),
            grad_clip=1.0,
            warmup_steps=50,
            batch_size=32,
            steps=3000,
        )
    )
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(batch_size=64))
    deepspeed: str = "configs/deepspeed/zero3_cpu.json"
    target_acc: float = 0.95  # every accuracy, so the vanilla model knows what it must forget
    eval_every: int = 250
    augment: bool = True  # fresh random shift/scale/brightness/noise on every training image
    cache_dir: str | None = None  # None: $DSUNLEARN_CACHE, else ./checkpoints
    seed: int = 0
    # The gold model: the vanilla's training (same steps and seed) minus every image of a forget
    # person; it knows their facts by name, never their faces. Needs the vanilla model cached.
    gold: bool = False


# --------------------------------------------------------------------------- loading


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting the harmless cases (int to float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}' cannot be null")
    if _is_dataclass_type(tp):
        if isinstance(value, bool) and "enabled" in {f.name for f in dataclasses.fields(tp)}:
            value = {"enabled": value}  # `audit=true` is short for `audit.enabled=true`
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {
            _coerce(k, kt, f"{key}.{k}"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()
        }
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' needs {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    raise ConfigError(f"config key '{key}' has an unsupported type {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys are errors, missing ones take defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge `a.b=value` strings into a nested mapping (values parsed as YAML scalars)."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if isinstance(child, bool):  # `audit=true audit.x=1`: the switch, then a setting
                child = node[part] = {"enabled": child}
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{part}' in '{item}' is not a section")
            node = child
        if isinstance(value, bool) and isinstance(node.get(path[-1]), dict):
            value = {**node[path[-1]], "enabled": value}  # `audit.x=1 audit=true`: keep x
        node[path[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read YAML `path` (optional) into `cls`, then apply `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {p} is not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (or any JSON-able object)."""
    if dataclasses.is_dataclass(obj):
        obj = to_dict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:10]

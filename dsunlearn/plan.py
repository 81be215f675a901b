"""`dsunlearn plan`: per-rank memory of an unlearning run before it is launched, and a verdict.

Why: a 7B run that does not fit fails minutes into its Slurm job, after the model load. The
arithmetic here is docs/scaling.md's (sections 1-4 and "Planning a run"), applied to the exact
shape of the model the config names (`dsunlearn.models.published.model_shape`: published
configs, built-in tiny models or a local folder's config.json; nothing is downloaded), to the
config's methods, batch sizes, dtype, LoRA and DeepSpeed JSON. Every figure is an estimate from
formulas, not a measurement; `plan_categories` returns them as a dict so that tests and
benchmarks can compare them with measured bytes.

Categories, in bytes per rank (Ψ = all parameters, Ψt = trainable ones, each tensor padded to a
multiple of the world size W, "_W" = the per-rank share):

- params, grads, optimizer: p·Ψ_W, p·Ψt_W, 12·Ψt_W (p = 2 in bf16, 4 in fp32);
- persistent: tensors under `stage3_param_persistence_threshold` stay whole on every rank;
- reference: the frozen vanilla engine, p·Ψ_W (the unlearn recipe always builds it);
- fixed: DeepSpeed's buffers F (reduce bucket + live parameters + prefetch bucket, at p bytes);
- activations: decoder and vision tower, with or without activation checkpointing;
- logits: the output head's logits, whole or in chunks of `chunk_rows` rows;
- saliency: MMUnlearner's F_forget, F_preserve and score buffers (fp32) during its saliency
  pass; mask: its bool mask plus the packed bits, for the whole run;
- host: what offload moves to host RAM, and the in-run selection's fp32 snapshot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from dsunlearn.config import UnlearnConfig
from dsunlearn.errors import ConfigError
from dsunlearn.models.published import PARTS, ModelShape, model_shape

GIB = 2**30
ADAM_BYTES = 12  # fp32 master + Adam m + v
OFFLOAD_HOST_BYTES = 18  # bf16 grad partition + fp32 grad buffer + 12 (scaling.md section 3)
MASK_BYTES = 1.0 + 1.0 / 8.0  # bool mask (saliency/mask.py) + packed bits (saliency/apply.py)
RESERVE = 0.10  # share of each GPU and host left for CUDA/NCCL context and fragmentation
# DeepSpeed 0.19 defaults of the keys our JSON configs leave unset (scaling.md section 2).
DS_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "stage3_max_live_parameters": 1e9,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_param_persistence_threshold": 1e5,
}
OFFLOADS = ("none", "optimizer", "optimizer+param")
CHUNK_ELEMS = 2**24  # kernels.chunked_head.CHUNK_ELEMS: fp32 logits per chunk buffer
# The methods' memory traits, as their classes declare them (`uses_reference` in
# dsunlearn/methods/*.py; tests/test_plan.py checks this table against those files): whether a
# step runs the frozen reference's forward (its logits), and whether the method has a mask.
REFERENCE_FORWARD = {"ga": False, "graddiff": False, "kl_min": True, "npo": True, "siu": True}
REFERENCE_FORWARD["mmunlearner"] = False
REFERENCE_FORWARD |= {"simnpo": False, "idkpo": True, "undial": True, "rmu": True, "manu": False}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    host_mem_gib: float

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError(
                f"--nodes and --gpus-per-node must be at least 1, got {self.nodes} and "
                f"{self.gpus_per_node}"
            )
        for flag, value in (("--gpu-mem", self.gpu_mem_gib), ("--host-mem", self.host_mem_gib)):
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{flag} must be a positive number of GiB, got {value}")


@dataclass(frozen=True)
class Workload:
    """What one method's run holds, independent of the cluster's size."""

    shape: ModelShape
    method: str
    dtype_bytes: int  # 2 (bf16) or 4 (fp32)
    trainable: list[int]  # element counts of the trainable tensors
    frozen: list[int]  # the others (a LoRA run's base model)
    micro_batch: int  # global examples per step; per rank = micro_batch / W
    text_tokens: int
    images: int  # pictures per example
    chunk_rows: int  # rows per logits chunk; 0: whole logits; -1: the kernels' default
    reference_forward: bool
    saliency: bool = False  # MMUnlearner's saliency pass runs in this run (no mmu_mask_dir)
    saliency_batch: int = 0  # examples per micro-batch of that pass (per rank)
    topk_selected: int = 0  # mask.mode=topk: elements its bisection copies to int64
    mask: bool = False
    head_trainable: bool = True  # the output head trains (not under LoRA): its fp32 gradient
    snapshot: bool = False  # in-run selection keeps an fp32 host copy of the trained partition
    ds: dict[str, float] = field(default_factory=lambda: dict(DS_DEFAULTS))


def fixed_elements(wl: Workload) -> float:
    """Elements of DeepSpeed's fixed buffers F (scaling.md section 2): the reduce bucket, which
    is allocated whole, plus the gathered parameters and the prefetch bucket, which are caps and
    cannot exceed the model (nor fall below its largest tensor, gathered whole)."""
    numels = wl.trainable + wl.frozen
    total, largest = sum(numels), max(numels)
    live = max(min(wl.ds["stage3_max_live_parameters"], total), largest)
    prefetch = min(wl.ds["stage3_prefetch_bucket_size"], total)
    return wl.ds["reduce_bucket_size"] + live + prefetch


def padded(numels: list[int], world: int) -> int:
    """Elements of one rank's partition: each tensor is padded to a multiple of W."""
    return sum(-(-n // world) for n in numels)


def _persistent_extra(numels: list[int], world: int, threshold: float) -> int:
    """Elements a rank holds beyond its partition: small tensors stay whole everywhere."""
    return sum(n - (-(-n // world)) for n in numels if n < threshold)


def activation_bytes(
    wl: Workload, per_rank: float, checkpointing: bool, batch: float | None = None
) -> dict[str, float]:
    """Decoder and vision-tower activations of one micro-batch (scaling.md section 4): 34·b·s·h
    per layer without checkpointing; with it, 2·b·s·h per layer (the stored inputs) plus one
    layer being recomputed (the larger tower's); scaled by p/2 (the rule counts 16-bit)."""
    sh = wl.shape
    b = per_rank if batch is None else batch
    s = wl.text_tokens + wl.images * sh.image.text
    s_v = wl.images * sh.image.vision
    scale = wl.dtype_bytes / 2
    text_layer = 34 * b * s * sh.hidden
    vision_layer = 34 * b * s_v * sh.vision_hidden
    if checkpointing:
        text = 2 * b * s * sh.hidden * sh.layers
        vision = 2 * b * s_v * sh.vision_hidden * sh.vision_layers
        recompute = max(text_layer, vision_layer)
        return {"activations": scale * (text + vision + recompute)}
    return {"activations": scale * (text_layer * sh.layers + vision_layer * sh.vision_layers)}


def chunk_rows_for(wl: Workload) -> int:
    """Rows per logits chunk: `chunk_rows`, or with -1 the kernels' own default (about
    CHUNK_ELEMS fp32 logits per buffer: `kernels.chunked_head.default_chunk`)."""
    if wl.chunk_rows >= 0:
        return wl.chunk_rows
    return max(1, CHUNK_ELEMS // max(1, wl.shape.vocab))


def logits_bytes(wl: Workload, per_rank: float) -> float:
    """The output head's logits for one micro-batch of b·s rows (an upper bound: the fused ops
    take the answer rows only).

    Whole logits (chunk 0), docs/scaling.md section 4: 10·b·s·V (bf16 logits, their fp32 copy,
    the fp32 log-softmax and its gradient), plus 6·b·s·V for the reference's logits.
    In chunks of c rows (`kernels/chunked_head.py`, `models/lm_head.py`): per chunk row 8·V for
    the trained side (bf16 logits, fp32 z overwritten by dL/dz, its bf16 copy for dL/dh) and 6·V
    for the reference (bf16, fp32); the head gathered whole for the op (p·V·h, held until the
    backward; the reference's too while its op runs); the head-gradient accumulator, p·V·h in
    the weight's dtype, when the head trains; and dL/dh, p·b·s·h."""
    sh = wl.shape
    rows = per_rank * (wl.text_tokens + wl.images * sh.image.text)
    ref = wl.reference_forward
    chunk = chunk_rows_for(wl)
    if chunk == 0:
        return (10 + (6 if ref else 0)) * rows * sh.vocab
    head = wl.dtype_bytes * sh.vocab * sh.hidden
    out = (8 + (6 if ref else 0)) * min(rows, chunk) * sh.vocab
    out += head * (2 if ref else 1) + wl.dtype_bytes * rows * sh.hidden
    if wl.head_trainable:
        out += head
    return out


def plan_categories(
    wl: Workload, world: int, checkpointing: bool, offload: str = "none"
) -> dict[str, float]:
    """Bytes per rank of every category for one world size, checkpointing setting and offload
    ("none", "optimizer", "optimizer+param"); "total" is the GPU peak (the saliency pass and
    the training steps are two phases, the larger counts) and "host" the host RAM per rank."""
    if offload not in OFFLOADS:
        raise ConfigError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    p = wl.dtype_bytes
    psi_w = padded(wl.trainable + wl.frozen, world)
    psi_t = padded(wl.trainable, world)
    threshold = wl.ds["stage3_param_persistence_threshold"]
    persistent = p * _persistent_extra(wl.trainable + wl.frozen, world, threshold)
    per_rank = wl.micro_batch / world
    gpu = {
        "params": p * psi_w,
        "grads": p * psi_t,
        "optimizer": ADAM_BYTES * psi_t,
        "persistent": 2 * persistent,  # trained model and reference
        "reference": p * psi_w,
        "fixed": p * fixed_elements(wl),
        **activation_bytes(wl, per_rank, checkpointing),
        "logits": logits_bytes(wl, per_rank),
        "saliency": 0.0,
        "mask": MASK_BYTES * psi_t if wl.mask else 0.0,
    }
    host = 4.0 * psi_t if wl.snapshot else 0.0
    if offload != "none":
        host += OFFLOAD_HOST_BYTES * psi_t
        gpu["grads"] = gpu["optimizer"] = 0.0
    if offload == "optimizer+param":
        host += gpu["params"] + gpu["reference"]
        gpu["params"] = gpu["reference"] = 0.0
    states = sum(gpu[k] for k in ("params", "grads", "optimizer", "persistent", "reference"))
    train_peak = states + gpu["fixed"] + gpu["activations"] + gpu["logits"] + gpu["mask"]
    total = train_peak
    if wl.saliency:
        # F_forget + F_preserve (fp32) for the whole pass; the score S (fp32), the bool mask
        # and, for topk, int64 copies of the selected scores while the mask is built.
        build = (4 + 4 + 4 + 1) * psi_t + 8 * padded([wl.topk_selected], world)
        gpu["saliency"] = float(build - psi_t)  # the bool mask is counted under "mask"
        pass_act = activation_bytes(wl, per_rank, checkpointing, batch=wl.saliency_batch)
        pass_logits = logits_bytes(replace(wl, reference_forward=False), wl.saliency_batch)
        during_pass = 8 * psi_t + pass_act["activations"] + pass_logits
        saliency_peak = states + gpu["fixed"] + max(during_pass, build)
        total = max(total, saliency_peak)
    return {**gpu, "total": total, "host": host}


# --------------------------------------------------------------------------- from a config


def _ds_settings(path: str) -> tuple[dict[str, float], str]:
    """The DeepSpeed JSON's buffer sizes (defaults where unset) and its offload."""
    from dsunlearn.engine.ds_config import read_ds_config

    ds = read_ds_config(path)
    zero = ds.get("zero_optimization") or {}
    settings = dict(DS_DEFAULTS)
    for key in DS_DEFAULTS:
        value = zero.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            settings[key] = float(value)
    opt = str((zero.get("offload_optimizer") or {}).get("device") or "none").lower()
    par = str((zero.get("offload_param") or {}).get("device") or "none").lower()
    offload = "none" if opt == "none" else ("optimizer+param" if par != "none" else "optimizer")
    return settings, offload


def _lora_tensors(shape: ModelShape, r: int) -> list[int]:
    """LoRA's A (r x in) and B (out x r) of every language block Linear (the default targets)."""
    return [n for fan_in, fan_out in shape.language_linears for n in (r * fan_in, fan_out * r)]


def workloads(cfg: UnlearnConfig, shape: ModelShape, text_tokens: int, chunk_rows: int):
    """One `Workload` per method of the config."""
    if cfg.model.dtype not in ("bf16", "fp32"):
        raise ConfigError(f"model.dtype must be bf16 or fp32, got '{cfg.model.dtype}'")
    unknown = [m for m in cfg.methods if m not in REFERENCE_FORWARD]
    if unknown:
        raise ConfigError(
            f"unknown method '{unknown[0]}' (known: {', '.join(sorted(REFERENCE_FORWARD))})"
        )
    ds, _ = _ds_settings(cfg.deepspeed)
    everything = shape.all_numels()
    if cfg.peft.lora.r > 0:
        trainable, frozen = _lora_tensors(shape, cfg.peft.lora.r), everything
    else:
        trainable, frozen = everything, []
    mc = cfg.method
    out = []
    for method in cfg.methods:
        mmu = method == "mmunlearner"
        saliency = mmu and not mc.mmu_mask_dir
        parts = {"vision": ("vision", "projector"), "language": ("language",)}
        selected_parts = parts.get(mc.mmu_mask.modules, ("vision", "projector", "language"))
        topk = sum(shape.counts[p] for p in selected_parts) if mc.mmu_mask.mode == "topk" else 0
        if cfg.peft.lora.r > 0:
            topk = sum(trainable) if mc.mmu_mask.mode == "topk" else 0
        out.append(
            Workload(
                shape=shape,
                method=method,
                dtype_bytes=2 if cfg.model.dtype == "bf16" else 4,
                trainable=trainable,
                frozen=frozen,
                micro_batch=mc.siu_batch_size if method == "siu" else cfg.optim.batch_size,
                text_tokens=text_tokens,
                images=1,
                chunk_rows=chunk_rows,
                reference_forward=REFERENCE_FORWARD[method],
                saliency=saliency,
                saliency_batch=mc.mmu_unit_batch // max(1, mc.mmu_micro_batches),
                topk_selected=topk,
                mask=mmu,
                head_trainable=cfg.peft.lora.r == 0,
                snapshot=cfg.eval.enabled and cfg.eval.every > 0,
                ds=ds,
            )
        )
    return out


# --------------------------------------------------------------------------- the verdict


@dataclass
class Plan:
    cfg: UnlearnConfig
    cluster: Cluster
    shape: ModelShape
    workloads: list[Workload]
    offload: str  # the DeepSpeed JSON's
    chunk_rows: int
    text_tokens: int

    def usable_gpu(self) -> float:
        return (1 - RESERVE) * self.cluster.gpu_mem_gib * GIB

    def usable_host(self) -> float:
        return (1 - RESERVE) * self.cluster.host_mem_gib * GIB

    def worst(self, world: int, ckpt: bool, offload: str) -> tuple[Workload, dict[str, float]]:
        rows = [(wl, plan_categories(wl, world, ckpt, offload)) for wl in self.workloads]
        return max(rows, key=lambda r: r[1]["total"])

    def fits(self, world: int, ckpt: bool, offload: str, gpus_per_node: int) -> bool:
        _, cats = self.worst(world, ckpt, offload)
        host_per_node = cats["host"] * gpus_per_node
        return cats["total"] <= self.usable_gpu() and host_per_node <= self.usable_host()

    def batch_problems(self, world: int) -> list[str]:
        """Global batches that do not split evenly over `world` ranks (the run would refuse)."""
        mc = self.cfg.method
        checks = [("optim.batch_size", self.cfg.optim.batch_size)]
        if "siu" in self.cfg.methods:
            checks.append(("method.siu_batch_size", mc.siu_batch_size))
        if "mmunlearner" in self.cfg.methods and not mc.mmu_mask_dir:
            checks.append(("method.mmu_micro_batches", mc.mmu_micro_batches))
        return [f"{k}={v} does not split over {world} ranks" for k, v in checks if v % world]

    def verdict(self) -> tuple[str, list[str]]:
        """(verdict, what to change): the first setting that fits on the given cluster, else the
        node count that fits without offload, else LoRA."""
        c = self.cluster
        w, g = c.world, c.gpus_per_node
        ckpt = self.cfg.model.gradient_checkpointing
        advice: list[str] = []
        if self.fits(w, ckpt, self.offload, g):
            how = "" if self.offload == "none" else f" (with {self.offload} offload)"
            verdict = f"fits{how}"
            if self.offload != "none" and self.fits(w, ckpt, "none", g):
                advice.append(
                    "fits without offload too: configs/deepspeed/zero3_bf16.json is faster"
                )
        elif not ckpt and self.fits(w, True, self.offload, g):
            verdict = "fits with activation checkpointing"
            advice.append("set model.gradient_checkpointing=true")
        else:
            verdict = ""
            for offload, json_name in (
                ("optimizer", "zero3_offload.json"),
                ("optimizer+param", "zero3_offload_param.json"),
            ):
                if OFFLOADS.index(offload) <= OFFLOADS.index(self.offload):
                    continue
                if self.fits(w, True, offload, g):
                    verdict = f"needs {offload} offload"
                    advice.append(
                        f"deepspeed=configs/deepspeed/{json_name}"
                        + ("" if ckpt else " model.gradient_checkpointing=true")
                    )
                    break
            if not verdict:
                nodes = next(
                    (
                        n
                        for n in (2**k for k in range(11))
                        if n > c.nodes and self.fits(n * g, True, "none", g)
                    ),
                    None,
                )
                if nodes is not None:
                    verdict = f"needs {nodes} nodes"
                    advice.append(f"sbatch -N {nodes} --gpus-per-node={g} launch/slurm.sbatch ...")
                    advice += [f"at W {nodes * g}: {x}" for x in self.batch_problems(nodes * g)]
                elif self.cfg.peft.lora.r == 0:
                    verdict = "use LoRA"
                    advice.append("peft.lora.r=16 (the baselines' LoRA): only adapters train")
                else:
                    verdict = "does not fit on up to 1024 nodes"
                    advice.append("shorten the sequences or lower the batch (see activations)")
        problems = self.batch_problems(w)
        if problems:
            advice.append("batch: " + "; ".join(problems) + " (set it to a multiple of W)")
        return verdict, advice


def make_plan(
    cfg: UnlearnConfig, cluster: Cluster, text_tokens: int = 256, chunk_rows: int = -1
) -> Plan:
    """The plan of an unlearn config on a cluster (input errors are one-line ConfigErrors)."""
    cluster.check()
    if text_tokens < 1:
        raise ConfigError(f"--text-tokens must be at least 1, got {text_tokens}")
    if chunk_rows < -1:
        raise ConfigError(f"--logits-chunk must be rows >= 0 (0: whole logits), got {chunk_rows}")
    shape = model_shape(cfg.model.name)
    wls = workloads(cfg, shape, text_tokens, chunk_rows)
    _, offload = _ds_settings(cfg.deepspeed)
    return Plan(cfg, cluster, shape, wls, offload, chunk_rows, text_tokens)


def plan_dict(plan: Plan) -> dict[str, Any]:
    """Every method x checkpointing x offload's categories (GiB per rank), and the verdict."""
    w = plan.cluster.world
    out: dict[str, Any] = {"world": w, "model": plan.shape.name, "methods": {}}
    for wl in plan.workloads:
        out["methods"][wl.method] = {
            f"{'ckpt' if ckpt else 'no_ckpt'}/{off}": {
                k: v / GIB for k, v in plan_categories(wl, w, ckpt, off).items()
            }
            for ckpt in (True, False)
            for off in OFFLOADS
        }
    out["verdict"], out["advice"] = plan.verdict()
    return out


# --------------------------------------------------------------------------- the report


ROWS = (
    ("params", "parameters"),
    ("grads", "gradients"),
    ("optimizer", "optimizer (fp32 master, m, v)"),
    ("persistent", "persistent small tensors"),
    ("reference", "reference model"),
    ("fixed", "DeepSpeed buffers F"),
    ("activations", "activations"),
    ("logits", "logits / chunk buffers"),
    ("saliency", "saliency buffers (pass only)"),
    ("mask", "MMUnlearner mask"),
    ("total", "GPU peak per rank"),
    ("host", "host RAM per rank"),
)


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{3 if unit == 'B' else 1}f}{unit}"
    return str(int(n))


def _chunk_text(plan: Plan) -> str:
    if plan.chunk_rows == 0:
        return "none (whole logits)"
    rows = chunk_rows_for(plan.workloads[0]) if plan.workloads else plan.chunk_rows
    return f"{rows} rows" + (" (the kernels' default)" if plan.chunk_rows < 0 else "")


def render(plan: Plan) -> str:
    """The text `dsunlearn plan` prints."""
    c, sh = plan.cluster, plan.shape
    w = c.world
    counts = sh.counts
    parts = ", ".join(f"{k} {_count(counts[k])}" for k in PARTS)
    lines = [
        f"model {sh.name} ({sh.source}, {sh.family}): {_count(counts['total'])} parameters "
        f"({parts})",
        f"image: {sh.image.text} decoder tokens, {sh.image.vision} vision-tower tokens per picture "
        f"({sh.image.note}); + {plan.text_tokens} text tokens per example",
        f"cluster: {c.nodes} node(s) x {c.gpus_per_node} GPUs = W {w}, {c.gpu_mem_gib:g} GiB per "
        f"GPU ({plan.usable_gpu() / GIB:.1f} usable), {c.host_mem_gib:g} GiB host per node",
        f"run: dtype {plan.cfg.model.dtype}, activation checkpointing "
        f"{'on' if plan.cfg.model.gradient_checkpointing else 'off'}, DeepSpeed "
        f"{plan.cfg.deepspeed} (offload: {plan.offload}), LoRA r {plan.cfg.peft.lora.r}, "
        f"logits chunk {_chunk_text(plan)}",
        "",
    ]
    wl, _ = plan.worst(w, plan.cfg.model.gradient_checkpointing, plan.offload)
    cols = [(ckpt, off) for ckpt in (True, False) for off in OFFLOADS]
    cats = {col: plan_categories(wl, w, *col) for col in cols}
    lines.append(
        f"GiB per rank, the most demanding method ({wl.method}; batch {wl.micro_batch}"
        f" global, {wl.micro_batch / w:g} per rank):"
    )
    short = {"none": "", "optimizer": "+opt.off", "optimizer+param": "+all.off"}
    head = [("ckpt" if ck else "no-ckpt") + short[o] for ck, o in cols]
    lines.append(f"{'':31}" + "".join(f"{h:>16}" for h in head))
    for key, label in ROWS:
        values = "".join(f"{cats[col][key] / GIB:>16.2f}" for col in cols)
        lines.append(f"{label:31}{values}")
    fits = "".join(
        f"{'fits' if plan.fits(w, ck, off, c.gpus_per_node) else 'no':>16}" for ck, off in cols
    )
    lines.append(f"{'fits (GPU and host per node)':31}{fits}")
    lines.append("(+opt.off: optimizer offload; +all.off: optimizer and parameter offload)")
    lines.append("")
    ckpt = plan.cfg.model.gradient_checkpointing
    per_method = ", ".join(
        f"{x.method} {plan_categories(x, w, ckpt, plan.offload)['total'] / GIB:.1f}"
        for x in plan.workloads
    )
    lines.append(f"per method, as configured (GiB per rank): {per_method}")
    verdict, advice = plan.verdict()
    lines.append(f"verdict: {verdict}")
    lines += [f"  change: {a}" for a in advice]
    lines.append(
        "(estimates from docs/scaling.md's formulas, not measurements; evaluation and generation"
        " are not included)"
    )
    return "\n".join(lines)

"""Quantization attack: weight-only, group-wise, symmetric round-to-nearest (int8 and int4,
groups of `quant_group` weights along each row), then forget and retain VQA.

Where torchao is installed (`pip install -e .[quant]`) its affine primitives do the rounding
(they run on CPU for both widths; its int4 module configs do not); otherwise, and for rows the
group does not divide, `rtn_symmetric` does: the same arithmetic in plain torch, equal to
torchao's bit for bit (tests/test_audit.py, against outputs torchao 0.18.0 wrote). bitsandbytes runs on CPU too, but its int8 is per row only and its
4-bit formats (nf4, fp4) are not integer grids, so it cannot do this grouping.

Zhang et al. 2024 ("Catastrophic Failure of LLM Unlearning via Quantization") found that 4-bit
quantization brings much forgotten knowledge back: an unlearning update smaller than the
quantization step is rounded away. The gold model, quantized the same way, is the yardstick.

Under ZeRO-3 each Linear weight is gathered alone (`GatheredParameters`, one tensor at a time:
no rank holds the model), quantized and dequantized on rank 0, and scattered back; the forward
passes then run on the rounded weights in the model's own dtype ("fake" quantization: the same
numbers an int kernel would compute with, with no int kernel needed).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from dsunlearn.audit.context import AuditContext, Source
from dsunlearn.models.encode import hf_model


def qmax_of(bits: int) -> int:
    """The symmetric integer range is [-qmax, qmax]: 127 for int8, 7 for int4 (no clipped end)."""
    return 2 ** (bits - 1) - 1


def rtn_symmetric(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round-to-nearest group-wise symmetric quantization of a 2-D weight [out, in], back in its
    dtype: per `group` consecutive weights of a row, scale = max|w| / qmax (at least the dtype's
    smallest normal), q = clamp(round(w * (1 / scale)), -qmax, qmax) (half to even), w' = q *
    scale, all in the weight's dtype. It is torchao's affine primitives' arithmetic to the bit
    (tests/test_audit.py), for rows whose length `group` does not divide (torchao refuses them):
    the short last group is padded with zeros, which change no maximum."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    pad = (-in_f) % group
    g = torch.nn.functional.pad(w, (0, pad)).reshape(out_f, -1, group)
    zero = torch.zeros((), dtype=w.dtype)
    amax = torch.maximum(-torch.minimum(g.amin(-1), zero), torch.maximum(g.amax(-1), zero))
    qmax = qmax_of(bits)
    scale = (amax / float(qmax)).clamp(min=torch.finfo(w.dtype).smallest_normal)
    q = torch.clamp(torch.round(g * (1.0 / scale[..., None])), -qmax, qmax)
    return (q * scale[..., None]).reshape(out_f, -1)[:, :in_f].to(w.dtype)


def torchao_symmetric(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The same quantization through torchao's affine primitives (`in` must divide by group)."""
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )

    block, qmax = (1, group), qmax_of(bits)
    scale, zero = choose_qparams_affine(
        w, MappingType.SYMMETRIC, block, torch.int8, quant_min=-qmax, quant_max=qmax
    )
    q = quantize_affine(w, block, scale, zero, torch.int8, quant_min=-qmax, quant_max=qmax)
    return dequantize_affine(
        q, block, scale, zero, torch.int8, quant_min=-qmax, quant_max=qmax, output_dtype=w.dtype
    )


def fake_quantize(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, str]:
    """(quantized-dequantized weight, the backend that made it): torchao where it runs (it is
    installed and the row length divides by the group), else `rtn_symmetric`."""
    if bits < 2 or bits > 8 or group < 1:
        raise ValueError(f"bits must be in [2, 8] and group >= 1, got {bits}, {group}")
    if w.shape[-1] % group == 0:
        try:
            return torchao_symmetric(w, bits, group), "torchao"
        except ImportError:
            pass
    return rtn_symmetric(w, bits, group), "rtn"


def quantize_model(model: Any, bits: int, group: int, zero3: bool) -> dict[str, int]:
    """Fake-quantize every `nn.Linear` weight of `model` in place; returns how many weights
    each backend quantized (on rank 0; the others hold the counts of the weights they saw).
    Every rank must call it (ZeRO-3 gathers are collective)."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    counts = {"weights": 0, "torchao": 0, "rtn": 0}
    for module in hf_model(model).modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        p = module.weight
        n = int(getattr(p, "ds_numel", p.numel()))
        counts["weights"] += n
        gather = deepspeed.zero.GatheredParameters([p], modifier_rank=0) if zero3 else None
        with gather or contextlib.nullcontext(), torch.no_grad():
            if rank == 0 or not zero3:
                q, backend = fake_quantize(p.data, bits, group)
                p.copy_(q)
                counts[backend] += n
    return counts


def quantization(ctx: AuditContext, source: Source) -> dict[str, Any]:
    """{"none": {...}, "int8": {...}, "int4": {...}}: forget and retain VQA of the model as it
    is and after each weight-only quantization (a fresh copy of the weights for each)."""
    sets = ctx.sets
    out: dict[str, Any] = {"group": ctx.cfg.quant_group}

    def measure(model: Any, processor: Any) -> dict[str, float]:
        return {
            "forget_vqa": ctx.mc_accuracy(model, processor, sets.forget_vqa),
            "retain_vqa": ctx.mc_accuracy(model, processor, sets.retain_vqa),
        }

    for i, bits in enumerate(ctx.cfg.quant_bits):
        with ctx.frozen(source) as (model, processor):
            if i == 0:
                out["none"] = measure(model, processor)
            counts = quantize_model(model, bits, ctx.cfg.quant_group, ctx.zero3)
            out[f"int{bits}"] = {**measure(model, processor), **counts}
    return out

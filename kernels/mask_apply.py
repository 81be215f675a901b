"""In-place multiply of a flat gradient buffer by a bit-packed 0/1 mask.

MMUnlearner updates only the salient weights: between backward and the optimizer step, the
forget step's gradient is multiplied by the saliency mask. Under ZeRO-3 each rank holds only its
own partition of every gradient, so the mask is stored per rank, for that local partition only,
and packed 1 bit per element (32x smaller than an fp32 mask, 8x smaller than a bool mask: the
mask stays resident next to the gradient for the whole run). Applying it is then one
bandwidth-bound pass over the gradient partition: read the gradient and 1/8 byte of mask per
element, write the gradient back.

Semantics: element i is kept where bit i of the mask is 1 and set to exactly +0.0 where it is 0,
even if it held NaN or inf (a select, not a multiply: NaN * 0 would stay NaN and poison the
optimizer state of weights that are meant to stay frozen).

Bit layout (``pack_mask``): element i is bit (i % 8) of byte i // 8 (little-endian within the
byte); the tail of the last byte is zero.

``mask_apply_reference`` is plain torch (unpack, then masked_fill_) and is the ground truth.
``mask_apply_`` dispatches to the Triton kernel (compiled on CUDA, interpreted on CPU when
TRITON_INTERPRET=1 was set before triton was imported) or to the reference.

Which DeepSpeed buffer it targets, and when: see the comment above ``mask_apply_``.
"""

from __future__ import annotations

import torch

from kernels.triton_utils import interpreter_ready, jit_once, tl, triton

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 4096  # elements per program (tests lower it to get many programs and a ragged tail)
_NUM_WARPS = 8


# --------------------------------------------------------------------------------------------
# Packing and reference
# --------------------------------------------------------------------------------------------


def packed_numel(numel: int) -> int:
    """Bytes of a packed mask for `numel` elements: ceil(numel / 8)."""
    return (int(numel) + 7) // 8


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask (any shape, flattened) -> uint8 [ceil(n/8)], element i = bit i%8 of byte i//8."""
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_mask expects a bool tensor, got {mask.dtype}")
    flat = mask.reshape(-1)
    n = flat.numel()
    nbytes = packed_numel(n)
    bits = torch.zeros(nbytes * 8, dtype=torch.uint8, device=mask.device)
    bits[:n] = flat.to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    # Distinct bits never carry, so a uint8 sum is an exact bitwise OR.
    return (bits.view(nbytes, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_mask``: bool [numel]."""
    _check_packed(packed, numel)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def _check_packed(packed: torch.Tensor, numel: int) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed mask must be 1-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != packed_numel(numel):
        raise ValueError(
            f"packed mask has {packed.numel()} bytes, {numel} elements need {packed_numel(numel)}"
        )


def _check(buf: torch.Tensor, packed: torch.Tensor) -> None:
    if buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(
            f"buf must be a contiguous 1-D tensor, got shape {tuple(buf.shape)}, "
            f"stride {tuple(buf.stride())}"
        )
    _check_packed(packed, buf.numel())
    if not packed.is_contiguous():
        raise ValueError("packed mask must be contiguous")
    if packed.device != buf.device:
        raise ValueError(f"buf is on {buf.device}, packed mask on {packed.device}")


def mask_apply_reference(buf: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Plain torch: zero `buf` in place where the mask bit is 0 (NaN/inf included); returns buf."""
    _check(buf, packed)
    return buf.masked_fill_(~unpack_mask(packed, buf.numel()), 0)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


def _mask_apply_kernel(
    buf_ptr,  # [n] fp32/bf16/fp16, masked in place
    bits_ptr,  # [ceil(n/8)] uint8, element i = bit i%8 of byte i//8
    n,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: buffers may exceed 2**31 elements
    offs = start + tl.arange(0, BLOCK)
    inb = offs < n
    byte = tl.load(bits_ptr + (offs >> 3), mask=inb, other=0).to(tl.int32)
    keep = ((byte >> (offs & 7).to(tl.int32)) & 1) != 0
    x = tl.load(buf_ptr + offs, mask=inb, other=0.0)
    tl.store(buf_ptr + offs, tl.where(keep, x, tl.zeros_like(x)), mask=inb)


def _kernel():
    """The jitted kernel, decorated at first use (once per compiled/interpreted mode)."""
    return jit_once(_mask_apply_kernel)


def _triton_usable(buf: torch.Tensor) -> bool:
    if buf.dtype not in TRITON_DTYPES:
        return False
    if buf.is_cuda:
        return triton is not None
    return interpreter_ready()


def mask_backend(buf: torch.Tensor) -> str:
    """Which implementation `mask_apply_(use_triton=None)` runs for `buf`: "triton" or "torch"."""
    return "triton" if _triton_usable(buf) else "torch"


# Which DeepSpeed buffer to mask (DeepSpeed 0.19.8, ``deepspeed/runtime/zero/stage3.py``, class
# DeepSpeedZeroOptimizer_Stage3, not offloaded):
#
# - Every rank's gradient partitions of ALL parameters live in one contiguous flat tensor,
#   ``optimizer.grad_partitions_flat_buffer`` (``__init__``, lines 786-802), dtype
#   ``gradient_accumulation_dtype``; ``__param_id_to_grad_partition[param.ds_id]`` is a narrow
#   view of it, one per parameter, in the order of ``itertools.chain(*fp16_groups)``, each
#   ``param.partition_numel()`` long.
# - ``partition_grads`` (lines 2006-2040) copies (first micro-step) or adds (later micro-steps)
#   the reduce-scattered partition into that view; ``independent_gradient_partition_epilogue``
#   (lines 1407-1432) synchronises the reduce stream and points ``averaged_gradients[i]`` at the
#   same views (no copy).
# - The fp32 buffer the optimizer actually steps on, ``fp32_partitioned_groups_flat[i].grad``,
#   does not exist between steps: ``step`` (lines 2873-2949) builds it per sub-group inside
#   ``_prepare_fp32_grad_for_sub_group`` (lines 2683-2699, called at 2913) as a NEW tensor
#   (``flatten(averaged_gradients[i]).to(fp32)``), then unscales/clips it and calls
#   ``_optimizer_step`` (2921), and ``_release_sub_group`` (line 2735) drops it again. There
#   is no hook between those calls, so it cannot be the target. The gradient norm used for
#   clipping is also taken from ``averaged_gradients`` (``_get_norm_groups``, line 2579),
#   before that flatten.
# - ``deepspeed.utils.safe_get_local_grad`` (``utils/tensor_fragment.py`` line 259) ->
#   ``get_local_fp32_grad_for_param`` (stage3.py line 3205) -> ``_get_fp32_grad_state_partition``
#   (line 3102) returns ``__param_id_to_grad_partition[ds_id]`` passed through ``.to(device)
#   .float()``: the live view when the accumulation dtype is fp32 (both calls are no-ops), a COPY
#   when it is bf16/fp16 (so an in-place op on the result is then lost). ``safe_set_local_grad``
#   (line 275) -> ``set_local_grad_for_param`` (line 3213) copies its value into the same view.
#
# So the kernel and the fallback target ``grad_partitions_flat_buffer``, the whole local partition
# in one launch (the rank's mask is the concatenation of the local mask partitions of every
# parameter in that same order; partition padding may carry 0 bits): it is the storage that both
# the clipping norm and the optimizer's fp32 ``.grad`` are computed from, and masking it in place
# needs no extra copy (per parameter, ``safe_get_local_grad`` + ``mask_apply_`` +
# ``safe_set_local_grad`` does the same at the cost of a copy each way when the accumulation
# dtype is not fp32, and one launch per parameter). With ``offload_optimizer`` the same buffer is
# the source too: ``finalize_gradient_accumulation_boundary`` (called at the start of
# ``engine.step``, ``runtime/engine.py`` line 3601) copies it into the CPU
# ``fp32_partitioned_groups_flat[i].grad`` (``_offload_grad_partition_at_boundary``, line 1443).
# That CPU buffer is what ``safe_get/set_local_grad`` read and write under offload (line 3111),
# so before ``engine.step`` they see last step's values and their writes are overwritten.
#
# Timing: the mask must be applied after the reduce-scatter of the step's LAST micro-batch (after
# ``engine.backward`` of that micro-batch has returned, whose epilogue waits for the reduce
# stream; masking an earlier micro-batch's partial sum and then accumulating unmasked ones would
# leak gradient into frozen weights) and before ``engine.step`` / ``optimizer.step``, on the
# current stream.
def mask_apply_(
    buf: torch.Tensor, packed: torch.Tensor, use_triton: bool | None = None
) -> torch.Tensor:
    """Zero `buf` in place where the bit-packed mask is 0; returns `buf` (same storage).

    buf: contiguous 1-D fp32/bf16/fp16 (any float dtype on the reference path), e.g. a rank's
    ZeRO-3 ``grad_partitions_flat_buffer``; packed: ``pack_mask`` output, exactly
    ceil(numel/8) bytes, on buf's device. use_triton=None picks Triton for CUDA tensors, or on
    CPU when the interpreter is active; True/False forces the choice.
    """
    _check(buf, packed)
    if use_triton is None:
        use_triton = _triton_usable(buf)
    if not use_triton:
        return mask_apply_reference(buf, packed)
    if triton is None:
        raise RuntimeError("use_triton=True but triton is not importable")
    if buf.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton path takes {TRITON_DTYPES}, got {buf.dtype}")
    n = buf.numel()
    if n == 0:
        return buf
    grid = (triton.cdiv(n, _BLOCK),)
    _kernel()[grid](buf, packed, n, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return buf

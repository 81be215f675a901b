"""Bit-packed mask apply: packing, the torch reference, and the Triton kernel against it."""

import pytest
import torch

import kernels.mask_apply as ma
from kernels.mask_apply import mask_apply_, mask_apply_reference, pack_mask, unpack_mask
from tests.conftest import rerun_under_interpreter

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

# The Triton path runs here on CPU through the interpreter, which must be switched on before
# triton is first imported (see tests/test_kernel_dmk_ce.py): in a plain run the interpreter
# tests are skipped and test_triton_suite_in_subprocess reruns them (-k interp) in a fresh
# process with TRITON_INTERPRET=1. Where a GPU is present (never in CI), the same tests also run
# the compiled kernel on CUDA (the "cuda" parameter of DEVICES; the rerun deselects those).
needs_interp = pytest.mark.skipif(
    not ma.interpreter_ready(),
    reason="needs TRITON_INTERPRET=1 at triton import: run by test_triton_suite_in_subprocess",
)
COMPILED_CUDA = ma.triton is not None and not ma.interpreter_ready() and torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not COMPILED_CUDA, reason="needs a CUDA GPU (compiled Triton)")
DEVICES = [pytest.param("cpu", marks=needs_interp), pytest.param("cuda", marks=needs_cuda)]


@pytest.mark.skipif(ma.triton is None, reason="triton not installed")
@pytest.mark.skipif(ma.interpreter_ready(), reason="already in interpreter mode")
def test_triton_suite_in_subprocess():
    rerun_under_interpreter(__file__, "interp and not cuda")


def rand_mask(n: int, p: float = 0.5, seed: int = 0, device="cpu") -> torch.Tensor:
    return (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p).to(device)


def rand_buf(n: int, dtype: torch.dtype, seed: int = 1, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(device=device, dtype=dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor: equality of these is bit-identity (NaN, -0.0 included)."""
    return t.view(_INT_VIEW[t.dtype])


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1023, 1024, 1025, 4321])
def test_pack_unpack_round_trip(n):
    mask = rand_mask(n, seed=n)
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 7) // 8,)
    assert torch.equal(unpack_mask(packed, n), mask)


def test_pack_unpack_round_trip_random_lengths():
    g = torch.Generator().manual_seed(123)
    for n in torch.randint(1, 5000, (8,), generator=g).tolist():
        mask = rand_mask(n, p=torch.rand(1, generator=g).item(), seed=n)
        assert torch.equal(unpack_mask(pack_mask(mask), n), mask)


def test_pack_bit_order_and_zero_tail():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    assert pack_mask(mask).tolist() == [0b1000_0001, 0b0000_0110]  # tail bits 3..7 stay 0
    assert pack_mask(torch.ones(9, dtype=torch.bool)).tolist() == [255, 1]
    # Any shape packs in flattened (row-major) order.
    assert torch.equal(pack_mask(mask[:8].reshape(2, 4)), pack_mask(mask[:8]))


def test_pack_and_unpack_reject_bad_input():
    with pytest.raises(ValueError, match="bool"):
        pack_mask(torch.ones(8, dtype=torch.uint8))
    packed = pack_mask(torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="bytes"):
        unpack_mask(packed, 17)  # needs 3 bytes
    with pytest.raises(ValueError, match="bytes"):
        unpack_mask(packed, 8)  # needs 1 byte
    with pytest.raises(ValueError, match="uint8"):
        unpack_mask(packed.to(torch.int8), 9)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 9, 1000])
def test_reference_matches_boolean_multiply(n, dtype):
    mask = rand_mask(n, seed=n)
    buf = rand_buf(n, dtype)
    want = buf * mask  # finite inputs: a multiply by 0/1 (torch.equal treats -0.0 == 0.0)
    out = mask_apply_reference(buf, pack_mask(mask))
    assert out is buf and torch.equal(buf, want)


def test_reference_zeroes_nan_and_inf_but_keeps_them_where_kept():
    buf = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1.0, float("nan")])
    mask = torch.tensor([False, False, False, False, True, True])
    mask_apply_reference(buf, pack_mask(mask))
    assert bits(buf[:4]).tolist() == [0, 0, 0, 0]  # exactly +0.0
    assert buf[4].item() == 1.0 and torch.isnan(buf[5])


@pytest.mark.parametrize(
    "use_triton, dev",
    [
        (False, "cpu"),
        pytest.param(True, "cpu", marks=needs_interp),
        pytest.param(True, "cuda", marks=needs_cuda),
    ],
)
def test_shape_and_size_errors_interp_and_reference(use_triton, dev):
    buf = torch.zeros(20, device=dev)

    def u8(k, dtype=torch.uint8):
        return torch.zeros(k, dtype=dtype, device=dev)

    with pytest.raises(ValueError, match="bytes"):
        mask_apply_(buf, u8(2), use_triton=use_triton)
    with pytest.raises(ValueError, match="bytes"):
        mask_apply_(buf, u8(4), use_triton=use_triton)
    with pytest.raises(ValueError, match="1-D"):
        mask_apply_(buf.view(4, 5), u8(3), use_triton=use_triton)
    with pytest.raises(ValueError, match="contiguous"):
        mask_apply_(buf[::2], u8(2), use_triton=use_triton)
    with pytest.raises(ValueError, match="uint8"):
        mask_apply_(buf, u8(3, torch.int32), use_triton=use_triton)
    assert torch.count_nonzero(buf) == 0  # nothing was launched on a bad call


def test_dispatcher_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    buf = rand_buf(10, torch.float32)
    assert ma.mask_backend(buf) == "torch"
    calls = []
    real = ma.mask_apply_reference
    monkeypatch.setattr(ma, "mask_apply_reference", lambda *a: calls.append(1) or real(*a))
    mask_apply_(buf, pack_mask(rand_mask(10)))
    assert calls == [1]


# ---------------------------------------------------------------------------------------------
# Triton kernel (TRITON_INTERPRET=1 on CPU; compiled on CUDA if present) against the reference:
# bit-identical
# ---------------------------------------------------------------------------------------------

# Block 64 in the sweep: several programs, ragged tails; lengths not multiples of 8 or 64.
LENGTHS = [1, 7, 8, 9, 63, 64, 65, 127, 129, 1000, 1027]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_interp_matches_reference_sweep(monkeypatch, dtype, dev):
    monkeypatch.setattr(ma, "_BLOCK", 64)
    for n in LENGTHS:
        packed = pack_mask(rand_mask(n, p=0.3, seed=n, device=dev))
        buf = rand_buf(n, dtype, seed=n + 1, device=dev)
        ref = buf.clone()
        out = mask_apply_(buf, packed, use_triton=True)
        mask_apply_reference(ref, packed)
        assert out is buf
        assert torch.equal(bits(buf), bits(ref)), (n, dtype)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_interp_default_block_and_in_place(dtype, dev):
    n = ma._BLOCK + 13  # two programs, the second nearly empty
    packed = pack_mask(rand_mask(n, seed=5, device=dev))
    buf = rand_buf(n, dtype, device=dev)
    ref, ptr = buf.clone(), buf.data_ptr()
    assert ma.mask_backend(buf) == "triton"
    out = mask_apply_(buf, packed)  # dispatcher: interpreter active or CUDA, so Triton
    mask_apply_reference(ref, packed)
    assert out is buf and out.data_ptr() == ptr
    assert torch.equal(bits(buf), bits(ref))


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_interp_all_zero_and_all_one_masks(monkeypatch, dtype, dev):
    monkeypatch.setattr(ma, "_BLOCK", 64)
    n = 131
    buf = rand_buf(n, dtype, device=dev)
    before = buf.clone()
    ones = torch.ones(n, dtype=torch.bool, device=dev)
    mask_apply_(buf, pack_mask(ones), use_triton=True)
    assert torch.equal(bits(buf), bits(before))
    mask_apply_(buf, pack_mask(~ones), use_triton=True)
    assert torch.equal(bits(buf), torch.zeros_like(bits(buf)))


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_interp_nan_inf_masked_out_become_exact_zero(monkeypatch, dtype, dev):
    monkeypatch.setattr(ma, "_BLOCK", 64)
    n = 77
    buf = rand_buf(n, dtype, device=dev)
    buf[::3] = float("nan")
    buf[1::5] = float("inf")
    buf[2::7] = -float("inf")
    buf[4::11] = -0.0
    mask = rand_mask(n, seed=2, device=dev)
    ref = buf.clone()
    mask_apply_(buf, pack_mask(mask), use_triton=True)
    mask_apply_reference(ref, pack_mask(mask))
    assert torch.equal(bits(buf[~mask]), torch.zeros_like(bits(buf[~mask])))
    assert torch.equal(bits(buf[mask]), bits(ref[mask]))
    assert torch.isnan(buf[mask]).any()  # kept NaNs stay NaN: only masked-out ones are cleared


@pytest.mark.parametrize("dev", DEVICES)
def test_interp_empty_buffer_and_unsupported_dtype(dev):
    empty = torch.empty(0, device=dev)
    no_bits = pack_mask(torch.zeros(0, dtype=torch.bool, device=dev))
    assert mask_apply_(empty, no_bits, use_triton=True) is empty
    f64 = torch.ones(9, dtype=torch.float64, device=dev)
    packed = pack_mask(torch.ones(9, dtype=torch.bool, device=dev))
    with pytest.raises(ValueError, match="Triton path"):
        mask_apply_(f64, packed, use_triton=True)
    assert ma.mask_backend(f64) == "torch"  # use_triton=None: the reference handles it
    assert mask_apply_(f64, packed) is f64


@pytest.mark.skipif(ma.triton is None or ma.interpreter_ready(), reason="needs compiled triton")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_kernel_compiles_for_sm90_without_gpu(dtype, tmp_path, monkeypatch):
    """The interpreter accepts more than the compiler: lower the kernel for an H100 too."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError

    sig = {"buf_ptr": f"*{dtype}", "bits_ptr": "*u8", "n": "i64", "BLOCK": "constexpr"}
    src = ASTSource(fn=ma._kernel(), signature=sig, constexprs={"BLOCK": ma._BLOCK})
    try:
        out = ma.triton.compile(src, target=GPUTarget("cuda", 90, 32))
    except CompilationError:
        raise
    except Exception as exc:  # backend toolchain missing (e.g. no ptxas): frontend not reached
        pytest.skip(f"CUDA backend unavailable: {type(exc).__name__}: {exc}")
    assert "ttir" in out.asm

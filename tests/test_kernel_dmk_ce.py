"""alpha*CE + beta*Dual Masked KL: the torch reference on hand cases, the fused path against it."""

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.dual_masked_kl_ce import dual_masked_kl_ce, dual_masked_kl_ce_reference


def make_inputs(n, v, hid, ref_hid, dtype=torch.float32, bias=False, seed=0, drop=(1, 4)):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    inp = dict(
        h=rnd(n, hid).requires_grad_(),
        weight=rnd(v, hid, scale=0.5).requires_grad_(),
        ref_h=rnd(n, ref_hid).requires_grad_(),
        ref_weight=rnd(v, ref_hid, scale=0.5).requires_grad_(),
        labels=torch.randint(0, v, (n,), generator=g),
        token_mask=torch.rand(n, generator=g) < 0.4,
        drop_ids=torch.tensor([d for d in drop if d < v], dtype=torch.long),
        bias=rnd(v, scale=0.3).requires_grad_() if bias else None,
        ref_bias=rnd(v, scale=0.3).requires_grad_() if bias else None,
    )
    inp["labels"][::3] = -100
    return inp


def clone_inputs(inp):
    out = {}
    for k, t in inp.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out[k] = t.detach().clone().requires_grad_()
        else:
            out[k] = t
    return out


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def test_reference_hand_computed_tiny_case():
    # Identity hidden -> logits: z = h, r = ref_h (V = H = 3).
    eye = torch.eye(3)
    h = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0]], requires_grad=True)
    ref_h = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([2, 1])
    token_mask = torch.tensor([False, True])
    drop = torch.tensor([1])
    alpha, beta = 0.9, 0.75

    def lsm(x):
        m = math.log(sum(math.exp(t) for t in x))
        return [t - m for t in x]

    lq0, lq1 = lsm([0.0, 1.0, 2.0]), lsm([1.0, 0.0, 0.0])
    lp0 = lsm([2.0, 0.0, 0.0])
    ce = -lq0[2] - lq1[1]
    kl0 = sum(math.exp(lp0[v]) * (lp0[v] - lq0[v]) for v in (0, 2))  # v=1 dropped; row 1 masked
    expected = alpha * ce / 2 + beta * kl0 / 1
    got = dual_masked_kl_ce_reference(
        h, eye, ref_h, eye, labels, token_mask, drop, alpha=alpha, beta=beta
    )
    assert got.item() == pytest.approx(expected, rel=1e-6)
    got_sum = dual_masked_kl_ce_reference(
        h, eye, ref_h, eye, labels, token_mask, drop, alpha, beta, reduction="sum"
    )
    assert got_sum.item() == pytest.approx(alpha * ce + beta * kl0, rel=1e-6)
    got_none = dual_masked_kl_ce_reference(
        h, eye, ref_h, eye, labels, token_mask, drop, alpha, beta, reduction="none"
    )
    assert got_none.tolist() == pytest.approx([alpha * -lq0[2] + beta * kl0, alpha * -lq1[1]])


def test_reference_equals_kl_div_without_drop_or_mask():
    inp = make_inputs(6, 11, 8, 5, drop=())
    inp["labels"][:] = 3  # every row valid, none token-masked: a plain KL(p || q) sum
    inp["token_mask"].fill_(False)
    got = dual_masked_kl_ce_reference(**inp, alpha=0.0, beta=1.0, reduction="sum")
    log_q = torch.log_softmax(F.linear(inp["h"], inp["weight"]), -1)
    log_p = torch.log_softmax(F.linear(inp["ref_h"], inp["ref_weight"]), -1)
    want = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # Non-empty drop set: KL restricted to the kept ids, p and q not renormalised.
    inp["drop_ids"] = torch.tensor([0, 7])
    got = dual_masked_kl_ce_reference(**inp, alpha=0.0, beta=1.0, reduction="sum")
    keep = torch.ones(11, dtype=torch.bool)
    keep[[0, 7]] = False
    want = F.kl_div(log_q[:, keep], log_p[:, keep], reduction="sum", log_target=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("use_triton", [False, None])
def test_reference_frozen_side_gets_no_grad(use_triton):
    inp = make_inputs(5, 13, 4, 6, bias=True)
    loss = dual_masked_kl_ce(**inp, use_triton=use_triton)
    loss.backward()
    assert inp["h"].grad is not None and inp["weight"].grad is not None
    assert inp["bias"].grad is not None
    for k in ("ref_h", "ref_weight", "ref_bias"):
        assert inp[k].grad is None


def test_reference_all_labels_ignored_is_zero():
    inp = make_inputs(4, 9, 4, 4, bias=True)
    inp["labels"].fill_(-100)
    loss = dual_masked_kl_ce_reference(**inp)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(inp["h"].grad) == 0
    assert torch.count_nonzero(inp["weight"].grad) == 0
    assert torch.count_nonzero(inp["bias"].grad) == 0


def test_reference_gradient_matches_analytic_formula():
    inp = make_inputs(7, 10, 6, 3, drop=(2, 5))
    alpha, beta = 0.9, 0.75
    z = F.linear(inp["h"], inp["weight"]).detach().requires_grad_()
    eye_h = torch.eye(10)
    loss = dual_masked_kl_ce_reference(
        z, eye_h, inp["ref_h"], inp["ref_weight"], inp["labels"], inp["token_mask"],
        inp["drop_ids"], alpha, beta,
    )  # fmt: skip
    loss.backward()
    q = torch.softmax(z.detach(), -1)
    p = torch.softmax(F.linear(inp["ref_h"], inp["ref_weight"]).detach(), -1)
    keep = torch.ones(10)
    keep[inp["drop_ids"]] = 0
    valid = inp["labels"] != -100
    kl_rows = valid & ~inp["token_mask"]
    a = valid.float() * alpha / valid.sum()
    b = kl_rows.float() * beta / kl_rows.sum()
    onehot = F.one_hot(inp["labels"].clamp(min=0), 10).float()
    s = (p * keep).sum(-1, keepdim=True)
    dz = a[:, None] * (q - onehot) + b[:, None] * (q * s - p * keep)
    torch.testing.assert_close(z.grad, dz, atol=1e-6, rtol=1e-5)

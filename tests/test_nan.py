"""NaN and ±Inf behave as in torch.nn.GRU, on every fused kernel this machine can run.

torch.nn.GRU is the reference: for a NaN or Inf placed in the input, h0 or any
parameter, every kernel must give the same pattern of NaN / +Inf / −Inf /
finite in the output, h_n and (for NaN) the gradients. Finite values are
compared too, to the usual tolerance.
"""
from __future__ import annotations

import pytest
import torch

from grulab.kernels import fused



def pattern(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +Inf, 3 −Inf, elementwise."""
    p = torch.zeros_like(t, dtype=torch.int8)
    p[torch.isnan(t)] = 1
    p[t == float("inf")] = 2
    p[t == float("-inf")] = 3
    return p


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    gp, wp = pattern(got), pattern(want)
    assert torch.equal(gp, wp), (
        f"{what}: NaN/Inf pattern differs at {int((gp != wp).sum())} of {gp.numel()} places "
        f"(got {int((gp == 1).sum())} NaN, torch {int((wp == 1).sum())})")
    fin = wp == 0
    tol = 1e-9 if got.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got[fin], want[fin], rtol=tol, atol=tol, msg=what)


def torch_gru(I, H, dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.GRU(I, H, dtype=dtype)


# (where, index, value): one special value placed in one tensor
CASES = [
    ("x", (1, 0, 2), float("nan")),
    ("x", (0, 1, 0), float("inf")),
    ("x", (2, 0, 1), float("-inf")),
    ("h0", (0, 3), float("nan")),
    ("h0", (1, 2), float("inf")),
    ("h0", (0, 0), float("-inf")),
    ("weight_ih_l0", (5, 1), float("nan")),
    ("weight_hh_l0", (7, 3), float("nan")),
    ("weight_hh_l0", (2, 4), float("inf")),
    ("bias_ih_l0", (4,), float("nan")),
    ("bias_hh_l0", (30,), float("nan")),  # an n-gate bias (H = 12: rows 24..35)
    ("bias_hh_l0", (3,), float("inf")),   # r gate saturates at 1
    ("bias_ih_l0", (14,), float("-inf")), # z gate saturates at 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("where,index,value", CASES)
def test_forward_and_backward_match_torch(tier, dtype, B, where, index, value):
    T, I, H = 4, 5, 12
    ref = torch_gru(I, H, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, dtype=dtype, generator=g)
    h0 = torch.randn(1, B, H, dtype=dtype, generator=g)
    if B == 1 and len(index) >= 2 and where in ("x", "h0"):
        index = (index[0], 0, index[2]) if where == "x" else (0, index[1])
    with torch.no_grad():
        if where == "x":
            x[index] = value
        elif where == "h0":
            h0[(0,) + index] = value
        else:
            getattr(ref, where)[index] = value
    params = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    xg, hg = x.clone().requires_grad_(), h0.clone().requires_grad_()
    want_out, want_h = ref(xg, hg)
    out, h_T = fused.gru_layer(x.clone().requires_grad_(), h0[0].clone().requires_grad_(), *params,
                               reset_after=True, backend=tier)
    assert_same(out, want_out, "output")
    assert_same(h_T, want_h[0], "h_n")
    if value != value:  # NaN: gradients carry it the same way
        want = torch.autograd.grad(want_out.sum(), [*ref.parameters()], allow_unused=True)
        got = torch.autograd.grad(out.sum(), params)
        for name, w, gw in zip(["w_ih", "w_hh", "b_ih", "b_hh"], want, got):
            assert torch.equal(torch.isnan(gw), torch.isnan(w)), f"NaN pattern of d{name}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["grad of step 0", "weight_hh_l0"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_zero_h0_keeps_a_non_finite_first_step(tier, dtype, where, value):
    """With h0 = 0 the first step's hidden-side terms are zero, and the native kernels skip
    them; a NaN or Inf that meets that zero (in W_hh, or in the gradient reaching step 0,
    which dW_hh multiplies by h0) must still give torch.nn.GRU's pattern: 0 · Inf = NaN.
    B = 17 and H = 64: the packed kernels with the batch split by rows."""
    T, B, I, H = 3, 17, 5, 64
    ref = torch_gru(I, H, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, B, I, dtype=dtype, generator=g)
    h0 = torch.zeros(1, B, H, dtype=dtype)
    go = torch.randn(T, B, H, dtype=dtype, generator=g)
    with torch.no_grad():
        if where == "weight_hh_l0":
            ref.weight_hh_l0[70, 9] = value  # gate z, unit 6
        else:
            go[0, 2, 5] = value
    params = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    want_out, _ = ref(x, h0)
    want = torch.autograd.grad((want_out * go).sum(), [*ref.parameters()])
    out, _ = fused.gru_layer(x, h0[0], *params, reset_after=True, backend=tier)
    assert_same(out, want_out, "output")
    got = torch.autograd.grad((out * go).sum(), params)
    if where == "weight_hh_l0":
        for name, w, gw in zip(["w_ih", "w_hh", "b_ih", "b_hh"], want, got):
            assert_same(gw, w, f"d{name}")
    else:  # dW_hh, the gradient with the h0 term; an Inf's other Inf - Inf NaNs follow torch's order of ops
        assert_same(got[1], want[1], "dw_hh")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("where,index,value", CASES)
@pytest.mark.parametrize("B", [3, 9])
def test_step_and_both_variants_match_the_reference_loop(tier, dtype, reset_after, where, index, value, B):
    """Both cell forms (torch.nn.GRU has only reset-after): the notes' formulas in a plain loop.
    B = 9: float32 reset-before runs the packed forward split by rows (csrc/forward.cpp)."""
    from grulab import reference

    T, I, H = 3, 5, 12
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, B, I, dtype=dtype, generator=g)
    h0 = torch.randn(B, H, dtype=dtype, generator=g)
    ref = torch_gru(I, H, dtype)
    w = dict((n, p.detach().clone()) for n, p in ref.named_parameters())
    if where == "x":
        x[index] = value
    elif where == "h0":
        h0[index] = value
    else:
        w[where][index] = value
    params = [w["weight_ih_l0"], w["weight_hh_l0"], w["bias_ih_l0"], w["bias_hh_l0"]]
    want_out, want_h = reference.gru_layer(x, h0, *params, reset_after=reset_after)
    out, h_T = fused.gru_layer(x, h0, *params, reset_after=reset_after, backend=tier)
    assert_same(out, want_out, "output")
    assert_same(h_T, want_h, "h_n")
    step = fused.gru_step(x[0], h0, *params, reset_after=reset_after, backend=tier)
    assert_same(step, want_out[0], "single step")


@pytest.mark.parametrize("where", ["weight_ih_l0", "weight_hh_l0"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_reset_before_with_zero_h0_keeps_a_non_finite_first_step(tier, where, value):
    """The notes' form, h0 = 0, B = 17 and H = 40 (the packed forward by rows, a partial panel):
    step 0's r and z skip their hidden-side tiles, but c = r ⊙ h0 still goes through W_hn, so
    a NaN in one unit's r (from W_ir) reaches every unit's n, as in the plain loop."""
    from grulab import reference

    T, B, I, H = 3, 17, 5, 40
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, I, generator=g)
    h0 = torch.zeros(B, H)
    params = [torch.randn(3 * H, I, generator=g) * 0.3, torch.randn(3 * H, H, generator=g) * 0.2,
              torch.randn(3 * H, generator=g), torch.randn(3 * H, generator=g)]
    if where == "weight_ih_l0":
        params[0][7, 2] = value  # W_ir, unit 7: r of that unit alone
    else:
        params[1][2 * H + 7, 3] = value  # W_hn
    want_out, want_h = reference.gru_layer(x, h0, *params, reset_after=False)
    out, h_T = fused.gru_layer(x, h0, *params, reset_after=False, backend=tier)
    assert_same(out, want_out, "output")
    assert_same(h_T, want_h, "h_n")
    if where == "weight_ih_l0" and value != value:  # NaN · 0 = NaN in c: every n at step 0
        assert out[0].isnan().all()


def test_nan_weight_gives_nan_loss_in_the_language_model():
    """The trainer's divergence check relies on a NaN weight giving a NaN loss."""
    from grulab.lm.model import LanguageModel, ModelConfig

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=11, hidden=16))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "weight_hh" in n)[3, 2] = float("nan")
    tokens = torch.randint(0, 11, (4, 9))
    logits, _ = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens.reshape(-1))
    assert torch.isnan(loss)

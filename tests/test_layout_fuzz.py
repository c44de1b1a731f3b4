"""Property test: grulab.GRU and GRUCell on arguments in any strided layout.

Hypothesis draws a module (GRU or GRUCell), a kernel (each of grulab.kernels, forced, or
impl="auto"), the cell form, float32 or float64, sizes B, T, I, H (0 and 1 included, and sizes
that reach the SIMD kernels' packed paths), layers, direction, bias, batch_first, whether h0 is
given and x needs a gradient, a frozen parameter, and a layout for each argument: x, h0, every
weight and bias, and the gradients arriving at output and h_n (contiguous, a slice of a wider
last dim, every other element, transposed, features outermost, expanded with stride 0, every other
time step). The output, h_n and every gradient (x, h0, each weight and bias) must equal the float64
yardstick's on contiguous copies: torch.nn.GRU / GRUCell for reset_after=True, grulab's reference
for reset_after=False. Where torch raises (GRU with input or hidden size 0: ValueError; an empty
sequence: RuntimeError) grulab must raise the same type.

An example with a zero size runs in a process of its own (see test_torch_contract.isolated), so
a kernel that dies on it fails the example instead of ending pytest.

The fixed cases (the issue's sliced input, B = 0, T = 0, GRUCell(10, 0)) are tests of their own in
test_torch_contract.py, so that a known failure there does not stop this search.

The normal suite runs 150 examples; set GRULAB_FUZZ_EXAMPLES (e.g. 2000) for a longer search::

    GRULAB_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_layout_fuzz.py
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from test_torch_contract import (
    TARGETS,
    check_against_twin,
    isolated,
    kernels,
    layout_tensor,
    leaf,
    make_cell,
    make_gru,
    set_weight_layout,
    use_target,
    why_not,
)

EXAMPLES = int(os.environ.get("GRULAB_FUZZ_EXAMPLES", "150"))

X_LAYOUTS = ["contiguous", "sliced", "step2", "transposed", "outer", "expand_batch", "expand_time", "time_strided"]
H_LAYOUTS = ["contiguous", "sliced", "step2", "transposed", "expand_batch"]
W_LAYOUTS = ["contiguous", "sliced", "transposed"]
G_LAYOUTS = ["contiguous", "step2", "transposed", "outer", "expand_batch", "expand_all"]
CELL_X_LAYOUTS = ["contiguous", "sliced", "step2", "transposed", "expand_batch"]


@st.composite
def sizes(draw, zero_percent: int = 4):
    """0 now and then, 1 often, small sizes mostly, and sizes the packed SIMD paths need."""
    r = draw(st.integers(0, 99))
    if r < zero_percent:
        return 0
    if r < 15:
        return 1
    if r < 85:
        return draw(st.integers(2, 9))
    return draw(st.sampled_from([16, 17, 31, 64]))


@st.composite
def specs(draw) -> dict:
    module = draw(st.sampled_from(["GRU", "GRUCell"]))
    target = draw(st.sampled_from(TARGETS))
    reset_after = True if target == "torch" else draw(st.booleans())
    cell = module == "GRUCell"
    return dict(
        module=module,
        target=target,
        reset_after=reset_after,
        dtype=draw(st.sampled_from(["float32", "float64"])),
        B=draw(sizes()),
        T=1 if cell else draw(sizes(zero_percent=3).filter(lambda t: t <= 17)),
        I=draw(sizes()),
        H=draw(sizes()),
        layers=1 if cell else draw(st.sampled_from([1, 2])),
        bidirectional=False if cell else draw(st.booleans()),
        batch_first=False if cell else draw(st.booleans()),
        bias=draw(st.booleans()),
        give_h0=draw(st.booleans()),
        grad_x=draw(st.booleans()),
        frozen=draw(st.sampled_from(["", "", "weight_ih", "weight_hh", "bias_ih", "bias_hh"])),
        x_layout=draw(st.sampled_from(CELL_X_LAYOUTS if cell else X_LAYOUTS)),
        h_layout=draw(st.sampled_from(H_LAYOUTS)),
        w_layout=draw(st.sampled_from(W_LAYOUTS)),
        g_layout=draw(st.sampled_from(G_LAYOUTS)),
        grads_at=draw(st.sampled_from(["both", "output", "h_n"])),
        seed=draw(st.integers(0, 2**16)),
    )


def has_zero_size(spec: dict) -> bool:
    return 0 in (spec["B"], spec["T"], spec["I"], spec["H"])


def run_spec(spec: dict) -> None:
    """One example: the module under test against its yardstick, or torch's error where torch raises."""
    with use_target(spec["target"]):
        _run(spec)


def run_spec_json(spec_json: str) -> None:
    run_spec(json.loads(spec_json))


def _run(spec: dict) -> None:
    dtype = getattr(torch, spec["dtype"])
    target, ra = spec["target"], spec["reset_after"]
    B, T, I, H = spec["B"], spec["T"], spec["I"], spec["H"]
    g = torch.Generator().manual_seed(spec["seed"])
    torch.manual_seed(spec["seed"])
    if spec["module"] == "GRU":
        L, bf = spec["layers"], spec["batch_first"]
        D = 2 if spec["bidirectional"] else 1
        kw = dict(bias=spec["bias"], batch_first=bf, bidirectional=spec["bidirectional"])
        if I == 0 or H == 0:  # torch.nn.GRU refuses these sizes
            with pytest.raises(ValueError):
                torch.nn.GRU(I, H, L, **kw)
            with pytest.raises(ValueError):
                make_gru(target, I, H, L, reset_after=ra, dtype=dtype, **kw)
            return
        m = make_gru(target, I, H, L, reset_after=ra, dtype=dtype, **kw)
        xshape, oshape, hshape = ((B, T, I), (B, T, D * H), (L * D, B, H)) if bf else \
            ((T, B, I), (T, B, D * H), (L * D, B, H))
    else:
        m = make_cell(target, I, H, bias=spec["bias"], reset_after=ra, dtype=dtype)
        xshape, oshape, hshape = (B, I), (B, H), (B, H)
    set_weight_layout(m, spec["w_layout"])
    if spec["frozen"]:
        for name, p in m.named_parameters():
            if name.startswith(spec["frozen"]):
                p.requires_grad_(False)
    x = leaf(layout_tensor(xshape, spec["x_layout"], g, dtype), spec["grad_x"])
    h0 = leaf(layout_tensor(hshape, spec["h_layout"], g, dtype, 0.5)) if spec["give_h0"] else None
    args = (x,) if h0 is None else (x, h0)
    if T == 0:  # torch.nn.GRU: "Expected sequence length to be larger than 0 in RNN"
        with pytest.raises(RuntimeError):
            m(*args)
        return
    gout = layout_tensor(oshape, spec["g_layout"], g, dtype)
    if spec["module"] == "GRU":
        gh = layout_tensor(hshape, spec["g_layout"], g, dtype)
        grads = [gout if spec["grads_at"] != "h_n" else None, gh if spec["grads_at"] != "output" else None]
    else:
        grads = [gout]
    check_against_twin(m, args, dtype, grads, what=describe(spec))


def describe(spec: dict) -> str:
    s = spec
    shape = f"B={s['B']} I={s['I']} H={s['H']}" + ("" if s["module"] == "GRUCell" else
                                                  f" T={s['T']} layers={s['layers']} "
                                                  f"bidirectional={s['bidirectional']} batch_first={s['batch_first']}")
    return (f"{s['module']} on {s['target']} reset_after={s['reset_after']} {s['dtype']} {shape} bias={s['bias']} "
            f"h0={s['give_h0']} grad_x={s['grad_x']} frozen={s['frozen'] or '-'} layouts: x {s['x_layout']}, "
            f"h0 {s['h_layout']}, weights {s['w_layout']}, grads {s['g_layout']} at {s['grads_at']}")


@pytest.fixture(scope="module", autouse=True)
def _private_autotune_cache(tmp_path_factory):
    """impl="auto" measures each new call signature and records it in $GRULAB_CACHE: random shapes
    go to a folder of their own, not to this machine's record (the native extension is loaded first)."""
    for k in kernels.KERNELS:
        k.why_not(kernels.Query())
    before = os.environ.get("GRULAB_CACHE")
    os.environ["GRULAB_CACHE"] = str(tmp_path_factory.mktemp("grulab-cache"))
    yield
    if before is None:
        os.environ.pop("GRULAB_CACHE", None)
    else:
        os.environ["GRULAB_CACHE"] = before


@settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
@given(spec=specs())
def test_layout_fuzz(spec):
    note(describe(spec))
    why = why_not(spec["target"], getattr(torch, spec["dtype"]), spec["reset_after"])
    if why is not None:
        return  # a kernel this CPU cannot run (the other examples still run)
    if has_zero_size(spec):
        result = isolated("test_layout_fuzz", "run_spec_json", json.dumps(spec))
        if result != "pass":
            raise AssertionError(f"{describe(spec)}:\n{result}")
    else:
        run_spec(spec)

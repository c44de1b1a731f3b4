"""grulab.GRU is a real torch operator: torch.compile(fullgraph=True) and torch.export work.

torch.nn.GRU itself breaks Dynamo's graph and cannot be exported; the fused
layer is registered as torch.ops.grulab.gru_forward / gru_backward / gru_step
with fake (meta) implementations and an autograd formula (grulab/fused.py).
"""
from __future__ import annotations

import pytest
import torch

import grulab
from grulab.lm.model import LanguageModel, ModelConfig


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Tagger(torch.nn.Module):
    def __init__(self, reset_after: bool):
        super().__init__()
        self.gru = grulab.GRU(6, 16, num_layers=2, bidirectional=True, reset_after=reset_after,
                              batch_first=True, impl="fused")
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x, h0):
        out, h = self.gru(x, h0)
        return self.head(out), h


def grads(model, *inputs):
    model.zero_grad()
    y, h = model(*inputs)
    (y.square().sum() + h.sum()).backward()
    return y.detach(), h.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("reset_after", [True, False])
def test_compile_fullgraph_same_numbers_and_gradients(reset_after):
    torch.manual_seed(0)
    model = Tagger(reset_after)
    x, h0 = torch.randn(3, 7, 6), torch.randn(4, 3, 16)
    want = grads(model, x, h0)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = grads(compiled, x, h0)
    for a, b in zip(got[:2] + tuple(got[2]), want[:2] + tuple(want[2])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compile_inductor_language_model_trains_like_eager():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=13, hidden=16, embed=8))
    tokens = torch.randint(0, 13, (4, 10))

    def loss_of(m):
        logits, state = m(tokens)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 13), tokens.reshape(-1))

    want = loss_of(model)
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)  # inductor, the default backend
    got = loss_of(compiled)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip((p.grad for p in model.parameters()), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reset_after", [True, False])
def test_export_gives_the_same_output(reset_after):
    torch.manual_seed(0)
    model = Tagger(reset_after).eval()
    x, h0 = torch.randn(3, 7, 6), torch.randn(4, 3, 16)
    prog = torch.export.export(model, (x, h0))
    assert any("grulab.gru_forward" in str(n.target) for n in prog.graph.nodes)
    x2, h2 = torch.randn(3, 7, 6), torch.randn(4, 3, 16)
    with torch.no_grad():
        want = model(x2, h2)
    got = prog.module()(x2, h2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_export_language_model_and_generation_step():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=13, hidden=16, layers=2)).eval()
    tokens = torch.randint(0, 13, (2, 5))
    prog = torch.export.export(model, (tokens,))
    with torch.no_grad():
        want_logits, _ = model(tokens)
    got_logits, _ = prog.module()(tokens)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-6)
    # the single step used by generation is an operator too
    x, h = torch.randn(1, 6), torch.randn(1, 16)
    w_ih, w_hh, b_ih, b_hh = torch.randn(48, 6), torch.randn(48, 16), torch.randn(48), torch.randn(48)

    class Step(torch.nn.Module):
        def forward(self, x, h):
            return grulab.kernels.fused.gru_step(x, h, w_ih, w_hh, b_ih, b_hh)

    step_prog = torch.export.export(Step(), (x, h))
    torch.testing.assert_close(step_prog.module()(x, h), Step()(x, h))


def _named_kernel(prog, name):
    """Make every grulab node of ``prog`` name ``name`` as its kernel (what an export on another CPU writes)."""
    for node in prog.graph.nodes:
        if "grulab." in str(node.target):
            node.args = (*node.args[:-1], name)
    prog.graph_module.recompile()
    return prog


def test_a_program_exported_on_another_cpu_runs_here(tmp_path):
    """The operator's kernel argument is the exporting CPU's choice. A .pt2 that names a native kernel
    this CPU cannot run (native-amx from a Sapphire Rapids; native-avx512 on a Zen 3) runs the first
    native kernel here that computes the same (bf16 for a bf16 name where the CPU has bf16 units), and
    says so once, instead of failing."""
    from grulab import kernels

    # the native kernels whose why_not fails here for a call they take (what the operator checks)
    foreign = [k for k in kernels.KERNELS if k.name.startswith("native-") and grulab.kernels.native.load() is not None
               and k.why_not(kernels.Query(autocast=k.bf16)) is not None]
    if not foreign:
        pytest.skip("this CPU runs every native kernel")
    torch.manual_seed(0)
    model = Tagger(reset_after=True).eval()
    x, h0 = torch.randn(3, 7, 6), torch.randn(4, 3, 16)
    with torch.no_grad():
        want = model(x, h0)
    for k in foreign:
        grulab.kernels.fused._TIERS.clear()
        path = tmp_path / f"{k.name}.pt2"
        torch.export.save(_named_kernel(torch.export.export(model, (x, h0)), k.name), path)
        here, _ = kernels.first_native(kernels.Query(autocast=k.bf16))
        with pytest.warns(RuntimeWarning, match=f"names the GRU kernel {k.name}, which cannot run here .*running {here}"):
            got = torch.export.load(path).module()(x, h0)
        same = _named_kernel(torch.export.load(path), here).module()(x, h0)
        for a, b, c in zip(got, same, want):
            assert torch.equal(a, b)  # exactly what the kernel chosen here computes
            torch.testing.assert_close(a, c, rtol=0, atol=3e-2 if k.bf16 else 1e-5)
    grulab.kernels.fused._TIERS.clear()

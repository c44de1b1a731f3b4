"""ONNX export: onnxruntime (from PyPI) against PyTorch, the numpy sampler, generation without torch, the CLI.

Every exported graph runs in a real onnxruntime session on random inputs of
several batch sizes and lengths (one file serves them all: the axes are
dynamic) and must match the PyTorch module to TOL.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import grulab
from grulab.cli import main
from grulab.lm.data import Vocab
from grulab.deploy.export import build_onnx
from grulab.lm.generate import generate
from grulab.lm.model import LanguageModel, ModelConfig
from grulab.deploy.onnx_generate import OnnxLanguageModel, sample_next
from grulab.deploy.onnx_generate import generate as onnx_generate

ort = pytest.importorskip("onnxruntime")

TOL = 1e-5
SHAPES = [(1, 1), (2, 7), (5, 13)]  # (batch, length)


def session(proto: onnx.ModelProto) -> "ort.InferenceSession":
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the optional state inputs are overridable initializers, by design
    options.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def as_tuple(state) -> tuple:
    return (state,) if torch.is_tensor(state) else tuple(state)


def max_diff(ours, theirs) -> float:
    return max(float(np.abs(a - b.detach().numpy()).max()) for a, b in zip(ours, theirs))


def run_recurrent(sess, rnn: nn.Module, x: torch.Tensor, state) -> float:
    """Max |difference| of output and state(s) between onnxruntime and the module."""
    with torch.no_grad():
        out, new = rnn(x, state)
    feed = {"input": x.numpy()}
    if state is not None:
        feed.update(zip(("state", "cell"), (s.numpy() for s in as_tuple(state))))
    return max_diff(sess.run(None, feed), (out, *as_tuple(new)))


def random_state(rnn: nn.Module, batch: int):
    rows = rnn.num_layers * (2 if rnn.bidirectional else 1)
    h = torch.randn(rows, batch, rnn.hidden_size)
    return (h, torch.randn_like(h)) if isinstance(rnn, nn.LSTM) else h


# ---------------------------------------------------------------------------- recurrent modules
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, False), (1, True), (3, True)])
def test_grulab_gru_matches(reset_after, layers, bidirectional):
    torch.manual_seed(layers + 10 * bidirectional)
    gru = grulab.GRU(5, 7, layers, bidirectional=bidirectional, reset_after=reset_after).eval()
    sess = session(build_onnx(gru))
    for batch, length in SHAPES:
        x = torch.randn(length, batch, 5)
        assert run_recurrent(sess, gru, x, None) <= TOL  # the state left out: zeros
        assert run_recurrent(sess, gru, x, random_state(gru, batch)) <= TOL  # a carried state


@pytest.mark.parametrize("make", [
    lambda: grulab.GRU(4, 6, 2, bias=False, batch_first=True, bidirectional=True, reset_after=False),
    lambda: nn.GRU(4, 6, 2, batch_first=True, bidirectional=True),
    lambda: nn.LSTM(4, 6, 2, bidirectional=True),
    lambda: nn.LSTM(4, 6, 1, bias=False),
    lambda: nn.RNN(4, 6, 2, bidirectional=True),
    lambda: nn.RNN(4, 6, 2, nonlinearity="relu"),
], ids=["grulab-no-bias-batch-first", "torch-gru", "lstm-bidirectional", "lstm-no-bias", "rnn-tanh", "rnn-relu"])
def test_other_recurrent_modules_match(make):
    torch.manual_seed(0)
    rnn = make().eval()
    sess = session(build_onnx(rnn))
    for batch, length in SHAPES:
        x = torch.randn(batch, length, 4) if rnn.batch_first else torch.randn(length, batch, 4)
        assert run_recurrent(sess, rnn, x, None) <= TOL
        assert run_recurrent(sess, rnn, x, random_state(rnn, batch)) <= TOL


def _gru_nodes(proto):
    return [n for n in proto.graph.node if n.op_type == "GRU"]


@pytest.mark.parametrize("reset_after", [True, False])
def test_linear_before_reset_is_the_reset_variant(reset_after):
    """The attribute says the variant, and flipping it changes the function by far more than TOL:
    a wrong attribute could not pass the matching tests above."""
    torch.manual_seed(1)
    gru = grulab.GRU(5, 7, 2, bidirectional=True, reset_after=reset_after).eval()
    proto = build_onnx(gru)
    for node in _gru_nodes(proto):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["linear_before_reset"] == int(reset_after)
        assert attrs["direction"] == b"bidirectional" and attrs["hidden_size"] == 7
    x, h = torch.randn(9, 3, 5), random_state(gru, 3)
    assert run_recurrent(session(proto), gru, x, h) <= TOL
    for node in _gru_nodes(proto):
        for a in node.attribute:
            if a.name == "linear_before_reset":
                a.i = 1 - a.i
    assert run_recurrent(session(proto), gru, x, h) > 100 * TOL


def test_gate_order_and_bias_layout():
    """W, R and B of the ONNX GRU are torch's r|z|n blocks as z|r|h, and B = Wb | Rb."""
    torch.manual_seed(2)
    gru = grulab.GRU(3, 4).eval()
    proto = build_onnx(gru)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    node = _gru_nodes(proto)[0]
    W, R, B = (inits[name] for name in node.input[1:4])
    r, z, n = (c.numpy() for c in gru.weight_ih_l0.detach().chunk(3))
    assert W.shape == (1, 12, 3) and np.array_equal(W[0], np.concatenate([z, r, n]))
    r, z, n = (c.numpy() for c in gru.weight_hh_l0.detach().chunk(3))
    assert R.shape == (1, 12, 4) and np.array_equal(R[0], np.concatenate([z, r, n]))
    b = [c.numpy() for c in (*gru.bias_ih_l0.detach().chunk(3), *gru.bias_hh_l0.detach().chunk(3))]
    assert B.shape == (1, 24) and np.array_equal(B[0], np.concatenate([b[1], b[0], b[2], b[4], b[3], b[5]]))


def test_graph_is_checked_and_axes_are_dynamic(tmp_path):
    gru = grulab.GRU(5, 7, 2)
    path = grulab.export_onnx(gru, tmp_path / "gru.onnx", opset=14)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 14
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims == {"input": ["seq", "batch", 5], "state": [2, "batch", 7]}


# ---------------------------------------------------------------------------- the language model
def tiny_lm(cell="gru", vocab_size=9, hidden=12, layers=1, embed=0, seed=0, **kw) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig(vocab_size=vocab_size, cell=cell, hidden=hidden, layers=layers,
                                     embed=embed, **kw)).eval()


LM_CASES = [
    dict(cell="gru", reset_after=True, layers=2, embed=0),
    dict(cell="gru", reset_after=False, layers=2, embed=6),
    dict(cell="gru", reset_after=False, layers=1, embed=0),
    dict(cell="gru", reset_after=True, layers=1, embed=6, dropout=0.3),
    dict(cell="lstm", layers=2, embed=6),
    dict(cell="rnn", layers=2, embed=0),
]


@pytest.mark.parametrize("kw", LM_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_language_model_matches_with_a_carried_state(kw, tmp_path):
    """Logits and state agree, the state carried over two chunks (one-hot and embedding inputs)."""
    model = tiny_lm(**kw)
    lm = OnnxLanguageModel(grulab.export_onnx(model, tmp_path / "lm.onnx"))
    g = torch.Generator().manual_seed(3)
    for batch, length in SHAPES:
        tokens = torch.randint(0, 9, (batch, 2 * length), generator=g)
        state, ort_state = None, None
        with torch.no_grad():
            for chunk in tokens.split(length, dim=1):
                logits, state = model(chunk, state)
                ort_logits, ort_state = lm(chunk.numpy(), ort_state)
                assert max_diff([ort_logits, *ort_state.values()], [logits, *as_tuple(state)]) <= TOL


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_step_by_step_matches_model_step(cell, tmp_path):
    """One token at a time with the state carried, as generation runs: LanguageModel.step vs onnxruntime."""
    model = tiny_lm(cell, hidden=16, layers=2, seed=4)
    lm = OnnxLanguageModel(grulab.export_onnx(model, tmp_path / "lm.onnx"))
    tok = torch.tensor([1, 4, 7])
    state, ort_state = None, None
    for _ in range(12):
        logits, state = model.step(tok, state)
        ort_logits, ort_state = lm(tok.numpy()[:, None], ort_state)
        assert max_diff([ort_logits[:, 0], *ort_state.values()], [logits, *as_tuple(state)]) <= TOL
        tok = logits.argmax(-1)


def test_greedy_text_equals_pytorch(tmp_path):
    vocab = Vocab("abcdefghijklmnop", level="char")
    model = tiny_lm(vocab_size=len(vocab), hidden=24, layers=2, embed=5, seed=5)
    for p in model.parameters():  # larger weights: a text that depends on the carried state
        p.data.mul_(4)
    lm = OnnxLanguageModel(grulab.export_onnx(model, tmp_path / "lm.onnx", vocab=vocab))
    assert lm.vocab == vocab
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = "".join(onnx_generate(lm, vocab, "abc", 60))
        assert ours == "".join(generate(model, vocab, "abc", 60))
    assert len(set(ours)) > 3  # not a constant loop


def test_generation_does_not_import_torch(tmp_path):
    vocab = Vocab("the cat sat on the mat", level="char")
    model = tiny_lm(vocab_size=len(vocab), hidden=16, seed=6)
    path = grulab.export_onnx(model, tmp_path / "lm.onnx", vocab=vocab)
    vocab.save(tmp_path / "vocab.json")
    code = (
        "import sys\n"
        "from grulab.lm.data import Vocab\n"
        "from grulab.deploy.onnx_generate import OnnxLanguageModel, generate\n"
        f"lm = OnnxLanguageModel({str(path)!r})\n"
        f"vocab = Vocab.load({str(tmp_path / 'vocab.json')!r})\n"
        "print(''.join(generate(lm, vocab, 'the ', 30)), end='')\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(generate(model, vocab, "the ", 30))


def test_refuses_what_it_cannot_express(tmp_path):
    class MinGRU(nn.Module):  # a cell the exporter has no ONNX form for
        hidden_size = 4

    model = tiny_lm()
    model.rnn = MinGRU()
    with pytest.raises(ValueError, match="cannot express MinGRU"):
        grulab.export_onnx(model, tmp_path / "x.onnx")
    class Subclass(grulab.GRU):  # may compute something else: refused, not exported as a plain GRU
        pass

    with pytest.raises(ValueError, match="cannot express Subclass"):
        build_onnx(Subclass(3, 4))
    with pytest.raises(ValueError, match="proj_size=2"):
        build_onnx(nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(ValueError, match="float32.*torch.float64"):
        build_onnx(grulab.GRU(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="opset must be in"):
        build_onnx(grulab.GRU(3, 4), opset=7)
    with pytest.raises(TypeError, match="nn.Module"):
        build_onnx("model.pt")
    with pytest.raises(ValueError, match="vocabulary has 3 tokens"):
        build_onnx(tiny_lm(), vocab=Vocab("ab"))
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------------------- the numpy sampler
def test_sampler_greedy_and_seeded():
    logits = np.random.default_rng(0).standard_normal((5, 11)).astype(np.float32)
    assert np.array_equal(sample_next(logits, 0), logits.argmax(-1))
    assert np.array_equal(sample_next(logits, 1e-40, rng=np.random.default_rng(1)), logits.argmax(-1))
    a = sample_next(logits, 1.0, rng=np.random.default_rng(3))
    assert np.array_equal(a, sample_next(logits, 1.0, rng=np.random.default_rng(3)))


def test_sampler_top_k_samples_only_the_k_most_likely():
    logits = np.array([[0.3, 2.0, -1.0, 1.5, 0.0, 1.9, -0.5, 1.0]], np.float32)  # ranks: 1, 5, 3, 7, 0, ...
    many = np.repeat(logits, 4000, axis=0)
    for k, allowed in [(1, {1}), (2, {1, 5}), (3, {1, 5, 3}), (5, {1, 5, 3, 7, 0}), (8, set(range(8)))]:
        assert set(sample_next(many, 2.0, top_k=k, rng=np.random.default_rng(k)).tolist()) == allowed


@pytest.mark.parametrize("top_p, kept", [(0.3, {2}), (0.74, {2, 0}), (0.76, {2, 0, 4}), (1.0, {2, 0, 4, 1, 3})])
def test_sampler_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = np.array([0.25, 0.0625, 0.5, 0.0625, 0.125])
    picks = sample_next(np.repeat(np.log(probs)[None], 6000, axis=0), 1.0, top_p=top_p, rng=np.random.default_rng(7))
    assert set(picks.tolist()) == kept
    freq = np.bincount(picks, minlength=5) / len(picks)
    for i in kept:
        assert freq[i] == pytest.approx(probs[i] / sum(probs[j] for j in kept), abs=0.03)


# ---------------------------------------------------------------------------- the CLI
_SCRIPT = Path(sys.executable).parent / "grulab"
GRULAB = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "grulab.cli"]
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}


def grulab_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*GRULAB, *map(str, args)], capture_output=True, text=True, encoding="utf-8",
                          env=ENV, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A few steps of `grulab train` on the bundled Austen corpus, tiny settings, the notes' reset-before GRU
    (linear_before_reset=0; the library tests cover both forms)."""
    run = tmp_path_factory.mktemp("export") / "run"
    proc = grulab_cli("train", "--corpus", "austen", "--out", run, "--hidden", "24", "--embed", "8",
                      "--layers", "2", "--reset-before", "--batch-size", "4", "--num-steps", "16", "--epochs", "0",
                      "--max-minutes", "0.03", "--seed", "0", "--no-progress", "--predict-length", "1")
    assert proc.returncode == 0, proc.stderr
    return run


def test_cli_export_then_generate(trained):
    onnx_path = trained.parent / "model.onnx"
    proc = grulab_cli("export", trained, "--onnx", onnx_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"wrote {onnx_path} (opset 17" in proc.stdout and "onnxruntime matches PyTorch" in proc.stdout
    greedy = ["--prefix", "Elizabeth ", "--length", "80", "--temperature", "0"]
    with ThreadPoolExecutor(2) as pool:  # two processes at once: each is mostly start-up
        via_onnx, via_torch = pool.map(lambda args: grulab_cli(*args),
                                       [("generate", trained, "--onnx", onnx_path, *greedy), ("generate", trained, *greedy)])
    assert via_onnx.returncode == 0, via_onnx.stderr
    assert via_onnx.stdout == via_torch.stdout and via_onnx.stdout.startswith("Elizabeth ")
    assert len(via_onnx.stdout) > 80
    sampled = ["generate", trained, "--onnx", onnx_path, "--temperature", "0.9", "--top-k", "5",
               "--top-p", "0.9", "--seed", "3", "--length", "30", "--prefix", "It "]
    assert main([str(a) for a in sampled]) == 0
    assert main([str(a) for a in sampled]) == 0


def test_cli_generate_onnx_runs_without_torch(trained):
    """`grulab generate RUN --onnx FILE` as a user runs it: torch is never imported."""
    onnx_path = trained.parent / "model-notorch.onnx"
    assert grulab_cli("export", trained, "--onnx", onnx_path).returncode == 0
    code = ("import sys\nfrom grulab.cli import main\n"
            f"rc = main(['generate', {str(trained)!r}, '--onnx', {str(onnx_path)!r}, '--length', '20', '--temperature', '0'])\n"
            "assert rc == 0\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) > 20


def bad_cli_cases(run: Path, tmp: Path) -> dict[str, tuple[list, int, str]]:
    (tmp / "a-file").write_text("x")
    (tmp / "not.onnx").write_text("not a model")
    other = tmp / "other.onnx"
    grulab.export_onnx(tiny_lm(vocab_size=9), other, vocab=Vocab("abcdefgh"))
    onnx_path = tmp / "ok.onnx"
    return {
        "export-missing-run": (["export", tmp / "no-such-run", "--onnx", onnx_path], 1, "no-such-run"),
        "export-unwritable": (["export", run, "--onnx", tmp / "a-file" / "m.onnx"], 1, "cannot write"),
        "export-no-directory": (["export", run, "--onnx", tmp / "missing-dir" / "m.onnx"], 1, "cannot write"),
        "export-bad-opset": (["export", run, "--onnx", onnx_path, "--opset", "7"], 1, "opset must be in"),
        "export-no-onnx-flag": (["export", run], 2, "--onnx"),
        "generate-missing-onnx": (["generate", run, "--onnx", tmp / "none.onnx"], 1, "no ONNX file"),
        "generate-not-onnx": (["generate", run, "--onnx", tmp / "not.onnx"], 1, "cannot load"),
        "generate-other-vocab": (["generate", run, "--onnx", other], 1, "another vocabulary"),
        "generate-missing-run": (["generate", tmp / "no-such-run", "--onnx", other], 1, "no-such-run"),
        "generate-bad-temperature": (["generate", run, "--onnx", other, "--temperature", "-1"], 2, "--temperature"),
        "generate-bad-length": (["generate", run, "--onnx", other, "--length", "-1"], 2, "--length"),
        "generate-bad-seed": (["generate", run, "--onnx", other, "--seed", "-4"], 2, "--seed"),
    }


def test_cli_bad_input_is_one_line(trained, tmp_path, capsys):
    for case, (args, code, piece) in bad_cli_cases(trained, tmp_path).items():
        returned = main([str(a) for a in args])
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert returned == code and len(lines) == 1 and piece in lines[0], (case, err)
        assert "Traceback" not in err and out == "", (case, out)

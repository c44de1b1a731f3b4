"""One config (issue 10): fields declared once, --help read from them, the notes' GRU from the CLI,
checkpoints of the earlier code still loading, a new cell kind as a one-place change.

Every run here is a real `grulab train` (through main()) on a small text; nothing is mocked.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from grulab.lm import checkpoint
from grulab import reference
from grulab.cli import build_parser, config_from_args, main
from grulab.errors import ConfigError, GrulabError
from grulab.lm.generate import predict
from grulab.lm.model import CELLS, CellKind, LanguageModel, ModelConfig
from grulab.lm.train import PRESETS, TrainConfig, read_metrics, resume_config

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint-0.1.0"
PATTERN = "the cat sat on the mat. " * 20
TINY = ["--hidden", "8", "--embed", "0", "--batch-size", "4", "--num-steps", "8", "--epochs", "1",
        "--max-minutes", "0", "--seed", "0", "--no-progress", "--prefix", "the", "--predict-length", "5"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs torch on one thread (conftest.one_thread)."""


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(PATTERN, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Checkpoints written by the code before issue 10
# ---------------------------------------------------------------------------

def test_checkpoint_of_the_earlier_code_loads_and_computes_the_same():
    expected = json.loads((FIXTURE / "expected.json").read_text())
    ck = checkpoint.load(FIXTURE / "run")
    assert ck.model.config == ModelConfig(vocab_size=12, cell="gru", hidden=8, layers=1, dropout=0.0, embed=0,
                                          reset_after=True, impl="auto", init="torch")
    ids = torch.tensor([ck.vocab.encode(expected["logits"]["text"])])
    with torch.no_grad():
        logits, _ = ck.model(ids)
    assert_close(logits[0], torch.tensor(expected["logits"]["values"]), rtol=1e-5, atol=1e-6)
    p = expected["predict"]
    assert predict(ck.model, ck.vocab, p["prefix"], p["length"]) == p["text"]
    saved = TrainConfig.from_dict(ck.train)  # its training config is a valid TrainConfig today
    assert saved.reset_after and saved.init == "torch" and saved.max_tokens == 0


def test_run_of_the_earlier_code_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    work = tmp_path / "old"
    shutil.copytree(FIXTURE, work)
    monkeypatch.chdir(work)  # the saved config names its corpus as corpus.txt
    assert main(["train", "--resume", "--out", "run", "--epochs", "2", "--no-progress"]) == 0
    row = read_metrics(work / "run" / "metrics.jsonl")[-1]
    want = json.loads((FIXTURE / "expected.json").read_text())["resume"]["metrics"]
    assert {k: row[k] for k in ("epoch", "step", "tokens")} == {k: want[k] for k in ("epoch", "step", "tokens")}
    for k in ("train_ppl", "val_ppl", "lr"):
        assert row[k] == pytest.approx(want[k], rel=1e-5), k


def test_unknown_keys_are_refused():
    with pytest.raises(GrulabError, match="unknown TrainConfig keys: colour"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "colour": "red"})
    with pytest.raises(GrulabError, match="unknown ModelConfig keys: colour"):
        ModelConfig.from_dict({**ModelConfig(vocab_size=5).to_dict(), "colour": "red"})
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


# ---------------------------------------------------------------------------
# One declaration per fact
# ---------------------------------------------------------------------------

def test_model_fields_are_declared_once_and_derived():
    config = TrainConfig(hidden=7, layers=2, embed=0, reset_after=False, init="d2l", cell="gru")
    model = config.model_config(11)
    assert model == ModelConfig(vocab_size=11, hidden=7, layers=2, embed=0, reset_after=False, init="d2l")
    train_only = set(TrainConfig.__dataclass_fields__) - set(ModelConfig.__dataclass_fields__)
    assert "hidden" not in train_only and "lr" in train_only


def test_errors_name_the_parameter_and_the_cli_names_the_flag(capsys):
    with pytest.raises(ConfigError, match=r"^hidden must be a positive integer up to 65,536, got -3$"):
        TrainConfig(hidden=-3)
    from grulab.lm.model import CELLS

    with pytest.raises(ConfigError, match=rf"^cell must be one of {re.escape(', '.join(CELLS))}, got 'foo'$"):
        ModelConfig(vocab_size=5, cell="foo")
    with pytest.raises(ConfigError, match="^impl must be auto, fused or reference for the reset-before GRU"):
        TrainConfig(reset_after=False, impl="torch")
    with pytest.raises(ConfigError, match="^temperature must be"):
        from grulab.lm.generate import check_sampling
        check_sampling(temperature=-1.0)
    assert main(["train", "--reset-before", "--impl", "torch"]) == 2
    assert capsys.readouterr().err.strip() == (
        "grulab: error: --impl must be auto, fused or reference for the reset-before GRU (torch's kernels compute "
        "only the reset-after form), got 'torch'")
    assert main(["generate", "nowhere", "--top-k", "0"]) == 2
    assert capsys.readouterr().err.strip() == "grulab: error: --top-k must be an integer >= 1, got 0"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _shown_defaults(help_text: str) -> dict[str, str]:
    """Option (or positional) -> the text of its "(default: ...)" in --help output printed unwrapped."""
    entries: dict[str, str] = {}
    key = None
    for line in help_text.splitlines():
        if re.match(r"^  \S", line):  # an entry: the invocation, then maybe its help after 2+ spaces
            parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            key = parts[0].split()[0].rstrip(",")
            entries[key] = parts[1] if len(parts) > 1 else ""
        elif re.match(r"^\s{3,}\S", line) and key:
            entries[key] += " " + line.strip()
        else:
            key = None
    return {k: m.group(1) for k, v in entries.items() if (m := re.search(r"\(default: ([^()]*)\)\s*$", v))}


POSITIONALS = {"train": [], "compare": [], "generate": ["RUN"], "eval": ["RUN", "FILE"], "viz": ["RUN", "--text", "x"],
               "demo": []}


@pytest.mark.parametrize("command", sorted(POSITIONALS))
def test_every_default_shown_in_help_is_the_default_used(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: nothing wrapped
    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = _shown_defaults(capsys.readouterr().out)
    sub = _subparsers()[command]
    args = sub.parse_args(POSITIONALS[command])
    config = config_from_args(args) if hasattr(args, "config_defaults") else None
    checked = 0
    for action in sub._actions:
        key = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
        if isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction)) \
                or action.required or action.dest in ("text", "file"):
            continue
        key = "{" + ",".join(action.choices) + "}" if not action.option_strings and action.choices else key
        assert key in shown, f"{command} {key}: no default in --help"
        used = getattr(config, action.dest) if action.default is argparse.SUPPRESS else getattr(args, action.dest)
        if used is None or used == []:
            assert shown[key] and shown[key] != "None", key  # said in words
        elif isinstance(action, argparse.BooleanOptionalAction):  # --flag / --no-flag: is the flag's state on
            on = used == getattr(action, "sets", True)  # (--reset-before sets reset_after to False)
            assert shown[key] == ("on" if on else "off"), f"{command} {key}: --help says {shown[key]!r}, uses {used!r}"
            checked += 1
        else:
            assert shown[key] == str(used), f"{command} {key}: --help says {shown[key]!r}, the command uses {used!r}"
            checked += 1
    assert checked >= {"train": 20, "compare": 20, "eval": 0}.get(command, 1)


def test_compare_help_shows_compares_own_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    shown = _shown_defaults(capsys.readouterr().out)
    assert shown["--out"] == "runs/compare" and shown["--max-minutes"] == "1.0"
    assert config_from_args(_subparsers()["compare"].parse_args([])).out == "runs/compare"


def test_help_of_switches_says_what_they_do(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--progress, --no-progress show a progress bar (default: on)" in out and "turn off" not in out
    assert "--reset-before, --no-reset-before GRU: the d2l PyTorch notes' form" in out
    assert "off: PyTorch's reset-after form" in out and "--d2l-text, --no-d2l-text" in out


# ---------------------------------------------------------------------------
# The notes' GRU from the command line
# ---------------------------------------------------------------------------

def notes_gru(model: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    """Seed 004's scratch model, written out as in the notes: ids (B, T) -> logits (T*B, V).

    The parameters are read from the model in the notes' layout (X @ W, one bias per gate).
    """
    H = model.config.hidden
    w_ih, w_hh, b_ih = model.rnn.weight_ih_l0, model.rnn.weight_hh_l0, model.rnn.bias_ih_l0
    W_xr, W_xz, W_xh = (w.T for w in w_ih.split(H))
    W_hr, W_hz, W_hh = (w.T for w in w_hh.split(H))
    b_r, b_z, b_h = b_ih.split(H)
    W_hq, b_q = model.head.weight.T, model.head.bias
    inputs = F.one_hot(ids.T, model.config.vocab_size).float()  # (T, B, V)
    H_ = torch.zeros(ids.shape[0], H)
    outputs = []
    for X in inputs:
        Z = torch.sigmoid((X @ W_xz) + (H_ @ W_hz) + b_z)
        R = torch.sigmoid((X @ W_xr) + (H_ @ W_hr) + b_r)
        H_tilda = torch.tanh((X @ W_xh) + ((R * H_) @ W_hh) + b_h)
        H_ = Z * H_ + (1 - Z) * H_tilda
        Y = H_ @ W_hq + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0)


def test_preset_d2l_trains_the_notes_gru(tmp_path, capsys):
    """`--preset d2l` on a bundled corpus (the Time Machine is a download; its text does not matter here):
    the checkpoint says reset-before and d2l init, the run trains on the first 10,000 tokens with
    sequential batches, and the trained model's forward is the notes' formula."""
    out = tmp_path / "d2l"
    assert main(["train", "--preset", "d2l", "--corpus", "austen", "--out", str(out), "--epochs", "1",
                 "--no-progress", "--predict-length", "5"]) == 0
    log = capsys.readouterr().out
    assert "(10,000 train / " in log and "gru (reset before) 1×256" in log and "8 batches of 32×35" in log
    ck = checkpoint.load(out)
    assert (ck.model.config.reset_after, ck.model.config.init, ck.model.config.embed) == (False, "d2l", 0)
    given = ("epochs", "predict_length")  # the flags above win over the preset
    assert {k: ck.train[k] for k in PRESETS["d2l"].values if k not in given} == \
        {k: v for k, v in PRESETS["d2l"].values.items() if k not in given}
    rnn = ck.model.rnn
    assert rnn.reset_after is False
    # one bias per gate: the hidden-side biases stayed zero through training and take no gradient
    assert torch.count_nonzero(rnn.bias_hh_l0) == 0 and not rnn.bias_hh_l0.requires_grad
    assert torch.count_nonzero(rnn.bias_ih_l0) > 0  # trained
    ids = torch.randint(ck.model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = ck.model(ids)  # (B, T, V)
        assert_close(logits.transpose(0, 1).reshape(-1, logits.shape[-1]), notes_gru(ck.model, ids),
                     rtol=1e-5, atol=1e-5)


def test_d2l_init_is_the_notes_get_params():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=28, hidden=256, embed=0, reset_after=False, init="d2l"))
    for name, p in model.named_parameters():
        if "bias" in name:
            assert torch.count_nonzero(p) == 0, name
        else:
            assert p.std().item() == pytest.approx(0.01, rel=0.05) and abs(p.mean().item()) < 1e-3, name
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["rnn.bias_hh_l0"]


def test_reset_before_through_train_generate_eval_viz_and_compare(corpus, tmp_path, capsys):
    run = tmp_path / "notes"
    assert main(["train", "--corpus", str(corpus), "--out", str(run), "--reset-before", *TINY]) == 0
    ck = checkpoint.load(run)
    assert ck.model.config.reset_after is False and ck.train["reset_after"] is False
    assert ck.model.rnn.reset_after is False
    capsys.readouterr()
    assert main(["generate", str(run), "--prefix", "the c", "--length", "10", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == predict(ck.model, ck.vocab, "the c", 10) + "\n"
    assert main(["eval", str(run), str(corpus), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    page = tmp_path / "gates.html"
    assert main(["viz", str(run), "--text", "the cat", "--out", str(page)]) == 0
    data = json.loads(re.search(r'id="gate-data">(.*?)</script>', page.read_text(encoding="utf-8"), re.S).group(1))
    assert data["reset_after"] is False
    # resume keeps the form
    assert resume_config(run, epochs=2).reset_after is False
    out = tmp_path / "forms"
    assert main(["compare", "--sweep", "reset_after=true,false", "--corpus", str(corpus), "--out", str(out),
                 *TINY]) == 0
    forms = [checkpoint.load(out / d).model.config.reset_after for d in ("reset_after-True", "reset_after-False")]
    assert forms == [True, False]


# ---------------------------------------------------------------------------
# A new cell kind is one entry in model.CELLS
# ---------------------------------------------------------------------------

def test_a_new_cell_kind_is_one_entry(corpus, tmp_path, monkeypatch, capsys):
    def relu_rnn(c, input_size, dropout):
        return nn.RNN(input_size, c.hidden, c.layers, nonlinearity="relu", dropout=dropout)

    monkeypatch.setitem(CELLS, "relu-rnn", CellKind(relu_rnn))
    assert TrainConfig(cell="relu-rnn").cell == "relu-rnn"
    run = tmp_path / "relu"
    assert main(["train", "--corpus", str(corpus), "--out", str(run), "--cell", "relu-rnn", *TINY]) == 0
    model = checkpoint.load(run).model
    assert model.config.cell == "relu-rnn" and model.rnn.nonlinearity == "relu"
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert ",".join(CELLS).endswith(",relu-rnn")  # the help's default is every cell, the new one last
    assert ",".join(CELLS) in capsys.readouterr().out.replace("\n", "")


# ---------------------------------------------------------------------------
# reference.trace: every gate over time
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("reset_after", [True, False])
def test_trace_equals_the_layers_forward(reset_after):
    import grulab

    torch.manual_seed(0)
    gru = grulab.GRU(5, 7, num_layers=2, reset_after=reset_after, impl="fused")
    x, h0 = torch.randn(9, 3, 5), torch.randn(2, 3, 7)
    layers = reference.trace(gru, x, h0)
    with torch.no_grad():
        out, h_n = gru(x, h0)
    assert [tuple(t.shape) for t in layers[0]] == [(9, 3, 7)] * 4
    assert_close(layers[-1].h, out)
    assert_close(torch.stack([layer.h[-1] for layer in layers]), h_n)
    # and torch.nn.GRU, the reset-after form, as it is
    torch_gru = nn.GRU(5, 7, num_layers=2)
    with torch.no_grad():
        out, _ = torch_gru(x, h0)
    assert_close(reference.trace(torch_gru, x, h0)[-1].h, out)

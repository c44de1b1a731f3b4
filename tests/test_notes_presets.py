"""Both of the notes' training setups as presets, on a corpus of either script.

`--preset d2l` is the d2l PyTorch notes' (the Time Machine), `--preset d2l-zh` the d2l MXNet notes'
(Chinese lyrics; tang300 here). Each cleans the text by the rule that fits the corpus' script and
continues the prefixes that fit it. Every run is a real `grulab train` through main(), made small
with flags (the flags given win over the preset).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from grulab.lm import checkpoint
from grulab.cli import main
from grulab.lm.train import NOTES_PREFIXES, PRESETS

SMALL = ["--hidden", "8", "--epochs", "1", "--max-tokens", "2000", "--no-progress", "--predict-length", "5",
         "--seed", "0"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs torch on one thread (conftest.one_thread)."""


def mxnet_gru_rnn(model, ids: torch.Tensor) -> torch.Tensor:
    """The d2l MXNet notes' gru_rnn, written as they write it (R multiplies H W_hh after the product, one
    bias per gate), on the model's parameters in the notes' layout: ids (B, T) -> logits (T*B, V)."""
    H = model.config.hidden
    W_xr, W_xz, W_xh = (w.T for w in model.rnn.weight_ih_l0.split(H))
    W_hr, W_hz, W_hh = (w.T for w in model.rnn.weight_hh_l0.split(H))
    b_r, b_z, b_h = model.rnn.bias_ih_l0.split(H)
    W_hy, b_y = model.head.weight.T, model.head.bias
    state = torch.zeros(ids.shape[0], H)
    outputs = []
    for X in F.one_hot(ids.T, model.config.vocab_size).float():  # num_steps matrices of batch × vocab
        Z = torch.sigmoid(X @ W_xz + state @ W_hz + b_z)
        R = torch.sigmoid(X @ W_xr + state @ W_hr + b_r)
        H_tilda = torch.tanh(X @ W_xh + R * (state @ W_hh) + b_h)
        state = Z * state + (1 - Z) * H_tilda
        outputs.append(state @ W_hy + b_y)
    return torch.cat(outputs, dim=0)


def test_preset_d2l_zh_is_the_mxnet_notes_setup(tmp_path, capsys):
    out = tmp_path / "zh"
    assert main(["train", "--preset", "d2l-zh", "--out", str(out), *SMALL]) == 0
    log = capsys.readouterr().out
    assert log.startswith("grulab train: tang300 (2,000 train / ") and "newlines as spaces" in log
    assert "gru 1×8" in log and "of 32×35 per epoch" in log and "'分开" in log and "'战争中部队" in log
    ck = checkpoint.load(out)
    given = {"hidden", "epochs", "max_tokens", "progress", "predict_length", "seed"}
    expected = {k: v for k, v in PRESETS["d2l-zh"].values.items() if k not in given}
    assert {k: ck.train[k] for k in expected} == expected
    assert (ck.train["lr"], ck.train["clip"], ck.train["loss"], ck.train["sampling"]) == (0.2, 5.0, "sum", "sequential")
    assert "\n" not in ck.vocab.idx_to_token  # newlines became spaces
    rnn = ck.model.rnn
    assert rnn.reset_after is True  # R after the product ...
    assert torch.count_nonzero(rnn.bias_hh_l0) == 0 and not rnn.bias_hh_l0.requires_grad  # ... with b_hn = 0
    assert torch.count_nonzero(rnn.bias_ih_l0) > 0  # the notes' b_r, b_z, b_h trained
    ids = torch.randint(ck.model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = ck.model(ids)  # (B, T, V)
        assert_close(logits.transpose(0, 1).reshape(-1, logits.shape[-1]), mxnet_gru_rnn(ck.model, ids),
                     rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset, corpus, rule, prefixes", [
    ("d2l", "tang300", "newlines as spaces", NOTES_PREFIXES["newlines"]),
    ("d2l-zh", "austen", "letters only", NOTES_PREFIXES["letters"]),
])
def test_each_preset_fits_the_corpus_script(tmp_path, capsys, preset, corpus, rule, prefixes):
    out = tmp_path / "run"
    assert main(["train", "--preset", preset, "--corpus", corpus, "--out", str(out), *SMALL]) == 0
    captured = capsys.readouterr()
    assert rule in captured.out and f"'{prefixes[0]}" in captured.out
    assert "never saw" not in captured.err  # the prefixes fit the corpus
    ck = checkpoint.load(out)
    assert ck.train["prefixes"] == prefixes and ck.train["d2l_text"] is True
    assert ck.train["reset_after"] is (preset == "d2l-zh")


def test_prefixes_given_win_over_the_fitted_ones(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "d2l", "--corpus", "tang300", "--out", str(out), *SMALL,
                 "--prefix", "床前"]) == 0
    assert checkpoint.load(out).train["prefixes"] == ["床前"]


def test_no_d2l_text_keeps_the_text_as_it_is(tmp_path, capsys):
    out = tmp_path / "raw"
    assert main(["train", "--preset", "d2l", "--corpus", "tang300", "--no-d2l-text", "--out", str(out), *SMALL]) == 0
    assert "newlines as spaces" not in capsys.readouterr().out
    ck = checkpoint.load(out)
    assert ck.train["d2l_text"] is False and "\n" in ck.vocab.idx_to_token


def test_eval_and_viz_clean_the_text_as_the_model_was_trained(tmp_path, capsys):
    out = tmp_path / "zh"
    assert main(["train", "--preset", "d2l-zh", "--out", str(out), *SMALL]) == 0
    text = tmp_path / "poem.txt"
    text.write_text("床前明月光，\n疑是地上霜。\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["eval", str(out), str(text), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["tokens"] == 13
    assert "'\\n'" not in captured.err  # the newlines were read as the spaces the model saw, not as <unk>
    assert main(["viz", str(out), "--file", str(text), "--out", str(tmp_path / "gates.html")]) == 0
    assert "'\\n'" not in capsys.readouterr().err


def test_loss_sum_is_the_mean_times_the_batch_tokens(tmp_path):
    """--loss sum (the MXNet notes' loss.backward() on a vector) gives the mean's gradient times B×T: with
    plain SGD and no clipping, lr a on the sum trains the weights lr a×B×T trains on the mean."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 40, encoding="utf-8")
    common = ["--corpus", str(corpus), "--hidden", "8", "--embed", "0", "--batch-size", "4", "--num-steps", "8",
              "--epochs", "2", "--max-minutes", "0", "--optimizer", "sgd", "--schedule", "constant", "--clip", "0",
              "--seed", "0", "--no-progress", "--prefix", "the", "--predict-length", "3"]
    assert main(["train", *common, "--loss", "sum", "--lr", "0.01", "--out", str(tmp_path / "sum")]) == 0
    assert main(["train", *common, "--loss", "mean", "--lr", str(0.01 * 4 * 8), "--out", str(tmp_path / "mean")]) == 0
    a, b = checkpoint.load(tmp_path / "sum").model.state_dict(), checkpoint.load(tmp_path / "mean").model.state_dict()
    for name in a:
        assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)

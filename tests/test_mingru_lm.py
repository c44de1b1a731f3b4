"""The minGRU cells (``--cell mingru``, ``--cell mingru-block``) through the real ``grulab`` command.

Tiny models on the bundled English corpus (its first 2,000 characters): train, resume,
generate, eval, viz and compare as subprocesses, each result checked against the
checkpoint recomputed in this process. The model-level checks (T step() calls equal one
forward, greedy generation equals re-running the text, Ctrl-C then resume) are in
test_lm.py, parametrised over the cells.
"""
from __future__ import annotations

import csv
import json
import math
import re
import warnings

import pytest
import torch

from grulab.lm import checkpoint
from grulab.cli import main
from grulab.mingru import MinGRU, MinGRUBlocks
from grulab.lm.train import evaluate, read_metrics

from test_cli import error_lines, grulab, grulab_many, ok

CELLS = ["mingru", "mingru-block"]
TINY = ["--corpus", "austen", "--max-tokens", "2000", "--val-fraction", "0.01", "--hidden", "16", "--embed", "8",
        "--layers", "2", "--batch-size", "4", "--num-steps", "16", "--max-minutes", "0", "--lr", "0.01",
        "--seed", "0", "--no-progress", "--prefix", "It ", "--predict-length", "5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One epoch of each cell, then --resume to two: {cell: run directory}."""
    d = tmp_path_factory.mktemp("mingru-cli")
    first = grulab_many([["train", "--cell", c, "--out", d / c, *TINY, "--epochs", "1"] for c in CELLS])
    resumed = grulab_many([["train", "--resume", "--out", d / c, "--epochs", "2", "--no-progress"] for c in CELLS])
    for proc in first + resumed:
        ok(proc)
    return {c: d / c for c in CELLS}


PREFIX, LENGTH = "It is a", 25
EVAL_TEXT = "It is a truth universally acknowledged, that a single man in possession"
VIZ_TEXT = "It is a truth universally acknowledged"


@pytest.fixture(scope="module")
def commands(runs, tmp_path_factory) -> dict:
    """generate, eval and viz of both cells, run at once (each process is mostly `import torch`)."""
    d = tmp_path_factory.mktemp("mingru-out")
    (d / "eval.txt").write_text(EVAL_TEXT, encoding="utf-8")
    todo = {("viz", "mingru"): ["viz", runs["mingru"], "--text", VIZ_TEXT, "--out", d / "g.html"],
            ("viz", "mingru-block"): ["viz", runs["mingru-block"], "--text", VIZ_TEXT, "--out", d / "g.png"]}
    for c in CELLS:
        todo["generate", c] = ["generate", runs[c], "--prefix", PREFIX, "--length", LENGTH, "--temperature", "0"]
        todo["eval", c] = ["eval", runs[c], d / "eval.txt", "--json"]
    done = dict(zip(todo, grulab_many(todo.values())))
    return {key: ok(proc) for key, proc in done.items()} | {"dir": d}


@pytest.mark.parametrize("cell", CELLS)
def test_train_and_resume(runs, cell):
    ck = checkpoint.load(runs[cell], with_training_state=True)
    assert ck.model.config.cell == cell and ck.progress["epoch"] == 2
    assert isinstance(ck.model.rnn, MinGRUBlocks if cell == "mingru-block" else MinGRU)
    assert [r["epoch"] for r in read_metrics(runs[cell] / "metrics.jsonl")] == [1, 2]
    rows = read_metrics(runs[cell] / "metrics.jsonl")
    assert all(math.isfinite(r["val_ppl"]) and r["val_ppl"] < 100 for r in rows)  # 76 characters: it learned some


@pytest.mark.parametrize("cell", CELLS)
def test_generate_greedy_equals_rerunning_the_text(runs, commands, cell):
    ck = checkpoint.load(runs[cell])
    model, vocab = ck.model, ck.vocab
    ids = vocab.encode(list(PREFIX))
    with torch.no_grad():  # the whole text so far through forward() each time, no carried state
        for _ in range(LENGTH):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert commands["generate", cell].stdout == vocab.decode(ids) + "\n"


@pytest.mark.parametrize("cell", CELLS)
def test_eval(runs, commands, cell):
    result = json.loads(commands["eval", cell].stdout)
    ck = checkpoint.load(runs[cell])
    nll, n = evaluate(ck.model, torch.tensor(ck.vocab.encode(list(EVAL_TEXT))), 32, ck.train["num_steps"])
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6) and result["tokens"] == n


def test_viz_html_and_png(runs, commands):
    d = commands["dir"]
    page = (d / "g.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="gate-data">(.*?)</script>', page, re.S).group(1))
    assert data["gates"] == ["z"] and data["z_writes"] and len(data["layers"]) == 2
    # the page's z is MinGRU.trace's z (in thousandths), the gate that writes the candidate at 1
    ck = checkpoint.load(runs["mingru"])
    x = ck.model.inputs(torch.tensor(ck.vocab.encode(list(VIZ_TEXT)))[:, None])  # (T, 1, I)
    z = ck.model.rnn.trace(x).z[-1, :, 0]  # (T, H), the top layer
    assert data["layers"][-1]["z"] == torch.round(z * 1000).int().flatten().tolist()
    assert (d / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_mingru_cells(tmp_path):
    out = tmp_path / "cmp"
    ok(grulab("compare", "--cells", "mingru,mingru-block,gru", "--out", out, *TINY, "--layers", "1", "--epochs", "1"))
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["mingru", "mingru-block", "gru"]
    for r in rows:
        assert checkpoint.load(out / r["run"]).model.config.cell == r["run"] and math.isfinite(float(r["val_ppl"]))


def test_d2l_init_refused_for_the_block(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own
    assert main(["train", "--cell", "mingru-block", "--init", "d2l", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert error_lines(capsys.readouterr().err) == ["grulab: error: --init must be torch for --cell mingru-block (the notes' "
                                        "N(0, 0.01²) weights would all but zero its LayerNorms), got 'd2l'"]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("cell", CELLS)
def test_checkpoint_whose_weights_do_not_fit_is_one_line(tmp_path, cell):
    """The checkpoint check computes shapes for rnn/gru/lstm only; a minGRU's mismatch is still one clear line."""
    from grulab.lm.data import Vocab
    from grulab.errors import GrulabError
    from grulab.lm.model import LanguageModel, ModelConfig

    vocab = Vocab("the cat sat on the mat")
    model = LanguageModel(ModelConfig(vocab_size=len(vocab), cell=cell, hidden=8, embed=4))
    checkpoint.save(tmp_path / "run", model, vocab, {}, {})
    assert checkpoint.load(tmp_path / "run").model.config == model.config  # as saved: it loads
    path = tmp_path / "run" / "checkpoint" / "config.json"
    config = json.loads(path.read_text())
    config["model"]["hidden"] = 9
    path.write_text(json.dumps(config))
    with pytest.raises(GrulabError) as e:
        checkpoint.load(tmp_path / "run")
    assert "do not fit the model in config.json" in str(e.value) and "\n" not in str(e.value)

"""grulab compare: one row per run, numbers taken from the runs themselves."""
import csv
import json
import math

import pytest

from grulab.lm import checkpoint
from grulab.cli import main
from grulab.lm.compare import parse_sweep, time_to_reach
from grulab.errors import UsageError
from grulab.lm.model import count_parameters

TEXT = "the cat sat on the mat. the dog sat on the log. " * 60

TINY = ["--hidden", "16", "--embed", "8", "--batch-size", "4", "--num-steps", "8", "--epochs", "2",
        "--max-minutes", "0", "--no-progress", "--predict-length", "5", "--prefix", "the "]


def _csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_compare_cells_table_matches_runs(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "cmp"
    assert main(["compare", "--cells", "rnn,gru,lstm", "--corpus", str(corpus), "--out", str(out), *TINY]) == 0
    rows = _csv(out / "results.csv")
    assert [r["run"] for r in rows] == ["rnn", "gru", "lstm"]
    for r in rows:
        metrics = [json.loads(line) for line in (out / r["run"] / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 2  # two epochs
        assert float(r["val_ppl"]) == pytest.approx(metrics[-1]["val_ppl"])
        assert float(r["train_ppl"]) == pytest.approx(metrics[-1]["train_ppl"])
        ckpt = checkpoint.load(out / r["run"])
        assert ckpt.model.config.cell == r["run"]
        assert int(r["parameters"]) == count_parameters(ckpt.model)
        assert float(r["tokens_per_s"]) > 0
        assert float(r["seconds"]) == pytest.approx(metrics[-1]["elapsed"])
    # GRU has 3x, LSTM 4x the recurrent weights of the RNN: the parameter counts must say so
    p = {r["run"]: int(r["parameters"]) for r in rows}
    assert p["rnn"] < p["gru"] < p["lstm"]
    # the default target is the worst final perplexity, which every run reaches
    target = float(rows[0]["target_ppl"])
    assert target == pytest.approx(max(float(r["val_ppl"]) for r in rows))
    assert all(r["time_to_target"] != "" for r in rows)
    md = (out / "results.md").read_text()
    assert md.count("\n| rnn |") == 1 and "| gru |" in md and "| lstm |" in md
    png = (out / "perplexity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    shown = capsys.readouterr().out
    assert "grulab compare" in shown and "lstm" in shown


def test_compare_sweep_hidden(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "sweep"
    args = [a for a in TINY]
    args[args.index("--epochs") + 1] = "1"
    assert main(["compare", "--sweep", "hidden=8,24", "--corpus", str(corpus), "--out", str(out), *args]) == 0
    rows = _csv(out / "results.csv")
    assert [r["run"] for r in rows] == ["hidden=8", "hidden=24"]
    hidden = [checkpoint.load(out / r["run"].replace("=", "-")).model.config.hidden for r in rows]
    assert hidden == [8, 24]
    assert int(rows[0]["parameters"]) < int(rows[1]["parameters"])


def test_parse_sweep():
    assert parse_sweep("hidden=64,128") == ("hidden", [64, 128])
    assert parse_sweep("lr=0.1,1") == ("lr", [0.1, 1.0])
    assert parse_sweep("num-steps=10,20") == ("num_steps", [10, 20])
    for bad in ["hidden", "hidden=", "colour=1,2", "hidden=a,b"]:
        with pytest.raises(UsageError):
            parse_sweep(bad)


def test_time_to_reach():
    rows = [dict(val_ppl=9.0, elapsed=1.0), dict(val_ppl=5.0, elapsed=2.0), dict(val_ppl=4.0, elapsed=3.0)]
    assert time_to_reach(rows, 5.0) == 2.0
    assert time_to_reach(rows, 3.0) is None
    assert time_to_reach(rows, math.inf) == 1.0


def test_compare_bad_cells_is_one_line(tmp_path, capsys):
    assert main(["compare", "--cells", "gru,transformer", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transformer" in err[0]

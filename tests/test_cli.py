"""The ``grulab`` command, run as a real subprocess: train, generate, eval, Ctrl-C, bad input, --help.

Every process imports torch (about 2 s of CPU), so independent invocations are
started together and the tests read their results. Bad input is checked for
every case through ``main()`` in this process, and for a sample as processes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from grulab.lm import checkpoint
from grulab.cli import main
from grulab.lm.generate import predict
from grulab.lm.train import evaluate, read_metrics

_SCRIPT = Path(sys.executable).parent / "grulab"
GRULAB = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "grulab.cli"]
# one thread: the models are tiny, and on a busy machine torch's thread pool only spins
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1", "COLUMNS": "120", "OMP_NUM_THREADS": "1"}

PATTERN = "the cat sat on the mat. " * 20  # 480 chars, vocabulary of 12 + <unk>
TINY = ["--hidden", "16", "--embed", "0", "--batch-size", "4", "--num-steps", "8", "--epochs", "2",
        "--max-minutes", "0", "--lr", "0.01", "--seed", "0", "--no-progress", "--prefix", "the",
        "--predict-length", "5"]


def grulab(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*GRULAB, *map(str, args)], capture_output=True, text=True, encoding="utf-8",
                          env=ENV, timeout=timeout)


def grulab_many(arg_lists) -> list[subprocess.CompletedProcess]:
    """Run several grulab commands at once (each is mostly `import torch`)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: grulab(*args), arg_lists))


def error_lines(stderr: str) -> list[str]:
    """stderr without blank lines and without the "warning: ..." lines."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture(autouse=True)
def _restore_formatwarning(monkeypatch):
    """main() installs its one-line warning format; keep that out of the other tests."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "corpus.txt").write_text(PATTERN, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def trained(work) -> tuple[Path, subprocess.CompletedProcess]:
    run = work / "run"
    proc = grulab("train", "--corpus", work / "corpus.txt", "--out", run, *TINY)
    return run, proc


# ---------------------------------------------------------------------------
# train, generate, eval
# ---------------------------------------------------------------------------

def test_train_writes_a_checkpoint(trained):
    run, proc = trained
    ok(proc)
    assert "done: val perplexity" in proc.stdout
    assert proc.stdout.count("\n  'the") == 2  # each epoch continues the --prefix
    assert {"model.safetensors", "optimizer.safetensors", "state.safetensors", "config.json",
            "vocab.json"} <= set(os.listdir(run / "checkpoint"))
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert (run / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ck = checkpoint.load(run)
    assert ck.model.config.hidden == 16 and ck.model.config.embed == 0 and ck.progress["epoch"] == 2
    assert ck.train["lr"] == 0.01 and ck.train["prefixes"] == ["the"]


def _tokens(text: str) -> list[str]:
    """Split generated text into tokens: characters, with <unk> as one token."""
    out, i = [], 0
    while i < len(text):
        n = 5 if text.startswith("<unk>", i) else 1
        out.append(text[i:i + n])
        i += n
    return out


def test_generate(trained):
    run, _ = trained
    seeded = [run, "--prefix", "the c", "--length", "20", "--seed", "1"]
    a, b, greedy = grulab_many([
        ["generate", *seeded],
        ["generate", *seeded],
        ["generate", run, "--prefix", "Qthe c", "--length", "20", "--temperature", "0"],
    ])
    for proc in (a, b):
        ok(proc)
        assert proc.stdout.startswith("the c") and proc.stdout.endswith("\n")
        assert len(_tokens(proc.stdout[len("the c"):-1])) == 20  # the prefix, then 20 tokens
        assert proc.stderr == ""
    assert a.stdout == b.stdout  # the same seed, the same text
    # greedy is the notes' predict, the same as from Python; an unknown prefix character
    # is read as <unk> with a warning, and the text comes anyway
    ok(greedy)
    ck = checkpoint.load(run)
    assert greedy.stdout == predict(ck.model, ck.vocab, "Qthe c", 20) + "\n"
    assert len(_tokens(greedy.stdout[len("Qthe c"):-1])) == 20
    assert [line for line in greedy.stderr.splitlines() if line.strip()] == \
        ["warning: the prefix has tokens the model never saw, read as <unk>: 'Q'"]


def test_eval(trained, work, capsys):
    run, _ = trained
    text = work / "eval.txt"
    text.write_text("the mat sat on the cat. " * 4, encoding="utf-8")
    result = json.loads(ok(grulab("eval", run, text, "--json")).stdout)
    assert set(result) == {"perplexity", "bits_per_token", "tokens"}
    assert result["perplexity"] == pytest.approx(math.exp(result["bits_per_token"] * math.log(2)), rel=1e-9)
    assert 1 < result["perplexity"] < 13 and isinstance(result["tokens"], int) and 0 < result["tokens"] <= 95
    # the same number from Python
    import torch

    ck = checkpoint.load(run)
    nll, n = evaluate(ck.model, torch.tensor(ck.vocab.encode(text.read_text())), 32, ck.train["num_steps"])
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-6) and result["tokens"] == n
    # without --json: one readable line
    assert main(["eval", str(run), str(text)]) == 0
    shown = capsys.readouterr().out
    assert f"perplexity {result['perplexity']:.4f}" in shown and str(text) in shown


# ---------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------

def test_ctrl_c_saves_and_resume_continues(work):
    corpus = work / "long.txt"
    corpus.write_text(PATTERN * 3, encoding="utf-8")  # 40 batches an epoch
    run = work / "interrupted"
    args = [*GRULAB, "train", "--corpus", str(corpus), "--out", str(run), *TINY, "--epochs", "1000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            env=ENV)
    try:
        deadline = time.monotonic() + 90
        while not (run / "checkpoint" / "config.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint after 90 s"
            time.sleep(0.05)
        time.sleep(0.3)  # into the next epoch
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert error_lines(stderr) == ["grulab: interrupted"]
    ck = checkpoint.load(run, with_training_state=True)
    done = ck.progress["epoch"]
    assert done >= 1 and ck.progress["step"] >= done * 40
    # --resume finishes the epoch it was in (and the budget --epochs gives)
    resumed = ok(grulab("train", "--resume", "--out", run, "--epochs", done + 1, "--no-progress"))
    assert f"resumed at epoch {done + 1}" in resumed.stdout
    after = checkpoint.load(run)
    assert after.progress["epoch"] == done + 1 and after.progress["batch"] == 0
    assert read_metrics(run / "metrics.jsonl")[-1]["epoch"] == done + 1


# ---------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2 (usage) or 1, never a traceback
# ---------------------------------------------------------------------------

def _bad_cases(work: Path, run: Path) -> dict[str, tuple[list, int, str]]:
    """id -> (arguments, exit code, a piece of the error line)."""
    (work / "empty.txt").write_bytes(b"")
    (work / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (work / "latin1.txt").write_bytes("café au lait, crème brûlée ".encode("latin-1") * 20)
    (work / "short.txt").write_text("the cat", encoding="utf-8")
    (work / "a-directory").mkdir(exist_ok=True)

    def damaged(name: str, fix) -> Path:
        copy = work / name
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run / "checkpoint", copy / "checkpoint")
        fix(copy / "checkpoint")
        return copy

    def drop_a_token(ck: Path) -> None:
        d = json.loads((ck / "vocab.json").read_text(encoding="utf-8"))
        d["tokens"] = d["tokens"][:-1]
        (ck / "vocab.json").write_text(json.dumps(d), encoding="utf-8")

    corrupt_config = damaged("corrupt-config", lambda ck: (ck / "config.json").write_text('{"format": "grulab-che'))
    vocab_mismatch = damaged("vocab-mismatch", drop_a_token)
    truncated = damaged("truncated", lambda ck: (ck / "model.safetensors").write_bytes(
        (ck / "model.safetensors").read_bytes()[:100]))

    # each case its own --out: the sample below runs as concurrent processes, and two runs on one
    # --out are refused ("in use by another grulab process"), which would hide the error under test
    def train_on(corpus: str, case: str) -> list:
        return ["train", "--corpus", work / corpus, "--out", work / f"bad-run-{case}", *TINY]

    def train(case: str) -> list:
        return [*train_on("corpus.txt", case), "--epochs", "1"]

    return {
        "missing-file": (train_on("missing.txt", "missing-file"), 1, "not found"),
        "empty-file": (train_on("empty.txt", "empty-file"), 1, "empty"),
        "binary-file": (train_on("binary.bin", "binary-file"), 1, "binary"),
        "non-utf8-file": (train_on("latin1.txt", "non-utf8-file"), 1, "UTF-8"),
        "directory": (train_on("a-directory", "directory"), 1, "directory"),
        "too-short": (train_on("short.txt", "too-short"), 1, "too short"),
        "hidden-negative": ([*train("hidden-negative"), "--hidden", "-3"], 2, "--hidden"),
        "hidden-zero": ([*train("hidden-zero"), "--hidden", "0"], 2, "--hidden"),
        "lr-nan": ([*train("lr-nan"), "--lr", "nan"], 2, "--lr"),
        "lr-zero": ([*train("lr-zero"), "--lr", "0"], 2, "--lr"),
        "dropout-1.5": ([*train("dropout-1.5"), "--dropout", "1.5"], 2, "--dropout"),
        "cell-foo": ([*train("cell-foo"), "--cell", "foo"], 2, "--cell"),
        "hidden-abc": ([*train("hidden-abc"), "--hidden", "abc"], 2, "--hidden"),
        "unknown-flag": ([*train("unknown-flag"), "--hiden", "3"], 2, "--hiden"),
        "generate-missing-dir": (["generate", work / "no-such-run", "--length", "5"], 1, "no-such-run"),
        "generate-corrupt-config": (["generate", corrupt_config, "--length", "5"], 1, "config.json"),
        "generate-vocab-mismatch": (["generate", vocab_mismatch, "--length", "5"], 1, "vocab"),
        "generate-truncated-weights": (["generate", truncated, "--length", "5"], 1, "model.safetensors"),
        "generate-temperature-negative": (["generate", run, "--temperature", "-1"], 2, "--temperature"),
        "generate-top-p-zero": (["generate", run, "--top-p", "0"], 2, "--top-p"),
        "eval-binary-file": (["eval", run, work / "binary.bin"], 1, "binary"),
        "eval-missing-dir": (["eval", work / "no-such-run", work / "corpus.txt"], 1, "no-such-run"),
    }


# Every case runs through main() in this process (the very code the console script runs), and a
# sample covering each command, exit code and kind of error runs as a real process too: a process
# costs ~2 s of `import torch`, too much to spend on all of them.
SUBPROCESS_CASES = ["non-utf8-file", "too-short", "hidden-negative", "hidden-abc", "generate-vocab-mismatch",
                    "generate-top-p-zero", "eval-binary-file"]


@pytest.fixture(scope="module")
def bad_cases(work, trained) -> dict[str, tuple[list, int, str]]:
    run, proc = trained
    ok(proc)
    return _bad_cases(work, run)


@pytest.fixture(scope="module")
def bad_processes(bad_cases) -> dict[str, subprocess.CompletedProcess]:
    return dict(zip(SUBPROCESS_CASES, grulab_many([bad_cases[name][0] for name in SUBPROCESS_CASES])))


def check_one_error_line(code: int, err: str, expected_code: int, piece: str) -> None:
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("grulab") and piece in lines[0], err
    assert code == expected_code, err


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_subprocess(bad_cases, bad_processes, case):
    _, code, piece = bad_cases[case]
    proc = bad_processes[case]
    check_one_error_line(proc.returncode, proc.stderr, code, piece)
    assert proc.stdout == ""  # nothing started


BAD_CASES = ["missing-file", "empty-file", "binary-file", "non-utf8-file", "directory", "too-short",
             "hidden-negative", "hidden-zero", "lr-nan", "lr-zero", "dropout-1.5", "cell-foo", "hidden-abc",
             "unknown-flag", "generate-missing-dir", "generate-corrupt-config", "generate-vocab-mismatch",
             "generate-truncated-weights", "generate-temperature-negative", "generate-top-p-zero",
             "eval-binary-file", "eval-missing-dir"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input(bad_cases, case, capsys):
    args, code, piece = bad_cases[case]
    returned = main([str(a) for a in args])
    out, err = capsys.readouterr()
    check_one_error_line(returned, err, code, piece)
    assert out == ""


def test_bad_input_cases_are_all_tested(bad_cases):
    assert sorted(BAD_CASES) == sorted(bad_cases) and set(SUBPROCESS_CASES) <= set(bad_cases)


@pytest.mark.parametrize("args, code", [
    (["train", "--batch-size", "0"], 2), (["train", "--num-steps", "-1"], 2), (["train", "--epochs", "-1"], 2),
    (["train", "--max-minutes", "nan"], 2), (["train", "--max-minutes", "-1"], 2), (["train", "--clip", "-1"], 2),
    (["train", "--val-fraction", "1"], 2), (["train", "--epochs", "0", "--max-minutes", "0"], 2),
    (["train", "--lr", "inf"], 2), (["train", "--lr", "-0.1"], 2), (["train", "--dropout", "nan"], 2),
    (["train", "--embed", "-1"], 2), (["train", "--layers", "0"], 2), (["train", "--sampling", "foo"], 2),
    (["train", "--optimizer", "foo"], 2), (["train", "--level", "foo"], 2), (["train", "--preset", "foo"], 2),
    (["train", "--hidden", "1.5"], 2), (["train", "--corpus", "no-such-corpus"], 1),
    (["generate", "RUN", "--top-k", "0"], 2), (["generate", "RUN", "--top-p", "1.5"], 2),
    (["generate", "RUN", "--top-p", "nan"], 2), (["generate", "RUN", "--temperature", "nan"], 2),
    (["generate", "RUN", "--length", "-5"], 2), (["generate", "RUN", "--length", "x"], 2),
    (["generate", "RUN", "--prefix", ""], 1), (["generate", "CORPUS"], 1),
    (["eval", "RUN", "EMPTY"], 1), (["eval", "RUN", "ONECHAR"], 1), (["eval", "RUN"], 2),
    (["train", "--resume", "--out", "EMPTYDIR"], 1), ([], 2), (["frobnicate"], 2), (["generate"], 2),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_more_bad_input(trained, work, tmp_path, capsys, args, code):
    run, _ = trained
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "one.txt").write_text("t")
    (tmp_path / "emptydir").mkdir()
    subst = {"RUN": str(run), "CORPUS": str(work / "corpus.txt"), "EMPTY": str(tmp_path / "empty.txt"),
             "ONECHAR": str(tmp_path / "one.txt"), "EMPTYDIR": str(tmp_path / "emptydir")}
    args = [subst.get(a, a) for a in args]
    if args[:1] == ["train"] and "--resume" not in args:
        args = ["train", "--corpus", str(work / "corpus.txt"), "--out", str(tmp_path / "out"), *TINY, *args[1:]]
    returned = main(args)
    err = capsys.readouterr().err
    check_one_error_line(returned, err, code, "")
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_preset_d2l_with_overrides(work, tmp_path, capsys):
    out = tmp_path / "d2l"
    assert main(["train", "--preset", "d2l", "--corpus", str(work / "corpus.txt"), "--out", str(out), "--hidden", "8",
                 "--batch-size", "4", "--num-steps", "8", "--epochs", "1", "--no-progress"]) == 0
    saved = checkpoint.load(out).train
    # the notes' settings, but the flags given win (issue 10: the notes run sequential batches, d2l's
    # default use_random_iter=False, and the reset-before cell with their own init)
    assert {k: saved[k] for k in ("cell", "embed", "optimizer", "lr", "clip", "sampling", "schedule", "max_minutes",
                                  "prefixes", "reset_after", "init")} == dict(
        cell="gru", embed=0, optimizer="sgd", lr=1.0, clip=1.0, sampling="sequential", schedule="constant",
        max_minutes=0.0, prefixes=["time traveller", "traveller"], reset_after=False, init="d2l")
    assert (saved["hidden"], saved["batch_size"], saved["num_steps"], saved["epochs"]) == (8, 4, 8, 1)
    assert "'time traveller" in capsys.readouterr().out


def test_exploding_loss_is_one_line(work, tmp_path, capsys):
    returned = main(["train", "--corpus", str(work / "corpus.txt"), "--out", str(tmp_path / "exploding"), *TINY,
                     "--optimizer", "sgd", "--lr", "1e30", "--clip", "0", "--schedule", "constant"])
    check_one_error_line(returned, capsys.readouterr().err, 1, "diverged")


# ---------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------

HELP_COMMANDS = [[], ["train"], ["generate"], ["eval"], ["compare"], ["viz"], ["demo"]]


def test_help_subprocess():
    top, train_help = grulab_many([["--help"], ["train", "--help"]])
    for proc in (top, train_help):
        assert proc.returncode == 0 and proc.stderr == "" and proc.stdout.startswith("usage: grulab"), proc.stderr
    # each command has its own row in the list of commands (the description names some of them too,
    # so a bare `name in stdout` could not fail)
    rows = {line.split()[0] for line in top.stdout.splitlines() if line.startswith("    ") and line.split()}
    for name in ("train", "generate", "eval", "compare", "viz", "demo", "kernels"):
        assert name in rows, (name, top.stdout)
    for flag in ("--corpus", "--cell", "--hidden", "--epochs", "--max-minutes", "--resume", "--seed", "--preset",
                 "--no-progress", "--clip", "--optimizer"):
        assert flag in train_help.stdout, flag


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "grulab")
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(f"usage: grulab {' '.join(command)}".rstrip())
    wanted = {"generate": ["--prefix", "--length", "--temperature", "--top-k", "--top-p", "--seed"],
              "eval": ["--json"]}.get(command[0] if command else "", [])
    for flag in wanted:
        assert flag in out, flag


def test_viz_html_and_png_from_the_cli(trained, tmp_path, capsys):
    run, _ = trained
    text = "the cat sat"
    page = tmp_path / "gates.html"
    assert main(["viz", str(run), "--text", text, "--out", str(page)]) == 0
    html = page.read_text(encoding="utf-8")
    assert "<html" in html.lower() and "http://" not in html and "https://" not in html
    png = tmp_path / "gates.png"
    source = tmp_path / "source.txt"
    source.write_text(text, encoding="utf-8")
    assert main(["viz", str(run), "--file", str(source), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["viz", str(run), "--text", text, "--out", str(tmp_path / "gates.svgz")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "gates.svgz" in err[0]


def test_impl_flag_trains_the_same_model_with_torch_kernels(work, tmp_path):
    """--impl torch runs torch.nn.GRU's kernels on the same parameters: same losses, to float32 noise."""
    corpus = work / "corpus.txt"
    runs = {}
    for impl in ("fused", "torch"):
        out = tmp_path / impl
        assert main(["train", "--corpus", str(corpus), "--out", str(out), "--impl", impl, *TINY]) == 0
        runs[impl] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["fused"], runs["torch"]):
        assert a["val_ppl"] == pytest.approx(b["val_ppl"], rel=1e-3)


@pytest.mark.parametrize("extra,word", [(["--hidden", "3"], "--hidden cannot change on --resume"),
                                        (["--preset", "d2l"], "--preset cannot change on --resume"),
                                        (["--cell", "lstm", "--lr", "0.5"], "--cell, --lr cannot change")])
def test_resume_refuses_changed_settings(trained, extra, word, capsys):
    run, _ = trained
    assert main(["train", "--resume", "--out", str(run), *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and word in err[0]


def test_resume_with_the_budget_used_up_says_so(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0  # its 2 epochs are done
    assert "nothing to train" in capsys.readouterr().out
    assert (run / "metrics.jsonl").read_text() == before

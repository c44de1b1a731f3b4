"""Run directories, signals and out-of-range values (issue 11), with real processes and real signals."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from grulab.lm import checkpoint, rundir
from grulab.cli import main
from grulab.errors import GrulabError
from grulab.lm.train import read_metrics

_SCRIPT = Path(sys.executable).parent / "grulab"
GRULAB = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "grulab.cli"]
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
PATTERN = "the cat sat on the mat. " * 60  # 40 batches of 4×8 an epoch
TINY = ["--hidden", "16", "--embed", "0", "--batch-size", "4", "--num-steps", "8", "--max-minutes", "0",
        "--lr", "0.01", "--seed", "0", "--no-progress", "--prefix", "the", "--predict-length", "5"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


# ---------------------------------------------------------------------------- run directories
def test_a_bad_out_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("x")
    cases = {tmp_path / "a-file": "is a file, not a directory",
             tmp_path / "a-file" / "run": f"{tmp_path / 'a-file'} is a file",
             Path("/proc/grulab-run"): "cannot be created: No such file or directory"}
    for out, piece in cases.items():
        with pytest.raises(GrulabError) as e:
            rundir.claim(out)
        assert piece in one_line(e) and str(out) in str(e.value)


def test_a_read_only_out_is_one_line():
    d = Path(tempfile.mkdtemp())
    try:
        os.chmod(d, 0o555)
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(65534)  # nobody: root writes anywhere
        try:
            for out, piece in [(d, "is not writable (Permission denied)"),
                               (d / "run", "cannot be created: Permission denied")]:
                with pytest.raises(GrulabError) as e:
                    rundir.claim(out)
                assert piece in one_line(e) and str(out) in str(e.value)
        finally:
            if as_root:
                os.seteuid(0)
    finally:
        shutil.rmtree(d)


def test_an_existing_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    with rundir.claim(out):  # a fresh directory is fine, and so is one with other files
        (out / "metrics.jsonl").write_text("{}\n")
        (out / "checkpoint").mkdir()
        (out / "notes.txt").write_text("mine")
    with pytest.raises(GrulabError) as e:
        rundir.claim(out)
    msg = one_line(e)
    assert str(out) in msg and "--resume" in msg and "--overwrite" in msg and "checkpoint, metrics.jsonl" in msg
    with rundir.claim(out, resume=True):
        assert (out / "checkpoint").exists()
    with rundir.claim(out, overwrite=True):
        assert sorted(os.listdir(out)) == [".lock", "notes.txt"]


HOLDER = """
import sys, time
from grulab.lm import rundir
run = rundir.claim(sys.argv[1])
print("claimed", flush=True)
time.sleep(120)
"""


def test_one_process_at_a_time_and_a_killed_one_blocks_nothing(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline() == "claimed\n"
        with pytest.raises(GrulabError) as e:
            rundir.claim(out)
        assert f"--out {out} is in use by another grulab process (pid {holder.pid})" in one_line(e)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the OS drops the lock
        holder.wait()
    with rundir.claim(out):
        pass


# ---------------------------------------------------------------------------- signals
STOPPER = """
import sys, time
from grulab.lm.signals import StopOnSignal, Stopped
try:
    with StopOnSignal() as stop:
        print("ready", flush=True)
        while not stop.requested:
            time.sleep(0.01)
        print("saving", flush=True)
        time.sleep(float(sys.argv[1]))  # a save that takes this long
        print("saved", flush=True)
        raise stop.interrupt()
except Stopped as e:
    sys.exit(e.exit_code)
"""


@pytest.mark.parametrize("signum,twice", [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGTERM, True)],
                         ids=["SIGTERM", "SIGHUP", "SIGTERM-twice"])
def test_sigterm_and_sighup_stop_like_ctrl_c(signum, twice):
    proc = subprocess.Popen([sys.executable, "-c", STOPPER, "60" if twice else "0"], stdout=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signum)
        assert proc.stdout.readline() == "\n"
        assert signal.Signals(signum).name in proc.stdout.readline()
        assert proc.stdout.readline() == "saving\n"
        if twice:  # a second signal quits at once, without waiting for the save
            proc.send_signal(signum)
        start = time.monotonic()
        # wait, then read through the same text wrapper as readline() above: communicate(timeout=...) reads the raw
        # pipe and would drop a "saved" line the wrapper had already buffered together with "saving"
        proc.wait(timeout=30)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum
    assert ("saved" in out) != twice
    assert time.monotonic() - start < 20


# ---------------------------------------------------------------------------- grulab train
def test_sigterm_saves_a_second_run_is_refused_and_resume_loses_nothing(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(PATTERN, encoding="utf-8")
    run = tmp_path / "run"
    args = ["train", "--corpus", str(corpus), "--out", str(run), *TINY]
    first = subprocess.Popen([*GRULAB, *args, "--epochs", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=ENV)
    try:
        wait_for(lambda: (run / "checkpoint" / "config.json").exists(), first, "checkpoint")
        # a second run into the same directory, while the first trains
        second = subprocess.run([*GRULAB, *args, "--epochs", "1"], capture_output=True, text=True, env=ENV,
                                timeout=120)
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert error_lines(second.stderr) == [
        f"grulab: error: --out {run} is in use by another grulab process (pid {first.pid}); "
        "wait for it to end or stop it, or give another --out"]
    assert first.returncode == 143, stderr
    assert error_lines(stderr) == ["grulab: stopped by SIGTERM"]
    assert f"continue with: grulab train --resume --out {run}" in stdout
    ck = checkpoint.load(run)
    done, step = ck.progress["epoch"], ck.progress["step"]
    assert step >= done * 40  # saved at the batch the signal found (an epoch end, if it came during a report)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, done + 1))  # only the first run's rows
    # a new run without --resume is refused; --resume finishes the next epoch (in this process: no torch import)
    assert main([*args, "--epochs", "1"]) == 1
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "already holds a run" in err[0] and "--resume" in err[0]
    assert main(["train", "--resume", "--out", str(run), "--epochs", str(done + 1), "--no-progress"]) == 0
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, done + 2))


# ---------------------------------------------------------------------------- generate and eval
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("run")
    (work / "corpus.txt").write_text(PATTERN[:480], encoding="utf-8")
    assert main(["train", "--corpus", str(work / "corpus.txt"), "--out", str(work / "run"), *TINY,
                 "--epochs", "1"]) == 0
    return work


def _with_weights(trained: Path, name: str, change) -> Path:
    run = trained / name
    shutil.copytree(trained / "run" / "checkpoint", run / "checkpoint")
    path = run / "checkpoint" / "model.safetensors"
    weights = load_file(str(path))
    change(weights)
    save_file(weights, str(path))
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    config["files"]["model.safetensors"] = path.stat().st_size
    (run / "checkpoint" / "config.json").write_text(json.dumps(config))
    return run


def test_generate_and_eval_on_broken_weights_are_one_line(trained, capsys):
    nan = _with_weights(trained, "nan", lambda w: [t.fill_(float("nan")) for t in w.values()])
    # finite, but the logits overflow to inf wherever the hidden units sum to more than about 1e-3
    huge = _with_weights(trained, "huge", lambda w: [w[k].fill_(3.4e38) for k in ("head.weight", "head.bias")])
    corpus = str(trained / "corpus.txt")
    for argv, code, piece in [
        (["generate", str(nan), "--length", "5", "--prefix", "the"], 1, "are not finite"),
        (["eval", str(nan), corpus], 1, "are not finite"),
        (["generate", str(huge), "--length", "5", "--prefix", "the"], 1, "the model's output is not finite"),
        (["eval", str(huge), corpus], 1, "perplexity on " + corpus + " is nan"),
        (["generate", str(trained / "run"), "--prefix", "the", "--seed", "99999999999999999999"], 2,
         "--seed must be an integer in [0, 18446744073709551615] (what torch.manual_seed takes), got 99999999999999999999"),
        (["train", "--corpus", corpus, "--out", str(trained / "x"), "--lr", "1e40"], 2,
         "--lr must be a positive number up to 1e+30, got 1e+40"),
        (["train", "--corpus", corpus, "--out", str(trained / "x"), "--hidden", str(10**9)], 2,
         "--hidden must be a positive integer up to 65,536, got 1000000000"),
        (["train", "--corpus", corpus, "--out", str(trained / "x"), "--seed", "-1"], 2, "--seed must be an integer in"),
    ]:
        assert main(argv) == code, argv
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and piece in err[0], (argv, err)


def test_a_tiny_temperature_is_greedy(trained, capsys):
    run = str(trained / "run")
    assert main(["generate", run, "--prefix", "the", "--length", "20", "--temperature", "1e-300", "--seed", "3"]) == 0
    tiny = capsys.readouterr().out
    assert main(["generate", run, "--prefix", "the", "--length", "20", "--temperature", "0"]) == 0
    assert tiny == capsys.readouterr().out


# ---------------------------------------------------------------------------- phase 2: timed checkpoints
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_run_loses_at_most_one_checkpoint_interval(tmp_path, signum):
    """Epochs far longer than the interval: the only saves before the signal are the timed ones."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(PATTERN * 100, encoding="utf-8")  # 4,000 batches an epoch: no report comes before the signal
    run, interval = tmp_path / "run", 0.5 / 60  # half a second
    proc = subprocess.Popen([*GRULAB, "train", "--corpus", str(corpus), "--out", str(run), *TINY, "--epochs", "1",
                             "--checkpoint-every-minutes", str(interval)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    config = run / "checkpoint" / "config.json"
    try:
        wait_for(lambda: config.exists() and json.loads(config.read_text())["serial"] >= 2, proc, "second timed save")
        time.sleep(0.3)
        # The time of sending, read from the clock that stamps files (the kernel's coarse clock,
        # a few ms behind time.time(): a save just after the signal could look older than it).
        marker = tmp_path / "signal-sent"
        marker.touch()
        sent = marker.stat().st_mtime
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    ck = checkpoint.load(run)
    assert ck.progress["epoch"] == 0 and 0 < ck.progress["batch"] < 4000  # saved inside the epoch
    assert read_metrics(run / "metrics.jsonl") == []  # timed saves write no metrics row
    saved = checkpoint.find(run) / "config.json"
    if signum == signal.SIGTERM:  # saved at the signal: nothing lost
        assert proc.returncode == 143 and error_lines(stderr) == ["grulab: stopped by SIGTERM"]
        assert saved.stat().st_mtime >= sent
        return  # the SIGTERM test above resumes such a run
    # SIGKILL: at most one interval (plus the batch and the save under way) before the kill
    assert proc.returncode == -signal.SIGKILL
    assert sent - saved.stat().st_mtime < interval * 60 + 1.0
    # the run goes on from there (a few more batches, then the budget's report)
    elapsed = ck.progress["elapsed"]
    assert main(["train", "--resume", "--out", str(run), "--max-minutes", str((elapsed + 0.5) / 60)]) == 0
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 1 and rows[0]["step"] > ck.progress["step"]


# ---------------------------------------------------------------------------- phase 2: --val-fraction 0
def test_val_fraction_0_trains_on_training_perplexity_alone(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(PATTERN, encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "--corpus", str(corpus), "--out", str(run), *TINY, "--epochs", "2", "--val-fraction", "0"]) == 0
    out = capsys.readouterr().out
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["val_ppl"] is None and r["train_ppl"] > 1 for r in rows)
    assert "val ppl" not in out and "train ppl" in out
    assert f"done: train perplexity {rows[-1]['train_ppl']:.3f}" in out
    # divergence is judged on the training loss
    assert main(["train", "--corpus", str(corpus), "--out", str(tmp_path / "hot"), *TINY, "--epochs", "2",
                 "--val-fraction", "0", "--lr", "1e29", "--clip", "0"]) == 1
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "training diverged" in err[0] and "lower --lr" in err[0]
    # compare ranks by validation perplexity: refused up front
    assert main(["compare", "--corpus", str(corpus), "--out", str(tmp_path / "cmp"), "--val-fraction", "0"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "grulab: error: --val-fraction 0: compare ranks the runs by validation perplexity; give a fraction > 0"]


# ---------------------------------------------------------------------------- phase 2: --resume from anywhere
def test_resume_from_another_working_directory(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "corpus.txt").write_text(PATTERN, encoding="utf-8")
    monkeypatch.chdir(tmp_path / "a")
    assert main(["train", "--corpus", "corpus.txt", "--out", "run", *TINY, "--epochs", "1"]) == 0
    saved = checkpoint.load(tmp_path / "a" / "run").train["corpus"]
    assert saved == str(tmp_path / "a" / "corpus.txt")
    monkeypatch.chdir(tmp_path / "b")
    assert main(["train", "--resume", "--out", "../a/run", "--epochs", "2", "--no-progress"]) == 0
    assert [r["epoch"] for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")] == [1, 2]


# ---------------------------------------------------------------------------- phase 2: compare and demo
def test_compare_claims_its_directory(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(PATTERN[:480], encoding="utf-8")
    cmp = tmp_path / "cmp"
    args = ["compare", "--corpus", str(corpus), "--out", str(cmp), *TINY, "--epochs", "1"]
    assert main([*args, "--cells", "gru,rnn"]) == 0
    assert (cmp / "rnn" / "checkpoint").is_dir()
    capsys.readouterr()
    assert main([*args, "--cells", "gru"]) == 1
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"grulab: error: --out {cmp} already holds a comparison (results.md"), err
    assert err[0].endswith("); replace it with --overwrite, or give another --out"), err
    assert main([*args, "--cells", "gru", "--overwrite"]) == 0
    assert not (cmp / "rnn").exists() and (cmp / "gru" / "checkpoint").is_dir()  # nothing stale is left
    assert "rnn" not in (cmp / "results.md").read_text()


def test_demo_replaces_only_its_own_earlier_demo(trained, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(trained / "run", other)
    assert main(["demo", "--out", str(other), "--minutes", "0.01"]) == 1
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and f"--out {other} holds a run that is not a demo's" in err[0] and "another --out" in err[0]
    assert checkpoint.load(other).train["corpus"] == str(trained / "corpus.txt")  # untouched
    # an earlier demo's directory (as the demo marks it) is replaced: running the demo twice just works
    demo = tmp_path / "demo"
    shutil.copytree(trained / "run", demo)
    (demo / ".grulab-demo").touch()
    assert main(["demo", "--out", str(demo), "--minutes", "0.01"]) == 0
    assert checkpoint.load(demo).train["corpus"] == "austen"
    assert len(read_metrics(demo / "metrics.jsonl")) == 1

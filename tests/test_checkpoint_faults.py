"""Checkpoints under faults (issue 11): kills during saves, full disks, damaged and hostile files.

The double-fault proof runs tests/double_fault.py as a real process, which kills
its own children with SIGKILL at every step of a save, twice in a row.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from grulab.lm import checkpoint
from grulab.lm.data import Vocab
from grulab.errors import GrulabError
from grulab.lm.model import LanguageModel, ModelConfig

TESTS = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
VOCAB = Vocab("the cat sat on the mat")


def model(hidden=8, **kw) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=len(VOCAB), hidden=hidden, **kw))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------- kills
def test_any_two_kills_during_saves_leave_the_newest_complete_checkpoint(tmp_path):
    # tmpfs when there is one: fsync is free there, and a kill (not a power cut) is what is tested
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    try:
        proc = subprocess.run([sys.executable, str(TESTS / "double_fault.py"), str(work)], capture_output=True,
                              text=True, env=ENV, timeout=600)
    finally:
        if work != tmp_path:
            shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    n = max(result["steps"]) + 1
    assert min(result["steps"]) >= 20  # opens, writes, fsyncs, renames and removals were all counted
    assert result["pairs"] == n * n
    assert result["failures"] == []


def test_a_save_cut_short_is_found_and_finished(tmp_path):
    """The issue's double fault by hand: killed between the two renames, then in the next save's
    clean-up. Only checkpoint.tmp/ is complete; find() takes it and the next save moves it in place."""
    run = tmp_path / "run"
    checkpoint.save(run, model(hidden=8), VOCAB, {}, {"step": 1})
    checkpoint.save(run, model(hidden=8), VOCAB, {}, {"step": 2})
    os.replace(run / "checkpoint", run / "checkpoint.tmp")  # as if checkpoint/ had been taken apart
    (run / "checkpoint.old").mkdir()
    (run / "checkpoint.old" / "config.json").write_text("{")  # a half-removed old one
    assert checkpoint.find(run) == run / "checkpoint.tmp"
    assert checkpoint.load(run).progress == {"step": 2}
    checkpoint.save(run, model(hidden=8), VOCAB, {}, {"step": 3})
    assert sorted(os.listdir(run)) == ["checkpoint"]
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    assert config["progress"] == {"step": 3} and config["serial"] == 3


def test_a_torn_file_makes_a_checkpoint_incomplete(tmp_path):
    run = tmp_path / "run"
    checkpoint.save(run, model(), VOCAB, {}, {"step": 1})
    shutil.copytree(run / "checkpoint", run / "checkpoint.old")
    checkpoint.save(run, model(), VOCAB, {}, {"step": 2})  # removes .old
    shutil.copytree(run / "checkpoint", run / "checkpoint.tmp")
    weights = run / "checkpoint.tmp" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # one byte short: not the size config.json lists
    config = json.loads((run / "checkpoint.tmp" / "config.json").read_text())
    config["serial"] = 99
    (run / "checkpoint.tmp" / "config.json").write_text(json.dumps(config))
    assert checkpoint.find(run) == run / "checkpoint"


def test_metrics_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    run = tmp_path / "run"
    checkpoint.append_metrics(run.mkdir() or run, {"step": 1})
    checkpoint.save(run, model(), VOCAB, {}, {"step": 1})
    checkpoint.append_metrics(run, {"step": 2})  # killed before the save that row belongs to
    ck = checkpoint.load(run)
    checkpoint.trim_metrics(run, ck)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    checkpoint.trim_metrics(run, ck)  # idempotent
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_files_are_written_0644_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        checkpoint.append_metrics(run.mkdir() or run, {"step": 1})
        opt = torch.optim.Adam(model().parameters())
        checkpoint.save(run, model(), VOCAB, {}, {}, opt, {"rng": torch.zeros(2)})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [*(run / "checkpoint").iterdir(), run / "metrics.jsonl"]}
    assert len(modes) == 6 and set(modes.values()) == {0o644}, modes


# ---------------------------------------------------------------------------- a full disk
def _save_on_a_full_disk(run: Path) -> str:
    """Save a small checkpoint, then one too large for the disk; return the error."""
    checkpoint.save(run, model(hidden=8), VOCAB, {}, {"step": 1})
    with pytest.raises(GrulabError) as e:
        checkpoint.save(run, model(hidden=200), VOCAB, {}, {"step": 2})  # 480 KB of weights
    return one_line(e)


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


FULL_DISK_CHILD = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from test_checkpoint_faults import _save_on_a_full_disk
print(_save_on_a_full_disk(Path(sys.argv[1])))
"""


def test_a_full_disk_is_one_line_and_leaves_no_tmp(tmp_path):
    disk = tmp_path / "disk"
    if _mount_tmpfs(disk, "256k"):  # a real full disk
        try:
            msg = _save_on_a_full_disk(disk / "run")
            leftovers = sorted(os.listdir(disk / "run"))
            kept = checkpoint.load(disk / "run").progress
        finally:
            subprocess.run(["umount", str(disk)], check=True)
        assert "No space left on device" in msg
    else:  # a file-size limit in a child process
        proc = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(tmp_path / "run"), str(TESTS)],
                              capture_output=True, text=True, env=ENV, timeout=120)
        assert proc.returncode == 0, proc.stderr
        msg = proc.stdout.strip()
        assert "File too large" in msg
        leftovers = sorted(os.listdir(tmp_path / "run"))
        kept = checkpoint.load(tmp_path / "run").progress
    assert "cannot save the checkpoint" in msg and "the last checkpoint is kept" in msg
    assert leftovers == ["checkpoint"]  # no checkpoint.tmp/
    assert kept == {"step": 1}


def test_a_metrics_row_that_does_not_fit_is_taken_back(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "8k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        (disk / "filler").write_bytes(b"x" * 4096)
        checkpoint.append_metrics(disk, {"step": 1})
        with pytest.raises(GrulabError, match="No space left") as e:
            checkpoint.append_metrics(disk, {"text": "x" * 10000})
        one_line(e)
        assert (disk / "metrics.jsonl").read_text() == '{"step": 1}\n'
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---------------------------------------------------------------------------- config.json
def _saved(tmp_path) -> Path:
    run = tmp_path / "run"
    checkpoint.save(run, model(), VOCAB, {"num_steps": 8, "corpus": "x"}, {"step": 1})
    return run


@pytest.mark.parametrize("section,key,value,piece", [
    ("model", "hidden", 10**9, "model.hidden must be a positive integer up to 65,536, got 1000000000"),
    ("model", "layers", 10**6, "model.layers must be a positive integer up to 256, got 1000000"),
    ("model", "impl", "bogus", "model.impl must be one of auto, "),
    ("model", "reset_after", "no", "model.reset_after must be true or false, got 'no'"),
    ("model", "hidden", 8.0, "model.hidden must be a positive integer up to 65,536, got 8.0"),
    ("model", "vocab_size", None, "model.vocab_size is missing"),
    ("train", None, [1], "train must be a JSON object"),
    ("train", "num_steps", "x", "train.num_steps must be a positive integer, got 'x'"),
    ("train", "seed", 10**20, "train.seed must be an integer in [0, 18446744073709551615]"),
    ("model", "hidden", 15000, "head.weight has shape [11, 8], the config needs [11, 15000]"),
])
def test_bad_config_values_are_refused_before_anything_is_allocated(tmp_path, section, key, value, piece):
    run = _saved(tmp_path)
    path = run / "checkpoint" / "config.json"
    config = json.loads(path.read_text())
    if key is None:
        config[section] = value
    elif value is None:
        del config[section][key]
    else:
        config[section][key] = value
    path.write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(GrulabError) as e:
        checkpoint.load(run)
    assert time.perf_counter() - start < 5  # 10**9 hidden units would be 12 EB; 10**6 layers, minutes
    msg = one_line(e)
    assert piece in msg and str(run / "checkpoint") in msg and "restore" in msg, msg


def test_shapes_computed_for_the_check_are_the_models():
    for kw in [dict(), dict(cell="lstm", layers=3, embed=5), dict(cell="rnn", layers=2), dict(reset_after=False),
               dict(layers=2, embed=4, dropout=0.1)]:
        m = model(hidden=6, **kw)
        assert checkpoint._expected_shapes(m.config) == {k: tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_weights_that_are_not_finite_are_refused(tmp_path, bad):
    run = _saved(tmp_path)
    path = run / "checkpoint" / "model.safetensors"
    weights = load_file(str(path))
    weights["head.bias"][2] = bad
    save_file(weights, str(path))
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    config["files"]["model.safetensors"] = path.stat().st_size
    (run / "checkpoint" / "config.json").write_text(json.dumps(config))
    with pytest.raises(GrulabError, match="head.bias holds NaN or Inf") as e:
        checkpoint.load(run)
    one_line(e)


@pytest.mark.parametrize("name", ["vocab.json", "model.safetensors", "config.json"])
def test_unreadable_files_are_reported_as_unreadable(name):
    d = Path(tempfile.mkdtemp())  # not under pytest's 0700 directory: another user must get in
    try:
        os.chmod(d, 0o755)
        run = _saved(d)
        os.chmod(run / "checkpoint" / name, 0)
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(65534)  # nobody: root reads any file
        try:
            with pytest.raises(GrulabError) as e:
                checkpoint.load(run)
        finally:
            if as_root:
                os.seteuid(0)
        msg = one_line(e)
        assert "Permission denied" in msg and name in msg and "No such file" not in msg, msg
    finally:
        shutil.rmtree(d)


# ---------------------------------------------------------------------------- the validator itself
def test_config_json_is_checked_by_the_dataclasses_own_rules():
    """One source of truth: a rule changed on the field is the rule config.json is held to."""
    from dataclasses import fields

    from grulab.lm.config import checked
    from grulab.errors import ConfigError
    from grulab.lm.validate import check_section

    hidden = next(f for f in fields(ModelConfig) if f.name == "hidden")
    assert hidden.metadata["rule"].ok(65536) and not hidden.metadata["rule"].ok(65537)
    with pytest.raises(GrulabError, match="c.json: model.vocab_size is missing; fix it"):
        check_section({"hidden": 8}, ModelConfig, "c.json: model", "fix it")
    check_section({"vocab_size": 3, "hidden": 8, "from_a_later_version": 1}, ModelConfig, "c.json: model", "fix")
    for values, piece in [({"hidden": True}, "model.hidden must be a positive integer up to 65,536, got True"),
                          ({"dropout": math.nan}, "model.dropout must be in [0, 1), got nan"),
                          ({"cell": "gruu"}, "model.cell must be one of rnn, gru, lstm")]:
        with pytest.raises(GrulabError, match="fix it") as e:
            check_section({"vocab_size": 3, **values}, ModelConfig, "c.json: model", "fix it")
        assert piece in one_line(e), str(e.value)
        with pytest.raises(ConfigError):  # the very check ModelConfig(...) makes
            ModelConfig(vocab_size=3, **values)
    assert checked(ModelConfig, {"dropout": 0, "x": 1}) == {"dropout": 0.0}  # normalised as the dataclass does

"""Kill a process at every step of a checkpoint save, then again at every step of the next one.

Run as a script (tests/test_checkpoint_faults.py starts it): ``python double_fault.py WORKDIR``.
It imports torch once, then forks a child per save. A "step" is every call that
changes the disk (os.open for writing, os.write, os.fsync, os.replace, os.unlink,
os.rmdir, os.mkdir, os.ftruncate, ...); the child is SIGKILLed just before step k
(a write is torn in half first). After two such children the run directory must
load, hold the newest checkpoint that was completely saved or a later one, and its
metrics.jsonl (after trim_metrics) must hold exactly one row per saved step.
Prints one JSON line: {"steps": [...], "pairs": n, "failures": [...]}.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

from grulab.lm import checkpoint
from grulab.lm.data import Vocab
from grulab.lm.model import LanguageModel, ModelConfig

VOCAB = Vocab("abcdefg")
STEPS = ("open", "write", "pwrite", "fsync", "replace", "rename", "unlink", "rmdir", "mkdir", "ftruncate", "truncate")
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def model_for(step: int) -> LanguageModel:
    torch.manual_seed(step)  # the weights tell which step a checkpoint belongs to
    return LanguageModel(ModelConfig(vocab_size=len(VOCAB), hidden=4, embed=3))


def inject(kill_at: int) -> list[int]:
    """Count the disk-changing os calls of this process; SIGKILL it before call number ``kill_at``."""
    count = [0]
    for name in STEPS:
        real = getattr(os, name)

        def step(*args, _real=real, _name=name, **kwargs):
            if _name == "open" and not (args[1] & WRITING):
                return _real(*args, **kwargs)  # opening to read changes nothing
            count[0] += 1
            if count[0] == kill_at:
                if _name == "write":  # a torn write: half of it reaches the file
                    _real(args[0], bytes(args[1])[: len(args[1]) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)

        setattr(os, name, step)
    return count


def report_and_save(run: Path, kill_at: int) -> dict:
    """What training does at a report, after a (re)start: load, trim, append the row, save.
    Returns the step saved and the number of disk-changing steps it took (when not killed)."""
    ck = checkpoint.load(run, with_training_state=True)
    step = ck.progress["step"] + 1
    model = model_for(step)
    count = inject(kill_at)
    checkpoint.trim_metrics(run, ck)
    checkpoint.append_metrics(run, {"step": step})
    checkpoint.save(run, model, VOCAB, {}, {"step": step}, extra={"rng": torch.tensor([step])})
    return {"saved": step, "steps": count[0]}


def in_child(fn, *args) -> int:
    """Run fn in a forked child; its exit status: 0 done, -9 killed, 1 failed."""
    pid = os.fork()
    if pid == 0:
        try:
            result = fn(*args)
            with open(os.environ["RESULT_FILE"], "w") as f:
                f.write(json.dumps(result))
            os._exit(0)
        except BaseException as e:  # noqa: BLE001 - reported by the parent
            print(f"child failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def snapshot(run: Path) -> str:
    """Every file's path and contents under ``run``, as one string."""
    return "|".join(f"{p.relative_to(run)}:{p.read_bytes().hex() if p.is_file() else '/'}"
                    for p in sorted(run.rglob("*")))


def check(run: Path, done: int, most: int) -> str:
    """'' if the run directory is as it must be; else what is wrong."""
    try:
        ck = checkpoint.load(run)
    except Exception as e:  # noqa: BLE001
        return f"does not load: {e}"
    s = ck.progress.get("step")
    if not done <= s <= most:
        return f"loaded step {s}, expected between {done} (the last complete save) and {most}"
    want = model_for(s).state_dict()
    if any(not torch.equal(v, want[k]) for k, v in ck.model.state_dict().items()):
        return f"step {s}: the weights are not that step's"
    checkpoint.trim_metrics(run, ck)
    rows = [json.loads(line)["step"] for line in (run / checkpoint.METRICS).read_text().splitlines()]
    if rows != list(range(1, s + 1)):
        return f"step {s}: metrics rows {rows}"
    return ""


def main(work: Path) -> None:
    torch.set_num_threads(1)
    base = work / "base"
    checkpoint.append_metrics(base.mkdir(parents=True) or base, {"step": 1})
    checkpoint.save(base, model_for(1), VOCAB, {}, {"step": 1}, extra={"rng": torch.tensor([1])})
    checkpoint.load(base, with_training_state=True)  # first-use costs, paid once before the forks
    os.environ["RESULT_FILE"] = str(work / "result.json")
    # how many steps a save takes from the base state, and from a state after one more save
    counts = []
    run = work / "count"
    shutil.copytree(base, run)
    for _ in range(2):
        assert in_child(report_and_save, run, 0) == 0
        counts.append(json.loads((work / "result.json").read_text())["steps"])
    n = max(counts) + 1  # +1: also "not killed at all"
    # the first kill, at every step; kills that leave the same files are one case
    after_first: dict[str, tuple[list[int], int]] = {}
    for first in range(1, n + 1):
        run = work / f"first-{first}"
        shutil.copytree(base, run)
        status = in_child(report_and_save, run, first)
        done = json.loads((work / "result.json").read_text())["saved"] if status == 0 else 1
        key = f"{status} {done} {snapshot(run)}"
        if key in after_first:
            after_first[key][0].append(first)
            shutil.rmtree(run)
        else:
            after_first[key] = ([first], done)
    failures, pairs = [], 0
    for firsts, done_first in after_first.values():
        state = work / f"first-{firsts[0]}"
        for second in range(1, n + 1):
            run = work / "run"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(state, run)
            status = in_child(report_and_save, run, second)
            done = json.loads((work / "result.json").read_text())["saved"] if status == 0 else done_first
            problem = ("the restart failed (see stderr)" if status not in (0, -signal.SIGKILL)
                       else check(run, done, 3))
            if problem:
                failures.append(f"kill at step {firsts} of the first save, {second} of the second: {problem}")
            pairs += len(firsts)
    print(json.dumps({"steps": counts, "pairs": pairs, "failures": failures[:20]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Run directories: one process at a time, never replaced by accident, one line per problem.

    with rundir.claim(out, resume=False, overwrite=False):
        ...  # train, writing checkpoint/ and metrics.jsonl into out

A run directory is locked with ``flock`` on its ``.lock`` file for as long as
the ``with`` lasts. The operating system drops the lock when the process ends,
however it ends, so a killed run never blocks the next one; a second process
is refused with the pid that holds the lock. A directory that already holds a
run is refused too, unless the caller resumes it or overwrites it; an empty
``metrics.jsonl`` alone (a run killed before its first report) is no run, and is
taken over. :func:`holder` tells others (generate, eval, ...) that a run is live.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from grulab.errors import GrulabError

LOCK = ".lock"
# what a `grulab train` run writes; their presence means "this directory holds a run"
TRAIN_FILES = ("checkpoint", "checkpoint.old", "checkpoint.tmp", "metrics.jsonl", "perplexity.png")
CHECKPOINTS = TRAIN_FILES[:3]  # a run that wrote none of these has nothing to resume
CLAIM_TRIES = 20  # a busy lock is tried this often, 10 ms apart: holder()'s probe holds it for microseconds


class RunDir:
    """A claimed run directory; leaving the ``with`` (or :meth:`release`) gives it up."""

    def __init__(self, path: Path, fd: int, created: Sequence[Path] = (), made_lock: bool = False) -> None:
        self.path, self._fd = path, fd
        self.created = tuple(created)  # the directories claim() made, deepest first
        self.made_lock = made_lock  # claim() made the lock file

    def abandon(self, files: Sequence[str]) -> None:
        """Give the directory up after a run that saved nothing: remove ``files`` (what the run wrote),
        the lock file and directories if claim() made them (the parents too, when empty), so that
        the next command finds --out as it was. Best effort: what cannot go stays."""
        for name in (*files, LOCK) if self.made_lock else files:
            path = self.path / name
            try:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError:
                pass
        self.release()
        for d in self.created:
            try:
                d.rmdir()  # only when empty
            except OSError:
                break

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.release()


def make_dir(out: Path) -> list[Path]:
    """Create ``out`` (and its parents); GrulabError with the reason if that cannot be done.
    Returns the directories it created, deepest first."""
    missing = [p for p in (out, *out.parents) if not p.exists()] if not out.exists() else []
    if out.exists() and not out.is_dir():
        raise GrulabError(f"--out {out} is a file, not a directory; give a directory path (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in reversed(out.parents) if p.exists() and not p.is_dir()), None)
        where = f"{blocker} is a file" if blocker is not None else "a part of the path is not a directory"
        raise GrulabError(f"--out {out} cannot be created: {where}; give another --out") from None
    except OSError as e:
        raise GrulabError(f"--out {out} cannot be created: {e.strerror} ({e.filename}); "
                          "give a directory on a writable disk") from None
    return missing


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"


def holder(out: Path) -> Optional[str]:
    """"pid N" of the other process that holds ``out`` now (a run in progress), None if none does.

    Probes the lock with a shared flock, dropped at once; a claim() meeting the probe tries again.
    """
    try:
        fd = os.open(Path(out) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            return None if who == f"pid {os.getpid()}" else who
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _empty(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size == 0
    except OSError:
        return False


def claim(out: Path, resume: bool = False, overwrite: bool = False,
          run_files: Sequence[str] = TRAIN_FILES, what: str = "a run") -> RunDir:
    """Create and lock the run directory ``out`` for this process.

    Refused in one line (GrulabError): ``out`` cannot be a directory or is not
    writable; another process holds it; it already holds ``what`` (any of
    ``run_files``) and neither ``resume`` nor ``overwrite`` is set.
    ``overwrite`` deletes those files first. Only ``what="a run"`` offers ``--resume``.
    """
    out = Path(out)
    created = make_dir(out)
    try:
        try:
            fd, made_lock = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            fd, made_lock = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666), False
    except OSError as e:
        raise GrulabError(f"--out {out} is not writable ({e.strerror}); give a writable directory") from None
    for attempt in range(CLAIM_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt < CLAIM_TRIES - 1:
                time.sleep(0.01)
                continue
            who = _holder(fd)
            os.close(fd)
            raise GrulabError(f"--out {out} is in use by another grulab process ({who}); "
                              "wait for it to end or stop it, or give another --out") from None
    run = RunDir(out, fd, created, made_lock)
    try:
        try:  # who holds it, for the message above; a full disk may refuse even this
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        present = [name for name in run_files if (out / name).exists()]
        if what == "a run" and present == ["metrics.jsonl"] and _empty(out / "metrics.jsonl"):
            present = []  # a run killed before its first report: nothing to keep, nothing to resume
        if present and not resume:
            if what == "a run" and not overwrite and not any(name in CHECKPOINTS for name in present):
                raise GrulabError(f"--out {out} holds {', '.join(present)} but no checkpoint: its run ended before "
                                  "its first checkpoint, so there is nothing to resume; start it again with "
                                  "--overwrite, or give another --out")
            if not overwrite:
                fixes = "continue it with --resume, or replace it with --overwrite" if what == "a run" else \
                    "replace it with --overwrite, or give another --out"
                raise GrulabError(f"--out {out} already holds {what} ({', '.join(present)}); {fixes}")
            for name in present:
                path = out / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    except OSError as e:
        run.release()
        raise GrulabError(f"--out {out}: cannot remove the old run ({e.strerror}); remove it by hand") from None
    except BaseException:
        run.release()
        raise
    return run

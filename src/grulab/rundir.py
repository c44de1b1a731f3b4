"""Run directories: one process at a time, never replaced by accident, one line per problem.

    with rundir.claim(out, resume=False, overwrite=False):
        ...  # train, writing checkpoint/ and metrics.jsonl into out

A run directory is locked with ``flock`` on its ``.lock`` file for as long as
the ``with`` lasts. The operating system drops the lock when the process ends,
however it ends, so a killed run never blocks the next one; a second process
is refused with the pid that holds the lock. A directory that already holds a
run is refused too, unless the caller resumes it or overwrites it.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Sequence

from .errors import GrulabError

LOCK = ".lock"
# what a `grulab train` run writes; their presence means "this directory holds a run"
TRAIN_FILES = ("checkpoint", "checkpoint.old", "checkpoint.tmp", "metrics.jsonl", "perplexity.png")


class RunDir:
    """A claimed run directory; leaving the ``with`` (or :meth:`release`) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.release()


def make_dir(out: Path) -> None:
    """Create ``out`` (and its parents); GrulabError with the reason if that cannot be done."""
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


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"


def claim(out: Path, resume: bool = False, overwrite: bool = False,
          run_files: Sequence[str] = TRAIN_FILES, what: str = "a run") -> RunDir:
    """Create and lock the run directory ``out`` for this process.

    Refused in one line (GrulabError): ``out`` cannot be a directory or is not
    writable; another process holds it; it already holds ``what`` (any of
    ``run_files``) and neither ``resume`` nor ``overwrite`` is set.
    ``overwrite`` deletes those files first. Only ``what="a run"`` offers ``--resume``.
    """
    out = Path(out)
    make_dir(out)
    try:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise GrulabError(f"--out {out} is not writable ({e.strerror}); give a writable directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise GrulabError(f"--out {out} is in use by another grulab process ({holder}); "
                          "wait for it to end or stop it, or give another --out") from None
    run = RunDir(out, fd)
    try:
        try:  # who holds it, for the message above; a full disk may refuse even this
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        present = [name for name in run_files if (out / name).exists()]
        if present and not resume:
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

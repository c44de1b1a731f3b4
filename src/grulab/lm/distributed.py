"""Training on several processes and machines with PyTorch's own engine: torchrun + DistributedDataParallel.

    torchrun --nproc-per-node 2 -m grulab train --out runs/ddp      # one machine, two processes
    grulab train --nproc 2 --out runs/ddp                            # the same: launches torchrun for you

A run means the same thing on any number of processes. ``--batch-size`` is the
*global* batch: every process draws the same batch from the shared seed and
keeps its own block of rows (:meth:`Dist.rows`), so

* ranks read disjoint data, and with sequential sampling a rank's rows continue
  its rows of the batch before, so the state it carries (a plain tensor,
  detached per batch, never a module buffer) still means something;
* random sampling shuffles per epoch from the shared seed;
* every rank takes the same number of steps, even when the rows do not divide
  evenly (the loss is weighted so the gradient is the global batch's mean);
* a checkpoint holds the state of all rows, gathered by rank 0, in the
  one-process format: it loads for generate/eval and resumes on any number of
  processes.

One process (no torchrun) is the case ``world == 1``: every method here is then
a no-op and no collective runs.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from grulab.errors import GrulabError

MARKER = ".elastic-run"  # in the run directory: which torchrun job started the run (for elastic restarts)


class LostPeer(GrulabError):
    """Another process of the run stopped answering (it died, or the network failed)."""

    exit_now = True  # a torchrun worker ends right after the error line (cli.main)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes (``world == 1``: one process)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0, the one writer: checkpoints, metrics, the plot and the console."""
        return self.rank == 0

    def rows(self, batch_size: int, rank: Optional[int] = None) -> slice:
        """The block of rows of a ``batch_size``-row batch that ``rank`` (default: this one) trains on.

        Blocks are contiguous and as even as can be: the first ``batch_size % world`` ranks take one more.
        """
        r = self.rank if rank is None else rank
        base, extra = divmod(batch_size, self.world)
        start = r * base + min(r, extra)
        return slice(start, start + base + (r < extra))

    def max(self, *values: float) -> list[float]:
        """Each value's largest over the ranks (one all_reduce): a flag set on any rank is set on all."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks, in float64 (one all_reduce)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def _reduce(self, values: Sequence[float], op) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        _collective(dist.all_reduce, t, op=op)
        return t.tolist()

    def gather_rows(self, x: torch.Tensor, batch_size: int, dim: int = 1) -> torch.Tensor:
        """The whole batch's ``x`` from each rank's block of rows along ``dim`` (every rank gets it)."""
        if self.world == 1:
            return x
        most = self.rows(batch_size, 0).stop  # rank 0's block is the largest
        pad = list(x.shape)
        pad[dim] = most - x.shape[dim]
        padded = torch.cat([x, x.new_zeros(pad)], dim).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        _collective(dist.all_gather, parts, padded)
        sizes = [self.rows(batch_size, r).stop - self.rows(batch_size, r).start for r in range(self.world)]
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)

    def barrier(self) -> None:
        if self.world > 1:
            _collective(dist.barrier)


def current() -> Dist:
    """The Dist of the process group this process belongs to (a one-process Dist if none is set up)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def _collective(fn, *args, **kwargs):
    with talking():
        return fn(*args, **kwargs)


@contextmanager
def talking():
    """Where the processes exchange data (collectives, DDP's backward): a failure of the transport
    (a dead peer, a timeout) becomes LostPeer, one line; other errors pass unchanged."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if not (isinstance(e, dist.DistError) or any(w in str(e) for w in ("gloo", "Gloo", "NCCL", "Connection"))):
            raise
        raise LostPeer(f"rank {dist.get_rank()}: lost contact with the other processes of the run "
                       f"({_first_sentence(e)}): a process died or the network failed") from None


def _first_sentence(e: BaseException) -> str:
    """'Read error [127.0.0.1]:56522: Connection reset by peer' out of gloo's '[.../pair.cc:537] Read error ... . This is ...'."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [type(e).__name__])[0])
    return text.split(". ")[0][:200]


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("WORLD_SIZE" in os.environ and "RANK" in os.environ)


def missing_env(env=None) -> Optional[str]:
    """What :func:`setup` would miss to join a run of several processes (torchrun sets it all), as a
    line to tell; None when nothing is missing or this is no such run. The values' forms are
    checked by grulab.cli.check_environment."""
    env = os.environ if env is None else env
    if not ("TORCHELASTIC_RUN_ID" in env or ("WORLD_SIZE" in env and "RANK" in env)):
        return None
    try:
        if int(env.get("WORLD_SIZE", "1")) == 1:
            return None
    except ValueError:
        return None  # said by check_environment
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in env]
    if not missing:
        return None
    return (f"WORLD_SIZE={env['WORLD_SIZE']} asks for a run of several processes, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set; start it with torchrun (which sets them all), "
            "or grulab train --nproc N, or unset WORLD_SIZE")


def setup(timeout: float) -> Dist:
    """Join the process group torchrun describes: gloo for CPU tensors, and NCCL for CUDA tensors
    where CUDA is available (each process on GPU ``LOCAL_RANK``).

    ``timeout`` (seconds) bounds every collective: if a rank dies, the others end within it.
    """
    if not under_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return current()
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(backend, store=_store(timeout), rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError, dist.DistError) as e:
        raise GrulabError(f"cannot join the distributed run ({_first_sentence(e)}); "
                          "check torchrun's --rdzv-endpoint / --master-addr and that every node can reach it") from None
    return current()


def _store(timeout: float) -> dist.Store:
    """torchrun's key-value store (what ``init_method="env://"`` would use).

    The agent's store outlives a restart, so there each restart takes a prefix of its own: otherwise a
    restarted group can read the addresses its dead predecessor left there and fail to connect (seen
    with torch 2.13's --standalone and --max-restarts). A store that rank 0 hosts
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) is new at each restart and takes none: the restart count is
    each node's own, and a node that joins in place of a dead one counts from 0.
    """
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent hosts it; else rank 0 does
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=not agent and os.environ["RANK"] == "0", timeout=timedelta(seconds=timeout),
                          multi_tenant=True)
    return dist.PrefixStore(f"grulab/restart{_restart_count()}" if agent else "grulab", store)


def _restart_count() -> int:
    """How many times this node's torchrun agent has restarted its workers."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def threads_note(threads: int) -> str:
    """How many threads each process computes with, and who chose it, for the log."""
    n = torch.get_num_threads()
    if threads:
        why = "--threads"
    elif "OMP_NUM_THREADS" in os.environ:
        why = (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
               + (", set by torchrun; choose with --threads" if under_torchrun() else ""))
    else:
        why = "PyTorch's default; choose with --threads"
    return f"{n} thread{'s' * (n != 1)} per process ({why})"


# ---------------------------------------------------------------------------- elastic restarts
def _job() -> str:
    """Names the torchrun job this process belongs to; the same across its restarts."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return run_id
    return f"{run_id}@{socket.gethostname()}:{os.getppid()}"  # the agent, which outlives its workers


def mark_job(out: Path) -> None:
    """Rank 0 of a fresh torchrun run: record the job, so that its restarts resume this run."""
    if under_torchrun():
        (Path(out) / MARKER).write_text(_job() + "\n")


def restarted(out: Path, group: Dist) -> bool:
    """Whether this group is torchrun's restart of the job that started the run in ``out`` (all ranks
    get the answer): an agent of the job has restarted its workers, and rank 0 finds the job's marker.

    Any agent will do: a node that joined in place of a dead one starts counting at 0 (and may be rank 0).
    """
    ours = False
    if group.main:
        try:
            ours = (Path(out) / MARKER).read_text().strip() == _job()
        except OSError:
            pass
    again, ours = group.max(float(_restart_count() >= 1), float(ours))
    return bool(again and ours)


# ---------------------------------------------------------------------------- grulab train --nproc N
def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m torch.distributed.run --standalone --nproc-per-node N -m grulab <argv>`` and wait.

    SIGINT, SIGTERM and SIGHUP are passed to torchrun once (it stops the workers,
    which save); returns torchrun's exit status.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "grulab", *argv]
    proc = subprocess.Popen(cmd, start_new_session=True)  # a terminal's Ctrl-C reaches it only through us
    forwarded = False

    def forward(signum, frame) -> None:
        nonlocal forwarded
        if not forwarded and proc.poll() is None:
            forwarded = True
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

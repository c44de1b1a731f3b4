"""Training under torchrun: real processes, gloo on 127.0.0.1, tiny models, few steps.

A distributed run must be the one-process run given the same (global) batch,
to float tolerance; its checkpoints load and resume on any number of
processes; a dead rank, torchrun's SIGTERM and an elastic restart each end or
go on cleanly. Two nodes are two network namespaces joined by a veth pair, with
a c10d rendezvous across them (root only).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from torch.testing import assert_close

from grulab.lm import checkpoint
from grulab.lm.train import TrainConfig, read_metrics, resume_config, train

TEXT = "the cat sat on the mat; the dog dug in the fog. " * 60  # 2,940 chars


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "cats.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs torch on one thread (conftest.one_thread)."""


def settings(corpus, out, **kw) -> dict:
    """A tiny run: SGD-free Adam, constant lr, no dropout, an odd global batch (3 + 2 rows on 2 ranks)."""
    d = dict(corpus=str(corpus), hidden=16, embed=8, batch_size=5, num_steps=8, epochs=1, max_minutes=0.0,
             lr=1e-2, clip=0.5, schedule="constant", dropout=0.0, seed=7, out=str(out), prefixes=["the "],
             predict_length=4, progress=False, threads=1, val_fraction=0.2, timeout=60.0)
    d.update(kw)
    return d


def flags(d: dict) -> list[str]:
    """The command line of a settings dict."""
    out = []
    for k, v in d.items():
        name = "--" + k.replace("_", "-")
        if k == "progress":
            out += [] if v else ["--no-progress"]
        elif k == "prefixes":
            out += ["--prefix", *v]
        else:
            out += [name, str(v)]
    return out


def torchrun(args: list[str], nproc: int = 2, extra: tuple = (), log: Path = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=0.1", *extra, "-m", "grulab", "train", *args]
    f = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 120) -> tuple[int, str]:
    rc = proc.wait(timeout)
    return rc, log.read_text()


def weights(run) -> dict:
    return checkpoint.load(run).model.state_dict()


def close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def wait_for(predicate, timeout: float = 90, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def children(pid: int) -> list[int]:
    """The pids of the children of process pid (none once it has gone), from every process's parent
    in /proc/*/stat: /proc/pid/task/pid/children lists only what the main thread forked, and the
    kernel calls it unreliable while the task runs (a worker it missed kept a killed node alive in CI)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # the process has gone
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def worker(agent: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank."""
    for child in children(agent):
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return child
    raise AssertionError(f"no worker with RANK={rank} under pid {agent}")


def serial(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint" / "config.json").read_text()).get("serial", 0)
    except (OSError, ValueError):
        return -1


# ---------------------------------------------------------------------------- the same run on 1 and 2 processes
@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_two_processes_equal_one_process_given_the_global_batch(corpus, tmp_path, sampling):
    """Rows split 3 + 2; sequential batches carry each rank's state; the loss is the global batch's mean,
    so the clipped gradient is the one process's. Metrics (val reduced over ranks) agree too."""
    cfg = settings(corpus, tmp_path / "two", sampling=sampling, eval_every=7)
    proc = torchrun(flags(cfg), log=tmp_path / "log")
    train(TrainConfig(**{**cfg, "out": str(tmp_path / "one")}))
    rc, log = finish(proc, tmp_path / "log")
    assert rc == 0, log
    close_weights(weights(tmp_path / "two"), weights(tmp_path / "one"))
    two, one = read_metrics(tmp_path / "two" / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one] and len(one) >= 2
    for a, b in zip(two, one):
        assert a["tokens"] == b["tokens"]  # global tokens
        assert_close(a["val_ppl"], b["val_ppl"], rtol=1e-4, atol=0)
        assert_close(a["train_ppl"], b["train_ppl"], rtol=1e-4, atol=0)
    assert "2 processes, 1 thread per process (--threads)" in log
    assert log.count("grulab train:") == 1  # rank 0 alone prints
    assert not list(checkpoint.load(tmp_path / "two").model.buffers())  # DDP would broadcast buffers from rank 0


# ---------------------------------------------------------------------------- checkpoints: 2 -> 1 -> 2 processes
def test_checkpoint_round_trip_distributed_single_distributed(corpus, tmp_path):
    """Epoch 1 on 2 processes (grulab train --nproc 2), epoch 2 on one, epoch 3 on 2 (torchrun):
    the same weights as 3 epochs on one process, and generate/eval read the distributed checkpoint."""
    run = tmp_path / "run"
    cfg = settings(corpus, run)
    straight = subprocess.Popen([sys.executable, "-c", "from grulab.lm.train import TrainConfig, train; import sys, json; "
                                 "train(TrainConfig(**json.loads(sys.argv[1])))",
                                 json.dumps({**cfg, "epochs": 3, "out": str(tmp_path / "straight")})])
    first = subprocess.run([sys.executable, "-m", "grulab", "train", "--nproc", "2", *flags(cfg)],
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    gen = subprocess.run([sys.executable, "-m", "grulab", "generate", str(run), "--prefix", "the ", "--length", "5",
                          "--seed", "1"], capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0 and gen.stdout.startswith("the "), gen.stderr
    ev = subprocess.run([sys.executable, "-m", "grulab", "eval", str(run), str(corpus), "--json"],
                        capture_output=True, text=True, timeout=60)
    assert ev.returncode == 0 and json.loads(ev.stdout)["perplexity"] > 1, ev.stderr

    train(resume_config(run, epochs=2))  # one process
    log = tmp_path / "log"
    rc, text = finish(torchrun(["--resume", "--out", str(run), "--epochs", "3", "--no-progress"], log=log), log)
    assert rc == 0, text
    assert "resumed at epoch 3" in text
    assert straight.wait(120) == 0
    close_weights(weights(run), weights(tmp_path / "straight"))
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == \
        [r["step"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]


# ---------------------------------------------------------------------------- faults
def long_run(corpus, out, **kw) -> list[str]:
    return flags(settings(corpus, out, epochs=200, eval_every=10, **kw))


def test_a_killed_rank_ends_the_run_with_a_clear_message(corpus, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log"
    proc = torchrun(long_run(corpus, run), log=log)
    try:
        wait_for(lambda: serial(run) >= 1, what="the first checkpoint")
        os.kill(worker(proc.pid, 1), signal.SIGKILL)
        t0 = time.monotonic()
        rc, text = finish(proc, log, timeout=60)
    finally:
        proc.kill()
    assert rc != 0 and time.monotonic() - t0 < 45
    assert "lost contact with the other processes" in text or "stopped by SIGTERM" in text, text
    assert "src/grulab/" not in text and "site-packages/grulab/" not in text, text  # no traceback of ours
    checkpoint.load(run, with_training_state=True)  # the last checkpoint is intact


def test_sigterm_to_torchrun_stops_every_rank_at_one_batch_and_saves(corpus, tmp_path):
    """The save lands inside an epoch, with both ranks' carried state: resumed on one process to the
    end of that epoch, the run ends with the weights of one that never stopped."""
    run, log = tmp_path / "run", tmp_path / "log"
    proc = torchrun(long_run(corpus, run), log=log)
    try:
        wait_for(lambda: serial(run) >= 2, what="two checkpoints")
        before = serial(run)
        proc.send_signal(signal.SIGTERM)
        rc, text = finish(proc, log, timeout=60)
    finally:
        proc.kill()
    assert rc != 0
    assert "interrupted at epoch" in text and "checkpoint saved" in text, text
    ckpt = checkpoint.load(run, with_training_state=True)
    assert serial(run) > before
    assert ckpt.extra["state_h"].shape[1] == 5  # both ranks' rows: they stopped at the same batch
    rows = read_metrics(run / "metrics.jsonl")
    assert ckpt.progress["step"] >= rows[-1]["step"]
    epochs = ckpt.progress["epoch"] + 1
    train(resume_config(run, epochs=epochs))  # one process, from the two processes' mid-epoch state
    train(TrainConfig(**settings(corpus, tmp_path / "straight", epochs=epochs, eval_every=10)))
    close_weights(weights(run), weights(tmp_path / "straight"))


def test_an_elastic_restart_resumes_from_the_checkpoint(corpus, tmp_path):
    """torchrun --max-restarts 1: a killed rank restarts the group, which resumes by itself and ends
    where a run that was never killed ends."""
    run, log = tmp_path / "run", tmp_path / "log"
    cfg = settings(corpus, run, epochs=4, eval_every=10)
    proc = torchrun(flags(cfg), extra=("--max-restarts=1",), log=log)
    straight = tmp_path / "straight"
    try:
        train(TrainConfig(**{**cfg, "out": str(straight)}))
        wait_for(lambda: serial(run) >= 1, what="the first checkpoint")
        os.kill(worker(proc.pid, 1), signal.SIGKILL)
        rc, text = finish(proc, log, timeout=120)
    finally:
        proc.kill()
    assert rc == 0, text
    assert "restarted by torchrun: resuming the run" in text, text
    assert checkpoint.load(run).progress["epoch"] == 4
    close_weights(weights(run), weights(straight))
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == sorted(set(steps))  # the rows after the checkpoint were trimmed, not doubled


# ---------------------------------------------------------------------------- two nodes: network namespaces
@dataclass
class Nodes:
    """Two network namespaces joined by a veth pair: two machines as far as the network goes (the
    file system is shared, as a shared --out would be). Node 0 hosts the rendezvous."""

    ns: tuple[str, str]
    veth: tuple[str, str]
    # Node 1's address sorts first, so the rendezvous makes node 1 rank 0: the ranks are not the launch order.
    addr: tuple[str, str] = ("10.213.13.2", "10.213.13.1")
    procs: list = field(default_factory=list)

    def torchrun(self, i: int, job: str, args: list[str], log: Path, extra: tuple = (), conf: str = "",
                 env: dict = None):
        """`torchrun --nnodes 2` on node i, as the README shows it, with the flags a machine whose hostname
        does not resolve to its network address needs (here: `vm`, 127.0.0.1 in both namespaces)."""
        cmd = ["ip", "netns", "exec", self.ns[i], sys.executable, "-m", "torch.distributed.run",
               "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.addr[0]}:29400",
               f"--rdzv-id={job}", f"--local-addr={self.addr[i]}", "--monitor-interval=0.1",
               f"--rdzv-conf={','.join(['is_host=1'] * (i == 0) + [conf] * bool(conf))}",
               *extra, "-m", "grulab", "train", *args]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": self.veth[i], **(env or {})}
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """The node dies: its agent and its workers (their own sessions) at once, by SIGKILL."""
        for pid in [*children(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def nodes():
    """Root only (ip netns); skipped where namespaces or veth pairs cannot be made (no CAP_NET_ADMIN)."""
    if os.geteuid() != 0:
        pytest.skip("two-node test: needs root, for ip netns")
    if shutil.which("ip") is None:
        pytest.skip("two-node test: no `ip` command (Debian: apt-get install iproute2)")
    tag = f"{os.getpid()}-{time.monotonic_ns() % 10**6}"
    n = Nodes(ns=(f"grulab-n0-{tag}", f"grulab-n1-{tag}"), veth=(f"gv{tag[-9:]}a", f"gv{tag[-9:]}b"))
    made = []
    try:
        for ns in n.ns:
            r = ip("netns", "add", ns)
            if r.returncode:
                pytest.skip(f"two-node test: `ip netns add` failed: {r.stderr.strip()}")
            made.append(ns)
        r = ip("link", "add", n.veth[0], "type", "veth", "peer", "name", n.veth[1])
        if r.returncode:
            pytest.skip(f"two-node test: cannot make a veth pair: {r.stderr.strip()}")
        for i in (0, 1):
            for cmd in (("link", "set", n.veth[i], "netns", n.ns[i]),
                        ("-n", n.ns[i], "addr", "add", f"{n.addr[i]}/24", "dev", n.veth[i]),
                        ("-n", n.ns[i], "link", "set", "lo", "up"), ("-n", n.ns[i], "link", "set", n.veth[i], "up")):
                r = ip(*cmd)
                assert r.returncode == 0, f"ip {' '.join(cmd)}: {r.stderr}"
        yield n
    finally:
        for proc in n.procs:
            if proc.poll() is None:
                n.kill(proc)
        ip("link", "del", n.veth[0])  # only if it never moved: a namespace's deletion takes its veth along
        for ns in made:
            ip("netns", "del", ns)


def test_two_nodes_equal_one_process_given_the_global_batch(nodes, corpus, tmp_path):
    """A real c10d rendezvous across two network namespaces, gloo over the veth pair."""
    cfg = settings(corpus, tmp_path / "two", eval_every=7)
    procs = [nodes.torchrun(i, "same", flags(cfg), tmp_path / f"log{i}") for i in (0, 1)]
    train(TrainConfig(**{**cfg, "out": str(tmp_path / "one")}))
    logs = [finish(p, tmp_path / f"log{i}") for i, p in enumerate(procs)]
    assert [rc for rc, _ in logs] == [0, 0], logs
    text = logs[0][1] + logs[1][1]
    assert "2 processes, 1 thread per process (--threads)" in logs[1][1], text  # node 1 is rank 0, it prints
    assert text.count("grulab train:") == 1, text
    close_weights(weights(tmp_path / "two"), weights(tmp_path / "one"))
    assert [r["step"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")] == \
        [r["step"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")]


def test_a_dead_node_ends_the_run_on_the_other(nodes, corpus, tmp_path):
    """Node 1 (rank 0, the writer) dies: node 0 ends at once with one line; the checkpoint is intact."""
    run = tmp_path / "run"
    procs = [nodes.torchrun(i, "dead", long_run(corpus, run), tmp_path / f"log{i}") for i in (0, 1)]
    wait_for(lambda: serial(run) >= 1, what="the first checkpoint")
    nodes.kill(procs[1])
    t0 = time.monotonic()
    rc, text = finish(procs[0], tmp_path / "log0", timeout=60)
    assert rc != 0 and time.monotonic() - t0 < 30, text
    assert "rank 1: lost contact with the other processes" in text, text
    assert "src/grulab/" not in text and "site-packages/grulab/" not in text, text
    checkpoint.load(run, with_training_state=True)


def test_a_node_that_comes_back_resumes_the_run(nodes, corpus, tmp_path):
    """--max-restarts: node 1 dies and is started again; the group resumes from the checkpoint and ends
    where a run that was never stopped ends. The new node 1 is rank 0 with a restart count of 0: only
    node 0's agent has restarted. (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with the store shared, as by
    default, torch 2.13's new node waits for a MASTER_ADDR that node 0's agent does not publish again.)"""
    run, straight = tmp_path / "run", tmp_path / "straight"
    cfg = settings(corpus, run, epochs=4, eval_every=10)
    elastic = dict(extra=("--max-restarts=1",), env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
                   conf="keep_alive_interval=1,keep_alive_max_attempt=2")  # the dead node's place frees sooner
    procs = [nodes.torchrun(i, "back", flags(cfg), tmp_path / f"log{i}", **elastic) for i in (0, 1)]
    wait_for(lambda: serial(run) >= 1, what="the first checkpoint")
    nodes.kill(procs[1])
    again = nodes.torchrun(1, "back", flags(cfg), tmp_path / "log1b", **elastic)
    train(TrainConfig(**{**cfg, "out": str(straight)}))
    (rc0, text0), (rc1, text1) = finish(procs[0], tmp_path / "log0"), finish(again, tmp_path / "log1b")
    assert (rc0, rc1) == (0, 0), text0 + text1
    assert "restarted by torchrun: resuming the run" in text1, text1
    assert checkpoint.load(run).progress["epoch"] == 4
    close_weights(weights(run), weights(straight))

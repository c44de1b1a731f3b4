"""The traps a new user fell into following the README (issue 25), each held by a test that failed
before its fix: bad environment variables, a run in progress, a run that failed before its first
checkpoint, benchmarks that wrote a tracked file, doubled error prefixes, figures with clipped or
overlapping labels.

In-process through ``main()`` where a process is not the point (``import torch`` costs seconds).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from grulab.cli import main
from grulab.lm import checkpoint, rundir

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "grulab"
GRULAB = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "grulab.cli"]
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
PATTERN = "the cat sat on the mat. " * 20
TINY = ["--hidden", "16", "--embed", "0", "--batch-size", "4", "--num-steps", "8", "--max-minutes", "0",
        "--lr", "0.01", "--seed", "0", "--no-progress", "--prefix", "the", "--predict-length", "5"]
# variables a test may set; each test starts without them (a developer's shell may have some)
ENV_VARS = ("GRULAB_KERNEL", "GRULAB_AUTOTUNE", "GRULAB_CACHE", "XDG_CACHE_HOME", "RANK", "LOCAL_RANK", "WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
            "TORCHELASTIC_USE_AGENT_STORE")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(PATTERN, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("traps")
    (work / "corpus.txt").write_text(PATTERN, encoding="utf-8")
    assert main(["train", "--corpus", str(work / "corpus.txt"), "--out", str(work / "run"), *TINY,
                 "--epochs", "1"]) == 0
    return work / "run"


# ---------------------------------------------------------------------------- 1. the environment
# (variables, what the line names); each is refused by `grulab train` before anything is made in --out
ENV_CASES = {
    "kernel-unknown": ({"GRULAB_KERNEL": "native-neon"}, "GRULAB_KERNEL='native-neon' is not a fused kernel"),
    "kernel-not-fused": ({"GRULAB_KERNEL": "torch"}, "GRULAB_KERNEL='torch' is not a fused kernel"),
    "autotune": ({"GRULAB_AUTOTUNE": "maybe"}, "GRULAB_AUTOTUNE='maybe' is not on or off"),
    "cache-a-file": ({"GRULAB_CACHE": "FILE"}, "is a file, not a directory"),
    "cache-under-a-file": ({"GRULAB_CACHE": "FILE/cache"}, "is a file, not a directory"),
    "xdg-cache-a-file": ({"XDG_CACHE_HOME": "FILE"}, "XDG_CACHE_HOME="),
    "world-size-word": ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not a whole number"),
    "rank-word": ({"WORLD_SIZE": "2", "RANK": "first", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
                  "RANK='first' is not a whole number"),
    "rank-too-big": ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
                     "RANK='2' is not below WORLD_SIZE=2"),
    "local-rank-word": ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not a whole number"),
    "master-port-word": ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"},
                         "MASTER_PORT='http' is not a whole number"),
    "master-port-range": ({"MASTER_PORT": "99999"}, "MASTER_PORT='99999' is out of range"),
    "no-master-addr": ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR, MASTER_PORT are not set"),
    "restart-count-word": ({"TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_RESTART_COUNT": "once"},
                           "TORCHELASTIC_RESTART_COUNT='once' is not a whole number"),
    "agent-store": ({"TORCHELASTIC_USE_AGENT_STORE": "yes"}, "TORCHELASTIC_USE_AGENT_STORE='yes'"),
    "omp-threads": ({"OMP_NUM_THREADS": "all"}, "OMP_NUM_THREADS='all' is not a positive whole number"),
}


@pytest.mark.parametrize("case", ENV_CASES)
def test_a_bad_environment_variable_is_one_line_before_anything_is_made(case, corpus, tmp_path, monkeypatch, capsys):
    variables, piece = ENV_CASES[case]
    (tmp_path / "a-file").write_text("x")
    for name, value in variables.items():
        monkeypatch.setenv(name, value.replace("FILE", str(tmp_path / "a-file")))
    out = tmp_path / "runs" / "out"
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--epochs", "1"]) == 2
    line = one_error(capsys)
    assert line.startswith("grulab") and ": error: " in line and piece in line, line
    assert not (tmp_path / "runs").exists()  # nothing made: no debris in a run directory


@pytest.mark.parametrize("case", ["kernel-unknown", "autotune", "cache-a-file", "master-port-range"])
def test_grulab_kernels_checks_the_environment_too(case, tmp_path, monkeypatch, capsys):
    variables, piece = ENV_CASES[case]
    (tmp_path / "a-file").write_text("x")
    for name, value in variables.items():
        monkeypatch.setenv(name, value.replace("FILE", str(tmp_path / "a-file")))
    assert main(["kernels"]) == 2
    assert piece in one_error(capsys)


def test_an_unwritable_cache_is_one_line(monkeypatch, capsys):
    cache = Path(tempfile.mkdtemp())  # in /tmp, which nobody may enter
    try:
        os.chmod(cache, 0o555)
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(65534)  # nobody: root writes anywhere
        try:
            lines = []
            for where, piece in [(cache, f"{cache} is not writable"),
                                 (cache / "grulab", f"{cache / 'grulab'} cannot be created (Permission denied)")]:
                monkeypatch.setenv("GRULAB_CACHE", str(where))
                assert main(["kernels"]) == 2
                lines.append((one_error(capsys), piece))
        finally:
            if as_root:
                os.seteuid(0)
    finally:
        shutil.rmtree(cache)
    for line, piece in lines:
        assert line.startswith("grulab: error: GRULAB_CACHE=") and piece in line, line


def test_a_bad_kernel_as_a_process_is_one_line_and_leaves_no_run(tmp_path, corpus):
    """The README's trap as it was met: GRULAB_KERNEL=native-neon grulab kernels / train."""
    out = tmp_path / "run"
    env = {**ENV, "GRULAB_KERNEL": "native-neon"}
    procs = [subprocess.run([*GRULAB, *args], capture_output=True, text=True, env=env, timeout=120)
             for args in (["kernels"], ["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--epochs", "1"])]
    for proc in procs:
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert error_lines(proc.stderr) == [
            "grulab: error: GRULAB_KERNEL='native-neon' is not a fused kernel; expected one of native-amx, "
            "native-avx512bf16, native-avx512, native-avx2, native-generic, fused-torch; fix or unset GRULAB_KERNEL "
            "(grulab kernels lists them)"]
    assert not out.exists()


def test_a_forced_kernel_that_cannot_run_is_one_line(tmp_path, corpus, monkeypatch, capsys):
    """A kernel this machine cannot run: said before training starts, and by `grulab kernels` for a
    query it cannot run (a RuntimeError from the registry before)."""
    import dataclasses

    from grulab import kernels

    monkeypatch.setenv("GRULAB_KERNEL", "native-avx2")
    assert main(["kernels", "--dtype", "bfloat16"]) == 2
    assert one_error(capsys) == ("grulab: error: GRULAB_KERNEL=native-avx2 cannot run here: float32 and float64 only "
                                 "(got bfloat16); unset GRULAB_KERNEL or pick another kernel (grulab kernels lists them)")
    assert main(["kernels", "--shape", "35,32,28,256", "--dtype", "bfloat16"]) == 2
    assert "GRULAB_KERNEL=native-avx2 cannot run here" in one_error(capsys)
    # as on a CPU without AVX2
    lacking = dataclasses.replace(kernels.BY_NAME["native-avx2"], why_not=lambda q: "this CPU lacks AVX2")
    monkeypatch.setitem(kernels.BY_NAME, "native-avx2", lacking)
    monkeypatch.setattr(kernels, "_cache", {})
    out = tmp_path / "run"
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--epochs", "1"]) == 2
    assert one_error(capsys) == ("grulab: error: GRULAB_KERNEL=native-avx2 cannot run here: this CPU lacks AVX2; "
                                 "unset GRULAB_KERNEL or pick another kernel (grulab kernels lists them)")
    assert not out.exists()


def test_train_from_python_checks_the_kernel_variable_first(tmp_path, corpus, monkeypatch):
    from grulab.errors import GrulabError
    from grulab.lm.train import TrainConfig, train

    monkeypatch.setenv("GRULAB_KERNEL", "native-neon")
    with pytest.raises(GrulabError, match="GRULAB_KERNEL='native-neon'"):
        train(TrainConfig(corpus=str(corpus), out=str(tmp_path / "run"), epochs=1, max_minutes=0, hidden=8))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- 2. a run in progress
HOLDER = """
import sys, time
from grulab.lm import rundir
run = rundir.claim(sys.argv[1])
print("claimed", flush=True)
time.sleep(120)
"""


def test_a_run_in_progress_is_told_as_such(trained, tmp_path, capsys):
    """A process holds the run (as `grulab train` does): before its first checkpoint every command that
    reads the run says it is still training; after it, they read that checkpoint and say so."""
    run = tmp_path / "live"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=ENV)
    corpus = str(trained.parent / "corpus.txt")
    commands = [["generate", str(run), "--length", "5", "--prefix", "the"], ["eval", str(run), corpus],
                ["viz", str(run), "--text", "the cat", "--out", str(tmp_path / "g.html")],
                ["train", "--resume", "--out", str(run)]]
    if importlib.util.find_spec("onnx") is not None:
        commands.append(["export", str(run), "--onnx", str(tmp_path / "m.onnx")])
    try:
        assert holder.stdout.readline() == "claimed\n"
        (run / "metrics.jsonl").write_text("")  # as train writes it at its start
        for argv in commands:
            assert main(argv) == 1, argv
            line = one_error(capsys)
            assert line.startswith(f"grulab: error: {run} is still training (pid {holder.pid}); no checkpoint yet"), line
            assert line.endswith("then --resume" if argv[0] == "train" else "try again then"), line
        shutil.copytree(trained / "checkpoint", run / "checkpoint")  # its first checkpoint
        for argv in commands:
            if argv[:2] == ["train", "--resume"]:
                assert main(argv) == 1
                assert one_error(capsys).startswith(
                    f"grulab: error: {run} is still training (pid {holder.pid}); last checkpoint at "
                    f"{run / 'checkpoint'} (after 1 epoch); wait for it to end")
                continue
            with pytest.warns(UserWarning) as told:
                assert main(argv) == 0, argv
            assert [str(w.message) for w in told] == [
                f"{run} is still training (pid {holder.pid}); last checkpoint at {run / 'checkpoint'} (after 1 epoch); "
                "using that checkpoint"], argv
    finally:
        holder.kill()
        holder.wait()
    # once it has ended, nothing is said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["generate", str(run), "--length", "5", "--prefix", "the"]) == 0


def test_a_real_run_before_its_first_checkpoint(tmp_path, capsys):
    """`grulab generate RUN` while `grulab train --out RUN` works on its first epoch; then the run is
    killed (SIGKILL: nothing of it cleans up) and `grulab train --out RUN` starts again without --overwrite."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(PATTERN * 1000, encoding="utf-8")  # 15,000 batches an epoch: no report comes soon
    run = tmp_path / "run"
    proc = subprocess.Popen([*GRULAB, "train", "--corpus", str(corpus), "--out", str(run), *TINY, "--epochs", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert main(["generate", str(run), "--length", "5"]) == 1
        line = one_error(capsys)
        assert line == (f"grulab: error: {run} is still training (pid {proc.pid}); no checkpoint yet: it saves one "
                        "at its first report; try again then"), line
    finally:
        proc.kill()
        proc.communicate()
    assert not (run / "checkpoint").exists() and (run / "metrics.jsonl").read_text() == ""
    # 3. what it left does not block the next run
    assert main(["train", "--corpus", str(corpus), "--out", str(run), *TINY, "--epochs", "1",
                 "--max-minutes", "0.005"]) == 0
    assert checkpoint.load(run).progress["step"] > 0


# ---------------------------------------------------------------------------- 3. a run that failed early
def test_a_run_that_fails_before_its_first_checkpoint_leaves_out_usable(tmp_path, corpus, capsys):
    out = tmp_path / "runs" / "hot"
    # diverges in its first epoch: nothing saved, and nothing left in the way
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--epochs", "2", "--optimizer", "sgd",
                 "--lr", "1e30", "--clip", "0", "--schedule", "constant"]) == 1
    assert "no checkpoint was saved" in one_error(capsys)
    assert not (tmp_path / "runs").exists()  # the directories it made are gone
    # the same command, with a sane learning rate, just works (no --overwrite)
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--epochs", "1"]) == 0
    assert checkpoint.load(out).progress["epoch"] == 1


def test_a_failed_run_in_an_existing_directory_leaves_it_as_it_was(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (tmp_path / "short.txt").write_text("the cat", encoding="utf-8")
    assert main(["train", "--corpus", str(tmp_path / "short.txt"), "--out", str(out), *TINY, "--epochs", "1"]) == 1
    assert "too short" in one_error(capsys)
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_rows_without_a_checkpoint_say_how_to_start_again(tmp_path, corpus, capsys):
    """metrics.jsonl with rows but no checkpoint (killed between a report's row and its save)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--epochs", "1"]) == 1
    assert one_error(capsys) == (f"grulab: error: --out {out} holds metrics.jsonl but no checkpoint: its run ended "
                                 "before its first checkpoint, so there is nothing to resume; start it again with "
                                 "--overwrite, or give another --out")
    assert main(["train", "--resume", "--out", str(out)]) == 1
    assert "its run ended before its first checkpoint" in one_error(capsys)
    assert main(["train", "--corpus", str(corpus), "--out", str(out), *TINY, "--epochs", "1", "--overwrite"]) == 0


def test_holder_names_the_other_process_only(tmp_path):
    run = tmp_path / "run"
    assert rundir.holder(run) is None  # no directory
    with rundir.claim(run):
        assert rundir.holder(run) is None  # this process
    assert rundir.holder(run) is None  # released


# ---------------------------------------------------------------------------- 4. benchmarks
def _writers() -> list[str]:
    """Every benchmark script that writes results.md."""
    return sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")
                  if "results.md" in p.read_text(encoding="utf-8") and "write_section(" in p.read_text(encoding="utf-8"))


def test_the_benchmarks_that_write_results_md_are_all_checked():
    assert _writers() == ["bench_bf16", "bench_export", "bench_grid", "bench_gru", "bench_mingru", "bf16_parity"]


@pytest.mark.parametrize("name", _writers())
def test_a_benchmark_writes_results_md_only_when_asked(name, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    if name == "bench_export":
        pytest.importorskip("onnxruntime")
    bench = importlib.import_module(name)
    gru = importlib.import_module("bench_gru")
    parse = bench.parser().parse_args
    assert gru.results_target(parse([])) is None
    if "--quick" in bench.parser().format_help():
        assert gru.results_target(parse(["--quick"])) is None
    assert gru.results_target(parse(["--write-results"])) == ROOT / "benchmarks" / "results.md"
    assert gru.results_target(parse(["--out", str(tmp_path / "r.md")])) == tmp_path / "r.md"


def test_bench_gru_quick_prints_and_writes_nothing(monkeypatch, capsys):
    """The run itself, its measurements stubbed: a plain --quick run calls no write."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gru = importlib.import_module("bench_gru")
    times = {"torch.nn.GRU": 1e-3, "grulab fused": 5e-4, "reference": 2e-3}
    monkeypatch.setattr(gru, "train_and_infer", lambda *a, **k: (dict(times), dict(times)))
    monkeypatch.setattr(gru, "generation", lambda *a, **k: dict(times))
    monkeypatch.setattr(gru, "bf16_row", lambda *a, **k: dict(times))
    written = []
    monkeypatch.setattr(gru, "write_section", lambda *a: written.append(a))
    assert gru.main(["--quick"]) == 0
    assert written == [] and "wrote" not in capsys.readouterr().out
    assert gru.main(["--quick", "--write-results"]) == 0
    assert [a[0] for a in written] == [ROOT / "benchmarks" / "results.md"]


# ---------------------------------------------------------------------------- 5. error lines
@pytest.mark.parametrize("argv, line", [
    (["trian"], "grulab: error: unknown command 'trian'; did you mean 'train'?"),
    (["kernels", "--shape", "35,x"], "grulab: error: argument --shape: expected T,B,I,H (four whole numbers, T >= 1, "
                                     "e.g. 35,32,28,256), got '35,x' (see grulab kernels --help)"),
    (["train", "--epohcs", "3"], "grulab: error: unknown flag --epohcs for train; did you mean --epochs? "
                                 "(see grulab train --help)"),
    (["kernels", "--dtype", "flaot32"], "grulab: error: argument --dtype: invalid choice 'flaot32'; did you mean "
                                        "'float32'? (choose from float32, float64, bfloat16, float16) "
                                        "(see grulab kernels --help)"),
    (["--verison"], "grulab: error: unknown flag --verison; did you mean --version? (see grulab --help)"),
    (["frobnicate"], "grulab: error: unknown command 'frobnicate'; the commands are train, generate, eval, compare, "
                     "viz, demo, kernels, export (see grulab --help)"),
    (["generate"], "grulab: error: the following arguments are required: dir (see grulab generate --help)"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_an_error_line_has_one_prefix_and_suggests_the_nearest(argv, line, capsys):
    assert main(argv) == 2
    assert one_error(capsys) == line


def test_a_typo_as_a_process():
    proc = subprocess.run([*GRULAB, "trian"], capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 2 and error_lines(proc.stderr) == [
        "grulab: error: unknown command 'trian'; did you mean 'train'?"], proc.stderr


# ---------------------------------------------------------------------------- 6. figures
def _edges_blank(path: Path) -> None:
    """Nothing drawn touches the image's edge: a label cut off by the canvas would."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path).convert("L"), dtype=np.int16)
    for name, edge in {"left": a[:, :2], "right": a[:, -2:], "top": a[:2, :], "bottom": a[-2:, :]}.items():
        assert edge.min() >= 250, f"{path.name}: something is drawn at its {name} edge (clipped)"


def _no_label_overlaps(fig) -> None:
    """Every tick label and axis label inside the figure, and no two tick labels of an axis overlapping."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
            shown = [t.get_window_extent(renderer) for t in labels
                     if axis.get_view_interval().min() <= t.get_position()[axis is ax.yaxis] <= axis.get_view_interval().max()]
            for i, a in enumerate(shown):
                assert box.x0 <= a.x0 and a.x1 <= box.x1 and box.y0 <= a.y0 and a.y1 <= box.y1
                for b in shown[i + 1:]:
                    assert not a.overlaps(b), f"tick labels overlap: {a} {b}"
            label = axis.get_label().get_window_extent(renderer)
            assert box.x0 <= label.x0 and label.x1 <= box.x1


@pytest.mark.parametrize("rows", [
    [dict(epoch=e, train_ppl=1 + 60 * 0.99 ** (e * 4), val_ppl=20 + e / 4) for e in range(1, 501)],  # 1 .. 150
    [dict(epoch=e, train_ppl=3000 / e, val_ppl=1284 / e ** 0.3) for e in range(1, 44)],  # 70 .. 3000
    [dict(epoch=e, train_ppl=12.0 - e, val_ppl=10.0 - e / 2) for e in (1, 2, 3)],  # a short run
], ids=["long-run", "d2l-zh", "short"])
def test_perplexity_labels_never_overlap(rows, monkeypatch, tmp_path):
    """A long run's perplexity falls over decades: its log axis labelled every minor tick (2, 3, ... 9,
    20, ...) drew them on top of each other."""
    from grulab.lm import plots

    plt = plots.pyplot()
    close, kept = plt.close, []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figure to measure its labels
    plots.perplexity_curve(rows, tmp_path / "p.png")
    try:
        _no_label_overlaps(kept[0])
    finally:
        for fig in kept:
            close(fig)
    _edges_blank(tmp_path / "p.png")


def test_the_cli_figures_clip_nothing(trained, tmp_path):
    """Each PNG the CLI writes, drawn from a run: perplexity.png (train), the compare plot, the gate
    heatmap (viz), catmouse.png (drawn from a result of the shape catmouse.run returns)."""
    from grulab.lm import plots
    from grulab.views.plots import catmouse_figure

    _edges_blank(trained / "perplexity.png")
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    plots.compare_curves([{"run": "gru", "rows": rows}, {"run": "hidden=1024", "rows": rows}], tmp_path / "cmp.png")
    _edges_blank(tmp_path / "cmp.png")
    assert main(["viz", str(trained), "--text", "the cat sat on the mat", "--out", str(tmp_path / "gates.png")]) == 0
    _edges_blank(tmp_path / "gates.png")
    z = [0.9, 0.3] + [0.95] * 48
    result = {"distances": [5, 10, 25, 50, 100, 200], "accuracy": {"gru": [1.0] * 6, "rnn": [1, 1, .4, .5, .26, .25]},
              "chance": 0.25, "gate": {"distance": 50, "z_key": 0.35, "z_filler": 0.64,
                                       "example": {"tokens": ["cat", "mouse"] + ["cat"] * 48, "z": z,
                                                   "z_units": [z, z[::-1]], "key_pos": 1}}}
    catmouse_figure(result, tmp_path / "catmouse.png")
    _edges_blank(tmp_path / "catmouse.png")

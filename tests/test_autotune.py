"""impl="auto" on the CPU: the measured choice (grulab.kernels.autotune) and the thread governor (grulab.kernels.threads)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grulab
from grulab.kernels import autotune, fused, native, plan, threads
from grulab import kernels


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private GRULAB_CACHE and no choices in memory, before and after."""
    monkeypatch.setenv("GRULAB_CACHE", str(tmp_path))
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.delenv(autotune.ENV, raising=False)
    autotune.forget()
    yield tmp_path
    autotune.forget()


def _gru(**kw):
    torch.manual_seed(0)
    return grulab.GRU(5, 24, **kw)


def test_first_call_measures_every_candidate_and_records_the_fastest(cache):
    gru = _gru(num_layers=2)
    x = torch.randn(6, 4, 5)
    out, h_n = gru(x)
    ref = torch.nn.GRU(5, 24, num_layers=2)
    ref.load_state_dict(gru.state_dict())
    want, want_h = ref(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_n, want_h, rtol=1e-5, atol=1e-6)

    choices = autotune.recorded()
    assert autotune.path().is_file() and autotune.path().parent == cache / "autotune"
    [(key, entry)] = choices.items()
    assert "T=6 B=4 I=5 H=24 layers=2" in key and "fwd+bwd" in key
    query = kernels.Query("cpu", torch.float32, True)
    assert set(entry["ms"]) <= set(autotune.candidates(query)) and entry["kernel"] in entry["ms"]
    static = autotune.candidates(query)[0]
    fastest = min(entry["ms"], key=entry["ms"].get)
    # the fastest, unless it beat the static choice by less than the margin
    static_ms = entry["ms"].get(static, float("inf"))  # absent: dropped as far slower after the warm-up
    expected = fastest if entry["ms"][fastest] * autotune.MARGIN <= static_ms else static
    assert entry["kernel"] == expected

    with torch.no_grad():
        gru(x)
    assert len(autotune.recorded()) == 2  # inference is its own signature


def test_measuring_leaves_the_random_state_alone(cache):
    gru = _gru(num_layers=2, dropout=0.5)  # dropout draws random numbers while measuring
    x = torch.randn(5, 3, 5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    name = autotune.choose(gru, x, None, gru._run)
    assert torch.equal(torch.get_rng_state(), before)
    assert name in autotune.candidates(kernels.Query())


def test_a_recorded_choice_is_used_by_the_next_process(cache):
    """Another process on this machine reads the file instead of measuring: here a choice written
    into it by hand (fused-torch) is what runs, bit for bit."""
    gru = _gru()
    x = torch.randn(7, 3, 5)
    gru(x)
    [key] = autotune.recorded()
    data = json.loads(autotune.path().read_text())
    data["choices"][key]["kernel"] = "fused-torch"
    autotune.path().write_text(json.dumps(data))
    script = (
        "import torch, grulab, sys\n"
        "from grulab import fused\n"
        "torch.manual_seed(0); g = grulab.GRU(5, 24); torch.manual_seed(1); x = torch.randn(7, 3, 5)\n"
        "out, _ = g(x)\n"
        "w = g.all_weights[0]\n"
        "ref, _ = fused.gru_layer(x, torch.zeros(3, 24), *w, True, backend='fused-torch')\n"
        "nat, _ = fused.gru_layer(x, torch.zeros(3, 24), *w, True, backend='native')\n"
        "print(torch.equal(out, ref), torch.equal(out, nat))\n"
    )
    env = dict(os.environ, GRULAB_CACHE=str(cache))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    same_as_torch_tier, same_as_native = proc.stdout.split()
    assert same_as_torch_tier == "True"
    if fused.native_available():
        assert same_as_native == "False"  # the two tiers differ in the last bits: the file decided
    assert autotune.recorded()[key]["kernel"] == "fused-torch"  # read, not measured again


def test_off_switch_and_forced_kernel_measure_nothing(cache, monkeypatch):
    x = torch.randn(4, 2, 5)
    monkeypatch.setenv(autotune.ENV, "0")
    _gru()(x)
    assert autotune.recorded() == {} and "measuring is off" in plan.report()
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(kernels.ENV, "fused-torch")
    _gru()(x)
    assert autotune.recorded() == {}


def test_a_damaged_file_is_measured_again(cache):
    autotune.path().parent.mkdir(parents=True)
    autotune.path().write_text("{not json")
    _gru()(torch.randn(3, 2, 5))
    assert len(autotune.recorded()) == 1


def test_report_lists_the_recorded_choices(cache):
    _gru(bidirectional=True)(torch.randn(3, 2, 5))
    text = plan.report()
    assert "1 recorded for this machine" in text and "dirs=2" in text and str(autotune.path()) in text


def test_reset_before_has_no_torch_candidate():
    query = kernels.Query("cpu", torch.float32, False)
    assert "torch" not in autotune.candidates(query)
    assert "torch" in autotune.candidates(kernels.Query("cpu", torch.float32, True))


# -- the thread governor ----------------------------------------------------------------------


def _drive(key, k, time_of):
    """k calls of ``key`` through the governor, each taking ``time_of(threads)`` seconds; the counts used."""
    used = []
    for _ in range(k):
        n = threads.choose(key)
        used.append(n)
        threads.record(key, n, time_of(n))
    return used


QUIET = lambda n: 0.010 if n == 2 else 0.017  # noqa: E731  2 threads faster
BUSY = lambda n: 0.060 if n == 2 else 0.018  # noqa: E731  a competitor holds a core: 2 threads stall


def test_governor_leaves_a_quiet_machine_on_all_threads_and_backs_off_its_probes(two_threads):
    key = ("test-quiet",)
    used = _drive(key, 8 + 16 + 32, QUIET)
    assert used.count(1) == 3  # probes after 8, 16 and 32 calls, each lost
    assert [i for i, n in enumerate(used) if n == 1] == [7, 7 + 16, 7 + 16 + 32]
    assert threads.snapshot()[key] == 2


def test_governor_moves_to_fewer_threads_when_busy_and_back_when_quiet(two_threads):
    key = ("test-busy",)
    _drive(key, 8, QUIET)  # the probe of 1 thread loses
    busy = _drive(key, 12, BUSY)
    # the median of the last 3 calls turns slow after 2 slow ones: it moves, and probes 8 calls later
    assert busy == [2, 2] + [1] * 7 + [2] + [1] * 2
    assert threads.snapshot()[key] == 1
    quiet = _drive(key, 16, QUIET)
    assert quiet[-1] == 2 and threads.snapshot()[key] == 2  # a probe found 2 threads fast again


def test_governor_times_the_other_count_at_once_when_the_one_in_use_turns_slow(two_threads):
    """Long quiet: the probes have backed off (the next one 64 calls away) and the other count's
    only time is old. A 3x slower count in use gets the other timed at once, not 64 calls later."""
    key = ("test-sudden",)
    quiet = _drive(key, 8 + 16 + 32 + 4, QUIET)
    assert quiet.count(1) == 3
    busy = _drive(key, 6, BUSY)
    assert busy[:2] == [2, 2] and 1 in busy[2:4]  # the window's median turns slow after 2 calls
    assert threads.snapshot()[key] == 1

    key = ("test-sudden-noise",)
    _drive(key, 8 + 16 + 32 + 4, QUIET)
    spike = iter([0.030] + [0.010] * 9)  # one slow call (a page fault, a GC pass) is no reason
    assert _drive(key, 10, lambda n: next(spike)) == [2] * 10


def test_deterministic_mode_keeps_torchs_thread_count(two_threads):
    torch.use_deterministic_algorithms(True)
    try:
        assert threads.choose(("test-det",)) == 0
    finally:
        torch.use_deterministic_algorithms(False)


def test_torchs_own_count_is_left_alone_unless_steering_is_on(two_threads):
    key = ("test-steer-off",)
    _drive(key, 8, QUIET)
    _drive(key, 12, BUSY)
    assert threads.snapshot()[key] == 1 and torch.get_num_threads() == 2


def test_steering_lowers_torchs_count_while_busy_and_gives_it_back_when_quiet(two_threads):
    key = ("test-steer",)
    with threads.steering():
        _drive(key, 8, QUIET)
        assert torch.get_num_threads() == 2
        used = _drive(key, 12, BUSY)
        assert threads.snapshot()[key] == 1 and torch.get_num_threads() == 1
        assert 2 in used[3:]  # the governor still probes the user's count while torch's is lowered
        _drive(key, 16, QUIET)
        assert threads.snapshot()[key] == 2 and torch.get_num_threads() == 2
        _drive(key, 12, BUSY)
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2  # the block's end gives it back
    with threads.steering():
        _drive(key, 12, BUSY)
        assert torch.get_num_threads() == 1 and threads.snapshot()[key] == 1
        threads.forget()
        assert torch.get_num_threads() == 2 and key not in threads.snapshot()


def test_steering_leaves_a_count_the_user_set_while_lowered(two_threads):
    key = ("test-steer-user",)
    with threads.steering():
        _drive(key, 8, QUIET)
        _drive(key, 12, BUSY)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(3)  # the user's choice, made while lowered
        _drive(key, 3, QUIET)
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == 3


def test_deterministic_mode_gives_torchs_count_back(two_threads):
    key = ("test-steer-det",)
    with threads.steering():
        _drive(key, 8, QUIET)
        _drive(key, 12, BUSY)
        assert torch.get_num_threads() == 1
        torch.use_deterministic_algorithms(True)
        try:
            assert threads.choose(key) == 0 and torch.get_num_threads() == 2
        finally:
            torch.use_deterministic_algorithms(False)


@pytest.mark.skipif(not fused.native_available(), reason="native extension unavailable")
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("B,H", [(32, 256), (1, 512), (8, 96)])
def test_float32_native_results_do_not_depend_on_the_thread_count(tier, reset_after, B, H):
    """The governor may run a call on 1 or 2 threads; float32 results must be the same bits."""
    if not tier.startswith("native-"):
        pytest.skip("native kernels only")
    isa = tier[len("native-"):]
    torch.manual_seed(0)
    T, I = 5, 12
    x, h0 = torch.randn(T, B, I), torch.randn(B, H)
    w_ih, w_hh = torch.randn(3 * H, I) * 0.2, torch.randn(3 * H, H) * 0.1
    b_ih, b_hh = torch.randn(3 * H), torch.randn(3 * H)
    mod = native.load()
    runs = []
    for n in (1, 2):
        out, h_T, saved = mod.forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, True, isa, n)
        grads = mod.backward(torch.ones_like(out), None, x, h0, w_ih, w_hh, out, saved, reset_after,
                             True, True, True, True, isa, n, 0)
        runs.append([out, h_T, *grads])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cli_kernels_forget_deletes_the_choices(cache, capsys):
    from grulab.cli import main

    _gru()(torch.randn(3, 2, 5))
    assert autotune.path().is_file()
    assert main(["kernels", "--forget"]) == 0
    shown = capsys.readouterr().out
    assert "forgot 1 measured choice(s)" in shown and "0 recorded for this machine" in shown
    assert not autotune.path().exists()
    _gru()(torch.randn(3, 2, 5))  # the next call measures again
    assert len(autotune.recorded()) == 1


def _mkl_max_threads():
    """MKL's thread count for this thread (None where torch's BLAS is not MKL)."""
    import ctypes
    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    fn = getattr(lib, "MKL_Get_Max_Threads", None)
    return None if fn is None else fn()


@pytest.mark.skipif(not fused.native_available(), reason="native extension unavailable")
def test_a_call_on_one_thread_gives_mkl_its_thread_count_back(tier, two_threads):
    """A native call runs its BLAS GEMMs on the governor's count (csrc/native.h, BlasThreads:
    MKL's thread-local count for the call); afterwards MKL is back on torch's count."""
    if not tier.startswith("native-"):
        pytest.skip("native kernels only")
    if _mkl_max_threads() is None:
        pytest.skip("torch's BLAS is not MKL")
    assert _mkl_max_threads() == 2
    isa = tier[len("native-"):]
    torch.manual_seed(0)
    T, B, I, H = 3, 4, 5, 64
    x, h0 = torch.randn(T, B, I), torch.randn(B, H)
    w_ih, w_hh, b_ih, b_hh = torch.randn(3 * H, I), torch.randn(3 * H, H), torch.randn(3 * H), torch.randn(3 * H)
    mod = native.load()
    out, _, saved = mod.forward(x, h0, w_ih, w_hh, b_ih, b_hh, True, True, isa, 1)
    assert _mkl_max_threads() == 2
    mod.backward(torch.ones_like(out), None, x, h0, w_ih, w_hh, out, saved, True, True, True, True,
                 True, isa, 1, 0)
    assert _mkl_max_threads() == 2


@pytest.mark.skipif(not fused.native_available(), reason="native extension unavailable")
def test_a_training_step_times_its_forward_and_its_backward(tier, two_threads):
    """A native training step reports its forward's time under the forward's key and its
    backward's under the backward's (each with the count it ran on); a forward whose backward
    never runs reports no backward time."""
    if not tier.startswith("native-"):
        pytest.skip("native kernels only")
    torch.manual_seed(0)
    I, H = 5, 64
    w = [p.requires_grad_() for p in (torch.randn(3 * H, I), torch.randn(3 * H, H), torch.randn(3 * H), torch.randn(3 * H))]
    x, h0 = torch.randn(4, 3, I), torch.zeros(3, H)
    isa = tier[len("native-"):]
    fwd = ("forward", isa, (4, 3, I), H, torch.float32, True, True)
    bwd = ("backward", isa, (4, 3, I), H, torch.float32, True, False)
    for key in (fwd, bwd):
        threads._states.pop(key, None)

    def recorded(key):
        state = threads._states.get(key)
        return [] if state is None else [t for times in state.recent.values() for t in times]

    fused.gru_layer(x, h0, *w, backend=tier)  # its backward never runs
    assert len(recorded(fwd)) == 1 and recorded(bwd) == []
    out, _ = fused.gru_layer(x, h0, *w, backend=tier)
    out.sum().backward()
    assert len(recorded(fwd)) == 2 and len(recorded(bwd)) == 1
    assert all(0 < t < 10 for t in recorded(fwd) + recorded(bwd))

"""The package's architecture holds: its layers (pyproject.toml's import-linter contract) and
grulab.GRU's light footprint.

Layers, top to bottom: cli; views | deploy; lm; mingru; gru; kernels; reference | cache | errors.
Each imports only the layers below it, function-local imports included (import-linter reads them).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_layer_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def test_the_contract_fails_on_an_upward_import(tmp_path):
    """The check can fail: a copy of the package where the kernels import the language model."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "grulab", src / "grulab", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    with open(src / "grulab" / "kernels" / "threads.py", "a") as f:
        f.write("\n\ndef _upward():\n    from grulab.lm import data  # noqa: F401\n")
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(src)})
    assert proc.returncode != 0 and "grulab.kernels.threads -> grulab.lm.data" in proc.stdout, proc.stdout[-3000:]


def test_a_gru_loads_no_language_model_cli_or_onnx():
    """A fresh interpreter that builds and runs grulab.GRU and GRUCell, forward and backward, on every
    path they take (auto's measuring included) has loaded only torch, the nn layer and the kernels."""
    code = textwrap.dedent("""
        import sys, torch, grulab
        x = torch.randn(5, 3, 4, requires_grad=True)
        for impl in ("auto", "fused", "reference", "torch"):
            out, h = grulab.GRU(4, 8, impl=impl)(x)
            (out.sum() + h.sum()).backward()
            grulab.GRUCell(4, 8, impl=impl)(x[0]).sum().backward()
            with torch.no_grad():
                grulab.GRUCell(4, 8, impl=impl)(x[0])
        loaded = sorted(m for m in sys.modules if m.startswith("grulab"))
        print(" ".join(loaded))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = proc.stdout.split()
    assert "grulab.kernels.fused" in loaded and "grulab.gru" in loaded
    unwanted = [m for m in loaded if m.split(".")[1:2] in (["lm"], ["cli"], ["deploy"], ["views"], ["mingru"])]
    assert not unwanted, unwanted


def test_old_module_paths_still_import_with_a_warning():
    code = ("import warnings, sys\nwarnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    import grulab.train\nexcept DeprecationWarning as w:\n    print(w)\n"
            "warnings.simplefilter('ignore')\n"
            "from grulab.train import TrainConfig\nfrom grulab import checkpoint, fused\n"
            "import grulab.lm.checkpoint, grulab.kernels.fused\n"
            "assert checkpoint is grulab.lm.checkpoint and fused is grulab.kernels.fused\n"
            "print(TrainConfig.__module__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "grulab.train moved to grulab.lm.train" in proc.stdout and "grulab.lm.settings" in proc.stdout

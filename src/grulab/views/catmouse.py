"""The cat-and-mouse demo: why a GRU remembers where a plain RNN forgets.

The notes motivate the GRU with a sequence of many "cat"s and one "mouse"
(猫猫猫…老鼠…猫猫): the model should learn that a cat tells it nothing new,
so the hidden state may stay as it is, while the mouse is worth writing down.
This module turns that into a task a tiny network can be trained on in
seconds::

    cat cat mouse cat cat cat … cat cat  ->  "mouse"
    cat dog cat cat cat cat … cat cat    ->  "dog"
    cat cat cat cat cat cat … cat cat    ->  "cat"   (no animal but cats)

Each sequence is a long run of the filler token ``cat`` with at most one rare
*key* token (``mouse``, ``dog``, ``bird``, …) placed early. Only at the last
step is the model asked which key it saw, so it must carry that one bit of
news across ``distance`` steps of cats. A GRU learns to hold its update gate
near 1 on a cat (h' = z⊙h + (1−z)⊙ñ ≈ h: keep the state) and to drop it at the
key (≈ ñ: rewrite the state). A plain tanh RNN has to push the key through
``distance`` multiplications by its recurrent matrix, and its accuracy falls
towards chance as the distance grows.

    >>> from grulab import catmouse
    >>> result = catmouse.run(out_dir="catmouse")     # ~15 s of CPU on one thread
    >>> result["accuracy"]["gru"], result["accuracy"]["rnn"]
    >>> result["gate"]["z_key"], result["gate"]["z_filler"]

Training uses a curriculum that makes the long distances learnable in a few
hundred steps: in the *training* sequences the key may sit anywhere, so most
gaps are shorter than ``distance``; the *test* sequences put the key early,
so every test gap is at least ``distance`` steps. Both cells see exactly the
same batches; neither gets a special initialisation.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grulab import reference
from grulab.gru import GRU
from grulab.views.plots import catmouse_figure

#: Token names: id 0 is the filler, ids 1..K the keys.
ANIMALS = ("cat", "mouse", "dog", "bird", "fish", "frog")
FILLER = 0
#: The key goes into one of the first EARLY positions of a test sequence.
EARLY = 3
CELLS = ("gru", "rnn")


@contextlib.contextmanager
def single_thread():
    """Run torch on one CPU thread inside the block, then restore the setting.

    The models here are tiny (16 units); a second thread buys nothing and,
    on a machine whose cores are busy with other work, intra-op threads that
    wait for each other can make training many times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_task(
    n: int,
    distance: int,
    generator: Optional[torch.Generator] = None,
    *,
    keys: int = 3,
    vary: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` cat-and-mouse sequences of length ``distance + EARLY``.

    Each sequence is the filler token 0 (``cat``) with, in ``keys/(keys+1)`` of
    them, one key token ``k`` in 1..keys. The label is the key's id, or 0 when
    the sequence holds nothing but cats, so chance accuracy is ``1/(keys+1)``.

    With ``vary=False`` (test sequences) the key sits in one of the first
    ``EARLY`` positions, so at least ``distance`` steps separate it from the
    last step, where the answer is due. With ``vary=True`` (the training
    curriculum) it sits anywhere before the last step.

    Returns ``x`` (n, T) int64 token ids, ``y`` (n,) int64 labels and
    ``key_pos`` (n,) int64, the key's position or -1 where there is none.
    """
    if not 1 <= keys < len(ANIMALS):
        raise ValueError(f"keys must be in 1..{len(ANIMALS) - 1}, got {keys}")
    if distance < 1:
        raise ValueError(f"distance must be at least 1, got {distance}")
    T = distance + EARLY
    x = torch.full((n, T), FILLER, dtype=torch.long)  # (n, T)
    y = torch.randint(0, keys + 1, (n,), generator=generator)  # (n,) 0 = only cats
    span = T - 1 if vary else EARLY
    pos = torch.randint(0, span, (n,), generator=generator)  # (n,)
    has_key = y > 0
    x[has_key, pos[has_key]] = y[has_key]
    key_pos = torch.where(has_key, pos, torch.full_like(pos, -1))  # (n,)
    return x, y, key_pos


class Classifier(nn.Module):
    """one-hot tokens -> recurrent layer (grulab.GRU or a tanh torch.nn.RNN) -> Linear on the last step."""

    def __init__(self, cell: str, hidden: int, keys: int) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
        self.cell = cell
        self.vocab_size = keys + 1
        if cell == "gru":
            self.rnn: nn.Module = GRU(self.vocab_size, hidden)
        else:
            self.rnn = nn.RNN(self.vocab_size, hidden, nonlinearity="tanh")
        self.head = nn.Linear(hidden, keys + 1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T) token ids -> logits (B, keys+1), read from the last step only."""
        inputs = F.one_hot(x.t(), self.vocab_size).to(self.head.weight.dtype)  # (T, B, V)
        out, _ = self.rnn(inputs)  # (T, B, H)
        return self.head(out[-1])  # (B, keys+1)


def train_cell(
    cell: str,
    distance: int,
    *,
    hidden: int = 16,
    steps: int = 300,
    batch: int = 64,
    lr: float = 0.01,
    keys: int = 3,
    seed: int = 0,
) -> Classifier:
    """Train one tiny classifier with Adam on fresh curriculum batches.

    The initial weights and the batches depend on ``seed`` only (the global
    RNG is left as it was), so a GRU and an RNN trained with the same seed
    see the same data.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Classifier(cell, hidden, keys)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with single_thread():
        for _ in range(steps):
            x, y, _ = make_task(batch, distance, generator, keys=keys, vary=True)  # (B, T), (B,)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: Classifier, x: Tensor, y: Tensor) -> float:
    """Fraction of sequences x (N, T) whose label y (N,) is predicted right."""
    return (model(x).argmax(-1) == y).float().mean().item()


@torch.no_grad()
def update_gates(gru: GRU, x: Tensor) -> Tensor:
    """The update gate of a one-layer GRU over token ids x (B, T): z (B, T, H).

    Computed step by step with the notes' equations (:func:`grulab.reference.trace`).
    """
    inputs = F.one_hot(x.t(), gru.input_size).to(gru.weight_ih_l0.dtype)  # (T, B, V)
    return reference.trace(gru, inputs)[0].z.transpose(0, 1)  # (B, T, H)


def gate_summary(gru: GRU, x: Tensor, key_pos: Tensor) -> dict:
    """Mean update gate at the key versus over the cats that follow it.

    Averages over all sequences of x (N, T) that contain a key, and over units.
    ``z_key`` is the mean of z at the key's step; ``z_filler`` the mean over
    every later (filler) step. ``z_key < z_filler`` means the GRU rewrites its
    state at the key and keeps it through the cats.
    """
    has_key = key_pos >= 0
    x, key_pos = x[has_key], key_pos[has_key]
    z = update_gates(gru, x).mean(-1)  # (N, T): mean over units
    T = x.shape[1]
    steps = torch.arange(T)[None, :]  # (1, T)
    at_key = steps == key_pos[:, None]  # (N, T)
    after = steps > key_pos[:, None]  # (N, T)
    return {
        "z_key": z[at_key].mean().item(),
        "z_filler": z[after].mean().item(),
    }


def run(
    distances: Sequence[int] = (5, 10, 25, 50, 100, 200),
    hidden: int = 16,
    steps: int = 300,
    seed: int = 0,
    out_dir: Union[str, Path, None] = "catmouse",
    *,
    batch: int = 64,
    lr: float = 0.01,
    keys: int = 3,
    test_size: int = 1000,
    trace_distance: Optional[int] = None,
    console=None,
    quiet: bool = False,
) -> dict:
    """Train a GRU and a tanh RNN of the same size at each distance; compare.

    For every distance both cells are trained (``steps`` Adam steps, batch
    ``batch``, the same batches for both) and tested on ``test_size`` sequences
    whose key lies at least ``distance`` steps before the answer. The GRU
    trained at ``trace_distance`` (default: the largest distance) is then
    traced with :func:`grulab.reference.gru_step` to read its update gate
    (default: the largest distance up to 50, so the key stays visible in the plot).

    Writes ``out_dir/catmouse.png`` (z over time with the key marked, and
    accuracy against distance) unless ``out_dir`` is None, and prints a
    table unless ``quiet``.

    Returns a dict::

        {"distances": [5, 20, ...],
         "accuracy": {"gru": [...], "rnn": [...]},   # one per distance, in [0, 1]
         "chance": 0.25,
         "gate": {"distance": 50, "z_key": 0.35, "z_filler": 0.64,  # means over the test set
                  "example": {"tokens": [...], "z": [...], "key_pos": 1}},  # one sequence, z mean over units
         "plot": "catmouse/catmouse.png" or None,
         "seconds": 31.2}
    """
    distances = [int(d) for d in distances]
    if not distances:
        raise ValueError("distances must name at least one distance")
    if trace_distance is None:  # long enough to matter, short enough to see the key in the plot
        trace_distance = max([d for d in distances if d <= 50] or [min(distances)])
    trace_distance = int(trace_distance)
    if trace_distance not in distances:
        raise ValueError(f"trace_distance {trace_distance} is not one of the distances {distances}")
    start = time.perf_counter()

    accuracy_by_cell: dict[str, list[float]] = {cell: [] for cell in CELLS}
    traced: Optional[Classifier] = None
    test_sets = {}
    with single_thread():
        for d in distances:
            test = make_task(test_size, d, torch.Generator().manual_seed(10_000 + seed), keys=keys)
            test_sets[d] = test
            for cell in CELLS:
                model = train_cell(cell, d, hidden=hidden, steps=steps, batch=batch, lr=lr, keys=keys, seed=seed)
                accuracy_by_cell[cell].append(accuracy(model, test[0], test[1]))
                if cell == "gru" and d == trace_distance:
                    traced = model
        assert traced is not None

        x, _, key_pos = test_sets[trace_distance]
        gate = {"distance": trace_distance, **gate_summary(traced.rnn, x, key_pos)}
        # One sequence to draw: the first test sequence with a mouse at position 1, as in the notes.
        x_at_key = x.gather(1, key_pos.clamp(min=0)[:, None])[:, 0]  # (N,) the key token, or cat
        for wanted in ((key_pos == 1) & (x_at_key == 1), key_pos == 1, key_pos >= 0):
            if wanted.any():
                i = int(torch.nonzero(wanted)[0])
                break
        z_one = update_gates(traced.rnn, x[i : i + 1])[0]  # (T, H)
    gate["example"] = {
        "tokens": [ANIMALS[t] for t in x[i].tolist()],
        "z": z_one.mean(-1).tolist(),  # (T,) mean over units
        "z_units": z_one.t().tolist(),  # (H, T)
        "key_pos": int(key_pos[i]),
    }

    result = {
        "distances": distances,
        "accuracy": accuracy_by_cell,
        "chance": 1.0 / (keys + 1),
        "gate": gate,
        "plot": None,
        "seconds": 0.0,
    }
    if out_dir is not None:
        result["plot"] = str(catmouse_figure(result, Path(out_dir) / "catmouse.png"))
    result["seconds"] = time.perf_counter() - start
    if not quiet:
        print_report(result, console)
    return result


def print_report(result: dict, console=None) -> None:
    """The accuracy table and the update-gate numbers, with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(
        title="remembering the mouse",
        caption=f"test accuracy; chance {result['chance']:.0%}",
    )
    table.add_column("distance", justify="right")
    table.add_column("GRU", justify="right")
    table.add_column("tanh RNN", justify="right")
    for d, g, r in zip(result["distances"], result["accuracy"]["gru"], result["accuracy"]["rnn"]):
        table.add_row(str(d), f"{g:.1%}", f"{r:.1%}")
    console.print(table)
    gate = result["gate"]
    console.print(
        f"GRU trained at distance {gate['distance']}: "
        f"mean update gate z = {gate['z_key']:.2f} at the key (rewrite the state) "
        f"vs {gate['z_filler']:.2f} over the cats after it (keep the state)."
    )
    if result.get("plot"):
        console.print(f"plot: {result['plot']}")
    console.print(f"[dim]{result['seconds']:.1f} s[/dim]")

"""The data layer: corpora, tokens, vocabulary and the minibatches of the notes.

From text to training batches in four steps::

    text = load_corpus("austen")                  # a bundled name, "timemachine", or a path
    tokens = tokenize(text, level="char")         # or notes_preprocess(text)[0] first, as the notes do
    vocab = Vocab(tokens, min_freq=0, level="char")
    ids = torch.tensor(vocab.encode(tokens))      # 1-D int64 token ids
    train, val = split_train_val(ids, 0.1)        # the tail is held out
    for X, Y in random_batches(train, 32, 35, generator=torch.Generator().manual_seed(0)):
        ...                                       # X, Y: (32, 35) int64, Y = X shifted by one

``build_dataset`` does the first five lines in one call.

The two samplers follow d2l's ``seq_data_iter_random`` and
``seq_data_iter_sequential`` (the notes' 随机采样 / 相邻采样), with one
deliberate difference: every epoch yields the same number of batches,
:func:`num_batches`, whatever the random offset (see there).

Every problem with what the user gave us (a file, a name, a value) raises
:class:`grulab.errors.GrulabError` with a one-line message that names the
offender and says how to fix it.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Union

from grulab.cache import default_cache_dir
from grulab.errors import ConfigError, GrulabError

if TYPE_CHECKING:  # torch is imported where it is used: tokens, vocabulary and prompts work without it
    import torch

__all__ = [
    "CORPORA",
    "LEVELS",
    "SAMPLERS",
    "SAMPLINGS",
    "TIMEMACHINE_URL",
    "TIMEMACHINE_SHA1",
    "UNK",
    "Dataset",
    "Vocab",
    "build_dataset",
    "check_sampling",
    "NOTES_RULES",
    "d2l_preprocess",
    "d2l_zh_preprocess",
    "default_cache_dir",
    "download_timemachine",
    "encode_prefix",
    "encode_warning",
    "load_corpus",
    "min_tokens",
    "notes_preprocess",
    "notes_rule",
    "num_batches",
    "random_batches",
    "sequential_batches",
    "split_train_val",
    "tokenize",
]

# ---------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------

#: Corpus names accepted by :func:`load_corpus`, with a one-line description.
CORPORA: dict[str, str] = {
    "austen": "Jane Austen, Pride and Prejudice (1813); English, 684,768 chars (bundled)",
    "tang300": "唐诗三百首 + 95 Song poems, Simplified Chinese; 39,237 chars (bundled)",
    "tang-qilu": "7,366 Tang 七言律诗, Traditional Chinese; 630,822 chars (bundled)",
    "timemachine": "H. G. Wells, The Time Machine, the d2l book's copy; English "
    "(downloaded on first use, then cached)",
}

# Bundled corpus name -> file in the package folder grulab/lm/corpora/.
_BUNDLED = {
    "austen": "austen.txt.gz",
    "tang300": "tang300.txt.gz",
    "tang-qilu": "tang-qilu.txt.gz",
}

TIMEMACHINE_URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
TIMEMACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"


def load_corpus(name_or_path: str) -> str:
    """Return the text of a corpus: a name from :data:`CORPORA` or a path.

    Names take precedence over files of the same name (write ``./austen`` for
    a file called ``austen``). ``timemachine`` is downloaded on first use, see
    :func:`download_timemachine`. A file must be non-empty UTF-8 text; a
    leading byte-order mark is dropped and ``\\r\\n`` / ``\\r`` line endings
    become ``\\n``.

    Raises GrulabError for an unknown name, a missing file, a directory, an
    unreadable, empty, binary (NUL bytes) or non-UTF-8 file.
    """
    name = str(name_or_path)
    if name in _BUNDLED:
        return _load_bundled(name)
    if name == "timemachine":
        return _read_text_file(download_timemachine())
    path = Path(name).expanduser()
    if not path.exists():
        known = ", ".join(CORPORA)
        if _looks_like_path(name):
            raise GrulabError(
                f"corpus file not found: {name}; check the path "
                f"(known corpus names: {known})"
            )
        raise GrulabError(
            f"unknown corpus {name!r}: not a known name and no such file; "
            f"use one of {known}, or the path of a UTF-8 text file"
        )
    return _read_text_file(path)


def _looks_like_path(name: str) -> bool:
    """Whether a string that names no existing file was meant as a path."""
    return "/" in name or os.sep in name or name.startswith("~") or bool(Path(name).suffix)


def _load_bundled(name: str) -> str:
    """Decompress one of the corpora shipped in grulab/lm/corpora/."""
    ref = resources.files("grulab.lm").joinpath("corpora").joinpath(_BUNDLED[name])
    try:
        return gzip.decompress(ref.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:  # a broken installation
        raise GrulabError(
            f"bundled corpus {name!r} ({ref}) cannot be read ({exc}); reinstall grulab"
        ) from exc


def _read_text_file(path: Path) -> str:
    """Read a user's text file, checking that it really is non-empty UTF-8 text."""
    if path.is_dir():
        raise GrulabError(f"{path} is a directory, not a text file; give the path of a UTF-8 text file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GrulabError(f"cannot read {path} ({exc.strerror or exc}); check the path and its permissions") from exc
    if not data.strip():
        what = "empty" if not data else "blank (only whitespace)"
        raise GrulabError(f"{path} is {what}; give a text file with something to learn from")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise GrulabError(
            f"{path} looks binary (NUL byte at offset {nul}), not text; give a UTF-8 text file"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # utf-8-sig only strips a BOM at offset 0, so offsets match the file.
        raise GrulabError(
            f"{path} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"convert it, e.g. iconv -f latin1 -t utf-8 {path} > out.txt"
        ) from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------------------
# The Time Machine download
# ---------------------------------------------------------------------------


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def download_timemachine(
    url: str = TIMEMACHINE_URL,
    sha1: str = TIMEMACHINE_SHA1,
    cache_dir: Optional[Union[str, Path]] = None,
    timeout: float = 30.0,
) -> Path:
    """Return the path of a verified local copy of ``url``, downloading it if needed.

    The file lives in ``cache_dir`` (default :func:`default_cache_dir`) under
    the last component of the URL. A copy already there is reused when its
    sha1 matches; otherwise the file is fetched with urllib (``timeout``
    seconds), checked against ``sha1`` and only then moved into place
    atomically (temporary file + ``os.replace``), so the cache never holds a
    partial or corrupt file.

    Raises GrulabError when the server cannot be reached ("could not download
    ...; check your network or put the file at <path>") or when the download
    does not match ``sha1``.
    """
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = directory / (Path(urllib.parse.urlparse(url).path).name or "download")
    stale = ""
    if target.is_file():
        got = _sha1(target.read_bytes())
        if got == sha1:
            return target
        stale = f"; the file there has sha1 {got}, expected {sha1}"

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except urllib.error.HTTPError as exc:
        raise GrulabError(
            f"could not download {url} (HTTP {exc.code} {exc.reason}); "
            f"check your network or put the file at {target}{stale}"
        ) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise GrulabError(
            f"could not download {url} ({reason}); "
            f"check your network or put the file at {target}{stale}"
        ) from exc

    got = _sha1(data)
    if got != sha1:
        raise GrulabError(
            f"downloaded {url} but its sha1 is {got}, expected {sha1}; nothing was saved. "
            f"Try again later or put a verified copy at {target}"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise GrulabError(
            f"cannot write the download cache {directory} ({exc.strerror or exc}); "
            f"set GRULAB_CACHE to a writable directory"
        ) from exc
    return target


# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------

#: Token levels understood by :func:`tokenize` and :class:`Vocab`.
LEVELS = ("char", "word")

# A word: a run of letters/digits/underscores, optionally with inner
# apostrophes ("don't", "Elizabeth's"); anything else that is not whitespace
# is a token of its own, one character long (punctuation).
_WORD_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


def _check_level(level: str) -> str:
    if level not in LEVELS:
        raise GrulabError(f"unknown token level {level!r}; use one of {', '.join(LEVELS)}")
    return level


def tokenize(text: str, level: str = "char") -> list[str]:
    """Split text into tokens.

    ``char``: every character is a token, whitespace and newlines included.
    ``word``: words and punctuation, whitespace dropped: a word is a run of
    letters/digits (``\\w+``) that may contain apostrophes (``don't``); every
    other non-space character is a token by itself. ``"Yes, don't!"`` gives
    ``["Yes", ",", "don't", "!"]``. Meant for space-separated languages; for
    Chinese use ``char`` (a ``word`` would be a whole run of characters).
    """
    if _check_level(level) == "char":
        return list(text)
    return _WORD_RE.findall(text)


def d2l_preprocess(text: str) -> str:
    """The d2l PyTorch notes' ``read_time_machine`` cleaning: letters only, lower case.

    Each line becomes ``re.sub('[^A-Za-z]+', ' ', line).strip().lower()``.
    The non-empty lines are then joined with a single space (d2l glues them
    together with no separator, which merges the last word of a line with the
    first of the next). The result contains only ``a``-``z`` and spaces: with
    ``<unk>`` that is d2l's 28-entry character vocabulary.
    """
    lines = (re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in text.splitlines())
    return " ".join(line for line in lines if line)


def d2l_zh_preprocess(text: str) -> str:
    """The d2l MXNet notes' cleaning of their Chinese lyrics: every newline (and carriage return)
    becomes a space, everything else is kept: ``text.replace('\\n', ' ').replace('\\r', ' ')``."""
    return text.replace("\n", " ").replace("\r", " ")


#: The notes' two text cleanings, by the name :func:`notes_rule` gives them.
NOTES_RULES = {
    "letters": d2l_preprocess,  # the PyTorch notes (the Time Machine): a-z and spaces only
    "newlines": d2l_zh_preprocess,  # the MXNet notes (Chinese lyrics): newlines become spaces
}

_LATIN_LETTER = re.compile("[A-Za-z]")
_LETTER = re.compile(r"[^\W\d_]")  # any script's letters, Chinese characters included


def notes_rule(text: str) -> str:
    """Which of the notes' cleanings fits the script of ``text``: ``"letters"`` (the d2l PyTorch
    notes' rule for the Time Machine) when most of its letters are A-Z or a-z, else ``"newlines"``
    (the d2l MXNet notes' rule for their Chinese lyrics; it keeps every character, so it fits
    Chinese and any other script). A text with no letters at all gets ``"newlines"``."""
    latin, letters = len(_LATIN_LETTER.findall(text)), len(_LETTER.findall(text))
    return "letters" if letters and 2 * latin > letters else "newlines"


def notes_preprocess(text: str) -> tuple[str, str]:
    """``text`` cleaned by the notes' rule that fits its script (:func:`notes_rule`), and the rule's name."""
    rule = notes_rule(text)
    return NOTES_RULES[rule](text), rule


# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

#: The reserved unknown token, always at index 0.
UNK = "<unk>"

_VOCAB_FORMAT = "grulab.vocab"
_VOCAB_VERSION = 1


def _as_tokens(tokens: Union[str, Iterable[str]], level: str) -> list[str]:
    """A string is tokenized at ``level``; anything else is taken as tokens."""
    if isinstance(tokens, str):
        return tokenize(tokens, level)
    return list(tokens)


class Vocab:
    """A token <-> id mapping with ``<unk>`` reserved at index 0.

    Tokens are ordered by descending frequency, ties broken by first
    appearance in ``tokens``, so the same input always gives the same ids.
    Tokens seen fewer than ``min_freq`` times are left out and encode as
    ``<unk>`` (``min_freq`` 0 or 1 keeps everything).

    ``tokens`` may be a list of tokens or a string, which is tokenized at
    ``level`` (for ``char`` that is just its characters). The same holds for
    :meth:`encode` and :meth:`unknown_tokens`.
    """

    def __init__(
        self,
        tokens: Union[str, Iterable[str]] = (),
        *,
        min_freq: int = 0,
        level: str = "char",
    ) -> None:
        self.level = _check_level(level)  # "char" or "word": how decode() joins tokens
        if not isinstance(min_freq, int) or isinstance(min_freq, bool) or min_freq < 0:
            raise GrulabError(f"min_freq must be an integer >= 0, got {min_freq!r}")
        counts = Counter(_as_tokens(tokens, level))  # insertion order = first appearance
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])  # stable: ties keep first appearance
        kept = [tok for tok, n in ranked if n >= min_freq and tok != UNK]
        self._set_tokens([UNK] + kept)

    def _set_tokens(self, idx_to_token: list[str]) -> None:
        self.idx_to_token: list[str] = idx_to_token  # id -> token
        self.token_to_idx: dict[str, int] = {t: i for i, t in enumerate(idx_to_token)}  # token -> id

    @property
    def unk(self) -> int:
        """The id of ``<unk>`` (always 0)."""
        return 0

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __contains__(self, token: object) -> bool:
        return token in self.token_to_idx

    def __getitem__(self, tokens):
        """``vocab["a"]`` -> id; ``vocab[["a", "b"]]`` -> list of ids (unknown -> 0)."""
        if isinstance(tokens, (list, tuple)):
            return [self.token_to_idx.get(t, 0) for t in tokens]
        return self.token_to_idx.get(tokens, 0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self.level == other.level and self.idx_to_token == other.idx_to_token

    def __repr__(self) -> str:
        return f"Vocab(level={self.level!r}, size={len(self)})"

    def encode(self, tokens: Union[str, Iterable[str]]) -> list[int]:
        """Token ids for ``tokens`` (a string is tokenized at ``self.level``); unknown -> 0."""
        get = self.token_to_idx.get
        return [get(t, 0) for t in _as_tokens(tokens, self.level)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids`` (ints, a tensor or an array): joined with "" at char level, " " at word level."""
        if hasattr(ids, "tolist"):  # a torch tensor or a numpy array
            ids = ids.reshape(-1).tolist()
        n = len(self.idx_to_token)
        out = []
        for i in ids:
            if not 0 <= int(i) < n:
                raise GrulabError(f"token id {i} is outside this vocabulary (0..{n - 1}); "
                                  f"were the ids made with another vocabulary?")
            out.append(self.idx_to_token[int(i)])
        return ("" if self.level == "char" else " ").join(out)

    def unknown_tokens(self, tokens: Union[str, Iterable[str]]) -> list[str]:
        """The distinct tokens of ``tokens`` not in the vocabulary, in order of appearance."""
        seen = dict.fromkeys(t for t in _as_tokens(tokens, self.level) if t not in self.token_to_idx)
        return list(seen)

    # -- serialization ---------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON-safe description: ``{"format", "version", "level", "tokens"}``."""
        return {
            "format": _VOCAB_FORMAT,
            "version": _VOCAB_VERSION,
            "level": self.level,
            "tokens": list(self.idx_to_token),
        }

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "vocabulary") -> "Vocab":
        """Rebuild a vocabulary from :meth:`to_dict`; GrulabError if ``d`` is not one.

        ``source`` names where ``d`` came from in error messages (a path).
        """
        def bad(what: str) -> GrulabError:
            return GrulabError(f"{source} is not a valid grulab vocabulary ({what}); "
                               f"re-create it from the corpus")

        if not isinstance(d, dict) or d.get("format") != _VOCAB_FORMAT:
            raise bad(f"expected a JSON object with format {_VOCAB_FORMAT!r}")
        if d.get("version") != _VOCAB_VERSION:
            raise bad(f"version {d.get('version')!r}, this grulab reads version {_VOCAB_VERSION}")
        level = d.get("level")
        if level not in LEVELS:
            raise bad(f"level {level!r}, expected one of {', '.join(LEVELS)}")
        tokens = d.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise bad("'tokens' must be a list of strings")
        if not tokens or tokens[0] != UNK:
            raise bad(f"the first token must be {UNK!r}")
        if len(set(tokens)) != len(tokens):
            dup = next(t for t, n in Counter(tokens).items() if n > 1)
            raise bad(f"token {dup!r} appears twice")
        vocab = cls.__new__(cls)
        vocab.level = level
        vocab._set_tokens(list(tokens))
        return vocab

    def to_json(self) -> str:
        """The vocabulary as JSON text (non-ASCII kept readable), as :meth:`save` writes it."""
        return json.dumps(self.to_dict(), ensure_ascii=False) + "\n"

    def save(self, path: Union[str, Path]) -> None:
        """Write the vocabulary as JSON (UTF-8)."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Vocab":
        """Read a vocabulary written by :meth:`save`; GrulabError if missing or corrupt."""
        p = Path(path)
        if not p.is_file():
            what = "is a directory" if p.is_dir() else "not found"
            raise GrulabError(f"vocabulary file {what}: {p}; give the vocab.json saved with the model")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:  # e.g. permission denied
            raise GrulabError(f"cannot read the vocabulary {p}: {exc.strerror}; "
                              f"check the file's permissions") from None
        except UnicodeDecodeError as exc:
            raise GrulabError(f"{p} is not a grulab vocabulary (not UTF-8 text, offset {exc.start}); "
                              f"give the vocab.json saved with the model") from exc
        except json.JSONDecodeError as exc:
            raise GrulabError(f"{p} is not a grulab vocabulary (invalid JSON at line {exc.lineno}: "
                              f"{exc.msg}); give the vocab.json saved with the model") from exc
        return cls.from_dict(d, source=str(p))


def encode_warning(vocab: "Vocab", tokens: list[str], what: str) -> list[int]:
    """``vocab.encode(tokens)``, with one warning naming the tokens the vocabulary lacks.

    Those tokens are read as <unk>; ``what`` names the text in the warning
    ("the prefix", a file name). Needs only ``vocab.encode`` and ``vocab.unk``.
    """
    ids = vocab.encode(tokens)
    missing = list(dict.fromkeys(t for t, i in zip(tokens, ids) if i == vocab.unk and t != UNK))
    if missing:
        shown = ", ".join(map(repr, missing[:10])) + (" …" if len(missing) > 10 else "")
        warnings.warn(f"{what} has tokens the model never saw, read as <unk>: {shown}", stacklevel=3)
    return ids


# ---------------------------------------------------------------------------
# Prompts (for grulab.lm.generate and grulab.deploy.onnx_generate, which runs without torch)
# ---------------------------------------------------------------------------


def encode_prefix(vocab: Vocab, prefix: str) -> list[int]:
    """Token ids of ``prefix``; unknown tokens become <unk>, with a warning naming them."""
    tokens = tokenize(prefix, vocab.level)
    ids = encode_warning(vocab, tokens, "the prefix")
    if not tokens:
        raise GrulabError("the prefix is empty: give at least one token with --prefix")
    return ids


def check_sampling(length: int = 0, temperature: float = 0.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None, seed: Optional[int] = None) -> None:
    """ConfigError naming the first argument of :func:`generate` (or the generator's seed) that is out of range."""
    from grulab.lm.config import SEED

    for name, value, ok, want in [
        ("seed", seed, seed is None or SEED.ok(seed), SEED.want),
        ("length", length, length >= 0, "an integer >= 0"),
        ("temperature", temperature, math.isfinite(temperature) and temperature >= 0, "a number >= 0"),
        ("top_k", top_k, top_k is None or top_k >= 1, "an integer >= 1"),
        ("top_p", top_p, top_p is None or 0 < top_p <= 1, "in (0, 1]"),
    ]:
        if not ok:
            raise ConfigError(name, want, value)


# ---------------------------------------------------------------------------
# Minibatches
# ---------------------------------------------------------------------------

def _check_shape(batch_size: int, num_steps: int) -> None:
    for flag, value in (("--batch-size", batch_size), ("--num-steps", num_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise GrulabError(f"{flag} must be a positive integer, got {value!r}")


def _check_sampling(sampling: str) -> None:
    if sampling not in SAMPLINGS:
        raise GrulabError(f"unknown sampling {sampling!r}; use one of {', '.join(SAMPLINGS)}")


def min_tokens(batch_size: int, num_steps: int, sampling: str = "random") -> int:
    """The fewest tokens that give at least one batch for every random offset."""
    _check_shape(batch_size, num_steps)
    _check_sampling(sampling)
    if sampling == "random":
        return (batch_size + 1) * num_steps
    return (batch_size + 1) * num_steps + 1


def num_batches(n_tokens: int, batch_size: int, num_steps: int, sampling: str = "random") -> int:
    """How many (X, Y) batches an epoch over ``n_tokens`` tokens yields (0 if too short).

    d2l's count depends on the random offset (one batch more or less);
    :func:`random_batches` and :func:`sequential_batches` stop after the count
    of the worst offset, so every epoch yields exactly this many batches.
    """
    _check_shape(batch_size, num_steps)
    _check_sampling(sampling)
    if sampling == "random":
        # offset num_steps - 1 leaves (n - num_steps) // num_steps windows
        return max(n_tokens - num_steps, 0) // num_steps // batch_size
    # offset num_steps leaves rows of (n - num_steps - 1) // batch_size tokens
    return max(n_tokens - num_steps - 1, 0) // batch_size // num_steps


def _as_ids(ids) -> torch.Tensor:
    import torch

    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise GrulabError(f"token ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} {ids.dtype}")
    return ids.long()


def _batch_count_or_raise(n: int, batch_size: int, num_steps: int, sampling: str, name: str) -> int:
    k = num_batches(n, batch_size, num_steps, sampling)
    if k == 0:
        need = min_tokens(batch_size, num_steps, sampling)
        raise GrulabError(
            f"{name} has {n:,} tokens but --batch-size {batch_size} --num-steps {num_steps} need at "
            f"least {need:,} for one batch ({sampling} sampling); use a smaller --batch-size or "
            f"--num-steps, or a longer corpus"
        )
    return k


def _randint(high: int, generator: Optional[torch.Generator]) -> int:
    """A uniform integer in [0, high)."""
    import torch

    return int(torch.randint(high, (1,), generator=generator).item())


def random_batches(
    ids,
    batch_size: int,
    num_steps: int,
    generator: Optional[torch.Generator] = None,
    *,
    name: str = "the corpus",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random sampling (d2l ``seq_data_iter_random``): yields (X, Y), each (B, T) int64.

    Drop a random offset in [0, num_steps) from the front, cut the rest into
    non-overlapping windows of ``num_steps`` tokens (each with one token after
    it for the target), and visit the windows in random order, ``batch_size``
    per batch. ``Y`` is ``X`` shifted by one token. Windows that do not fill a
    whole batch are dropped; the epoch has :func:`num_batches` batches.
    Consecutive batches are unrelated, so the hidden state must be reset
    before each one.

    ``generator`` (a seeded ``torch.Generator``) makes it reproducible;
    ``name`` names the corpus in the error raised when it is too short.
    """
    import torch

    ids = _as_ids(ids)
    k = _batch_count_or_raise(len(ids), batch_size, num_steps, "random", name)
    offset = _randint(num_steps, generator)
    n_windows = (len(ids) - offset - 1) // num_steps
    starts = offset + num_steps * torch.randperm(n_windows, generator=generator)
    steps = torch.arange(num_steps)
    for b in range(k):
        pos = starts[b * batch_size:(b + 1) * batch_size, None] + steps  # (B, T) positions
        yield ids[pos], ids[pos + 1]


def sequential_batches(
    ids,
    batch_size: int,
    num_steps: int,
    generator: Optional[torch.Generator] = None,
    *,
    name: str = "the corpus",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential sampling (d2l ``seq_data_iter_sequential``): yields (X, Y), each (B, T) int64.

    Drop a random offset in [0, num_steps] (inclusive, as d2l) from the front,
    lay the rest out as ``batch_size`` contiguous rows of equal length and
    walk along them ``num_steps`` columns at a time, so row i of batch k+1
    continues row i of batch k exactly and the hidden state can be carried
    over (detached) from batch to batch. ``Y`` is ``X`` shifted by one token.
    The epoch has :func:`num_batches` batches.

    ``generator`` (a seeded ``torch.Generator``) makes it reproducible;
    ``name`` names the corpus in the error raised when it is too short.
    """
    ids = _as_ids(ids)
    k = _batch_count_or_raise(len(ids), batch_size, num_steps, "sequential", name)
    offset = _randint(num_steps + 1, generator)
    row_len = (len(ids) - offset - 1) // batch_size
    n = row_len * batch_size
    xs = ids[offset:offset + n].reshape(batch_size, row_len)
    ys = ids[offset + 1:offset + 1 + n].reshape(batch_size, row_len)
    for b in range(k):
        cols = slice(b * num_steps, (b + 1) * num_steps)
        yield xs[:, cols], ys[:, cols]


#: The sampling schemes and their samplers: ``SAMPLERS[sampling](ids, batch_size, num_steps, generator)``.
SAMPLERS = {"random": random_batches, "sequential": sequential_batches}
SAMPLINGS = tuple(SAMPLERS)


def split_train_val(ids, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split token ids into (train, val): the last ``val_fraction`` of the corpus is
    held out (``floor(len * val_fraction)`` tokens; 0 gives an empty val)."""
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) \
            or not 0.0 <= val_fraction < 1.0:
        raise GrulabError(f"--val-fraction must be in [0, 1), got {val_fraction!r}")
    ids = _as_ids(ids)
    n_val = int(len(ids) * val_fraction)
    cut = len(ids) - n_val
    return ids[:cut], ids[cut:]


# ---------------------------------------------------------------------------
# All of it at once
# ---------------------------------------------------------------------------


@dataclass
class Dataset:
    """A corpus ready for training, as :func:`build_dataset` makes it."""

    vocab: Vocab  # built from the whole corpus (train + val)
    train_ids: torch.Tensor  # 1-D int64 token ids, the head of the corpus
    val_ids: torch.Tensor  # 1-D int64 token ids, the tail of the corpus (may be empty)
    name: str  # the corpus name or path as given, for messages and run metadata
    rule: Optional[str] = None  # the notes' cleaning applied (NOTES_RULES), None without d2l


def build_dataset(
    corpus: str,
    level: str = "char",
    min_freq: int = 0,
    d2l: bool = False,
    val_fraction: float = 0.1,
    max_tokens: int = 0,
) -> Dataset:
    """Load ``corpus`` (a name or path), optionally clean it as the notes do, tokenize it,
    build the vocabulary and split the ids into train and validation.

    ``d2l``: the notes' cleaning that fits the corpus' script (:func:`notes_preprocess`): the d2l
    PyTorch notes' letters-only rule for Latin text, the d2l MXNet notes' newline rule otherwise.

    The vocabulary is built from the whole text so a split alone never makes
    validation tokens unknown. ``max_tokens`` > 0 trains on the first that many
    tokens only, as d2l's ``load_data_time_machine`` (10,000); the validation
    tail stays where ``val_fraction`` puts it.
    """
    import torch

    _check_level(level)
    text = load_corpus(corpus)
    rule = None
    if d2l:
        text, rule = notes_preprocess(text)
        if not text.strip():
            raise GrulabError(
                f"corpus {corpus!r} has nothing left after the notes' text cleaning ({rule} rule); "
                f"train on it without it: --no-d2l-text"
            )
    tokens = tokenize(text, level)
    if not tokens:
        raise GrulabError(f"corpus {corpus!r} has no {level} tokens; use --level char or another corpus")
    vocab = Vocab(tokens, min_freq=min_freq, level=level)
    ids = torch.tensor(vocab.encode(tokens), dtype=torch.long)
    train_ids, val_ids = split_train_val(ids, val_fraction)
    if max_tokens:
        train_ids = train_ids[:max_tokens]
    return Dataset(vocab=vocab, train_ids=train_ids, val_ids=val_ids, name=str(corpus), rule=rule)

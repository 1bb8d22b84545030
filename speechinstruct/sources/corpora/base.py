"""What every corpus reader shares: the items a reader yields (manifest rows, ``Skip``, ``Note``), probing an
audio file, and the split vocabulary (``train``/``validation``/``test``) with the words corpora use for it."""

from __future__ import annotations

import contextvars
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator


@dataclass(frozen=True)
class Skip:
    """Something a reader could not use: the file (relative to the root where possible), why, and where."""

    path: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Note:
    """Something a reader tells the user about the whole source (not one file): written to the shard summary."""

    text: str


Item = dict | Skip | Note
Reader = Callable[..., Iterator[Item]]


def relpath(path: Path, root: Path) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


class NotText(ValueError):
    """A table's cell that holds an object or an array where text is read (a transcript, a speaker, an id)."""


def cell_text(value) -> str | None:
    """A table's cell (a transcript, a speaker, an id) as text; null, NaN (pandas' missing value) and blank are none;
    a number is its digits. An object or an array raises :class:`NotText`: Python's spelling of it is no text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (dict, list, tuple)):
        raise NotText(f"a JSON {'object' if isinstance(value, dict) else 'array'}")
    return str(value).strip() or None


def cells_text(record: dict, columns: dict[str, str | None], where: str) -> dict[str, str | None] | Skip:
    """``{key: cell_text(record[column])}`` for each of ``columns`` given (None where a column is not), or the Skip
    naming ``where`` and the first column whose cell is not text."""
    found: dict[str, str | None] = {}
    for key, column in columns.items():
        try:
            found[key] = cell_text(record.get(column)) if column else None
        except NotText as e:
            return Skip(where, "a cell that is not text", f"{column}: {e}")
    return found


def deepest_common_folder(files, fallback: Path) -> Path:
    """The deepest folder holding every one of ``files`` (absolute paths), or ``fallback`` when there are none:
    where lhotse and Kaldi sources, which name audio anywhere on disk, get their manifest root."""
    parents = {os.path.dirname(os.path.abspath(f)) for f in files}
    return Path(os.path.commonpath(sorted(parents))) if parents else Path(fallback).resolve()


# Whether a corpus's links that lead out of its root are read: the corpus's owner says so (shard --follow-links, a
# recipe corpus's options.follow_links); shard_corpus sets it while its reader runs. Off, such a file is a counted
# skip saying how to read it.
FOLLOW_LINKS: contextvars.ContextVar[bool] = contextvars.ContextVar("follow_links", default=False)
LINK_OUT = "a link out of the corpus root (--follow-links reads it)"
# what datasets and corpora call a clip's transcript and its speaker, in the order a reader prefers them: `text`
# (most), `sentence` (Common Voice), `transcription` (FLEURS); `speaker_id` (LibriSpeech), `client_id` (Common Voice)
TRANSCRIPT_NAMES = ("text", "transcript", "sentence", "transcription", "normalized_text")
SPEAKER_NAMES = ("speaker", "speaker_id", "client_id")
# how `shard audio` reads a recording of several channels: mixed into one stream, or each channel on its own
CHANNELS = ("mix", "each")


def outside(path: Path, root: Path) -> Skip | None:
    """The Skip for a file of a corpus that lies outside ``root``: a path that leaves it (``..``, absolute), or a
    link out of it unless :data:`FOLLOW_LINKS`; None for a file inside."""
    from ...io import LinkOutOfRoot, safe_join

    try:
        safe_join(root, os.path.relpath(path, root), follow_links=FOLLOW_LINKS.get())
    except LinkOutOfRoot as e:
        return Skip(relpath(path, root), LINK_OUT, str(e))
    except ValueError as e:
        return Skip(str(path), "path escapes the corpus root", str(e))
    return None


def probe(path: Path, root: Path) -> tuple[int, float] | Skip:
    """(sample_rate, seconds) of an audio file, or a Skip saying why it cannot be read: outside ``root``
    (:func:`outside`), missing, unreadable or empty."""
    from ... import audio  # here, not at the top: the CLI reads the registry without loading audio libraries

    if refused := outside(path, root):
        return refused
    if not path.is_file():
        return Skip(relpath(path, root), "missing audio file")
    try:
        sr, frames = audio.info(path)
    except audio.AudioError as e:
        return Skip(relpath(path, root), "unreadable audio", str(e))
    if frames <= 0:
        return Skip(relpath(path, root), "empty audio", f"{path}: 0 samples")
    return sr, frames / sr


# The one split vocabulary, from the manifest to the published dataset (Hugging Face's names). Corpora name
# their parts otherwise (``dev-clean``, ``{DEV}``, ``dev.tsv``): :func:`split_word` maps those names onto it,
# and :func:`split_name` the names users and older folders give (``dev``, written by speechinstruct 0.2).
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"dev": "validation"}


def split_name(name: str) -> str | None:
    """``name`` in the split vocabulary (``dev`` → ``validation``), or None when it is not a split's name."""
    name = SPLIT_ALIASES.get(name, name)
    return name if name in SPLITS else None



# The words a corpus's part names use for its held-out data, matched as whole words of the name (letters
# only, so ``eval2000`` is ``eval`` and ``dev93`` is ``dev``): ``validation.clean`` (the Hub's librispeech_asr),
# ``valid_clean``, ``val-clean``, ``dev-other``, ``test_clean``, ``eval`` (AMI), ``eval2000`` (Switchboard),
# Kaldi's ``train_dev`` (held out from train). Common Voice's ``validated`` is not ``valid``.
DEV_WORDS = frozenset({"dev", "devel", "development", "val", "valid", "validation", "heldout"})
TEST_WORDS = frozenset({"test", "testing", "eval", "evaluation"})
# Names that say training data: the word train, and the corpora's own names for parts of their training data
# (GigaSpeech's sizes, LibriLight's, Common Voice's TSVs). Any other name is train too, but listed in the
# shard summary as not recognised, so that a held-out set named otherwise is seen (and mapped: --split-map).
TRAIN_WORDS = frozenset({"train", "training", "xs", "s", "m", "l", "xl", "small", "medium", "large",
                         "validated", "invalidated", "other", "reported"})


def split_word(name: str) -> str | None:
    """train, validation or test when ``name`` (a corpus's own name of a part: ``dev-clean``, ``{DEV}``, ``dev.tsv``,
    ``validation.clean`` …) says which, else None. A word for held-out data wins over ``train``."""
    words = re.findall(r"[a-z]+", name.lower().removesuffix(".tsv"))
    if any(w in TEST_WORDS for w in words):
        return "test"
    if any(w in DEV_WORDS for w in words):
        return "validation"
    if any(w in TRAIN_WORDS for w in words):
        return "train"
    return None


def split_of(name: str, split_map: dict[str, str] | None = None) -> str:
    """The split of a corpus part: ``split_map[name]`` when the user mapped it, else what its name says
    (:func:`split_word`); names that say nothing are training data."""
    if split_map and name in split_map:
        return split_map[name]
    return split_word(name) or "train"


def parse_split_map(pairs) -> dict[str, str]:
    """``["eval2000=test", "heldout=validation"]`` (or one comma-separated string, or a dict) → {name: split},
    with the splits' names in the split vocabulary (``dev`` → ``validation``)."""
    if not pairs:
        return {}
    if isinstance(pairs, dict):  # a recipe's {NAME: SPLIT}
        pairs = [f"{name}={split}" for name, split in pairs.items()]
    items = [p.strip() for p in (pairs.split(",") if isinstance(pairs, str) else pairs) if p.strip()]
    mapping = {}
    for item in items:
        name, sep, split = item.rpartition("=")
        if not sep or not name.strip() or split_name(split.strip()) is None:
            raise ValueError(f"--split-map {item!r}: write NAME=SPLIT with SPLIT one of {', '.join(SPLITS)}")
        mapping[name.strip()] = split_name(split.strip())
    return mapping


def parse_splits(splits) -> tuple[str, ...] | None:
    """``"train,validation"`` (or a list; ``dev`` is ``validation``) → ("train", "validation"); None keeps every
    split."""
    if splits is None:
        return None
    items = [s.strip() for s in (splits.split(",") if isinstance(splits, str) else splits) if s.strip()]
    unknown = [s for s in items if split_name(s) is None]
    if unknown or not items:
        raise ValueError(f"unknown split(s) {unknown or splits!r}: choose from {', '.join(SPLITS)}")
    return tuple(split_name(s) for s in items)

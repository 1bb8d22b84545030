"""Corpus readers: one module per corpus, each a function from a folder in the corpus's native layout to
manifest rows (``schemas/manifest.json``) and ``Skip`` notes for what could not be used."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from .. import audio
from ..io import safe_join


@dataclass(frozen=True)
class Skip:
    """Something a reader could not use: the file (relative to the root where possible), why, and where."""

    path: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


Item = dict | Skip
Reader = Callable[..., Iterator[Item]]


def relpath(path: Path, root: Path) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def probe(path: Path, root: Path) -> tuple[int, float] | Skip:
    """(sample_rate, seconds) of an audio file, or a Skip saying why it cannot be read.

    Paths that leave ``root`` (``..``, absolute paths, symlinks pointing outside) are refused."""
    try:
        safe_join(root, os.path.relpath(path, root))
    except ValueError as e:
        return Skip(str(path), "path escapes the corpus root", str(e))
    if not path.is_file():
        return Skip(relpath(path, root), "missing audio file")
    try:
        sr, frames = audio.info(path)
    except audio.AudioError as e:
        return Skip(relpath(path, root), "unreadable audio", str(e))
    if frames <= 0:
        return Skip(relpath(path, root), "empty audio", f"{path}: 0 samples")
    return sr, frames / sr


def readers() -> dict[str, Reader]:
    from . import commonvoice, gigaspeech, librilight, librispeech

    return {
        "librispeech": librispeech.read,
        "librilight": librilight.read,
        "gigaspeech": gigaspeech.read,
        "commonvoice": commonvoice.read,
    }


DEFAULT_LICENSES = {
    "librispeech": "CC-BY-4.0",
    "librilight": "public-domain (LibriVox)",
    "gigaspeech": "GigaSpeech terms of access (non-commercial research)",
    "commonvoice": "CC0-1.0",
}

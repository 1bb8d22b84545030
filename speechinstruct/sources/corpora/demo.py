"""The embedded demo corpus (``speechinstruct.demo``): sentences we generate, spoken by espeak-ng, written in
LibriSpeech's folder layout under ``train/``. It is read with the LibriSpeech reader but published as
what it is: corpus ``speechinstruct-demo``, split train, the license of what we ship."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from . import librispeech
from .base import Item

NAME = "speechinstruct-demo"


def read(root: str | Path, license: str | None = None) -> Iterator[Item]:
    for item in librispeech.read(root, license=license, corpus=NAME):
        if isinstance(item, dict):
            item = {**item, "split": "train", "corpus_split": "train"}
        yield item

"""LibriSpeech: ``{split}/{speaker}/{chapter}/{speaker}-{chapter}-{utt}.flac`` with transcripts in
``{speaker}-{chapter}.trans.txt`` ("UTT-ID TEXT" per line). ROOT may be the corpus folder or one split.

The split is the top folder (``train-clean-100`` … ``dev-clean`` … ``test-other``): ``split`` says train, dev
or test, ``corpus_split`` keeps LibriSpeech's name. A folder that names no LibriSpeech split counts by its
name (``dev*``/``test*`` are dev/test, anything else train).

Word alignments: a TextGrid beside an utterance's audio (``{utt}.TextGrid``, as the Montreal Forced Aligner writes
them) becomes its ``words`` (``alignments.py``); one that does not fit the audio is skipped with its reason."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ...io import files_under
from ...progress import progress
from ..alignments import textgrid_words
from .base import Item, Skip, probe, relpath, split_of

SPLITS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other", "test-clean", "test-other")


def corpus_split(trans: Path, root: Path) -> str:
    """LibriSpeech's split folder holding a transcript file: a known split name on its path (ROOT may be
    the corpus, one split or deeper), else the first folder under ROOT (or ROOT's own name)."""
    parts = [root.resolve().name, *trans.relative_to(root).parts[:-1]]
    known = [p for p in parts if p in SPLITS]
    if known:
        return known[-1]
    return parts[1] if len(parts) > 3 else parts[0]


def read(root: str | Path, license: str | None = None, corpus: str = "librispeech") -> Iterator[Item]:
    root = Path(root)
    trans_files = sorted(path for name, path in files_under(root) if name.endswith(".trans.txt"))
    if not trans_files:
        raise FileNotFoundError(f"{root}: no *.trans.txt files: not a LibriSpeech folder")
    for trans in progress(trans_files, desc=f"{corpus} chapters", unit="chapter"):
        part = corpus_split(trans, root)
        try:
            lines = trans.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            yield Skip(relpath(trans, root), "transcript file is not UTF-8", str(e))
            continue
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            utt, _, text = line.strip().partition(" ")
            text = text.strip()
            where = f"{relpath(trans, root)}:{lineno}"
            if not text:
                yield Skip(where, "empty transcript", utt)
                continue
            flac = trans.parent / f"{utt}.flac"
            probed = probe(flac, root)
            if isinstance(probed, Skip):
                yield probed
                continue
            sr, seconds = probed
            words, problem = textgrid_words(flac, seconds)
            if problem:
                yield Skip(relpath(flac.with_suffix(".TextGrid"), root), "alignment not used", problem)
            yield {
                "id": f"{corpus}/{utt}",
                "path": relpath(flac, root),
                "offset": 0.0,
                "duration": seconds,
                "sample_rate": sr,
                "text": text,
                "speaker": utt.split("-")[0],
                "corpus": corpus,
                "license": license,
                "split": split_of(part),
                "corpus_split": part,
                **({"words": words} if words else {}),
            }

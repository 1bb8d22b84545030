"""LibriSpeech: ``{split}/{speaker}/{chapter}/{speaker}-{chapter}-{utt}.flac`` with transcripts in
``{speaker}-{chapter}.trans.txt`` ("UTT-ID TEXT" per line). ROOT may be the corpus folder or one split."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from . import DEFAULT_LICENSES, Item, Skip, probe, relpath


def read(root: str | Path, license: str | None = None, quiet: bool = False) -> Iterator[Item]:
    root = Path(root)
    license = license or DEFAULT_LICENSES["librispeech"]
    trans_files = sorted(root.rglob("*.trans.txt"))
    if not trans_files:
        raise FileNotFoundError(f"{root}: no *.trans.txt files: not a LibriSpeech folder")
    for trans in tqdm(trans_files, desc="librispeech chapters", unit="chapter", disable=quiet):
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
            yield {
                "id": f"librispeech/{utt}",
                "path": relpath(flac, root),
                "offset": 0.0,
                "duration": seconds,
                "sample_rate": sr,
                "text": text,
                "speaker": utt.split("-")[0],
                "corpus": "librispeech",
                "license": license,
            }

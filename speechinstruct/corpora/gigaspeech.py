"""GigaSpeech: ``GigaSpeech.json`` lists audio files (opus, 16 kHz), each with ``segments`` (``sid``,
``begin_time``, ``end_time``, ``text_tn``, ``subsets``). Punctuation tags become punctuation; garbage
segments (``<SIL>``, ``<NOISE>``, ``<MUSIC>``, ``<OTHER>``) are dropped and counted. The metadata is
streamed with ijson, so memory stays flat however large the file is."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from . import DEFAULT_LICENSES, Item, Skip, probe, relpath

PUNCTUATION = {"<COMMA>": ",", "<PERIOD>": ".", "<QUESTIONMARK>": "?", "<EXCLAMATIONPOINT>": "!"}
GARBAGE = {"<SIL>", "<NOISE>", "<MUSIC>", "<OTHER>"}
SUBSETS = ("XS", "S", "M", "L", "XL")


def normalize(text_tn: str) -> str:
    """``HELLO <COMMA> WORLD <PERIOD>`` → ``HELLO, WORLD.``; garbage tags removed."""
    words = []
    for token in text_tn.split():
        if token in PUNCTUATION:
            if words:
                words[-1] += PUNCTUATION[token]
        elif token not in GARBAGE:
            words.append(token)
    return re.sub(r"\s+", " ", " ".join(words)).strip()


def read(
    root: str | Path, subset: str | None = None, license: str | None = None, quiet: bool = False
) -> Iterator[Item]:
    root = Path(root)
    license = license or DEFAULT_LICENSES["gigaspeech"]
    if subset is not None and subset.upper() not in SUBSETS:
        raise ValueError(f"unknown GigaSpeech subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    meta_path = root / "GigaSpeech.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing: not a GigaSpeech folder")
    audios = _stream_audios(meta_path)
    want = None if subset is None else subset.upper()
    for n, entry in enumerate(tqdm(audios, desc="gigaspeech audios", unit="file", disable=quiet)):
        where = f"GigaSpeech.json:audios[{n}]"
        try:
            rel = str(entry["path"])
            segments = entry.get("segments") or []
        except (KeyError, TypeError, AttributeError) as e:
            yield Skip(where, "malformed audio entry", f"{type(e).__name__}: {e}")
            continue
        chosen = [s for s in segments if want is None or _in_subset(s, want)]
        if not chosen:
            continue
        path = root / rel
        probed = probe(path, root)
        if isinstance(probed, Skip):
            yield probed
            continue
        sr, seconds = probed
        for seg in chosen:
            try:
                sid, begin, end = str(seg["sid"]), float(seg["begin_time"]), float(seg["end_time"])
                text = normalize(str(seg.get("text_tn", "")))
            except (KeyError, TypeError, ValueError) as e:
                yield Skip(f"{rel}", "malformed segment", f"{where}: {type(e).__name__}: {e}")
                continue
            if not text:
                yield Skip(rel, "garbage segment", sid)
                continue
            if not (0 <= begin < end <= seconds + 0.05):
                yield Skip(rel, "segment outside the audio", f"{sid}: {begin}-{end} s of {seconds:.2f} s")
                continue
            yield {
                "id": f"gigaspeech/{sid}",
                "path": relpath(path, root),
                "offset": begin,
                "duration": round(min(end, seconds) - begin, 4),
                "sample_rate": sr,
                "text": text,
                "speaker": str(entry.get("aid", "unknown")),
                "corpus": "gigaspeech",
                "license": license,
            }


def _stream_audios(meta_path: Path) -> Iterator[dict]:
    """The ``audios`` entries of GigaSpeech.json one at a time: the file is gigabytes, and loading it
    whole would take several times that in memory."""
    import ijson

    with open(meta_path, "rb") as f:
        try:
            for entry in ijson.items(f, "audios.item", use_float=True):
                yield entry
        except ijson.JSONError as e:
            raise ValueError(f"{meta_path}: not valid GigaSpeech metadata ({e})") from None


def _in_subset(segment: dict, subset: str) -> bool:
    return any(str(s).strip("{}").upper() == subset for s in segment.get("subsets", []))

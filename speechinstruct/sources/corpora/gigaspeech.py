"""GigaSpeech: ``GigaSpeech.json`` lists audio files (opus, 16 kHz), each with ``segments`` (``sid``,
``begin_time``, ``end_time``, ``text_tn``, ``subsets``). Punctuation tags become punctuation; garbage
segments (``<SIL>``, ``<NOISE>``, ``<MUSIC>``, ``<OTHER>``) are dropped and counted. The metadata is
streamed with ijson, so memory stays flat however large the file is.

Splits come from each segment's ``subsets``: ``{DEV}`` and ``{TEST}`` segments (whole files, labelled end to
end) are dev and test; the training subsets ``{XS}`` ⊂ ``{S}`` ⊂ ``{M}`` ⊂ ``{L}`` ⊂ ``{XL}`` are train, and
``corpus_split`` names the smallest one holding the segment. ``subset`` keeps one of the seven."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from ...progress import progress
from .base import Item, Skip, probe, relpath, split_of

PUNCTUATION = {"<COMMA>": ",", "<PERIOD>": ".", "<QUESTIONMARK>": "?", "<EXCLAMATIONPOINT>": "!"}
GARBAGE = {"<SIL>", "<NOISE>", "<MUSIC>", "<OTHER>"}
SUBSETS = ("XS", "S", "M", "L", "XL")  # nested training subsets, smallest first
EVAL_SUBSETS = ("DEV", "TEST")


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
    root: str | Path, subset: str | None = None, license: str | None = None
) -> Iterator[Item]:
    root = Path(root)
    if subset is not None and subset.upper() not in SUBSETS + EVAL_SUBSETS:
        raise ValueError(f"unknown GigaSpeech subset {subset!r}; choose one of {', '.join(SUBSETS + EVAL_SUBSETS)}")
    meta_path = root / "GigaSpeech.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing: not a GigaSpeech folder")
    audios = _stream_audios(meta_path)
    want = None if subset is None else subset.upper()
    for n, entry in enumerate(progress(audios, desc="gigaspeech audios", unit="file")):
        where = f"GigaSpeech.json:audios[{n}]"
        try:
            rel = str(entry["path"])
            segments = entry.get("segments") or []
            if not isinstance(segments, list):
                raise TypeError(f"segments is a {type(segments).__name__}, not a list")
        except (KeyError, TypeError, AttributeError) as e:
            yield Skip(where, "malformed audio entry", f"{type(e).__name__}: {e}")
            continue
        # a segment that is not an object is read (and skipped, malformed) only where every segment is wanted
        chosen = [s for s in segments if want is None or (isinstance(s, dict) and _in_subset(s, want))]
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
            part = corpus_split(seg)
            if part is None:
                yield Skip(rel, "segment in no GigaSpeech subset", f"{sid}: subsets {seg.get('subsets')!r}")
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
                "split": split_of(part),
                "corpus_split": part,
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


def _subsets(segment: dict) -> set[str]:
    subsets = segment.get("subsets") or []
    return {str(s).strip("{} ").upper() for s in (subsets if isinstance(subsets, list) else [subsets])}


def _in_subset(segment: dict, subset: str) -> bool:
    return subset in _subsets(segment)


def corpus_split(segment: dict) -> str | None:
    """``{DEV}`` or ``{TEST}`` for evaluation segments, else the smallest training subset holding it."""
    subsets = _subsets(segment)
    for name in EVAL_SUBSETS + SUBSETS:
        if name in subsets:
            return "{" + name + "}"
    return None

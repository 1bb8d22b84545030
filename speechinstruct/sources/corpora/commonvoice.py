"""Common Voice: ``clips/*.mp3`` (48 kHz) and tab-separated ``validated.tsv`` / ``train.tsv`` / … with
columns ``client_id, path, sentence, up_votes, down_votes, age, gender, locale, …``.

Releases write the TSVs unquoted (a sentence may hold raw ``"``, even three quotes in a row before ``Good-bye,""``); some tools
re-save them with quoting (fields holding tabs, newlines or quotes wrapped in ``"``). The reader checks which
one a file is and parses accordingly.

Splits: ``train.tsv``, ``dev.tsv`` and ``test.tsv`` are disjoint, and ``validated.tsv`` (the default, and
``other.tsv``…) also lists the dev and test clips. A clip listed in ``dev.tsv`` or ``test.tsv`` is therefore
dev or test whichever TSV it is read from; ``corpus_split`` names the TSV that assigns it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

from ...progress import progress
from .base import Item, Note, Skip, probe, split_of

REQUIRED = ("client_id", "path", "sentence")


def _parse(text: str, quoting: int) -> list[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=quoting)
    return [(reader.line_num, row) for row in reader]


def _rows(tsv: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line, fields) rows, read unquoted or quoted: whichever gives more well-formed rows."""
    try:
        text = tsv.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{tsv}: not UTF-8 ({e})") from None
    if not text.strip():
        raise ValueError(f"{tsv}: empty file")
    best = None
    for quoting in (csv.QUOTE_NONE, csv.QUOTE_MINIMAL):
        try:
            parsed = _parse(text, quoting)
        except csv.Error:
            continue
        width = len(parsed[0][1])
        good = sum(len(row) == width for _, row in parsed[1:])
        if best is None or good > best[0]:
            best = (good, parsed)
    if best is None:
        raise ValueError(f"{tsv}: not a tab-separated file")
    parsed = best[1]
    return parsed[0][1], parsed[1:]


def _read_tsv(tsv_path: Path) -> tuple[dict[str, int], list[tuple[int, list[str]]], int]:
    header, rows = _rows(tsv_path)
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ValueError(f"{tsv_path}: header lacks columns {missing} (has {header})")
    return {name: i for i, name in enumerate(header)}, rows, len(header)


EVAL_TSVS = ("dev.tsv", "test.tsv")


def eval_clips(root: Path, tsv: str) -> dict[str, str]:
    """clip → the evaluation TSV listing it (dev.tsv, test.tsv), for clips read from another TSV."""
    clips: dict[str, str] = {}
    for name in EVAL_TSVS:
        if name != tsv and (root / name).is_file():
            col, rows, width = _read_tsv(root / name)
            clips.update((row[col["path"]].strip(), name) for _, row in rows if len(row) == width)
    return clips


def read(
    root: str | Path, tsv: str | None = None, license: str | None = None
) -> Iterator[Item]:
    """Rows of ``tsv`` (default ``validated.tsv``). The default needs ``dev.tsv`` or ``test.tsv`` beside it to
    tell their clips apart; a TSV the user names is read even without them (their clips are then all train,
    and a :class:`Note` says no dev/test list was found)."""
    root = Path(root)
    named, tsv = tsv is not None, tsv or "validated.tsv"
    tsv_path = root / tsv
    if not tsv_path.is_file():
        present = sorted(p.name for p in root.glob("*.tsv")) if root.is_dir() else []
        raise FileNotFoundError(f"{tsv_path}: missing: not a Common Voice folder (or wrong --tsv)"
                                + (f"; TSVs here: {', '.join(present)}" if present else ""))
    split_tsv = tsv in ("train.tsv", *EVAL_TSVS)  # one of the disjoint split files: its name is the split
    if not split_tsv and not any((root / name).is_file() for name in EVAL_TSVS):
        if not named:
            alternative = ("read train.tsv (--tsv train.tsv)" if (root / "train.tsv").is_file()
                           else f"name it with --tsv {tsv} to read all its clips as training data")
            raise FileNotFoundError(
                f"{root}: neither dev.tsv nor test.tsv is here, so the dev and test clips inside {tsv} cannot be "
                f"told apart from training clips; restore them, or {alternative}")
        yield Note(f"{tsv}: neither dev.tsv nor test.tsv is in {root}: every clip of {tsv} is read as train "
                   "(named with --tsv); none is held out")
    col, rows, width = _read_tsv(tsv_path)
    evaluation = {} if split_tsv else eval_clips(root, tsv)
    for line, row in progress(rows, desc=f"commonvoice {tsv}", unit="clip"):
        where = f"{tsv}:{line}"
        if len(row) != width:
            yield Skip(where, "malformed tsv row", f"{len(row)} fields, header has {width}")
            continue
        clip, sentence = row[col["path"]].strip(), " ".join(row[col["sentence"]].split())
        if not clip:
            yield Skip(where, "malformed tsv row", "empty path")
            continue
        if not sentence:
            yield Skip(where, "empty transcript", clip)
            continue
        if "/" in clip or "\\" in clip or clip in (".", ".."):
            yield Skip(where, "path escapes clips/", clip)
            continue
        audio_path = root / "clips" / clip
        probed = probe(audio_path, root)
        if isinstance(probed, Skip):
            yield probed
            continue
        sr, seconds = probed
        locale = row[col["locale"]] if "locale" in col else ""
        yield {
            "id": f"commonvoice/{locale + '/' if locale else ''}{Path(clip).stem}",
            "path": f"clips/{clip}",
            "offset": 0.0,
            "duration": seconds,
            "sample_rate": sr,
            "text": sentence,
            "speaker": row[col["client_id"]],
            "corpus": "commonvoice",
            "license": license,
            "split": split_of(evaluation.get(clip, tsv)),
            "corpus_split": evaluation.get(clip, tsv),
        }

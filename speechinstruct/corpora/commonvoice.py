"""Common Voice: ``clips/*.mp3`` (48 kHz) and tab-separated ``validated.tsv`` / ``train.tsv`` / … with
columns ``client_id, path, sentence, up_votes, down_votes, age, gender, locale, …``.

Most releases write the TSV unquoted; some tools re-save it with quoting (fields holding tabs, newlines
or quotes wrapped in ``"``). The reader checks which one a file is and parses accordingly.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from . import DEFAULT_LICENSES, Item, Skip, probe

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


def read(
    root: str | Path, tsv: str = "validated.tsv", license: str | None = None, quiet: bool = False
) -> Iterator[Item]:
    root = Path(root)
    license = license or DEFAULT_LICENSES["commonvoice"]
    tsv_path = root / tsv
    if not tsv_path.is_file():
        raise FileNotFoundError(f"{tsv_path}: missing: not a Common Voice folder (or wrong --tsv)")
    header, rows = _rows(tsv_path)
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ValueError(f"{tsv_path}: header lacks columns {missing} (has {header})")
    col = {name: i for i, name in enumerate(header)}
    for line, row in tqdm(rows, desc=f"commonvoice {tsv}", unit="clip", disable=quiet):
        where = f"{tsv}:{line}"
        if len(row) != len(header):
            yield Skip(where, "malformed tsv row", f"{len(row)} fields, header has {len(header)}")
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
        }

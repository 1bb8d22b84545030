"""Kaldi data directories: ``wav.scp`` (``<recording-id> <path>``), optional ``segments`` (``<utt-id>
<recording-id> <start> <end>``, seconds), ``text`` (``<utt-id> <transcript>``) and ``utt2spk``.

ROOT is one data directory or a folder of them (``data/train``, ``data/dev_clean`` …); the split is the
directory's name (``dev*``/``test*`` are dev/test, anything else train). Without ``segments`` every
recording is one utterance. ``wav.scp`` entries that are commands (``flac -c -d -s x.flac |``, as Kaldi's
LibriSpeech recipe writes them) or archive offsets (``x.ark:123``) are never run or read: each is a counted
skip saying so, so convert such audio to files first. Relative paths are resolved from the current folder,
as Kaldi resolves them from its recipe folder. The manifest stores paths relative to ``audio_root``: by
default the deepest folder holding every listed file (:func:`audio_root`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from ...progress import progress
from .base import Item, Skip, deepest_common_folder, probe, split_of

NAME = "kaldi"


def data_dirs(root: Path) -> list[Path]:
    if (root / "wav.scp").is_file():
        return [root]
    found = sorted(p.parent for p in root.glob("*/wav.scp"))
    if not found:
        raise FileNotFoundError(f"{root}: no wav.scp here or in a subfolder: not a Kaldi data directory")
    return found


def _table(path: Path, min_fields: int) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a Kaldi table file: whitespace-separated, the key first."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (editors on Windows) is not part of the first key
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < min_fields:
            raise ValueError(f"{path}:{n}: expected at least {min_fields} fields, got {line!r}")
        yield n, fields


def _file_entries(root: Path) -> Iterator[str]:
    for folder in data_dirs(root):
        for _, fields in _table(folder / "wav.scp", 2):
            if len(fields) == 2 and not fields[1].endswith("|"):
                yield fields[1]


def audio_root(root: str | Path, audio_root: str | Path | None = None, **_) -> Path:
    """The folder manifest paths are relative to: ``audio_root`` when given, else the deepest folder that
    holds every file ``wav.scp`` lists (relative entries resolved from the current folder)."""
    if audio_root is not None:
        return Path(audio_root).resolve()
    return deepest_common_folder(_file_entries(Path(root)), Path(root))


def read(root: str | Path, audio_root: str | Path | None = None, license: str | None = None) -> Iterator[Item]:
    root = Path(root)
    base = Path(audio_root or ".").resolve()
    license = license or "unknown (Kaldi data directories carry none: pass --license)"
    for folder in data_dirs(root):
        yield from _read_dir(folder, base, license)


def _read_dir(folder: Path, base: Path, license: str) -> Iterator[Item]:
    part = folder.name
    recordings: dict[str, str] = {}
    for n, fields in _table(folder / "wav.scp", 2):
        recordings[fields[0]] = " ".join(fields[1:])
    texts = {f[0]: " ".join(f[1:]) for _, f in _table(folder / "text", 1)} if (folder / "text").is_file() else {}
    speakers = {f[0]: f[1] for _, f in _table(folder / "utt2spk", 2)} if (folder / "utt2spk").is_file() else {}
    if (folder / "segments").is_file():
        segments = []
        for n, f in _table(folder / "segments", 4):
            try:
                start, end = float(f[2]), float(f[3])
            except ValueError:
                yield Skip(f"{folder.name}/segments:{n}", "malformed segments line", " ".join(f))
                continue
            segments.append((n, f[0], f[1], start, end))
    else:
        segments = [(None, rec, rec, 0.0, None) for rec in recordings]
    probed: dict[str, tuple[str, int, float] | Skip] = {}
    for n, utt, rec, start, end in progress(segments, desc=f"kaldi {part}", unit="utt"):
        where = f"{folder.name}/segments:{n}" if n is not None else f"{folder.name}/wav.scp: {rec}"
        if rec not in recordings:
            yield Skip(where, "recording not in wav.scp", rec)
            continue
        if rec not in probed:
            probed[rec] = _probe(recordings[rec], base, f"{folder.name}/wav.scp: {rec}")
        found = probed[rec]
        if isinstance(found, Skip):
            yield found if n is None else Skip(where, found.reason, found.detail)
            continue
        rel, sr, seconds = found
        end = seconds if end is None or end < 0 else end  # Kaldi's end -1 means "to the end"
        if not 0 <= start < end <= seconds + 0.01:
            yield Skip(where, "segment outside its recording", f"{start}-{end} s of a {seconds:.3f} s file")
            continue
        yield {
            "id": f"kaldi/{part}/{utt}", "path": rel, "offset": start, "duration": min(end, seconds) - start,
            "sample_rate": sr, "text": " ".join(texts[utt].split()) if texts.get(utt, "").strip() else None,
            "speaker": speakers.get(utt, "unknown"), "corpus": NAME, "license": license,
            "split": split_of(part), "corpus_split": part,
        }


def _probe(entry: str, base: Path, where: str) -> tuple[str, int, float] | Skip:
    if entry.rstrip().endswith("|"):
        return Skip(where, "wav.scp entry is a command (not run)", f"{entry!r}: convert this audio to a file first")
    if len(entry.split()) > 1:
        return Skip(where, "wav.scp entry is not a file path", repr(entry))
    if ":" in entry and Path(entry.rsplit(":", 1)[0]).suffix == ".ark":
        return Skip(where, "wav.scp entry is an archive offset (not read)", f"{entry!r}: extract it to a file first")
    path = Path(os.path.abspath(entry))
    found = probe(path, base)
    if isinstance(found, Skip):
        return Skip(where, found.reason, found.detail or str(path))
    sr, seconds = found
    return os.path.relpath(path, base).replace(os.sep, "/"), sr, seconds

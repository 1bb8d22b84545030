"""lhotse manifests, read with lhotse itself: recordings + supervisions (``*_recordings_<part>.jsonl.gz`` and
``*_supervisions_<part>.jsonl.gz``, as lhotse's recipes name them) or cuts (``*_cuts_<part>.jsonl.gz``).

ROOT is a folder of such files, or one cuts file. The split is ``<part>`` (``dev-clean``, ``test``…: ``dev*``
and ``test*`` are dev/test, anything else train). One manifest row per supervision (or per cut, its
supervisions' texts joined). Only audio sources of type ``file`` are read; ``url``, ``command`` and
``memory`` sources are counted skips. Paths are stored relative to ``audio_root``: by default the deepest
folder holding every recording's file (:func:`audio_root`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from . import Item, Skip, deepest_common_folder, probe, split_of

NAME = "lhotse"
_MANIFEST = re.compile(r"^(?:(?P<prefix>.*?)_)?(?P<kind>recordings|supervisions|cuts)(?:_(?P<part>.+?))?\.jsonl(?:\.gz)?$")


def manifests(root: Path) -> list[tuple[str, str, Path]]:
    """(part, kind, file) of every lhotse manifest under ``root`` (or ``root`` itself, one file)."""
    files = [root] if root.is_file() else sorted(root.glob("*.jsonl*"))
    found = []
    for path in files:
        m = _MANIFEST.match(path.name)
        if m:
            found.append((m.group("part") or m.group("prefix") or "train", m.group("kind"), path))
    if not found:
        raise FileNotFoundError(f"{root}: no lhotse manifests (*_recordings_*.jsonl.gz with *_supervisions_*, or "
                                "*_cuts_*.jsonl.gz)")
    return found


def _parts(root: Path) -> dict[str, dict[str, Path]]:
    parts: dict[str, dict[str, Path]] = {}
    for part, kind, path in manifests(root):
        parts.setdefault(part, {})[kind] = path
    for part, kinds in parts.items():
        if "cuts" not in kinds and not {"recordings", "supervisions"} <= set(kinds):
            have = ", ".join(p.name for p in kinds.values())
            raise FileNotFoundError(f"{root}: part {part!r} has {have} only: lhotse needs recordings with "
                                    "supervisions, or cuts")
    return parts


def _recordings(parts: dict[str, dict[str, Path]]) -> Iterator:
    from lhotse import load_manifest_lazy

    for kinds in parts.values():
        if "cuts" in kinds:
            for cut in load_manifest_lazy(kinds["cuts"]):
                if cut.has_recording:
                    yield cut.recording
        else:
            yield from load_manifest_lazy(kinds["recordings"])


def _file_of(recording) -> str | None:
    sources = recording.sources
    if len(sources) == 1 and sources[0].type == "file":
        return os.path.abspath(sources[0].source)
    return None


def audio_root(root: str | Path, audio_root: str | Path | None = None, **_) -> Path:
    """``audio_root`` when given, else the deepest folder holding every recording's file."""
    if audio_root is not None:
        return Path(audio_root).resolve()
    return deepest_common_folder((f for f in map(_file_of, _recordings(_parts(Path(root)))) if f), Path(root))


def read(root: str | Path, audio_root: str | Path | None = None, license: str | None = None,
         quiet: bool = False) -> Iterator[Item]:
    from lhotse import load_manifest_lazy

    root = Path(root)
    base = Path(audio_root or ".").resolve()
    license = license or "unknown (lhotse manifests carry none: pass --license)"
    for part, kinds in sorted(_parts(root).items()):
        probed: dict[str, tuple[str, int, float] | Skip] = {}

        def check(recording, where):
            if recording.id not in probed:
                probed[recording.id] = _probe(recording, base, where)
            return probed[recording.id]

        if "cuts" in kinds:
            for cut in tqdm(load_manifest_lazy(kinds["cuts"]), desc=f"lhotse {part} cuts", unit="cut", disable=quiet):
                where = f"{kinds['cuts'].name}: cut {cut.id}"
                if not cut.has_recording:
                    yield Skip(where, "cut without a recording", "features-only cuts have no audio to read")
                    continue
                found = check(cut.recording, where)
                if isinstance(found, Skip):
                    yield found
                    continue
                texts = [s.text for s in cut.supervisions if s.text]
                speakers = [s.speaker for s in cut.supervisions if s.speaker]
                yield _row(f"{part}/{cut.id}", found, cut.start, cut.duration, " ".join(texts) or None,
                           speakers[0] if speakers else None, part, license)
        else:
            recordings = {r.id: r for r in load_manifest_lazy(kinds["recordings"])}
            for sup in tqdm(load_manifest_lazy(kinds["supervisions"]), desc=f"lhotse {part}", unit="utt", disable=quiet):
                where = f"{kinds['supervisions'].name}: supervision {sup.id}"
                if sup.recording_id not in recordings:
                    yield Skip(where, "recording not in the recordings manifest", sup.recording_id)
                    continue
                found = check(recordings[sup.recording_id], where)
                if isinstance(found, Skip):
                    yield found
                    continue
                yield _row(f"{part}/{sup.id}", found, sup.start, sup.duration, sup.text, sup.speaker, part, license)


def _probe(recording, base: Path, where: str) -> tuple[str, int, float] | Skip:
    path = _file_of(recording)
    if path is None:
        kinds = ", ".join(s.type for s in recording.sources)
        return Skip(where, "audio source is not one file (not read)", f"recording {recording.id}: sources {kinds}")
    found = probe(Path(path), base)
    if isinstance(found, Skip):
        return Skip(where, found.reason, found.detail or path)
    sr, seconds = found
    return os.path.relpath(path, base).replace(os.sep, "/"), sr, seconds


def _row(utt: str, found: tuple[str, int, float], start: float, duration: float, text: str | None,
         speaker: str | None, part: str, license: str) -> Item:
    rel, sr, seconds = found
    if start < 0 or duration <= 0 or start + duration > seconds + 0.01:
        return Skip(f"{part}/{utt}", "segment outside its recording", f"{start}+{duration} s of a {seconds:.3f} s file")
    return {
        "id": f"lhotse/{utt}", "path": rel, "offset": float(start), "duration": float(min(duration, seconds - start)),
        "sample_rate": sr, "text": " ".join(text.split()) if text and text.strip() else None,
        "speaker": speaker or "unknown", "corpus": NAME, "license": license, "split": split_of(part),
        "corpus_split": part,
    }

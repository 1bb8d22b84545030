"""lhotse manifests, read with lhotse itself: recordings + supervisions (``*_recordings_<part>.jsonl.gz`` and
``*_supervisions_<part>.jsonl.gz``, as lhotse's recipes name them) or cuts (``*_cuts_<part>.jsonl.gz``).

ROOT is a folder of such files, or one cuts file. The split is ``<part>`` (``dev-clean``, ``test``…: ``dev*``
and ``test*`` are dev/test, anything else train). One manifest row per supervision (or per cut, its
supervisions' texts joined). A supervision's word alignment (``alignment["word"]``) becomes the row's ``words``,
timed from the supervision's start. Audio sources of type ``file`` are read, and those of type ``url`` whose
URL is object storage (``s3://``, ``gs://``, ``hf://``; not ``http(s)://``), from their copy in the cache (:mod:`speechinstruct.storage`,
each fetched once); a ``command`` source that only decodes one file is read as that file, never run
(``flac -c -d -s F``: what lhotse's import of a Kaldi ``wav.scp`` makes, :func:`kaldi.piped_file`); other
``command`` and ``memory`` sources are counted skips. Paths are stored relative to
``audio_root``: by default the deepest folder holding every recording's file (:func:`audio_root`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

from ...progress import progress
from .. import storage
from ..alignments import check_words, lhotse_words
from .base import Item, Skip, deepest_common_folder, probe, split_of
from .kaldi import file_channel, piped_file

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


def records(path: Path) -> Iterator[tuple[int, object] | Skip]:
    """(line, lhotse object) of each line of a JSONL manifest (gzipped or not), decoded by lhotse's own
    ``deserialize_item``, or a :class:`Skip` naming the file and line for a record that is not a valid one.
    A file that is not gzip or is cut short is one clear error naming it (not lhotse's traceback)."""
    import gzip
    import json
    import zlib

    from lhotse.serialization import deserialize_item

    line = 0
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")) as f:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                where = f"{path.name}:{line}"
                try:
                    data = json.loads(text)
                    if not isinstance(data, dict):
                        raise ValueError(f"a record must be a JSON object, got {type(data).__name__}")
                    obj = deserialize_item(data)
                    _check_fields(obj)
                except Exception as e:  # lhotse raises TypeError/KeyError/ValueError/AssertionError on bad records
                    yield Skip(where, "malformed manifest record", f"{type(e).__name__}: {e}")
                    continue
                yield line, obj
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:  # not gzip, truncated, not UTF-8
        raise ValueError(f"{path}: unreadable manifest after line {line} ({type(e).__name__}: {e})") from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fields(obj) -> None:
    """The fields this reader uses have the types lhotse documents (lhotse itself does not check them)."""
    from lhotse import SupervisionSegment

    segments = [obj] if isinstance(obj, SupervisionSegment) else list(getattr(obj, "supervisions", None) or [])
    if not isinstance(obj, SupervisionSegment) and hasattr(obj, "start"):
        segments.append(obj)  # a cut: its own start and duration
    for seg in segments:
        for key in ("start", "duration"):
            if not _number(getattr(seg, key)):
                raise ValueError(f"{key} must be a number of seconds, got {getattr(seg, key)!r}")
        for key in ("text", "speaker"):
            value = getattr(seg, key, None)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{key} must be a string, got {value!r}")


def _objects(path: Path) -> Iterator:
    """The valid records of a manifest, for the passes that only look (the audio root): skips are counted by
    :func:`read`."""
    for item in records(path):
        if not isinstance(item, Skip):
            yield item[1]


def _recordings(parts: dict[str, dict[str, Path]]) -> Iterator:
    for kinds in parts.values():
        if "cuts" in kinds:
            for cut in _objects(kinds["cuts"]):
                if getattr(cut, "has_recording", False):
                    yield cut.recording
        else:
            yield from _objects(kinds["recordings"])


def _file_of(recording) -> str | None:
    """The one file a recording's audio is in: its path, where the cache keeps its URL's copy, or the file a
    command only decodes (lhotse's import of a Kaldi ``wav.scp``: ``flac -c -d -s F``, never run)."""
    url = _url_of(recording)
    if url:
        return str(storage.cache_path(url))
    sources = recording.sources
    if len(sources) == 1 and sources[0].type == "file":
        return os.path.abspath(sources[0].source)
    if len(sources) == 1 and sources[0].type == "command" and (piped := piped_file(f"{sources[0].source} |")):
        return os.path.abspath(piped[0])
    return None


def _url_of(recording) -> str | None:
    sources = recording.sources
    if len(sources) == 1 and sources[0].type == "url" and storage.in_object_storage(sources[0].source):
        return sources[0].source
    return None


def audio_root(root: str | Path, audio_root: str | Path | None = None, **_) -> Path:
    """``audio_root`` when given, else the deepest folder holding every recording's file."""
    if audio_root is not None:
        return Path(audio_root).resolve()
    return deepest_common_folder((f for f in map(_file_of, _recordings(_parts(Path(root)))) if f), Path(root))


def read(root: str | Path, audio_root: str | Path | None = None, license: str | None = None) -> Iterator[Item]:
    root = Path(root)
    base = Path(audio_root or ".").resolve()
    license = license or "unknown (lhotse manifests carry none: pass --license)"
    parts = _parts(root)
    # recordings in object storage: their files copied first, each once (a rerun fetches only what changed)
    fetched = storage.local_files([u for u in map(_url_of, _recordings(parts)) if u])
    for part, kinds in sorted(parts.items()):
        probed: dict[str, tuple[str, int, float] | Skip] = {}

        def check(recording, where):
            if recording.id not in probed:
                probed[recording.id] = _probe(recording, base, where, fetched)
            return probed[recording.id]

        if "cuts" in kinds:
            for item in progress(records(kinds["cuts"]), desc=f"lhotse {part} cuts", unit="cut"):
                if isinstance(item, Skip):
                    yield item
                    continue
                _, cut = item
                where = f"{kinds['cuts'].name}: cut {cut.id}"
                if not getattr(cut, "has_recording", False):
                    yield Skip(where, "cut without a recording", "features-only cuts have no audio to read")
                    continue
                found = check(cut.recording, where)
                if isinstance(found, Skip):
                    yield found
                    continue
                texts = [s.text for s in cut.supervisions if s.text]
                speakers = [s.speaker for s in cut.supervisions if s.speaker]
                yield _row(part, cut.id, found, cut.start, cut.duration, " ".join(texts) or None,
                           speakers[0] if speakers else None, license, getattr(cut, "channel", None))
        else:
            recordings = {}
            for item in records(kinds["recordings"]):
                if isinstance(item, Skip):
                    yield item
                else:
                    recordings[item[1].id] = item[1]
            for item in progress(records(kinds["supervisions"]), desc=f"lhotse {part}", unit="utt"):
                if isinstance(item, Skip):
                    yield item
                    continue
                _, sup = item
                where = f"{kinds['supervisions'].name}: supervision {sup.id}"
                if sup.recording_id not in recordings:
                    yield Skip(where, "recording not in the recordings manifest", sup.recording_id)
                    continue
                found = check(recordings[sup.recording_id], where)
                if isinstance(found, Skip):
                    yield found
                    continue
                row = _row(part, sup.id, found, sup.start, sup.duration, sup.text, sup.speaker, license, sup.channel)
                words = lhotse_words(sup)
                problem = check_words(words, row["duration"]) if words and isinstance(row, dict) else None
                if problem:
                    yield Skip(where, "alignment not used", problem)
                elif words and isinstance(row, dict):
                    row["words"] = words
                yield row


def _probe(recording, base: Path, where: str, fetched: dict[str, Path]) -> tuple[str, int, float] | Skip:
    url = _url_of(recording)
    if url and url not in fetched:  # nothing stored there (an older copy in the cache is not used)
        return Skip(where, "missing audio file", f"recording {recording.id}: nothing stored at {storage.redacted(url)}")
    path = _file_of(recording)
    if path is None:
        kinds = ", ".join(s.type for s in recording.sources)
        return Skip(where, "audio source is not one file (not read)", f"recording {recording.id}: sources {kinds}")
    found = probe(Path(path), base)
    if isinstance(found, Skip):
        return Skip(where, found.reason, found.detail or path)
    sr, seconds = found
    source = recording.sources[0]
    if source.type == "command":  # the channel its command picks (1-based), or none
        index = file_channel(Path(path), piped_file(f"{source.source} |")[1])
        if isinstance(index, str):
            return Skip(where, "audio source picks a channel the file lacks", f"recording {recording.id}: {index}")
        channels = {channel: index for channel in source.channels}
    else:  # a file's channels in the order its source lists them
        many = _channels(Path(path)) > 1
        channels = {channel: (i if many else None) for i, channel in enumerate(source.channels)}
    return os.path.relpath(path, base).replace(os.sep, "/"), sr, seconds, channels


def _channels(path: Path) -> int:
    import soundfile as sf

    return sf.info(str(path)).channels


def _row(part: str, utt: str, found: tuple[str, int, float, dict], start: float, duration: float, text: str | None,
         speaker: str | None, license: str, channel=None) -> Item:
    """A manifest row of ``[start, start + duration)`` of a recording (``found``: its file, rate, length and which
    of the file's channels each of its channel ids is), on its supervision's or cut's ``channel`` (an id, or a list
    of them: all the recording's are mixed, one is read alone, a few are refused)."""
    rel, sr, seconds, channels = found
    if start < 0 or duration <= 0 or start + duration > seconds + 0.01:
        return Skip(f"{part}/{utt}", "segment outside its recording", f"{start}+{duration} s of a {seconds:.3f} s file")
    wanted = sorted(set(channel)) if isinstance(channel, (list, tuple)) else [channel] if channel is not None else []
    if missing := [c for c in wanted if c not in channels]:
        return Skip(f"{part}/{utt}", "channel not in its recording", f"channel {missing[0]} (it has {sorted(channels)})")
    if 1 < len(wanted) < len(channels):
        return Skip(f"{part}/{utt}", "several channels of a recording (not read apart)",
                    f"channels {wanted} of {sorted(channels)}: only one, or all of them mixed, are read")
    if len(channels) == 1:  # the recording's one channel: the file's only one (None), or the one it is read from
        index = next(iter(channels.values()))
    else:  # one of several alone, or all of them mixed (None)
        index = channels[wanted[0]] if len(wanted) == 1 else None
    return {
        "id": f"lhotse/{part}/{utt}", "path": rel, "offset": float(start), "duration": float(min(duration, seconds - start)),
        "sample_rate": sr, "text": " ".join(text.split()) if text and text.strip() else None,
        "speaker": speaker or "unknown", "corpus": NAME, "license": license, "split": split_of(part),
        "corpus_split": part, "channel": index,
    }

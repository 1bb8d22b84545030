"""lhotse's records, read with lhotse itself, and the manifest row of one supervision or cut: what the manifest
reader (:mod:`lhotse_manifests`) and the Shar reader (:mod:`lhotse_shar`) share."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .base import Item, Skip, split_of

NAME = "lhotse"


def records(path: Path) -> Iterator[tuple[int, object] | Skip]:
    """(line, lhotse object) of each line of a JSONL manifest (gzipped or not), decoded by lhotse's own
    ``deserialize_item``, or a :class:`Skip` naming the file and line for a record that is not a valid one.
    A file that is not gzip or is cut short is one clear error naming it (not lhotse's traceback)."""
    import gzip
    import zlib

    from lhotse.serialization import deserialize_item

    from ...io import parse_json_object

    line = 0
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")) as f:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                where = f"{path.name}:{line}"
                try:
                    data = parse_json_object(text)  # a lone surrogate (\udc80) is "not valid Unicode"
                    if isinstance(data, str):
                        raise ValueError(f"a record must be a JSON object: {data}")
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


def manifest_row(part: str, utt: str, found: tuple[float, dict], start: float, duration: float, text: str | None,
                 speaker: str | None, license: str, channel=None) -> Item:
    """A manifest row of ``[start, start + duration)`` of a recording (``found``: :func:`_probe`'s), on its
    supervision's or cut's ``channel``: an id, read alone, or a list of them (all the recording's mixed, when one
    file holds them; one read alone; a few of several refused)."""
    seconds, channels = found
    if start < 0 or duration <= 0 or start + duration > seconds + 0.01:
        return Skip(f"{part}/{utt}", "segment outside its recording", f"{start}+{duration} s of a {seconds:.3f} s file")
    wanted = sorted(set(channel)) if isinstance(channel, (list, tuple)) else [channel] if channel is not None else []
    if missing := [c for c in wanted if c not in channels]:
        return Skip(f"{part}/{utt}", "channel not in its recording", f"channel {missing[0]} (it has {sorted(channels)})")
    if 1 < len(wanted) < len(channels):
        return Skip(f"{part}/{utt}", "several channels of a recording (not read apart)",
                    f"channels {wanted} of {sorted(channels)}: only one, or all of them mixed, are read")
    if len(wanted) == 1 or len(channels) == 1:  # one channel: its file, alone (None: the file's only one)
        rel, index, sr = channels[wanted[0] if wanted else next(iter(channels))]
    else:  # all of them, mixed: where one file holds them
        files = {(rel, sr) for rel, _, sr in channels.values()}
        if len(files) > 1:
            return Skip(f"{part}/{utt}", "channels in several files (not mixed)",
                        f"{len(channels)} channels in {len(files)} files: a supervision on one of them is read")
        (rel, sr), index = files.pop(), None
    return {
        "id": f"lhotse/{part}/{utt}", "path": rel, "offset": float(start), "duration": float(min(duration, seconds - start)),
        "sample_rate": sr, "text": " ".join(text.split()) if text and text.strip() else None,
        "speaker": speaker or "unknown", "corpus": NAME, "license": license, "split": split_of(part),
        "corpus_split": part, "channel": index,
    }


def cut_row(part: str, cut, found: tuple[float, dict], license: str) -> Item:
    """The manifest row of one cut (:func:`manifest_row`): its supervisions' texts joined, its first speaker."""
    texts = [s.text for s in cut.supervisions if s.text]
    speakers = [s.speaker for s in cut.supervisions if s.speaker]
    return manifest_row(part, cut.id, found, cut.start, cut.duration, " ".join(texts) or None,
                        speakers[0] if speakers else None, license, getattr(cut, "channel", None))

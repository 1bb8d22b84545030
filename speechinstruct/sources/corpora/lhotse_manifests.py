"""lhotse manifests, read with lhotse itself: recordings + supervisions (``*_recordings_<part>.jsonl.gz`` and
``*_supervisions_<part>.jsonl.gz``, as lhotse's recipes name them) or cuts (``*_cuts_<part>.jsonl.gz``); the
chunks ``split_lazy`` writes with no prefix (``split.00000000.jsonl.gz``) are the kind their records are, and the
part their folder's name.

ROOT is a folder of such files, or one cuts file; lhotse's Shar folders at or under it (tar shards of cuts and their
audio, ``CutSet.to_shar``) are read by :mod:`lhotse_shar`. The split is ``<part>`` (``dev-clean``, ``test``…: ``dev*``
and ``test*`` are dev/test, anything else train). One manifest row per supervision (or per cut, its
supervisions' texts joined). A supervision's word alignment (``alignment["word"]``) becomes the row's ``words``,
timed from the supervision's start. Audio sources of type ``file`` are read, and those of type ``url`` whose
URL is object storage (``s3://``, ``gs://``, ``hf://``; not ``http(s)://``), from their copy in the cache (:mod:`speechinstruct.storage`,
each fetched once); a ``command`` source that only decodes one file is read as that file, never run
(``flac -c -d -s F``: what lhotse's import of a Kaldi ``wav.scp`` makes, :func:`kaldi.piped_file`); other
``command`` and ``memory`` sources are counted skips. A supervision (or cut) on one channel reads that channel
alone: of the recording's one file (a two-channel call), or the file holding it (AMI's headsets, one file per
channel). Paths are stored relative to
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
from .base import Item, Skip, deepest_common_folder, probe, relpath
from .kaldi import file_channel, piped_file
from .lhotse_records import NAME, cut_row, manifest_row, records  # noqa: F401 (NAME: the registry's)
from .lhotse_shar import DEPTH, folders, is_cuts, is_shar_folder, read_folder, tars

# lhotse's recipes' names; a chunk of one split by lhotse (``split_lazy``: ``cuts_XL.00000000.jsonl.gz``, or
# ``cuts.00000000.jsonl.gz`` with the prefix "cuts") ends in its number, and is read with the other chunks of its part
_MANIFEST = re.compile(r"^(?:(?P<prefix>.*?)_)?(?P<kind>recordings|supervisions|cuts)(?:_(?P<part>.+?))?(?:\.\d+)?"
                       r"\.jsonl(?:\.gz)?$")
# the chunks of ``split_lazy`` with no prefix (lhotse's default, "split"): their records say their kind
_SPLIT_CHUNK = re.compile(r"^split\.\d+\.jsonl(?:\.gz)?$")


def manifests(root: Path) -> list[tuple[str, str, Path]]:
    """(part, kind, file) of every lhotse manifest in ``root`` (or ``root`` itself, one file); a Shar folder's cuts
    files are :mod:`lhotse_shar`'s."""
    files = [root] if root.is_file() else sorted(root.glob("*.jsonl*"))
    if root.is_dir() and is_shar_folder([p for p in root.iterdir() if not p.name.startswith(".") and p.is_file()]):
        files = [p for p in files if not is_cuts(p)]
    found = []
    for path in files:
        m = _MANIFEST.match(path.name)
        if m:
            found.append((m.group("part") or m.group("prefix") or "train", m.group("kind"), path))
    if chunks := [path for path in files if _SPLIT_CHUNK.match(path.name)]:
        part = (root if root.is_dir() else root.parent).resolve().name  # as a Shar folder's
        found += [(part, _kind_of(chunks), path) for path in chunks]
    return found


def _kind_of(chunks: list[Path]) -> str:
    """The kind of ``split_lazy``'s unnamed chunks: their first valid record's, as lhotse's ``load_manifest_lazy``
    tells it; "cuts" when none is valid (each record is then a counted skip)."""
    from lhotse import Recording, SupervisionSegment

    for record in _objects(chunks):
        return "recordings" if isinstance(record, Recording) else \
            "supervisions" if isinstance(record, SupervisionSegment) else "cuts"
    return "cuts"


def shar_folders(root: Path) -> dict[Path, str]:
    """{Shar folder: its corpus part} at or under ``root``: the part is the folder's path under ``root``, or its
    name when ``root`` is one."""
    root = root.resolve()
    return {folder: (folder.name if folder == root else relpath(folder, root))
            for folder in folders(root)}


def _parts(root: Path) -> dict[str, dict[str, list[Path]]]:
    """The manifests of ``root`` by part and kind (a kind's chunks in order); a folder with none, and no Shar folders
    either, is an error."""
    parts: dict[str, dict[str, list[Path]]] = {}
    found = manifests(root)
    if not found and not shar_folders(root):
        raise FileNotFoundError(f"{root}: no lhotse manifests (*_recordings_*.jsonl.gz with *_supervisions_*, or "
                                "*_cuts_*.jsonl.gz) and no Shar folders (cuts.000000.jsonl.gz with recording.000000.tar) in it "
                                f"or up to {DEPTH} folders down")
    for part, kind, path in found:  # sorted by name: a kind's chunks in their order
        parts.setdefault(part, {}).setdefault(kind, []).append(path)
    for part, kinds in parts.items():
        if "cuts" not in kinds and not {"recordings", "supervisions"} <= set(kinds):
            have = ", ".join(p.name for paths in kinds.values() for p in paths)
            raise FileNotFoundError(f"{root}: part {part!r} has {have} only: lhotse needs recordings with "
                                    "supervisions, or cuts")
    return parts


def _records(paths: list[Path]) -> Iterator:
    """(file, record or skip) of each chunk of a manifest in turn."""
    for path in paths:
        for item in records(path):
            yield path, item


def _objects(paths: list[Path]) -> Iterator:
    """The valid records of a manifest's chunks, for the passes that only look (the audio root): skips are counted
    by :func:`read`."""
    return (item[1] for _, item in _records(paths) if not isinstance(item, Skip))


def _recordings(parts: dict[str, dict[str, list[Path]]]) -> Iterator:
    for kinds in parts.values():
        if "cuts" in kinds:
            for cut in _objects(kinds["cuts"]):
                if getattr(cut, "has_recording", False) and not isinstance(speech := _speech_of(cut), str):
                    yield speech.recording
        else:
            yield from _objects(kinds["recordings"])


def _source_file(source) -> tuple[str, int | None] | None:
    """(the file, the 1-based channel a command picks of it or None) of one audio source: its path, where the cache
    keeps its URL's copy (object storage), or the file a command only decodes (lhotse's import of a Kaldi
    ``wav.scp``: ``flac -c -d -s F``, never run); None for any other source."""
    if source.type == "file":
        return os.path.abspath(source.source), None
    if source.type == "url" and storage.in_object_storage(source.source):
        return str(storage.cache_path(source.source)), None
    if source.type == "command" and (piped := piped_file(f"{source.source} |")):
        return os.path.abspath(piped[0]), piped[1]
    return None


def _speech_of(cut):
    """The cut whose recording a row reads: ``cut`` itself, or the one track of a MixedCut that holds a recording
    (lhotse's ``pad`` puts silence beside it); why not, for a mix of several recordings (lhotse's ``mix``)."""
    tracks = getattr(cut, "tracks", None)
    if tracks is None:
        return cut
    speech = [track.cut for track in tracks if getattr(track.cut, "recording", None) is not None]  # not PaddingCuts
    if len(speech) == 1:
        return speech[0]
    return f"{len(speech)} recordings mixed: {', '.join(c.recording.id for c in speech[:3])}"


def _urls_of(recording) -> list[str]:
    return [s.source for s in recording.sources if s.type == "url" and storage.in_object_storage(s.source)]


def audio_root(root: str | Path, audio_root: str | Path | None = None, **_) -> Path:
    """``audio_root`` when given, else the deepest folder holding every recording's file."""
    if audio_root is not None:
        return Path(audio_root).resolve()
    files = [found[0] for recording in _recordings(_parts(Path(root))) for found in map(_source_file, recording.sources)
             if found]
    files += [str(tar) for folder in shar_folders(Path(root)) for tar in tars(folder)]
    return deepest_common_folder(files, Path(root))


def read(root: str | Path, audio_root: str | Path | None = None, license: str | None = None) -> Iterator[Item]:
    root = Path(root)
    base = Path(audio_root or ".").resolve()
    license = license or "unknown (lhotse manifests carry none: pass --license)"
    parts = _parts(root)
    # recordings in object storage: their files copied first, each once (a rerun fetches only what changed)
    fetched = storage.local_files([u for recording in _recordings(parts) for u in _urls_of(recording)])
    for part, kinds in sorted(parts.items()):
        probed: dict[str, tuple[str, int, float] | Skip] = {}

        def check(recording, where):
            if recording.id not in probed:
                probed[recording.id] = _probe(recording, base, where, fetched)
            return probed[recording.id]

        if "cuts" in kinds:
            for path, item in progress(_records(kinds["cuts"]), desc=f"lhotse {part} cuts", unit="cut"):
                if isinstance(item, Skip):
                    yield item
                    continue
                _, cut = item
                where = f"{path.name}: cut {cut.id}"
                if not getattr(cut, "has_recording", False):
                    yield Skip(where, "cut without a recording", "features-only cuts, or a Shar folder's cuts without its "
                               "recording tars, have no audio to read")
                    continue
                cut = _speech_of(cut)
                if isinstance(cut, str):
                    yield Skip(where, "a mix of several recordings (not read)", cut)
                    continue
                found = check(cut.recording, where)
                if isinstance(found, Skip):
                    yield found
                    continue
                yield cut_row(part, cut, found, license)
        else:
            recordings = {}
            for _, item in _records(kinds["recordings"]):
                if isinstance(item, Skip):
                    yield item
                else:
                    recordings[item[1].id] = item[1]
            for path, item in progress(_records(kinds["supervisions"]), desc=f"lhotse {part}", unit="utt"):
                if isinstance(item, Skip):
                    yield item
                    continue
                _, sup = item
                where = f"{path.name}: supervision {sup.id}"
                if sup.recording_id not in recordings:
                    yield Skip(where, "recording not in the recordings manifest", sup.recording_id)
                    continue
                found = check(recordings[sup.recording_id], where)
                if isinstance(found, Skip):
                    yield found
                    continue
                row = manifest_row(part, sup.id, found, sup.start, sup.duration, sup.text, sup.speaker, license, sup.channel)
                words = lhotse_words(sup)
                problem = check_words(words, row["duration"]) if words and isinstance(row, dict) else None
                if problem:
                    yield Skip(where, "alignment not used", problem)
                elif words and isinstance(row, dict):
                    row["words"] = words
                yield row
    for folder, part in shar_folders(root).items():
        yield from read_folder(folder, part, base, license)


def _probe(recording, base: Path, where: str, fetched: dict[str, Path]) -> tuple[float, dict] | Skip:
    """(the recording's length, and for each of its channel ids the file that holds it, relative to ``base``, the
    channel of that file (None: the file has one) and its sample rate), or why it cannot be read. A recording is one
    file, or one file per channel (lhotse's AMI headsets)."""
    from ... import audio  # here, not at the top: the CLI reads the registry without loading audio libraries

    changed = [name for name in map(_transform_name, recording.transforms or []) if name != "Resample"]
    if changed:  # lhotse's perturb_speed, perturb_volume, reverb…: the file as it is is not this audio
        return Skip(where, "a transformed recording (not read)", f"recording {recording.id}: {', '.join(changed)}: a row "
                    "reads the file as it is; shard the cuts before perturbing them")
    channels, seconds = {}, None
    for source in recording.sources:
        found = _source_file(source)
        if found is None:
            return Skip(where, "audio source is not one file (not read)", f"recording {recording.id}: a {source.type} source"
                        + (" (a Shar folder's cut: its audio is in the recording tar beside it, not here)"
                           if source.type == "shar" else ""))
        if source.type == "url" and source.source not in fetched:  # nothing stored there (an older copy is not used)
            return Skip(where, "missing audio file", f"recording {recording.id}: nothing stored at "
                        f"{storage.redacted(source.source)}")
        path, picked = found
        probed = probe(Path(path), base)
        if isinstance(probed, Skip):
            return Skip(where, probed.reason, probed.detail or path)
        sr, length = probed
        seconds = length if seconds is None else min(seconds, length)
        rel = os.path.relpath(path, base).replace(os.sep, "/")
        if source.type == "command":  # the channel its command picks (1-based), or none
            index = file_channel(Path(path), picked)
            if isinstance(index, str):
                return Skip(where, "audio source picks a channel the file lacks", f"recording {recording.id}: {index}")
            channels.update({channel: (rel, index, sr) for channel in source.channels})
        else:  # a file's channels in the order its source lists them
            many = audio.channels(path) > 1
            channels.update({channel: (rel, i if many else None, sr) for i, channel in enumerate(source.channels)})
    return seconds, channels


def _transform_name(transform) -> str:
    """A recording transform's name (lhotse keeps them as objects, ``Speed(factor=1.1)``, or as dicts)."""
    return transform.get("name", "?") if isinstance(transform, dict) else type(transform).__name__

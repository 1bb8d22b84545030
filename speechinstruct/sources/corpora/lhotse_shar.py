"""lhotse's Shar format, read in place: a folder of ``cuts.000000.jsonl.gz`` with ``recording.000000.tar`` beside
it (and so on for each shard; ``cuts.jsonl.gz`` with ``recording.tar`` unsharded), as ``CutSet.to_shar`` writes
it. Each cut's audio is a member of the tar of its shard, named by the cut's id (``ID.flac``, ``ID.wav``,
``ID.mp3``, ``ID.opus``; ``ID.original`` in the input's own container), its recording's manifest after it
(``ID.json``); a cut stored without audio has ``ID.nodata`` there. The stored audio is the cut's alone (lhotse
writes the cut at start 0, its channels only), so a row is ``[start, start + duration)`` of that member, read back
by its byte offset in the tar (``tar_offset``, ``tar_size``) as WebDataset rows are.

The corpus part, and so the split, is the Shar folder's name (``dev-clean`` is validation); ROOT is one Shar folder
or a folder holding several. lhotse's own reader pairs the i-th cuts file with the i-th tar and stops on a cut
whose member is missing; here they are paired by shard number, and a shard's missing or damaged tar, a cut with
no member, and a cut without a recording are each a counted skip naming the cut. Fields other than the
recording (features, custom arrays) are named in a note, not read.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

from ...progress import progress
from .base import Item, Note, Skip, outside, relpath
from .lhotse_records import cut_row, records
from .webdataset import TAR_ERRORS, compressed, file_members


def _field_and_shard(name: str) -> tuple[str, str]:
    """(field, shard number or "") of a Shar file name: ``recording.000003.tar`` → (recording, 000003)."""
    parts = name.split(".")
    return parts[0], parts[1] if len(parts) > 2 and parts[1].isdigit() else ""


def is_cuts(path: Path) -> bool:
    return path.name.split(".")[0] == "cuts" and ".jsonl" in path.suffixes  # lhotse's rule (LazySharIterator)


DEPTH = 2  # how far under ROOT Shar folders are looked for (shar/train-clean-100 under a corpus folder)


def folders(root: Path) -> list[Path]:
    """The Shar folders (:func:`is_shar_folder`) at ``root`` or up to :data:`DEPTH` folders under it (not deeper: a
    corpus's own audio tree beside its manifests is not listed). Their paths are under ``root`` resolved, their own
    links kept (a tar linked in from elsewhere is judged by :func:`outside`)."""
    if not root.is_dir():
        return []
    found, level = [], [root.resolve()]
    for _ in range(DEPTH + 1):
        below = []
        for folder in level:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:  # unreadable, or removed since it was listed
                continue
            if is_shar_folder([Path(e.path) for e in entries if not e.name.startswith(".") and e.is_file()]):
                found.append(folder)
            below += [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]
        level = below
    return sorted(found)


def tars(folder: Path) -> list[Path]:
    """The recording tars of one Shar folder."""
    return _recording_tars(sorted(p for p in folder.iterdir() if p.is_file()))


def _recording_tars(files: list[Path]) -> list[Path]:
    return [p for p in files if _field_and_shard(p.name)[0] == "recording"]


def is_shar_folder(files: list[Path]) -> bool:
    """Whether a folder holding ``files`` is a Shar folder: lhotse's Shar cuts files beside the numbered tars of its
    fields (``recording.000000.tar``, ``features.000000.tar``). Numbered cuts files with no tar beside them are the
    chunks of an ordinary cuts manifest (``CutSet.split_lazy(prefix="cuts")``: ``cuts.00000000.jsonl.gz``), which
    :mod:`lhotse_manifests` reads."""
    return any(is_cuts(f) for f in files) and (bool(_recording_tars(files)) or any(
        f.name.endswith(".tar") and _field_and_shard(f.name)[1] for f in files))


def members(tar: Path) -> tuple[dict[str, list | None], str | None]:
    """({cut id: [data offset, size, soundfile's info or why it is unreadable, the channel ids its manifest member
    lists or None], or None for a cut stored without audio}, why the tar stops early or None): one pass over the
    tar as a stream, one member in memory at a time. As lhotse's reader, the recording is the manifest member's
    (``ID.json``), not the cut file's."""
    import json

    import soundfile as sf

    found: dict[str, list | None] = {}
    try:
        for info, read in file_members(tar):
            name = Path(info.name)
            key = str(name.parent / name.stem)  # lhotse's: the member's name without its extension
            if name.suffix == ".nometa":
                continue
            if name.suffix == ".nodata":
                found[key] = None
                continue
            data = read()
            if name.suffix == ".json":  # the manifest of the data member before it
                try:
                    ids = json.loads(data.decode("utf-8")).get("channel_ids")
                except (ValueError, AttributeError, RecursionError):
                    ids = None
                if found.get(key) and isinstance(ids, list) and all(isinstance(i, int) for i in ids):
                    found[key][3] = ids
            else:
                try:
                    audio = sf.info(io.BytesIO(data))
                except (sf.LibsndfileError, RuntimeError) as e:
                    audio = f"{info.name}: {str(e)[:80]}"
                found[key] = [info.offset_data, info.size, audio, None]
    except TAR_ERRORS as e:
        return found, str(e)[:120]
    return found, None


def read_folder(folder: Path, part: str, base: Path, license: str) -> Iterator[Item]:
    """The rows of one Shar folder, its cuts read with lhotse's own deserializer (``lhotse_records.records``)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    cut_files = [p for p in files if is_cuts(p)]
    by_shard = {_field_and_shard(p.name)[1]: p for p in _recording_tars(files)}
    if not by_shard:
        raise FileNotFoundError(f"{folder}: lhotse Shar cuts ({cut_files[0].name}) with no recording tar beside them "
                                "(no audio stored: write it with to_shar(fields={'recording': 'flac'}))")
    others = sorted({_field_and_shard(p.name)[0] for p in files} - {"cuts", "recording"})
    if others:
        yield Note(f"{relpath(folder, base) if folder != base else folder.name}: Shar fields not read (only the "
                   f"recording's audio is): {', '.join(others)}")
    for cuts in progress(cut_files, desc=f"lhotse shar {part}", unit="shard"):
        shard = _field_and_shard(cuts.name)[1]
        tar = by_shard.get(shard)
        problem = None
        if tar is None:
            problem = ("missing tar", f"recording.{shard + '.' if shard else ''}tar, the audio of {cuts.name}, is not there")
        elif refused := outside(tar, base):
            problem = (refused.reason, refused.detail)
        elif kind := compressed(tar):
            problem = ("compressed tar", f"{tar.name}: {kind}: a row is read at its byte offset in the tar, which a "
                       "compressed file does not have; decompress it and shard again")
        stored, damage = ({}, None) if problem else members(tar)
        for item in records(cuts):
            if isinstance(item, Skip):
                yield item
                continue
            cut = item[1]
            where = f"{part}/{cuts.name}: cut {cut.id}"
            if problem:
                yield Skip(where, *problem)
                continue
            if cut.id not in stored:
                yield (Skip(where, "truncated or damaged tar", f"{tar.name}: {damage}") if damage else
                       Skip(where, "no audio member for the cut", f"{tar.name} holds no {cut.id}.*"))
                continue
            if stored[cut.id] is None:
                yield Skip(where, "cut without a recording", f"{tar.name}: {cut.id}.nodata")
                continue
            offset, size, info, ids = stored[cut.id]
            if isinstance(info, str):
                yield Skip(where, "unreadable audio", info)
                continue
            if ids is None:  # no manifest member: the cut file's recording, else the stored channels in order
                recording = getattr(cut, "recording", None)
                ids = list(recording.channel_ids) if recording is not None else list(range(info.channels))
            if info.channels != len(ids):
                yield Skip(where, "audio member's channels differ from its recording's",
                           f"{info.channels} channels stored, the recording lists {ids}")
                continue
            rel = relpath(tar, base)
            found = (info.frames / info.samplerate,
                     {c: (rel, i if info.channels > 1 else None, info.samplerate) for i, c in enumerate(ids)})
            row = cut_row(part, cut, found, license)
            yield row if isinstance(row, Skip) else {**row, "tar_offset": int(offset), "tar_size": int(size)}

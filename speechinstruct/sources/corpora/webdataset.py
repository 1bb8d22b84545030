"""WebDataset tar shards (corpus name ``webdataset``): ROOT is a shard pattern such as
``data/shard-{000000..000099}.tar`` (brace-expanded as webdataset expands it), one tar file, or a folder (every
``.tar`` under it, hidden folders left out as ``datasets`` leaves them: the Hub's ``validation/000000.tar`` layout).

A sample is the tar members that share a key (the member name up to the first dot of its file name, as
webdataset groups them): one audio member (``.flac``, ``.wav``, ``.mp3``, ``.ogg``, ``.opus``) and, for its text
and speaker, a ``.json`` (``text``/``transcript``/``sentence``, ``speaker``/``speaker_id``, ``language``; Emilia's
shards carry these) and/or a ``.txt``. Each tar is read once, as a stream, a sample at a time. The manifest row
records the tar (``path``, relative to the folder ROOT or to the folder of all the shards) and where the audio
member's bytes lie in it (``tar_offset``, ``tar_size``), so ``extract`` reads the audio without unpacking anything.
The split is read from the tar's name or its folders (``train-000.tar``, ``validation/000.tar``): below a folder
ROOT, or the tar's own folder for a pattern or one tar; train when none says. A license is required (a shard
carries none we could trust), unless a folder ROOT holds a dataset card (``README.md``) naming one.

A sample without audio, audio libsndfile cannot read, and a truncated tar (the rest of that tar cannot be read)
are skipped with the tar and the member named. A compressed tar (``.tar.gz``, ``.tar.bz2``, ``.tar.xz``,
``.tar.zst``, found by its first bytes) is skipped whole, counted: its rows could not be read back by offset.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

from ...io import files_under
from ...progress import progress
from .base import (SPEAKER_NAMES, TRANSCRIPT_NAMES, Item, Note, Skip, deepest_common_folder, outside, relpath, split_of,
                   split_word)

NAME = "webdataset"
AUDIO = (".flac", ".wav", ".mp3", ".ogg", ".opus")


def tar_files(root: str | Path) -> list[Path]:
    """The tar files under a folder (in order of their paths; none in a folder or file whose name starts with ``.``
    or ``__``, which ``datasets`` leaves out too), or those a pattern names (brace expansion), or one tar file, in
    order; those that exist."""
    from braceexpand import braceexpand

    folder = Path(root)
    if folder.is_dir():  # listed as every corpus reader lists a folder: linked folders followed once, hidden ones not
        return [path for rel, path in files_under(folder) if rel.endswith(".tar")
                and not any(part.startswith("__") for part in Path(rel).parts)]
    return [Path(p) for p in braceexpand(str(root)) if Path(p).is_file()]


def audio_root(root: str | Path, **_) -> Path:
    """Manifest paths are relative to this: a folder ROOT itself, else the deepest folder holding every shard."""
    return Path(root) if Path(root).is_dir() else _shards_folder(tar_files(root))


def _shards_folder(tars: list[Path]) -> Path:
    return deepest_common_folder(tars, tars[0].parent if tars else Path("."))


# webdataset's own rules (tariterators): a member's key is its name up to the first dot of the file name, and
# no sample is made of names without one (README, ._a.flac: macOS's AppleDouble files) or of its __meta__ files
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")


def _key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, as webdataset splits it: at the first dot of the file name; None for a
    member webdataset takes no sample from."""
    found = _KEY.match(name)
    if found is None or _META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    return found.group(1), "." + found.group(2).lower()


def _split_part(tar: Path, base: Path, folder_root: bool) -> str:
    """The corpus part a tar belongs to: the split word its name starts with, else the nearest of its folders below
    ``base`` that says one (for a pattern or one tar, ``folder_root`` False, its own folder even where that folder
    is ``base``), else train. A folder ROOT's own name is not read: ``datasets`` matches its split patterns below the
    root too."""
    folders = tar.relative_to(base).parts[:-1]
    if not folder_root and not folders:
        folders = (tar.parent.name,)
    for name in (tar.stem.split("-")[0], tar.stem, *reversed(folders)):
        if split_word(name) is not None:
            return name
    return "train"


MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def compressed(tar: Path) -> str | None:
    """The compression of a tar file (``.tar.gz`` and the like), by its first bytes; None for a plain tar."""
    with open(tar, "rb") as f:
        head = f.read(6)
    return next((name for magic, name in MAGIC.items() if head.startswith(magic)), None)


TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)  # a tar truncated or damaged


def file_members(tar: Path) -> Iterator[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
    """(member, a function reading its bytes) of each file in a tar, read as a stream: a member's bytes can be read
    until the next member is taken, one member in memory at a time. Reading a member cut short raises
    ``tarfile.ReadError``; a damaged tar raises one of :data:`TAR_ERRORS`."""
    with tarfile.open(tar, "r|*") as stream:
        for info in stream:
            if not info.isfile():
                continue

            def read(info=info) -> bytes:
                handle = stream.extractfile(info)
                data = handle.read() if handle is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} is cut short ({len(data)} of {info.size} bytes)")
                return data

            yield info, read


def samples(tar: Path, ignored: list[tuple[str, str]] | None = None,
            name: str | None = None) -> Iterator[tuple[str, dict[str, tuple[int, int, bytes | None]]] | Skip]:
    """(key, {extension: (data offset, size, bytes)}) per sample of one tar, read as a stream (one sample's
    members in memory at a time); a Skip for a sample holding one extension twice, and when the tar is truncated
    or damaged (and no more samples of it). Members webdataset takes no sample from are added to ``ignored``.
    ``name``: the tar's, in skips (its file name by default)."""
    name = name or tar.name
    current, members, twice = None, {}, None

    def done():
        return Skip(f"{name}: {current}", "member twice in one sample", twice) if twice else (current, members)

    try:
        for info, read in file_members(tar):
            found = _key(info.name)
            if found is None:
                if ignored is not None:
                    ignored.append((name, info.name))
                continue
            key, ext = found
            if key != current and current is not None:
                yield done()
                members, twice = {}, None
            current = key
            data = read()
            if ext in members:  # webdataset: "duplicate file name", and its stream stops
                twice = twice or info.name
            members[ext] = (info.offset_data, info.size, data)
    except TAR_ERRORS as e:
        yield Skip(name, "truncated or damaged tar", f"after {current or 'the start'}: {str(e)[:120]}")
        return
    if current is not None:
        yield done()


def _row(key: str, members: dict, tar: Path, base: Path, part: str, license: str) -> Item:
    import soundfile as sf

    where = f"{relpath(tar, base)}: {key}"
    audio_ext = next((ext for ext in members if "." + ext.rsplit(".", 1)[-1] in AUDIO), None)  # .flac, .speech.flac
    if audio_ext is None:
        return Skip(where, "sample without audio", ", ".join(sorted(members)) or "no members")
    offset, size, data = members[audio_ext]
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError) as e:
        return Skip(where, "unreadable audio", f"{audio_ext}: {str(e)[:80]}")
    meta = {}
    if ".json" in members:
        try:
            meta = json.loads(members[".json"][2].decode("utf-8"))
            meta = meta if isinstance(meta, dict) else {}
        except (UnicodeDecodeError, ValueError, RecursionError):
            return Skip(where, "unreadable .json", "not a UTF-8 JSON object")
    text = next((meta[k] for k in TRANSCRIPT_NAMES if isinstance(meta.get(k), str)), None)
    if text is None and ".txt" in members:
        text = members[".txt"][2].decode("utf-8", "replace")
    # a name or a number, as a transcript is text: an object or a list under such a key is passed over
    speaker = next((str(meta[k]) for k in SPEAKER_NAMES if isinstance(meta.get(k), (str, int, float))
                    and not isinstance(meta[k], bool) and str(meta[k]).strip()), "unknown")
    return {
        "id": f"{NAME}/{Path(relpath(tar, base)).with_suffix('')}/{key}",
        "path": relpath(tar, base),
        "offset": 0.0,
        "duration": round(info.frames / info.samplerate, 6),
        "sample_rate": int(info.samplerate),
        "text": " ".join(text.split()) if text and text.strip() else None,
        "speaker": speaker,
        "corpus": NAME,
        "license": license,
        "split": split_of(part),
        "corpus_split": part,
        "tar_offset": int(offset),
        "tar_size": int(size),
    }


def card_languages(root: str | Path, **_) -> list[str]:
    """The languages a folder ROOT's dataset card (``README.md``, as the Hub keeps one beside the tars) names."""
    from .hf import card_languages as of_card

    return of_card(root) if Path(root).is_dir() else []


def read(root: str | Path, audio_root: str | Path | None = None, license: str | None = None) -> Iterator[Item]:
    folder_root = Path(root).is_dir()
    if not license and folder_root:  # the Hub's WebDataset repos keep a card beside the tars: its license, said
        from .hf import card_license

        if license := card_license(Path(root)):
            yield Note(f"license {license!r}: the dataset card's (README.md)")
    if not license:
        raise ValueError(f"{root}: shard webdataset needs --license: the license of these shards (we will not guess "
                         "one; a folder's dataset card, README.md, would name it)")
    tars = tar_files(root)
    if not tars:
        raise FileNotFoundError(f"{root}: no tar files match")
    base = (Path(audio_root) if audio_root else Path(root) if folder_root else _shards_folder(tars)).resolve()
    ignored: list[tuple[str, str]] = []
    for tar in progress(tars, desc="webdataset shards", unit="tar"):
        # under ``base`` as listed (a link in a folder ROOT stays a link, for ``outside`` to judge); a pattern's tar
        # with its folders resolved as ``base`` is, not a link the tar itself is
        tar = base / tar.relative_to(root) if folder_root else tar.parent.resolve() / tar.name
        name = relpath(tar, base)
        if folder_root and (refused := outside(tar, base)):  # a tar named in a pattern is read where it lies
            yield refused
            continue
        compression = compressed(tar)
        if compression:
            yield Skip(name, "compressed tar", f"{compression}: a row is read later at its byte offset in the tar, "
                       f"which a compressed file does not have; decompress it (e.g. `gunzip`) and shard again")
            continue
        part = _split_part(tar, base, folder_root)
        for sample in samples(tar, ignored, name):
            yield sample if isinstance(sample, Skip) else _row(*sample, tar, base, part, license)
    if ignored:  # a few of them, by tar
        by_tar: dict[str, list[str]] = {}
        for tar_name, name in ignored[:3]:
            by_tar.setdefault(tar_name, []).append(name)
        yield Note(f"{len(ignored)} tar member{'s' if len(ignored) != 1 else ''} that webdataset takes no sample from "
                   "(its __meta__ files, names without a key such as ._a.flac or README), left out: "
                   + "; ".join(f"{t}: {', '.join(names)}" for t, names in by_tar.items()) + (" …" if len(ignored) > 3 else ""))

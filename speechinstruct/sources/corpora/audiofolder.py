"""Hugging Face ``audiofolder`` datasets: audio files with a metadata file beside them, the layout the ``datasets``
docs teach for making an audio dataset, and how many Hub audio repos are kept::

    my_dataset/README.md
    my_dataset/train/metadata.csv        file_name,transcription,speaker
    my_dataset/train/a.wav               a.wav,hello there,s1
    my_dataset/train/sub/b.flac          sub/b.flac,good morning,s2
    my_dataset/test/metadata.jsonl       {"file_name": "c.wav", "transcription": "bye", "speaker": "s3"}
    my_dataset/test/c.wav

Read as ``datasets.load_dataset("audiofolder", data_dir=…)`` reads it (``datasets``' folder-based builder, whose rules
are copied here). The splits are those ``datasets`` finds (``hf.split_files``: its own split patterns, ``train/``,
``data/validation/``, ``test_clean/``, ``train-00000-of-00001.wav``, else all ``train``; or the card config's
``data_files``). Each ``metadata.csv``/``.jsonl``/``.parquet`` (one kind in a dataset) names its split's audio by
``file_name`` (or ``<column>_file_name``), relative to the metadata file's folder; the other columns are the
transcript, speaker and id columns. Audio files no metadata file names are left out, as ``datasets`` leaves them (counted in a note); a
split without a metadata file gives its audio files without transcripts.

Where ``datasets`` fails the whole dataset, one row is a counted skip naming the metadata file and row: a
``file_name`` that is absolute, a URL, climbs out of its folder, is missing or is not audio. Transcripts are read as
text (``007`` stays ``007``, ``NA`` stays ``NA``; pandas would make them 7 and missing); only an empty cell is no
transcript. The rows are files, as LibriSpeech's are: ``extract`` reads each by its path."""

from __future__ import annotations

import functools
import os
import posixpath
from pathlib import Path, PurePosixPath
from typing import Iterator

from ...io import parse_json_object
from ...progress import progress
from .base import Item, Note, Skip, cells_text, outside, probe, split_of


@functools.cache
def _lists() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``datasets``' own lists: the audio file extensions its audiofolder reads, and the metadata files' names."""
    from datasets.packaged_modules.audiofolder.audiofolder import AudioFolder

    return tuple(AudioFolder.EXTENSIONS), tuple(AudioFolder.METADATA_FILENAMES)


def kind(name: str) -> str | None:
    """metadata, audio, table (Parquet/Arrow data) or shards (WebDataset tars) for a file's name, as ``datasets``
    sorts data files; None else."""
    extensions, metadata = _lists()
    base = name.rsplit("/", 1)[-1]
    if base in metadata:
        return "metadata"
    suffixes = [s.lower() for s in PurePosixPath(base).suffixes[-2:]]  # a.wav, a.wav.gz (datasets' two suffixes)
    if any(s in extensions for s in suffixes):
        return "audio"
    if suffixes and suffixes[-1] in (".parquet", ".arrow"):
        return "table"
    return "shards" if suffixes and suffixes[-1] == ".tar" else None


def read(root: Path, splits: dict[str, list[tuple[str, Path]]], name: str, license: str, audio_column: str,
         text_column: str, id_column: str | None, speaker_column: str | None) -> Iterator[Item]:
    """Manifest rows of an audiofolder's ``splits`` (``hf.split_files``: each one's audio and metadata files), with
    ``name`` as the corpus."""
    kinds = {Path(rel).suffix for files in splits.values() for rel, _ in files if kind(rel) == "metadata"}
    if len(kinds) > 1:  # datasets refuses them too ("Found metadata files with different extensions")
        raise ValueError(f"{root}: metadata files of different kinds ({', '.join(sorted(kinds))}); an audiofolder "
                         "dataset keeps one kind (metadata.csv, metadata.jsonl or metadata.parquet)")
    keys = ["file_name", "audio_file_name"] if audio_column == "audio" else [f"{audio_column}_file_name"]
    with progress(desc=f"hf {name}", unit="row") as bar:
        for split, files in splits.items():
            audio = {rel for rel, _ in files if kind(rel) == "audio"}
            metadata = [(rel, path) for rel, path in files if kind(rel) == "metadata"]
            named: set[str] = set()
            context = dict(root=root, split=split, name=name, license=license, id_column=id_column,
                           text_column=text_column, speaker_column=speaker_column)
            if not metadata:
                yield Note(f"split {split}: no metadata file (metadata.csv, .jsonl or .parquet): its {len(audio)} "
                           "audio files are read without transcripts")
                for rel in sorted(audio):
                    bar.update()
                    yield _row(rel, None, rel, **context)
                continue
            for meta_rel, meta_path in metadata:
                for where, record in _records(root, meta_path, meta_rel, keys, [id_column, text_column, speaker_column]):
                    bar.update()
                    if isinstance(record, Skip):
                        yield record
                        continue
                    key = next((k for k in keys if k in record), keys[0])
                    rel, problem = _audio_name(record.get(key), posixpath.dirname(meta_rel))
                    if problem:
                        yield Skip(where, "not an audio file name", f"{key} {record.get(key)!r}: {problem}")
                        continue
                    named.add(rel)
                    yield _row(rel, record, where, **context)
            if left := len(audio - named):
                yield Note(f"split {split}: {left} audio file{'s' if left != 1 else ''} named by no metadata file, "
                           "left out (as datasets' audiofolder leaves them)")


def _audio_name(value, folder: str) -> tuple[str, str | None]:
    """(the audio file's name relative to ROOT, None) for a metadata ``file_name`` relative to its metadata file's
    ``folder``, or ("", why it is refused). As ``datasets`` takes it: backslashes are slashes, the name normalised;
    absolute names, URLs and names that climb out of the folder are refused."""
    if not isinstance(value, str) or not value.strip():
        return "", "not a file name"
    if "\x00" in value:
        return "", "holds a NUL character"
    if "://" in value:
        return "", "a URL: names are relative to the metadata file's folder"
    name = os.path.normpath(value).replace("\\", "/")
    if os.path.isabs(value) or os.path.isabs(name) or name == ".." or name.startswith("../"):
        return "", "absolute, or climbs out of the metadata file's folder"
    return posixpath.normpath(posixpath.join(folder, name)), None


def _columns(path: Path) -> list[str]:
    """A metadata file's column names: the CSV header, the Parquet schema, the first JSON line's keys."""
    if path.suffix == ".csv":
        import pandas as pd

        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).schema_arrow.names
    with open(path, encoding="utf-8-sig") as f:  # a BOM (Windows editors) is not JSON
        first = next((line for line in f if line.strip()), "{}")
    obj = parse_json_object(first)
    return list(obj) if isinstance(obj, dict) else []


def _records(root: Path, path: Path, rel: str, audio_keys: list[str], wanted: list[str | None]) -> Iterator[tuple[str, dict | Skip]]:
    """(where, record) of each row of a metadata file, or a Skip for a row (a JSON line) or the rest of a file that
    cannot be read. Columns the reader needs and the file lacks: one line naming them and the file's columns."""
    if refused := outside(path, root):  # another folder's metadata (a user's own table): not without --follow-links
        yield rel, refused
        return
    try:
        names = _columns(path)
    except (ValueError, OSError) as e:  # pandas' ParserError, pyarrow's ArrowInvalid, UnicodeDecodeError
        yield rel, Skip(rel, "unreadable metadata file", str(e))
        return
    missing = ([f"audio file name column {' or '.join(map(repr, audio_keys))}"] if not set(audio_keys) & set(names) else []) + \
        [f"column {c!r}" for c in wanted if c is not None and c not in names]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} (columns: {', '.join(names)}); "
                         "pick them with --audio-column/--text-column/--id-column/--speaker-column")
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8-sig") as f:  # a BOM (Windows editors) is not JSON
                for number, line in enumerate(f, 1):
                    if line.strip():
                        record = parse_json_object(line)
                        where = f"{rel} line {number}"
                        yield where, record if isinstance(record, dict) else Skip(where, "unreadable metadata line", record)
        elif path.suffix == ".csv":
            import pandas as pd

            number = 0  # every cell as text; only an empty cell is missing (pandas would read NA, null, 007 otherwise)
            for chunk in pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], chunksize=10_000):
                for record in chunk.to_dict("records"):
                    yield f"{rel} row {number}", record
                    number += 1
        else:
            import pyarrow.parquet as pq

            number = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    yield f"{rel} row {number}", record
                    number += 1
    except (ValueError, OSError) as e:
        yield rel, Skip(rel, "unreadable metadata file", f"{e} (the rows before it are read)")


def _row(rel: str, record: dict | None, where: str, root: Path, split: str, name: str, license: str,
         id_column: str | None, text_column: str, speaker_column: str | None) -> Item:
    probed = probe(root / rel, root)
    if isinstance(probed, Skip):  # named by a metadata row: say which
        return Skip(probed.path, probed.reason, "; ".join(filter(None, (probed.detail, where != rel and f"named by {where}"))))
    sr, seconds = probed
    cells = cells_text(record or {}, {"id": id_column, "text": text_column, "speaker": speaker_column}, where)
    if isinstance(cells, Skip):
        return cells
    return {
        "id": f"{name}/{cells['id'] or PurePosixPath(rel).with_suffix('').as_posix()}", "path": rel,
        "offset": 0.0, "duration": seconds, "sample_rate": sr, "text": cells["text"],
        "speaker": cells["speaker"] or "unknown", "corpus": name, "license": license, "split": split_of(split),
        "corpus_split": split,
    }

"""Crash-safe file output: everything is written under a temporary name, fsynced, then renamed.

A reader therefore sees a file either complete or not at all; a killed run leaves at most ``.*.tmp-*``
files behind, which the next run of the same stage (or of the same shard) deletes. Each temporary name
carries its writer's host and process id (``.NAME.tmp-HOST-PID-XXXX``), and only temporary files whose writer
is no longer alive are deleted (:func:`remove_stale_temps`): two runs on one folder never delete each other's
live files. Files get the usual
permissions (0666 less the umask, so 0644 by default), not ``mkstemp``'s private 0600: a dataset written on
a shared cluster is readable by those the umask lets read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

_UMASK = os.umask(0o022)  # read once at import (single-threaded then): os.umask can only be read by setting it
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_TEMP_OWNER = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[^-]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, pattern: str = ".*.tmp-*", recursive: bool = False) -> int:
    """Delete the temporary files under ``folder`` (matching ``pattern``) whose writer is dead: written on
    this host by a process that no longer runs, or named as releases before the owner was in the name did.
    A live writer's files, and those of another host (its processes cannot be seen from here), are kept."""
    folder, removed = Path(folder), 0
    for tmp in (folder.rglob(pattern) if recursive else folder.glob(pattern)):
        if not tmp.is_file():
            continue
        owner = _TEMP_OWNER.search(tmp.name)
        if owner:
            pid = int(owner["pid"])
            if owner["host"] != _HOST or pid == os.getpid() or _alive(pid):
                continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_HOST}-{os.getpid()}-", dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, FILE_MODE)  # writers that replace the file (pyarrow, soundfile) get the same mode
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a path's undecodable bytes): escaped as \udcff, read back the same
        text = json.dumps(obj, indent=2, ensure_ascii=True, sort_keys=True)
    write_text(path, text + "\n")


def write_parquet(path: str | os.PathLike, table: pa.Table, metadata: dict[bytes, bytes] | None = None) -> None:
    """``table`` into ``path`` atomically; ``metadata`` added to its schema's (``shardfiles.made_from``)."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with atomic_path(path) as tmp:
        # No statistics-dependent metadata besides the data: same rows give the same bytes.
        pq.write_table(table, tmp, compression="zstd")


class _Rows:
    """Collects rows and writes a row group each ``per_group`` rows."""

    def __init__(self, writer, to_table, per_group: int):
        self.writer, self.to_table, self.per_group, self.rows, self.count = writer, to_table, per_group, [], 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.per_group:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(self.to_table(self.rows))
            self.rows = []


@contextlib.contextmanager
def parquet_writer(path: str | os.PathLike, schema: pa.Schema,
                   metadata: dict[bytes, bytes] | None = None) -> Iterator[pq.ParquetWriter]:
    """A ``ParquetWriter`` (one row group per ``write_table``) on a temporary name, renamed onto ``path`` when
    the block ends, deleted if it fails; ``metadata`` added to the schema's (``shardfiles.made_from``)."""
    if metadata:
        schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        yield writer


# Rows the streaming readers and writers hold as Python dicts at a time: a stage's working set is bounded by
# this many rows, whatever the shard's size (python -m benchmarks --only memory measures it).
ROWS_AT_A_TIME = 256


@contextlib.contextmanager
def parquet_rows(path: str | os.PathLike, schema: pa.Schema, to_table, rows_per_group: int = ROWS_AT_A_TIME,
                 metadata: dict[bytes, bytes] | None = None) -> Iterator[_Rows]:
    """``sink.add(row)`` writes rows to ``path`` as they come, a row group at a time (``parquet_writer``):
    memory holds one row group, not the file. ``to_table`` turns a list of row dicts into a table of
    ``schema`` (``records.to_table``)."""
    with parquet_writer(path, schema, metadata) as writer:
        sink = _Rows(writer, to_table, rows_per_group)
        yield sink
        sink.flush()


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Name ``path`` in pyarrow's errors: a truncated or foreign Parquet/Arrow file otherwise says only
    "Parquet magic bytes not found in footer", naming no file."""
    try:
        yield
    except pa.ArrowException as e:
        raise ValueError(f"{path}: unreadable {Path(path).suffix.lstrip('.') or 'data'} file, truncated or not one "
                         f"({e}); rerun the stage that wrote it") from None


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """A whole Parquet file (``pq.read_table``), its path named in any error."""
    with naming(path):
        return pq.read_table(path, columns=columns)


def iter_rows(path: str | os.PathLike, batch_size: int = ROWS_AT_A_TIME, columns: list[str] | None = None) -> Iterator[dict]:
    """The rows of a Parquet file as dicts, one record batch in memory at a time."""
    with naming(path):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()


def read_text(path: str | os.PathLike) -> str:
    """A text file the user hands us (a recipe, a system prompt, a key), or one line naming it when it is not UTF-8
    (Python's own error names no file)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}: {e.reason})") from None


def read_yaml(path: str | os.PathLike, what: str):
    """A YAML file the user hands us (``what``: a recipe, training settings), or one line naming it: unreadable, not
    UTF-8, not YAML, or nested too deeply for PyYAML (which recurses; JSON is YAML too)."""
    import yaml

    try:
        return yaml.safe_load(read_text(path))
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: cannot read {what} ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: cannot read {what} (nested too deeply)") from None


def read_json(path: str | os.PathLike, kind: type = dict, hint: str = ""):
    """A JSON file that must hold a ``kind`` (dict or list); one line naming the file otherwise (``hint``: what
    to do about it, appended)."""
    names = {dict: "object", list: "array"}
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}){hint}") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply){hint}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: must be a JSON {names.get(kind, kind.__name__)}, got {type(value).__name__}{hint}")
    return value


def claim_outputs(out: str | os.PathLike, stage: str, names: str, legacy: bool = False) -> None:
    """Before a command writes its files into ``out``: one line (FileExistsError) when a file there whose path
    (relative to ``out``) matches the regular expression ``names`` was not written by ``stage``, else the claim that
    every such file is ``stage``'s, ``out/.speechinstruct-{stage}.json``, written only when none was someone else's.
    ``legacy``: ``out`` holds what an earlier version of ``stage`` wrote (it kept no claim): those files are its own.
    The user's other files in ``out`` are never touched."""
    from . import __version__

    out, pattern = Path(out), re.compile(names)
    claim = out / f".speechinstruct-{stage}.json"
    if not claim.is_file() and not legacy and out.is_dir():
        for p in sorted(out.rglob("*")):
            if (p.is_file() or p.is_symlink()) and pattern.fullmatch(p.relative_to(out).as_posix()):
                raise FileExistsError(f"{p}: already there and not written by {stage}; move it away or {stage} into "
                                      f"another folder ({stage} never overwrites a file it did not write)")
    out.mkdir(parents=True, exist_ok=True)
    if not claim.is_file():
        write_json(claim, {"written_by": f"speechinstruct {__version__} {stage}",
                           "owns": f"every file whose path here matches {names}"})


def wrote_before(path: str | os.PathLike, keys: set[str]) -> bool:
    """``path`` (a JSON file, or a JSONL file's first line) is an object with every one of ``keys``: a stage's own
    file, by which :func:`claim_outputs` recognises a folder an earlier version wrote (it kept no claim)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        found = json.loads(text.partition("\n")[0] if path.suffix == ".jsonl" else text)
    except (OSError, ValueError, RecursionError):  # not there, not JSON, nested too deeply: not the stage's file
        return False
    return isinstance(found, dict) and keys <= found.keys()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class LinkOutOfRoot(ValueError):
    """A name inside a corpus root whose file is a link (or under one) that leads out of it."""


def safe_join(root: str | os.PathLike, relative: str, follow_links: bool = False) -> Path:
    """``root/relative`` (``root`` resolved) for a name from data (a manifest row, a metadata file, a listing):
    absolute names and names with a ``..`` part are refused, and so are links that lead out of ``root`` (but for a
    Hub cache snapshot's links into its repo's blobs: :func:`hub_cache_repo`) unless ``follow_links``: the
    corpus's owner said to read where its links lead (``shard --follow-links``), or the name was held to that
    rule when the corpus was sharded."""
    root = Path(root).resolve()
    if os.path.isabs(relative):
        raise ValueError(f"absolute path {relative!r} refused: paths must be relative to the corpus root {root}")
    if ".." in Path(relative).parts:
        raise ValueError(f"path {relative!r} leaves the corpus root {root}" if os.path.normpath(relative).startswith("..")
                         else f"path {relative!r} has a '..' part: names may not climb (corpus root {root})")
    try:
        candidate = (root / relative).resolve()
    except (RuntimeError, OSError) as e:  # Python < 3.13 raises RuntimeError on a symlink loop
        raise ValueError(f"path {relative!r} cannot be resolved (symlink loop?): {e}") from None
    if not follow_links:
        repo = hub_cache_repo(root)
        inside = [root, *([repo / "blobs"] if repo else [])]
        if not any(candidate == folder or folder in candidate.parents for folder in inside):
            raise LinkOutOfRoot(f"path {relative!r} leaves the corpus root {root} through a link (to {candidate}); "
                                f"shard --follow-links (a recipe: the corpus's options.follow_links: true) reads where "
                                "the corpus's links lead")
    return root / relative  # by its own name: a link's target may be named for its content alone (the Hub's blobs)


def hub_snapshot(path) -> tuple[Path, str, str, str, str] | None:
    """(repo folder, repo type, repo id, commit, file name or "") where ``path`` lies in a snapshot of
    huggingface_hub's cache (``…/datasets--owner--name/snapshots/COMMIT/FILE``: ``shard hf owner/name``), else None.
    Read from the path alone: the machine asking may hold none of it."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, 0, -1):
        kind, _, repo = parts[i - 1].partition("--")
        if parts[i] == "snapshots" and kind in ("datasets", "models", "spaces") and repo:
            return Path(*parts[:i]), kind[:-1], repo.replace("--", "/"), parts[i + 1], "/".join(parts[i + 2:])
    return None


def hub_cache_repo(root: Path) -> Path | None:
    """The Hugging Face Hub cache's repo folder (``…/datasets--owner--name``) when ``root`` (resolved) lies in one of
    its ``snapshots``, where huggingface_hub links every file to ``../../blobs/<hash>`` (``shard hf owner/name``)."""
    found = hub_snapshot(root)
    return found[0] if found and (found[0] / "blobs").is_dir() else None


def installed_file(package: str, *parts: str) -> Path | None:
    """A file inside an installed package, found without importing the package (silero_vad's import loads
    torchaudio; resemblyzer's, webrtcvad), or None when the package or the file is not there."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_file() else None


def parse_json_object(text: str) -> dict | str:
    """One JSON object from untrusted text, or the reason it is none: malformed, nested too deeply for Python's
    parser (100,000 ``[``), not an object, or holding a lone surrogate (``"\\ud800"``, which no UTF-8 file can
    hold)."""
    try:
        obj = json.loads(text)
    except RecursionError:
        return "malformed JSON (nested too deeply)"
    except ValueError as e:
        return f"malformed JSON ({e})"
    if not isinstance(obj, dict):
        return "malformed JSON (not an object)"
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "not valid Unicode (a lone surrogate, such as \\ud800)"
    except RecursionError:
        return "malformed JSON (nested too deeply)"
    return obj


# ------------------------------------------------------------------------------- the state of input files
def files_state(*paths: str | Path) -> str:
    """What a run's stamps take for the state of input files and folders (a corpus, an evaluation set, a model
    folder): the sha256 of the path (relative to its root), size and modification time of each file under each
    of ``paths``, in name order. Linked folders are followed, each once; files and folders whose names start with a
    dot (``.DS_Store``, ``.cache``) are left out. A file added, removed or written again (even to the same size)
    changes it; where the paths are (a corpus moved with its times) does not."""
    digest = hashlib.sha256()
    for number, top in enumerate(map(Path, paths)):
        digest.update(f"root {number}\n".encode())
        for name, path in (files_under(top) if top.is_dir() else [(top.name, top)]):
            try:
                stat = path.stat()
            except OSError:  # a link to nothing, or gone since the listing: the stage that reads it says so
                continue
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def files_under(top: Path) -> list[tuple[str, Path]]:
    """(path relative to ``top``, path) of every file under ``top`` in name order, hidden ones left out, linked
    folders followed once each (a link back up is not a loop): what the corpus readers list, and what a run's
    corpus state holds."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(top, followlinks=True):
        try:
            stat = os.stat(folder)
        except OSError:  # removed since it was listed (a download under way)
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [(os.path.relpath(os.path.join(folder, f), top), Path(folder, f)) for f in sorted(files)
                  if not f.startswith(".")]
    return found

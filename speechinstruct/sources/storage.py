"""Inputs in object storage: ``s3://``, ``gs://``, ``hf://`` (any fsspec URL) as a local copy, downloaded once.

Every source and stage input may be a URL. :func:`local` turns one into a folder or file in the cache
(``$SPEECHINSTRUCT_CACHE``, default ``~/.cache/speechinstruct/remote``), laid out as the bucket is
(``s3://corpus/LibriSpeech/dev-clean/…`` → ``CACHE/s3/corpus/LibriSpeech/dev-clean/…``), so that every corpus
reader and stage reads it as it reads a local folder. A rerun lists the URL again and downloads only what is new
or changed there (size and version: S3's ETag, the Hub's blob id), and removes from the copy what is gone
from the URL, so the copy never holds a file the source does not (what was fetched is recorded outside the
copy, under ``CACHE/.index``). Each file is written under a temporary name and renamed when complete: a killed
download leaves no half file that a rerun would take as whole. Processes given one URL at once (job-array
tasks) copy it one at a time, so the later ones find the files there.

fsspec does the talking (s3fs for S3, gcsfs for Google Cloud Storage, huggingface_hub for ``hf://``), and those
libraries find the credentials themselves, in the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``AWS_ENDPOINT_URL_S3`` for MinIO or R2; ``GOOGLE_APPLICATION_CREDENTIALS``; ``HF_TOKEN``).
We never take credentials as arguments, refuse URLs that carry them, and never write them anywhere.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

CACHE_ENV = "SPEECHINSTRUCT_CACHE"
INDEX = ".index"  # CACHE/.index/PROTOCOL/BUCKET/KEY/index.json: relative path → [size, version] of each file
_URL = re.compile(r"^(?P<protocol>[a-z][a-z0-9+.-]*)://", re.IGNORECASE)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
_DOWNLOADS_AT_ONCE = 8
log = logging.getLogger(__name__)


class StorageError(ValueError):
    """A URL that cannot be read; the message names it and says what to do. ``may_pass``: the storage failed
    for a while (:func:`may_pass`), so that a rerun may read it."""

    def __init__(self, message: str, may_pass: bool = False):
        super().__init__(message)
        self.may_pass = may_pass


# what storage says when it fails for a while: an I/O error of a network file system (NFS, a FUSE mount of a
# bucket) or one s3fs makes of a server's 500 (EREMOTEIO) or 503/SlowDown (EBUSY); a stale handle, a timeout,
# a refused or reset connection
_PASSING = {errno.EIO, errno.EREMOTEIO, errno.EBUSY, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE,
            errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH,
            errno.ENETRESET, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENOTCONN, errno.ENOLINK, errno.ECOMM}


def may_pass(e: BaseException) -> bool:
    """Whether ``e`` says that storage or the network failed for a while rather than that what was read is
    missing or bad: reading it again later may work, so a stage does again what it stopped."""
    if isinstance(e, StorageError):
        return e.may_pass
    return isinstance(e, (ConnectionError, TimeoutError)) or (isinstance(e, OSError) and e.errno in _PASSING)


def is_hub_id(value) -> bool:
    """Whether ``value`` has the shape of a Hugging Face Hub repo id, ``owner/name`` (what a path that does not
    exist may be instead)."""
    return bool(_HUB_ID.fullmatch(str(value)))


def is_url(path) -> bool:
    """Whether ``path`` names a remote file or folder (``s3://…``); local paths and ``file://`` are not."""
    found = _URL.match(str(path))
    return bool(found) and found["protocol"].lower() != "file"


def in_object_storage(path) -> bool:
    """Whether ``path`` is a URL of object storage (``s3://``, ``gs://``, ``hf://``, Azure), not a web page."""
    found = _URL.match(str(path))
    return bool(found) and found["protocol"].lower() in {*_PACKAGES, "hf"}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "speechinstruct" / "remote")


@dataclass(frozen=True)
class Copy:
    """What :func:`mirror` did: the local copy, and how much of it came over the network this time."""

    path: Path
    files: int
    size: int
    downloaded: int
    downloaded_bytes: int
    removed: int
    refused: tuple[str, ...] = ()  # listed names that would land outside the copy (``..``): never written


def local(path):
    """``path`` itself when local (a ``Path`` when given one), else the local copy of the URL (a ``Path``)."""
    if not is_url(path):
        return path
    return mirror(str(path)).path


def local_pattern(pattern: str) -> str:
    """A brace pattern of remote files (``s3://b/shard-{000..009}.tar``) as the same pattern in the cache, each
    file it names copied there (those that exist: a pattern's missing names are the reader's to report)."""
    from braceexpand import braceexpand

    if not is_url(pattern):
        return pattern
    urls = list(braceexpand(pattern))
    copied = local_files(urls)
    for url in urls:  # gone from the bucket: an older copy must not be read as if it were there
        if url not in copied:
            cache_path(url).unlink(missing_ok=True)
    return str(cache_path(pattern))


def mirror(url: str) -> Copy:
    """Copy the file or folder at ``url`` into the cache, fetching only files that are new or changed there."""
    fs, remote = _filesystem(url)
    target = _cache_path(fs, url)
    try:
        if fs.isfile(remote):  # one file: it is kept in its folder's copy, under its name
            folder, base, entries = target.parent, url.rsplit("/", 1)[0], {target.name: fs.info(remote)}
            sources, refused = {target.name: remote}, ()
        else:
            folder, base = target, url.rstrip("/")
            listed = {_relative(name, remote): info for name, info in fs.find(remote, detail=True).items()
                      if info.get("type", "file") == "file"}
            entries = {rel: info for rel, info in listed.items() if _safe_name(rel)}
            refused = tuple(sorted(rel for rel in listed if rel not in entries))
            sources = {rel: f"{remote.rstrip('/')}/{rel}" for rel in entries}
    except Exception as e:
        raise explain(e, url) from None
    if not entries and not refused:
        raise StorageError(f"{url}: no such file or folder (nothing is stored under this name)")
    for rel in refused:
        log.warning("%s/%s: skipped: a name that would be written outside the copy ('..', '.' or an empty part)",
                    redacted(url), rel)
    # ``base``: the URL of ``folder``
    copy = _update(fs, base, folder, sources, entries, whole_folder=folder == target)
    return replace(copy, path=target, refused=refused)


def _safe_name(rel: str) -> bool:
    """Whether a listed name, relative to its folder, stays inside that folder's copy: no ``..`` or ``.`` part,
    no empty part (``a//b``, a leading ``/``), no backslash (a separator on some systems), no NUL."""
    parts = rel.split("/")
    return bool(rel) and all(p not in ("", ".", "..") for p in parts) and "\\" not in rel and "\0" not in rel


def local_files(urls) -> dict[str, Path]:
    """The local copies of remote files (lhotse's ``url`` audio sources), each fetched once: {url: path}. A URL
    with nothing stored at it is left out (the caller's to report); any other failure is one StorageError."""
    groups: dict[tuple, dict[str, tuple[str, str]]] = {}  # (filesystem, folder) → {name: (url, remote path)}
    for url in dict.fromkeys(urls):
        fs, remote = _filesystem(url)
        target = _cache_path(fs, url)
        groups.setdefault((fs, target.parent), {})[target.name] = (url, remote)
    copies = {}
    for (fs, folder), files in groups.items():
        with ThreadPoolExecutor(_DOWNLOADS_AT_ONCE) as pool:
            infos = dict(zip(files, pool.map(lambda item: _info_or_none(fs, *item), files.values())))
        present = {name: info for name, info in infos.items() if info is not None}
        if present:
            base = files[next(iter(present))][0].rsplit("/", 1)[0]  # the URL of ``folder``
            _update(fs, base, folder, {n: files[n][1] for n in present}, present, whole_folder=False)
        copies.update({files[name][0]: folder / name for name in present})
    return copies


def _info_or_none(fs, url: str, remote: str) -> dict | None:
    try:
        return fs.info(remote)
    except FileNotFoundError:
        return None
    except Exception as e:
        raise explain(e, url) from None


def _update(fs, url: str, folder: Path, sources: dict, entries: dict, whole_folder: bool) -> Copy:
    """Bring the copy at ``folder`` (of the folder at ``url``) up to ``entries`` (relative path → the listing's
    info), fetching ``sources[path]``; with ``whole_folder``, also delete what ``entries`` no longer lists. What the copy holds
    is recorded outside it (the copy holds the source's files and nothing else), with paths relative to
    ``folder``, so that a file's copy and its folder's agree; one process at a time per folder (job-array tasks
    given one URL), so the others then find the files there."""
    index_file = cache_root() / INDEX / folder.relative_to(cache_root()) / "index.json"
    index_file.parent.mkdir(parents=True, exist_ok=True)
    with open(index_file.with_name("lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch(fs, url, folder, sources, entries, index_file, whole_folder)


def _fetch(fs, url: str, folder: Path, sources: dict, entries: dict, index_file: Path,
           whole_folder: bool) -> Copy:
    from ..io import atomic_path, remove_stale_temps, write_json
    from ..progress import progress

    index = _read_index(index_file)
    wanted = {rel: [int(info.get("size") or 0), _version(info)] for rel, info in entries.items()}
    todo = [rel for rel, state in wanted.items() if index.get(rel) != state or not _whole(folder / rel, state[0])]
    if folder.is_dir():  # a killed run's half files (a live writer's are kept)
        remove_stale_temps(folder, recursive=whole_folder)
    removed = 0
    if whole_folder:  # drop what the URL no longer holds
        removed = _remove_gone(folder, set(wanted))
        index = {rel: state for rel, state in index.items() if rel in wanted}

    def fetch(rel: str) -> str:
        if not (folder / rel).resolve().is_relative_to(folder.resolve()):  # _safe_name's promise, kept here too
            raise StorageError(f"{rel}: would be written outside {folder}; refused")
        with atomic_path(folder / rel) as tmp:
            fs.get_file(sources[rel], str(tmp))
        return rel

    size = sum(wanted[rel][0] for rel in todo)
    with progress(total=size, unit="B", unit_scale=True, desc=f"download {redacted(url)}/", disable=not todo) as bar:
        failed = None
        with ThreadPoolExecutor(_DOWNLOADS_AT_ONCE) as pool:
            pending = {pool.submit(fetch, rel): rel for rel in todo}
            for done in as_completed(pending):
                try:
                    rel = done.result()
                except Exception as e:  # the others still finish, and are kept for the rerun
                    failed = failed or (e, f"{url}/{pending[done]}")
                    continue
                index[rel] = wanted[rel]
                bar.update(wanted[rel][0])
        write_json(index_file, index)
    if failed:
        raise explain(*failed) from None
    return Copy(folder, len(wanted), sum(s for s, _ in wanted.values()), len(todo), size, removed)


def _filesystem(url: str):
    """(fsspec filesystem, path within it) for ``url``; one line when the protocol or its package is missing."""
    if "@" in url.split("://", 1)[1].split("/", 1)[0]:
        raise StorageError(f"{redacted(url)}: credentials in a URL are refused (they would be written into "
                           "manifests and logs); set them in the environment instead")
    import fsspec

    protocol = _URL.match(url)["protocol"].lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        package = _PACKAGES.get(protocol, f"the fsspec package for {protocol}://")
        raise StorageError(f"{url}: reading {protocol}:// needs {package} (pip install {package}): {e}") from None
    except ValueError as e:
        raise StorageError(f"{url}: {e}") from None


def _copy_parts(path: Path) -> tuple[str, ...] | None:
    """``path``'s parts under the cache (PROTOCOL, BUCKET, KEY...) when it lies in a bucket's copy there, else None."""
    try:
        parts = Path(path).resolve().relative_to(cache_root().resolve()).parts
    except ValueError:
        return None
    return parts if len(parts) >= 2 and parts[0] != INDEX else None


def in_a_copy(path: Path) -> bool:
    """Whether ``path`` lies in a bucket's copy in the cache, or in a snapshot of huggingface_hub's cache, so that
    what this machine lacks of it is fetched as it is read (:func:`fetch_copy`)."""
    from ..io import hub_snapshot

    return _copy_parts(path) is not None or hub_snapshot(path) is not None


def _url_of_copy(path) -> str | None:
    """The URL whose copy in the cache ``path`` is (PROTOCOL://BUCKET/KEY), None for a path outside the cache."""
    parts = _copy_parts(Path(path))
    return f"{parts[0]}://{'/'.join(parts[1:])}" if parts is not None and len(parts) >= 3 else None


def fetch_copy(path: Path) -> bool:
    """Fetch ``path``, a file of a copy in the cache that this machine lacks (a Ray node that did not make the
    copy, with the same cache path: the same user, or the same $SPEECHINSTRUCT_CACHE), from its URL; a file of a
    Hub cache snapshot, with huggingface_hub into the same place (the same ``HF_HUB_CACHE``). Whether it is here
    now; False too for a path outside both caches."""
    from ..io import hub_snapshot

    snapshot = hub_snapshot(path)
    if snapshot is not None and snapshot[4]:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        folder, kind, repo, commit, name = snapshot
        url = f"hf://{kind}s/{repo}@{commit}/{name}"
        try:
            hf_hub_download(repo, name, repo_type=kind, revision=commit, cache_dir=folder.parent)
        except LocalEntryNotFoundError as e:  # a FileNotFoundError, but it says the Hub could not be asked (down,
            # no connection, HF_HUB_OFFLINE), not that the file is gone: a rerun may read it
            raise StorageError(f"{url}: cannot reach the Hub ({e.__cause__ or e})", may_pass=True) from None
        except Exception as e:  # noqa: BLE001 (the Hub's other errors, each as one line: missing, refused)
            raise explain(e, url) from None
        return Path(path).is_file()
    url = _url_of_copy(path)
    return url is not None and bool(local_files([url])) and Path(path).is_file()


def fetch_copy_of(path):
    """``path`` as given; where it is a bucket's file or folder copied into the cache (a model, speaker references)
    that this machine lacks (a Ray node that did not make the copy), copied here from its URL first."""
    url = _url_of_copy(path)
    if url is not None and not Path(path).exists():
        mirror(url)
    return path


def cache_path(url: str) -> Path:
    """Where the copy of ``url`` is (or will be) in the cache; nothing is fetched."""
    fs, _ = _filesystem(url)
    return _cache_path(fs, url)


def _strip(fs, url: str) -> str:
    return fs._strip_protocol(url)


def _cache_path(fs, url: str) -> Path:
    """Where the copy of ``url`` lives: CACHE/PROTOCOL/BUCKET/KEY, refusing names that would leave the cache."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    parts = [p for p in _strip(fs, url).split("/") if p]
    if any(p in (".", "..") for p in parts) or not parts:
        raise StorageError(f"{url}: a URL with '.' or '..' parts, or without a bucket, cannot be copied")
    return cache_root() / protocol / Path(*parts)


def _relative(name: str, remote: str) -> str:
    return name[len(remote.rstrip("/")):].lstrip("/")


def _version(info: dict) -> str:
    """What changes when the stored file does: S3's ETag, GCS's md5, the Hub's blob id, else its time."""
    for key in ("ETag", "etag", "md5Hash", "blob_id", "VersionId", "LastModified", "updated", "mtime"):
        if info.get(key):
            return str(info[key])
    lfs = info.get("lfs") or {}
    return str(lfs.get("sha256", ""))


def _whole(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no copy yet, or an unreadable index: every file is fetched again
    return index if isinstance(index, dict) else {}


def _remove_gone(folder: Path, wanted: set[str]) -> int:
    """Delete the files of the copy that the URL no longer holds (so no reader sees a file the source lacks)."""
    if not folder.is_dir():
        return 0
    removed = 0
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and ".tmp-" not in path.name and rel not in wanted:
            path.unlink()
            removed += 1
    return removed


def redacted(url: str) -> str:
    """``url`` without a ``user:password@`` part, fit to be written down."""
    head, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{head}://{netloc.rpartition('@')[2]}{slash}{path}"


def explain(e: Exception, url: str) -> StorageError:
    """One line for a failed listing or download: missing, refused, unreachable, or no credentials."""
    name, text = type(e).__name__, str(e).strip() or type(e).__name__
    where = redacted(url)
    if isinstance(e, StorageError):
        return e
    if name == "NoCredentialsError":
        return StorageError(f"{where}: no credentials found: set them in the environment (for S3: "
                            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    if isinstance(e, PermissionError):
        return StorageError(f"{where}: access refused ({text}): check the credentials in the environment")
    if isinstance(e, FileNotFoundError):
        return StorageError(f"{where}: no such bucket, file or folder ({text})")
    if "connect" in name.lower() or "timeout" in name.lower() or isinstance(e, (ConnectionError, TimeoutError)):
        return StorageError(f"{where}: cannot reach the storage ({text})", may_pass=True)
    return StorageError(f"{where}: {name}: {text}", may_pass=may_pass(e))

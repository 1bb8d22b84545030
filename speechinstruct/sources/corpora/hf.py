"""Hugging Face audio datasets, read where they lie, without copying the audio.

Three local forms, as ``datasets`` and the Hub write them:
- Hub-style Parquet files: ``data/train-00000-of-00002.parquet``, ``validation-00000-of-00001.parquet`` or
  ``train/0000.parquet`` (the split is in the file or folder name); the audio column is
  ``struct<bytes: binary, path: string>`` holding the encoded file (flac, wav, mp3…), or only the path of a file
  inside the dataset's folder (``Dataset.to_parquet`` of audio cast from file names: :func:`_named_file`).
- A ``save_to_disk`` folder: ``dataset_dict.json`` with one folder per split, or one split's folder, each
  with ``data-00000-of-00001.arrow`` (Arrow IPC stream files), ``dataset_info.json`` and ``state.json``.
- An ``audiofolder``: audio files beside ``metadata.csv``/``.jsonl``/``.parquet`` (``audiofolder.py``).
Which files are whose split, and which of these forms a folder is, are decided as ``datasets`` decides them
(:func:`split_files`, :func:`builder`), and a card's ``configs`` pick a config's files (:func:`card_config`). A
dataset kept as WebDataset tars is one line naming ``shard webdataset``. A hub id (``owner/name``, at a
``revision``), or the URL of its repo or of a folder in it (``hf://datasets/owner/name[@rev][/folder]``:
:func:`remote_root`), is fetched first with ``huggingface_hub.snapshot_download`` (the card, then the files the
reader will take: :func:`local_folder`), for users with internet, and then read as a local folder.

Each manifest row points at its audio by ``path`` (the Parquet/Arrow file, relative to the dataset folder)
plus ``row`` and ``audio_column``; :func:`audio_bytes` reads those bytes back for ``extract``, one row group
(Parquet) or one memory-mapped file (Arrow) at a time (a cell naming a file: that file's ``path``). Bytes are
decoded with soundfile, not ``datasets``' ``Audio`` feature, which needs torchcodec. The license comes from the
dataset card (``README.md``'s YAML ``license``) when there is one.
"""

from __future__ import annotations

import collections
import glob
import io
import json
import os
import posixpath
import re
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from ...io import files_under, hub_cache_repo, read_json, safe_join
from ...progress import progress
from ..storage import is_hub_id
from ..decoding import audio_bytes, encoded_audio as _encoded  # noqa: F401 (audio_bytes: this module's API)
from .audiofolder import kind as file_kind, read as audiofolder_rows
from .base import (FOLLOW_LINKS, SPEAKER_NAMES, TRANSCRIPT_NAMES, Item, Note, Skip, cells_text, probe, relpath,
                   split_of)

NAME = "hf"


def read(root: str | Path, audio_column: str = "audio", text_column: str = "text", id_column: str | None = None,
         speaker_column: str | None = None, split: str | None = None, config: str | None = None,
         license: str | None = None, audio_root: str | None = None) -> Iterator[Item]:
    """Manifest rows of every split (or only ``split``, the dataset's own name such as ``validation``) of the
    card's config ``config`` (its default one when None; any files when the card names no configs); of one data
    file when ``root`` is one (:func:`audio_root`: its folder)."""
    root = Path(root).resolve()
    if root.is_file():
        yield from _read_one_file(root, audio_column, text_column, id_column, speaker_column, split, config, license)
        return
    license = license or card_license(root) or "unknown (no license in the dataset card)"
    name = dataset_name(root)
    chosen, folder, patterns = card_config(root, config)
    if chosen is not None and config is None:  # inferred: said in the shard summary
        yield Note(f"config {chosen!r}: the dataset card's default config")
    splits = split_files(root, folder, patterns)
    names = [rel for found in splits.values() for rel, _ in found]
    kept_as = builder(names)
    if kept_as == "webdataset":
        raise ValueError(webdataset_problem(str(folder), str(folder), names))
    if kept_as == "audiofolder":  # audio files beside metadata files
        if split is not None:
            splits = {split: splits[_known(root, split, splits)]}
        yield from audiofolder_rows(root, splits, name, license, audio_column, text_column, id_column, speaker_column)
        return
    if patterns is None:  # the files' names say the splits (split_files has matched them once: not again)
        files = data_files(folder, assigned={path: named for named, found in splits.items() for _, path in found})
        if left := [relpath(f, root) for split, f in files if split is None]:
            yield Note(f"{len(left)} Parquet file{'s' if len(left) != 1 else ''} that datasets' split patterns leave "
                       f"out (a second layout beside the one it reads), left out: {', '.join(left[:3])}"
                       + (" …" if len(left) > 3 else ""))
            files = [(split, f) for split, f in files if split is not None]
    else:
        files = [(named, _inside(root, rel, root)) for named, found in splits.items() for rel, _ in found
                 if file_kind(rel) == "table"]
        if not files:
            raise FileNotFoundError(f"{folder}: no Parquet files match the data_files of the card's config "
                                    f"({json.dumps(patterns)})")
    if split is not None:
        _known(root, split, [s for s, _ in files])
        files = [(s, f) for s, f in files if s == split]
    yield from _read_files(root, files, name, license, audio_column, text_column, id_column, speaker_column)


def _read_files(root: Path, files: list[tuple[str, Path]], name: str, license: str, audio_column: str,
                text_column: str, id_column: str | None, speaker_column: str | None) -> Iterator[Item]:
    """The rows of ``files`` ((split, Parquet or Arrow file) under ``root``), their columns found by :func:`_columns`
    and said in notes."""
    audio_column, text_column, speaker_column, said = _columns(files, audio_column, text_column, speaker_column)
    for note in said:
        yield Note(note)
    rows = sum(_parquet_rows(f) for _, f in files) or None  # for the progress bar (Arrow files: unknown)
    with progress(total=rows, desc=f"hf {name}", unit="row") as bar:
        for hf_split, path in files:
            for item in _read_file(root, path, hf_split, name, license, audio_column, text_column, id_column, speaker_column):
                bar.update()
                yield item


def audio_root(root: str | Path, **_) -> Path:
    """The folder the rows' paths are relative to: ROOT, or the folder of ROOT when it is one data file."""
    return Path(root).resolve().parent if Path(root).is_file() else Path(root)


def _read_one_file(file: Path, audio_column: str, text_column: str, id_column: str | None,
                   speaker_column: str | None, split: str | None, config: str | None, license: str | None) -> Iterator[Item]:
    """The rows of one Parquet (or ``save_to_disk`` Arrow) file, as its folder's dataset holding it alone: its split
    by its name and its folder's (:func:`parquet_splits`: ``test/0000.parquet``, ``data/test-clean.parquet``; a
    lone file ``datasets`` would call train whatever its name), the license of the card beside it or above."""
    folder = file.parent
    if file.suffix not in (".parquet", ".arrow"):
        raise ValueError(f"{file}: not a Parquet or Arrow file; `shard hf` reads a dataset's folder, or one of its "
                         "Parquet files")
    if config is not None:
        raise ValueError(f"{file}: one data file has no configs; --config picks among a dataset folder's")
    named = f"{folder.name}/{file.name}"
    hf_split = parquet_splits([named]).get(named, "train")
    if split is not None:
        _known(file, split, [hf_split])
    card = next((f for f in (folder, folder.parent) if (f / "README.md").is_file()), folder)
    license = license or card_license(card) or "unknown (no license in the dataset card)"
    yield from _read_files(folder, [(hf_split, file)], dataset_name(folder), license, audio_column, text_column,
                           id_column, speaker_column)


def card_config(root: Path, config: str | None, folders: set[str] | None = None) -> tuple[str | None, Path, dict[str, list[str]] | None]:
    """The name, folder and ``{split: patterns}`` of the dataset card's config ``config`` (its default config when
    None), as ``datasets.load_dataset(ROOT, config)`` takes them from the card's ``configs``: ``data_files``
    relative to ``data_dir``. No patterns when the config names only a folder, or the card names no configs:
    then the files' names say the splits. A config to pick, and none given: one line naming them. Where the card
    names no configs, ``config`` is a top folder of ROOT's (``folders``; by default those ROOT has), as the Hub's
    Parquet conversion keeps one folder per config."""
    from datasets.data_files import sanitize_patterns
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    card = root / "README.md"
    try:
        configs = MetadataConfigs.from_dataset_card_data(DatasetCardData(**_card(root)))
        default = configs.get_default_config_name()
    except (ValueError, TypeError, KeyError) as e:  # datasets' own checks of the YAML, or a malformed field
        raise ValueError(f"{card}: its configs cannot be read: {str(e).strip().splitlines()[0]}") from None
    if not configs:
        folders = folders if folders is not None else {p.name for p in root.iterdir() if p.is_dir()}
        if config is not None and config not in folders:
            raise ValueError(f"{root}: no config {config!r}: the dataset card names no configs, and there is no "
                             f"folder {config!r} (a config's, as the Hub's Parquet conversion keeps them)")
        return config, root if config is None else _inside(root, config, root), None
    config = config if config is not None else default
    if config is None:
        raise ValueError(f"{root}: the dataset card names configs {', '.join(configs)} and no default one: "
                         "pick one with --config (a recipe: the corpus's options.config)")
    if config not in configs:
        raise ValueError(f"{root}: no config {config!r} in the dataset card (it names {', '.join(configs)})")
    chosen = configs[config]
    folder = root if chosen.get("data_dir") is None else _inside(root, chosen["data_dir"], card)
    try:
        patterns = sanitize_patterns(chosen["data_files"]) if chosen.get("data_files") is not None else None
    except ValueError as e:
        raise ValueError(f"{card}: config {config!r}: {str(e).strip().splitlines()[0]}") from None
    return config, folder, patterns


def split_files(root: Path, folder: Path, patterns: dict[str, list[str]] | None = None) -> dict[str, list[tuple[str, Path]]]:
    """The files of each split under ``folder`` (name relative to ``root``, path), as :func:`split_names` assigns
    them, among the files listed as every reader lists them (linked folders followed once, hidden files left out).
    Empty for a ``save_to_disk`` folder."""
    if patterns is None and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
        return {}
    listed = {rel.replace(os.sep, "/"): path for rel, path in files_under(folder)}
    return {split: [(relpath(listed[name], root), listed[name]) for name in names]
            for split, names in split_names(list(listed), patterns, where=str(folder)).items()}


def split_names(names: list[str], patterns: dict[str, list[str]] | None = None, where: str = "") -> dict[str, list[str]]:
    """Each split's files among ``names`` (relative, ``/``-separated: a folder's listing or a Hub repo's), as
    ``datasets`` resolves them: ``patterns`` (a card config's ``data_files``) or ``datasets``' own split patterns
    (``data/{split}-NNNNN-of-NNNNN``, split folders, split words in names, else all train), matched as fsspec's glob
    matches them. Hidden files and the card are no split's. Split names ``datasets`` refuses: one line naming
    ``where`` (the folder or repo)."""
    from datasets.data_files import FILES_TO_IGNORE, _get_data_files_patterns
    from fsspec.utils import glob_translate

    names = [n for n in names if posixpath.basename(n) not in FILES_TO_IGNORE and not any(
        part.startswith(".") for part in n.split("/"))]

    def matching(pattern: str) -> list[str]:
        regex = re.compile(glob_translate(pattern))
        return [name for name in names if regex.fullmatch(name)]

    if patterns is None:
        try:
            patterns = _get_data_files_patterns(matching)
        except FileNotFoundError:  # no files at all
            return {}
        except ValueError as e:  # data/test-clean-00000-of-00001.parquet: datasets takes \w+(.\w+)* split names only
            raise ValueError(f"{where or 'this dataset'}: datasets refuses the split names of its data/{{split}}-NNNNN-"
                             f"of-NNNNN files ({str(e).strip()}): rename them (letters, digits, _ and . only), or "
                             "name each split's files in the card's configs (data_files)") from None
    return {str(split): sorted({name for glob in globs for name in matching(glob)}) for split, globs in patterns.items()}


def builder(names) -> str:
    """``audiofolder``, ``webdataset`` or ``parquet``, as ``datasets`` picks a dataset's builder: by the commonest
    suffix among the audio, tar and Parquet/Arrow files of a dataset's splits (``names``), Parquet on a draw (and
    where there are none)."""
    formats = collections.Counter(Path(name).suffix.lower() for name in names if file_kind(name) in ("audio", "table", "shards"))
    commonest = max(formats, key=lambda f: (formats[f], f in (".parquet", ".arrow")), default=".parquet")
    return {".parquet": "parquet", ".arrow": "parquet", ".tar": "webdataset"}.get(commonest, "audiofolder")


def webdataset_problem(where: str, url: str, names: list[str]) -> str:
    """One line for a dataset kept as WebDataset tar shards, which ``shard webdataset`` reads (by ``url``)."""
    tars = sorted(n for n in names if n.endswith(".tar"))
    return (f"{where}: a WebDataset dataset ({len(tars)} tar shards, {tars[0]} … {tars[-1]}): read it with "
            f"`shard webdataset '{url}'` (every tar under it), or some of its shards as a brace pattern")


def _known(root: Path, split: str, splits) -> str:
    """``split`` when the dataset has it, else one line naming those it has."""
    if split not in splits:
        raise ValueError(f"{root}: no split {split!r} in this dataset (it has {', '.join(sorted(set(splits)))})")
    return split


def dataset_name(root: Path) -> str:
    """The dataset's name for its ids and ``corpus`` (``root`` resolved): its folder's, or the repo's for a snapshot
    in the Hub cache (``…/datasets--owner--name/snapshots/<commit>``: ``name``, not the commit; a hub id's download,
    and an ``hf://datasets/owner/name@rev`` URL's). A folder inside a snapshot is its folder's (``…/clean``), so the
    folders of one repo keep their ids apart."""
    repo = hub_cache_repo(root)
    return repo.name.split("--")[-1] if repo and root.parent.name == "snapshots" else root.name


# a dataset's page (or a folder's) on the Hub's web site, after ``…/datasets/``: owner/name[/tree/REV[/folder]]
_WEB_PAGE = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:/tree/(?P<revision>[^/?#]+)(?P<folder>/[^?#]*)?)?/?(?:[?#].*)?")


def hub_url(url: str) -> str | None:
    """The ``hf://`` URL of a dataset's page, or of a folder's page in it, on the Hub's web site (as a browser's
    address bar holds it: ``https://huggingface.co/datasets/owner/name[/tree/REV[/folder]]``, or at ``HF_ENDPOINT``):
    ``hf://datasets/owner/name[@REV][/folder]``. None for any other URL (a file's ``…/resolve/…`` is read by HTTP as
    it is)."""
    from urllib.parse import unquote

    from huggingface_hub import constants

    for site in {"https://huggingface.co", constants.ENDPOINT.rstrip("/")}:
        if url.startswith(f"{site}/datasets/") and (page := _WEB_PAGE.fullmatch(url[len(site) + 10:])):
            try:
                folder = unquote(page["folder"] or "", errors="strict").rstrip("/")
            except UnicodeDecodeError:  # not a name (%ED%A0%80, a lone surrogate's bytes): left to HTTP, as given
                return None
            if any(ord(c) < 32 or ord(c) == 127 for c in folder):  # %00, %0A: no file's name, and not for a line
                return None
            revision = f"@{page['revision']}" if page["revision"] else ""  # kept encoded, as hf:// takes it
            return f"hf://datasets/{page['repo']}{revision}{folder}"
    return None


def remote_root(url: str, split: str | None = None, config: str | None = None, **_) -> Path | None:
    """An ``hf://datasets/owner/name[@rev][/folder]`` URL that names a dataset repo (a recipe's Hub dataset) or a
    folder in one, fetched as its hub id is (:func:`local_folder`: the card, then the files the reader will take,
    into huggingface_hub's cache); None for any other URL, or one that names no repo or folder there: that is copied
    as every URL is, and the copy says what went wrong. The Hub not answering is the storage's one line (a rerun may
    pass), never a cue to copy the whole repo."""
    if not url.startswith("hf://"):
        return None
    from huggingface_hub import HfFileSystem

    from ..storage import explain

    try:  # huggingface_hub's own reading of the URL (`@refs%2Fconvert%2Fparquet`, `@refs/pr/1`, a trailing /)
        found = HfFileSystem().resolve_path(url)
    except (ValueError, NotImplementedError, FileNotFoundError):  # not a repo's URL, or none there: as any URL
        return None
    except Exception as e:  # noqa: BLE001 (offline, a dropped connection, the Hub's 5xx: one line)
        raise explain(e, url) from None
    if getattr(found, "repo_type", None) != "dataset":
        return None
    try:
        return local_folder(found.repo_id, split, config, found.revision if "@" in url else None,
                            under=found.path_in_repo.strip("/"))
    except NotADirectoryError:  # a file, or nothing of that name in the repo: as any URL
        return None


def local_folder(source: str | Path, split: str | None = None, config: str | None = None,
                 revision: str | None = None, under: str = "") -> Path:
    """``source`` as a local folder: itself when it exists, else a hub id (``owner/name``) whose card and data
    files are fetched with ``huggingface_hub`` into its cache (needs internet; the default path never does this),
    or those of its folder ``under`` (read as a dataset of its own, as a copy of it would be; NotADirectoryError
    when the repo has no such folder). Where the card names configs, the files of ``config`` (or its default
    config), of ``split`` only when given. Else, a repo whose commonest data files are audio (an audiofolder, as
    ``datasets`` would read it), the audio and metadata files of its splits (of ``split`` only when given); else its
    Parquet files (those the reader takes for ``split`` when given)."""
    path = Path(source)
    if path.exists():
        return path
    if not is_hub_id(source):
        raise FileNotFoundError(f"{source}: no such folder, and not a hub id (owner/name)")
    from huggingface_hub import HfApi, snapshot_download

    def from_hub(call):  # huggingface_hub's errors (offline, no such repo, gated, no connection): one line naming it
        try:
            return call()
        except Exception as e:  # noqa: BLE001 (its transport's errors, httpx's, are neither OSError nor ValueError)
            if not isinstance(e, (OSError, ValueError)) and not type(e).__module__.startswith("httpx"):
                raise
            raise OSError(f"{source}: the Hub did not give this dataset: {' '.join(str(e).split())}") from None

    top = posixpath.join(under, "README.md") if under else "README.md"  # the dataset's card

    def fetch(patterns: list[str]) -> Path:  # the files' folder: the snapshot's, or its folder ``under``
        snapshot = from_hub(lambda: snapshot_download(str(source), repo_type="dataset", revision=revision,
                                                      allow_patterns=[*patterns, glob.escape(top)]))
        return Path(snapshot, under)

    card = fetch([])  # the card first: its configs say which files are whose
    listed = from_hub(lambda: HfApi().list_repo_files(str(source), repo_type="dataset", revision=revision))
    if under:  # the folder's files, by their names in it
        listed = [name[len(under) + 1:] for name in listed if name.startswith(under + "/")]
        if not listed:
            raise NotADirectoryError(f"{source}: no folder {under!r} in this repo")
    named = f"{source}/{under}" if under else str(source)  # what the lines below name
    _, folder, patterns = card_config(card, config, folders={name.split("/")[0] for name in listed if "/" in name})
    base = os.path.relpath(folder, card)

    def in_repo(names) -> list[str]:  # names under ``base`` as the repo names them
        return [posixpath.normpath(posixpath.join(under, base, name)) for name in names]

    if patterns is not None:  # the config names its files
        if split is not None:
            patterns = {split: patterns[_known(Path(named), split, patterns)]}
        return fetch(in_repo(g for globs in patterns.values() for g in globs))
    below = [name[len(base) + 1:] for name in listed if name.startswith(base + "/")] if base != "." else listed
    splits = split_names(below, where=named)
    kept_as = builder(name for found in splits.values() for name in found)
    if kept_as == "webdataset":
        raise ValueError(webdataset_problem(named, f"hf://datasets/{named}", listed))
    if kept_as == "audiofolder":  # its split's audio and metadata
        if split is not None:
            splits = {split: splits[_known(Path(named), split, splits)]}
        wanted = [name for found in splits.values() for name in found if file_kind(name) in ("audio", "metadata")]
    else:
        tables = parquet_splits((name for name in below if name.endswith(".parquet")), where=named)
        if not tables and any(name.endswith(".py") and "/" not in name for name in listed) and revision is None:
            raise FileNotFoundError(f"{named}: no data files, but a loading script (datasets 4 and later run none): "
                                    "the Hub's Parquet conversion of it is read with --revision refs/convert/parquet "
                                    f"(a URL: hf://datasets/{source}@refs%2Fconvert%2Fparquet) and --config NAME, one "
                                    "of its folders")
        if split is not None:
            _known(Path(named), split, tables.values())
        wanted = [name for name, of in tables.items() if split is None or of == split]
    if not wanted:
        raise FileNotFoundError(f"{named}: no Parquet, audio or tar files" + (f" under {base}/" if base != "." else "")
                                + (f" at {revision}" if revision else "") + ": not a dataset this command reads")
    return fetch(hub_patterns(in_repo(wanted), [posixpath.join(under, name) for name in listed]))


def hub_patterns(wanted: list[str], listed: list[str]) -> list[str]:
    """Few ``snapshot_download`` patterns (fnmatch, ``*`` spanning folders) that fetch exactly ``wanted`` of a repo's
    ``listed`` files: a folder's where every file under it is wanted, else the file's own name (escaped). One name
    each would not do: huggingface_hub tests every file against every pattern."""
    wanted_set = set(wanted)
    files, chosen = collections.Counter(), collections.Counter()  # under each folder: files, wanted files
    for name in listed:
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            files["/".join(parts[:depth])] += 1
            chosen["/".join(parts[:depth])] += name in wanted_set
    patterns = set()
    for name in wanted_set:
        parts = name.split("/")[:-1]
        folders = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
        whole = next((f for f in folders if files[f] == chosen[f]), None)  # the shallowest folder wanted whole
        patterns.add(glob.escape(whole) + "/*" if whole else glob.escape(name))
    return sorted(patterns)


def _inside(root: Path, relative, where: Path) -> Path:
    """``root/relative`` for a name a metadata file gives, refusing names that leave ``root``."""
    if not isinstance(relative, str) or not relative.strip():
        raise ValueError(f"{where}: {relative!r} is not a file or folder name")
    try:
        return safe_join(root, relative, follow_links=FOLLOW_LINKS.get())
    except ValueError as e:
        raise ValueError(f"{where}: {e}; a dataset's files must lie inside it") from None


def data_files(root: Path, assigned: dict[Path, str] | None = None) -> list[tuple[str | None, Path]]:
    """(split, file) of every data file under ``root``, Parquet or ``save_to_disk`` Arrow (:func:`parquet_splits`;
    ``assigned``: the splits :func:`split_files` found for its files, not matched again). Names that the metadata
    files give (splits, ``_data_files``) must stay inside ``root``."""
    dict_file = root / "dataset_dict.json"
    if dict_file.is_file():  # DatasetDict.save_to_disk: one folder per split
        splits = read_json(dict_file).get("splits")
        if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
            raise ValueError(f"{dict_file}: 'splits' must be a list of split names (as save_to_disk writes it), "
                             f"got {splits!r}")
        return [(s, f) for s in splits for f in _arrow_files(_inside(root, s, dict_file), root)]
    if (root / "state.json").is_file():  # Dataset.save_to_disk: one split, named in dataset_info.json
        info_file = root / "dataset_info.json"
        info = read_json(info_file) if info_file.is_file() else {}
        split = info.get("split") or "train"
        if not isinstance(split, str):
            raise ValueError(f"{info_file}: 'split' must be a name, got {split!r}")
        return [(split, f) for f in _arrow_files(root, root)]
    listed = {relative.replace(os.sep, "/"): path for relative, path in files_under(root)  # hidden ones left out
              if relative.endswith(".parquet")}
    if not listed:
        raise FileNotFoundError(f"{root}: no Parquet files, no save_to_disk folder (dataset_dict.json or "
                                "state.json) and no audio files (audiofolder): not a Hugging Face dataset folder")
    if assigned is not None and not _converted(listed):
        splits = {name: assigned.get(path) for name, path in listed.items()}
    else:
        splits = parquet_splits(listed, where=str(root))
    for name in listed:
        _inside(root, name, root)  # a link out of ROOT: one line (--follow-links reads it)
    return [(splits.get(name), path) for name, path in sorted(listed.items(), key=lambda item: item[1])]


def parquet_splits(names, where: str = "") -> dict[str, str]:
    """The split of each Parquet file among ``names`` (relative to the dataset, ``/``-separated) where no card names
    them. The Hub's Parquet conversion (``refs/convert/parquet``: numbered files in split folders, ``train.100/
    0000.parquet``, ``partial-train/0000.parquet``): its folder's name, the split the Hub's dataset viewer gives
    ``datasets`` for it. Else as ``datasets`` assigns them (:func:`split_names`: ``data/validation-00000-of-00001
    .parquet``, split words such as ``test-clean.parquet``, else all ``train``); a file its patterns leave out (a
    second layout beside the first it finds) has none. Hidden files have none."""
    names = [n for n in names if not any(part.startswith(".") for part in n.split("/"))]
    if _converted(names):
        return {n: n.split("/")[-2] for n in names}
    return {name: split for split, found in split_names(names, where=where).items() for name in found}


def _converted(names) -> bool:
    """Whether ``names`` (not hidden) are the Hub's Parquet conversion's: numbered files in split folders."""
    return bool(names) and all(_CONVERTED.fullmatch(n) for n in names)


_CONVERTED = re.compile(r"(?:[^/]+/)*[^/]+/\d+\.parquet")  # the Hub's Parquet conversion: {config}/{split}/0000.parquet


def _arrow_files(folder: Path, root: Path) -> list[Path]:
    state = folder / "state.json"
    if state.is_file():
        entries = read_json(state).get("_data_files") or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{state}: '_data_files' must be a list of {{\"filename\": …}} objects, got {entries!r}")
        names = [e.get("filename") for e in entries]
        if names:
            here = os.path.relpath(folder, root)  # by name: a linked split folder is judged by _inside
            return [_inside(root, os.path.join(here, n) if isinstance(n, str) else n, state) for n in names]
    return sorted(folder.glob("data-*.arrow"))


def _card(root: str | Path) -> dict:
    """The YAML of the dataset card (``README.md``), read with huggingface_hub's card classes; empty when
    there is no card, or it has no YAML or broken YAML."""
    readme = Path(root) / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub import DatasetCard

    try:
        return DatasetCard.load(readme).data.to_dict()
    except Exception:  # a README without YAML metadata, or broken YAML: nothing to take from it
        return {}


def card_license(root: Path) -> str | None:
    """The card's ``license`` (``other: NAME`` with its ``license_name``), or None. Only plain text is taken:
    a value holding markup (``<``, ``>``) or that is not a string is ignored, since it is copied into every
    manifest row and, from there, into the published card the Hub renders."""
    data = _card(root)
    value = data.get("license")
    if isinstance(value, list):
        value = ", ".join(v for v in value if isinstance(v, str))
    name = data.get("license_name")
    if value == "other" and isinstance(name, str) and name.strip():
        value = f"other: {name.strip()}"
    if not isinstance(value, str) or not value.strip() or _MARKUP.search(value):
        return None
    return value.strip()


_MARKUP = re.compile(r"[<>]")
# BCP-47-like language codes as the Hub's cards hold them: en, en-US, zh_Hans, yue
LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*")


def card_languages(root: str | Path, **_) -> list[str]:
    """The card's ``language`` list (empty without a card or the key); entries that are not language codes
    (numbers, markup) are left out."""
    value = _card(root).get("language")
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [v for v in values if isinstance(v, str) and LANGUAGE_CODE.fullmatch(v)]


def _parquet_rows(path: Path) -> int:
    try:
        return pq.read_metadata(path).num_rows if path.suffix == ".parquet" else 0
    except (pa.ArrowInvalid, OSError):  # an unreadable file is a counted skip when its turn comes
        return 0


def _batches(path: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    if path.suffix == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=64, columns=columns)
    else:
        with pa.memory_map(str(path)) as source:
            for batch in pa.ipc.open_stream(source):
                yield batch.select(columns)


def _schema(path: Path) -> pa.Schema:
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).schema_arrow
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).schema


def _schema_names(path: Path) -> list[str]:
    return _schema(path).names


TEXT_COLUMNS = tuple(n for n in TRANSCRIPT_NAMES if n != "text")  # the Hub's other names for the default's column


def _columns(files: list[tuple[str, Path]], audio_column: str, text_column: str,
             speaker_column: str | None) -> tuple[str, str, str | None, list[str]]:
    """The audio, text and speaker columns to read, and what was inferred: where the first data file has no column
    of the name given (``audio``, ``text`` by default) and one column alone can be meant (its one ``struct<bytes,
    path>`` column; the one of :data:`TEXT_COLUMNS` it has), that one, said in a note; with no speaker column
    given, the one of ``base.SPEAKER_NAMES`` it has. Else as given: a missing column is :func:`_read_file`'s one
    line."""
    try:
        schema = _schema(files[0][1]) if files else None
    except (pa.ArrowInvalid, OSError):  # unreadable: its own skip when its turn comes
        schema = None
    said = []
    if schema is not None and audio_column not in schema.names:
        audio = [f.name for f in schema if pa.types.is_struct(f.type) and {"bytes", "path"} <= {c.name for c in f.type}]
        if len(audio) == 1:
            said.append(f"audio column {audio[0]!r}: no column {audio_column!r}, and {audio[0]!r} is the only one "
                        "holding audio (struct<bytes, path>)")
            audio_column = audio[0]
    if schema is not None and text_column not in schema.names:
        text = [name for name in TEXT_COLUMNS if name in schema.names]
        if len(text) == 1:
            said.append(f"text column {text[0]!r}: no column {text_column!r}, and {text[0]!r} is the only transcript column")
            text_column = text[0]
    if schema is not None and speaker_column is None:
        speaker = [name for name in SPEAKER_NAMES if name in schema.names]
        if len(speaker) == 1:
            said.append(f"speaker column {speaker[0]!r}: the only column naming speakers")
            speaker_column = speaker[0]
    return audio_column, text_column, speaker_column, said


def _read_file(root: Path, path: Path, hf_split: str, name: str, license: str, audio_column: str, text_column: str,
               id_column: str | None, speaker_column: str | None) -> Iterator[Item]:
    rel = relpath(path, root)
    try:
        names = _schema_names(path)
    except (pa.ArrowInvalid, OSError) as e:
        yield Skip(rel, "unreadable data file", str(e))
        return
    wanted = {"audio column": audio_column, "text column": text_column, "id column": id_column,
              "speaker column": speaker_column}
    missing = [f"{what} {col!r}" for what, col in wanted.items() if col is not None and col not in names]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} (columns: {', '.join(names)}); "
                         "pick them with --audio-column/--text-column/--id-column/--speaker-column")
    columns = [c for c in dict.fromkeys(wanted.values()) if c is not None]
    row = 0
    for batch in _batches(path, columns):
        for record in batch.to_pylist():
            item = _row(record, root, rel, row, hf_split, name, license, audio_column, text_column, id_column,
                        speaker_column)
            row += 1
            yield item


def _row(record: dict, root: Path, rel: str, row: int, hf_split: str, name: str, license: str, audio_column: str,
         text_column: str, id_column: str | None, speaker_column: str | None) -> Item:
    where = f"{rel} row {row}"
    value = record[audio_column]
    data = _encoded(value)
    at: dict = {"path": rel, "row": row, "audio_column": audio_column}  # where extract reads the audio
    if data:
        try:
            info = sf.info(io.BytesIO(data))
        except Exception as e:  # libsndfile's message names the file object by its address: name the row instead
            return Skip(where, "unreadable audio", re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", where, str(e)))
        if info.frames <= 0:
            return Skip(where, "empty audio", "0 samples")
        sample_rate, seconds = info.samplerate, info.frames / info.samplerate
    else:  # a path and no bytes (Dataset.to_parquet keeps cast file names so): that file, inside the dataset
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        found = _named_file(root, path, where)
        if isinstance(found, Skip):
            return found
        at, (sample_rate, seconds) = {"path": found[0], "row": None, "audio_column": None}, found[1:]
    cells = cells_text(record, {"id": id_column, "text": text_column, "speaker": speaker_column}, where)
    if isinstance(cells, Skip):
        return cells
    utt = cells["id"] or f"{Path(rel).with_suffix('').as_posix()}/{row:06d}"
    return {
        "id": f"{name}/{utt}", **at, "offset": 0.0, "duration": seconds, "sample_rate": sample_rate,
        "text": cells["text"], "speaker": cells["speaker"] or "unknown",
        "corpus": name, "license": license, "split": split_of(hf_split), "corpus_split": hf_split,
    }


def _named_file(root: Path, path, where: str) -> tuple[str, int, float] | Skip:
    """(name relative to ROOT, sample rate, seconds) of the audio file an audio cell names by ``path`` alone:
    absolute, or relative to the dataset's folder (``datasets`` reads it from the working directory: a user's
    in that folder); a Skip naming the row where it lies outside the dataset, is missing, or is no file's name."""
    if not isinstance(path, str) or not path.strip() or "\x00" in path or "://" in path:
        return Skip(where, "no embedded audio bytes", f"the audio column holds only the path {path!r}" if path
                    else f"the audio column holds {type(path).__name__}: nothing to decode")
    full = Path(os.path.normpath(root / path))  # an absolute path stays itself
    for candidate in (full, full.resolve()):  # as written, or with the links on its way (/tmp → /private/tmp) read
        inside = os.path.relpath(candidate, root)
        if inside != ".." and not inside.startswith(".." + os.sep):
            break
    else:
        return Skip(where, "audio outside the dataset folder", f"the audio column holds only the path {path!r}: move "
                    "the audio into the dataset's folder, or write the dataset with save_to_disk or push_to_hub, which "
                    "embed it")
    probed = probe(root / inside, root)
    if isinstance(probed, Skip):
        return Skip(probed.path, probed.reason, "; ".join(filter(None, (probed.detail, f"named by {where}"))))
    return inside.replace(os.sep, "/"), *probed

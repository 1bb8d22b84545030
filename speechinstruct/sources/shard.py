"""``speechinstruct shard``: a corpus in its native layout → Parquet manifest shards + a JSON summary.

Rows are cut into shards of about ``shard_hours`` of audio each (``manifest-00000.parquet`` …), every
shard written atomically; a rerun rewrites the same names and removes shards a previous, larger run left.
Every row carries the ``split`` (train, validation, test) the corpus gives it; ``splits`` keeps only some.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

from .. import recipe as settings, records
from ..io import claim_outputs, files_state, write_json, write_parquet, wrote_before
from . import storage
from .corpora import (FOLLOW_LINKS, SOURCES, Note, Skip, audio_roots, languages, option_problem, parse_split_map, parse_splits,
                      readers, remote_roots, root_problem, split_of, split_word, with_known_license)

MAX_LISTED_SKIPS = 1000


class ManifestShards:
    """Manifest rows as ``manifest-NNNNN.parquet`` files in ``out``, a new file every ``shard_hours`` of audio,
    each written atomically; :meth:`close` writes the last one and removes the shards of an earlier, larger run."""

    def __init__(self, out: Path, shard_hours: float):
        self.out, self.limit = out, shard_hours * 3600
        self.rows: list[dict] = []
        self.seconds = 0.0
        self.written: list[str] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.seconds += row["duration"]
        if self.seconds >= self.limit:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            name = f"manifest-{len(self.written):05d}.parquet"
            write_parquet(self.out / name, records.to_table("manifest", self.rows))
            self.written.append(name)
            self.rows, self.seconds = [], 0.0

    def close(self) -> list[str]:
        self._flush()
        for stale in sorted(self.out.glob("manifest-*.parquet")):
            if stale.name not in self.written:
                stale.unlink()
        return self.written


class Tally:
    """What the summary counts: rows kept per split (with the corpus's own part names), rows left out by
    ``splits``, skips by reason (the first :data:`MAX_LISTED_SKIPS` listed) and the readers' notes."""

    def __init__(self):
        self.by_split: dict[str, dict] = {}
        self.left_out: collections.Counter[str] = collections.Counter()
        self.skipped: collections.Counter[str] = collections.Counter()
        self.examples: list[dict] = []
        self.notes: list[str] = []
        self.utterances, self.seconds = 0, 0.0

    def skip(self, skip: Skip) -> None:
        self.skipped[skip.reason] += 1
        if len(self.examples) < MAX_LISTED_SKIPS:
            self.examples.append(skip.as_dict())

    def kept(self, row: dict) -> None:
        part = self.by_split.setdefault(row["split"], {"utterances": 0, "hours": 0.0, "corpus_splits": collections.Counter()})
        part["utterances"] += 1
        part["hours"] += row["duration"] / 3600
        part["corpus_splits"][row["corpus_split"]] += 1
        self.utterances += 1
        self.seconds += row["duration"]

    def summary(self, split_map: dict[str, str]) -> dict:
        return {
            "utterances": self.utterances,
            "hours": round(self.seconds / 3600, 4),
            "splits": {name: {"utterances": v["utterances"], "hours": round(v["hours"], 4),
                              "corpus_splits": dict(sorted(v["corpus_splits"].items()))}
                       for name, v in sorted(self.by_split.items())},
            "left_out_by_split": dict(sorted(self.left_out.items())),
            # part names that say neither train, validation nor test: kept as train; --split-map them if held out
            "unrecognised_split_names": sorted({name for v in self.by_split.values() for name in v["corpus_splits"]
                                                if split_word(name) is None and name not in split_map}),
            **({"notes": self.notes} if self.notes else {}),
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": self.examples,
        }


def shard_corpus(
    corpus: str,
    root: str | Path,
    out: str | Path,
    cfg: settings.Shard | None = None,
    splits: str | list[str] | None = None,
    split_map: dict[str, str] | list[str] | str | None = None,
    follow_links: bool | None = None,
    **reader_options,
) -> dict:
    """Read ``root`` with the ``corpus`` reader, write manifest shards to ``out``; return the summary.
    ``splits`` (e.g. ``"train,validation"``) keeps only rows of those splits; the others are counted as left out.
    ``split_map`` (``{"eval2000": "test"}`` or ``["eval2000=test"]``) says the split of a corpus part whose
    name does not; the summary lists the part names that said nothing and were kept as train. ``follow_links``:
    read files through the corpus's links that lead out of ``root`` (else each is a counted skip). ``cfg``: the
    recipe's ``shard`` section (its defaults when None); ``reader_options``: the source's own
    (``corpora.SOURCES[corpus].options``) and ``license``."""
    shard_hours = (cfg or settings.Shard()).shard_hours
    all_readers = readers()
    if corpus not in all_readers:
        raise ValueError(f"unknown corpus {corpus!r}; choose one of {', '.join(all_readers)}")
    if shard_hours <= 0:
        raise ValueError(f"shard_hours must be positive, got {shard_hours}")
    for option in reader_options:
        if problem := option_problem(corpus, option):
            raise ValueError(f"{option}: {problem}")
    keep = parse_splits(splits)
    split_map = parse_split_map(split_map)
    remote = storage.redacted(str(root)) if storage.is_url(root) else None
    root, refused = local_root(corpus, root, reader_options)
    out = Path(out)
    problem = root_problem(corpus, root)
    if problem:
        raise FileNotFoundError(f"{root}: corpus root {problem}")
    audio_root = root
    if corpus in audio_roots():  # manifests that name audio files anywhere, one data file: paths relative to a folder
        audio_root = audio_roots()[corpus](root, **reader_options)
        if "audio_root" in SOURCES[corpus].options or audio_root != root:  # hf: a file's folder only
            reader_options["audio_root"] = str(audio_root)
    claim_outputs(out, "shard", r"manifest-\d{5}\.parquet|summary\.json",
                  wrote_before(out / "summary.json", {"corpus", "root", "shards", "utterances"}))

    shards, tally = ManifestShards(out, shard_hours), Tally()
    for name in refused:
        tally.skip(Skip(name, "unsafe name in the bucket", "it would be written outside the copy ('..'); not copied"))
    following = FOLLOW_LINKS.set(bool(follow_links))  # probe's rule for links out of the root, while the reader runs
    try:
        write_rows(all_readers[corpus](root, **with_known_license(corpus, reader_options)), shards, tally, keep, split_map)
    finally:
        FOLLOW_LINKS.reset(following)
    written = shards.close()

    counts = tally.summary(split_map)
    summary = {
        "corpus": corpus,
        "root": str(audio_root.resolve()),
        **({"source": str(root.resolve())} if audio_root != root else {}),
        **({"remote": remote} if remote else {}),  # where the copy at ``root`` came from
        "options": {"shard_hours": shard_hours, "splits": list(keep) if keep else None,
                    **({"split_map": split_map} if split_map else {}), **({"follow_links": True} if follow_links else {}),
                    **reader_options},
        "shards": written,
        **{key: counts[key] for key in ("utterances", "hours", "splits")},
        **({"languages": languages()[corpus](root)} if corpus in languages() else {}),
        **{key: value for key, value in counts.items() if key not in ("utterances", "hours", "splits")},
    }
    write_json(out / "summary.json", summary)
    return summary


def local_root(corpus: str, root: str | Path, reader_options: dict) -> tuple[Path, tuple[str, ...]]:
    """The corpus root (and ``reader_options["audio_root"]``) where the reader can open it: a bucket or the Hub
    read from its copy in the cache (downloaded once; a Hub dataset repo's root, only what the reader will read:
    :func:`corpora.remote_roots`); with the bucket keys that were not copied because they would be written outside
    the copy (``..``)."""
    refused: tuple[str, ...] = ()
    if storage.is_url(root):
        fetch = remote_roots().get(corpus)
        if fetch is not None and (fetched := fetch(str(root), **reader_options)) is not None:
            root = fetched
        elif SOURCES[corpus].pattern_root and "{" in str(root):  # only the files it names; a folder is copied whole
            root = storage.local_pattern(str(root))
        else:
            copy = storage.mirror(str(root))
            root, refused = copy.path, copy.refused
    if storage.is_url(reader_options.get("audio_root") or ""):
        reader_options["audio_root"] = storage.local(reader_options["audio_root"])
    return Path(root), refused


class NothingRead(ValueError):
    """A shard that wrote no row: every utterance skipped or left out. ``summary``: the shard's, which the command line
    still prints."""

    summary: dict | None = None


def read_something(summary: dict, out: str | Path, splits: str = "--splits") -> dict:
    """``summary``, or one line (:class:`NothingRead`) when its shard holds no utterance: what became of them (the
    skips, or the splits ``splits``, the option as the user gave it, left out), rather than a later stage's "no
    manifest files, run shard first"."""
    if summary["utterances"]:
        return summary

    def counted(counts: dict[str, int]) -> str:  # the commonest first
        return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))

    skipped, left = summary.get("skipped") or {}, summary.get("left_out_by_split") or {}
    what = " or ".join(filter(None, (skipped and f"was skipped ({counted(skipped)})",
                                     left and f"is in a split {splits} leaves out ({counted(left)})")))
    root = summary.get("remote") or summary.get("source") or summary["root"]  # as the user named it
    nothing = NothingRead(f"{root}: no utterance read"
                          + (f": every one {what}; {Path(out) / 'summary.json'} names each" if what else ""))
    nothing.summary = summary
    raise nothing


def corpus_state(corpus: str, root: str | Path, options: dict | None = None) -> str:
    """What ``run`` takes for the state of a corpus it has sharded (:func:`io.files_state`): every file under a local
    root folder, a root file or the tar files a pattern names, and a local ``audio_root`` option's files. A file
    added, removed, or written again (a transcript corrected in place, even to the same size) changes it. A corpus
    in a bucket or on the Hub is not listed at each run: its state is "" (``--force`` brings its copy up to date)."""
    if storage.is_url(root):
        return ""
    if corpus in SOURCES and SOURCES[corpus].pattern_root:
        from .corpora.webdataset import tar_files

        roots = tar_files(root)
    else:
        roots = [Path(root)]
    if (audio := (options or {}).get("audio_root")) and not storage.is_url(audio):
        roots.append(Path(audio))
    return files_state(*roots)


def not_unicode(row: dict) -> str | None:
    """Which field of ``row`` holds a lone surrogate (JSON can spell one, ``\\udc80``; no UTF-8 file can hold it),
    or None."""
    for key, value in row.items():
        for text in value if isinstance(value, list) else [value]:
            text = json.dumps(text, ensure_ascii=False) if isinstance(text, dict) else text
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    where = row["id"].encode("utf-8", "backslashreplace").decode("utf-8")
                    return f"{where}: {key} holds a lone surrogate"
    return None


def write_rows(items, shards: ManifestShards, tally: Tally, keep: tuple[str, ...] | None, split_map: dict) -> None:
    """A reader's items into the shards: notes and skips counted, rows no UTF-8 file can hold and repeated ids
    skipped, each row's split as the split map says, rows of splits not kept counted as left out."""
    seen_ids: set[str] = set()
    for item in items:
        if isinstance(item, Note):
            tally.notes.append(item.text)
        elif isinstance(item, Skip):
            tally.skip(item)
        elif problem := not_unicode(item):
            tally.skip(Skip(item["path"], "not valid Unicode", problem))
        elif not item["duration"] * item["sample_rate"] >= 1:  # a span shorter than a sample (or NaN): no audio
            tally.skip(Skip(item["path"], "no audio in its span", f"{item['id']}: {item['duration']} s"))
        elif item["id"] in seen_ids:
            tally.skip(Skip(item["path"], "duplicate id", item["id"]))
        else:
            seen_ids.add(item["id"])
            if item["corpus_split"] in split_map:
                item["split"] = split_of(item["corpus_split"], split_map)
            if keep is not None and item["split"] not in keep:
                tally.left_out[item["split"]] += 1
                continue
            tally.kept(item)
            shards.add(item)

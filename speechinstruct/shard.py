"""``speechinstruct shard``: a corpus in its native layout → Parquet manifest shards + a JSON summary.

Rows are cut into shards of about ``shard_hours`` of audio each (``manifest-00000.parquet`` …), every
shard written atomically; a rerun rewrites the same names and removes shards a previous, larger run left.
Every row carries the ``split`` (train, validation, test) the corpus gives it; ``splits`` keeps only some.
"""

from __future__ import annotations

import collections
from pathlib import Path

from . import recipe as settings, records
from .corpora import Note, Skip, audio_roots, languages, parse_split_map, parse_splits, readers, root_problem, split_of, split_word
from .io import write_json, write_parquet
from .recipe import default

MAX_LISTED_SKIPS = 1000


def shard_corpus(
    corpus: str,
    root: str | Path,
    out: str | Path,
    shard_hours: float = default(settings.Shard, "shard_hours"),
    splits: str | list[str] | None = None,
    split_map: dict[str, str] | list[str] | str | None = None,
    quiet: bool = False,
    **reader_options,
) -> dict:
    """Read ``root`` with the ``corpus`` reader, write manifest shards to ``out``; return the summary.
    ``splits`` (e.g. ``"train,validation"``) keeps only rows of those splits; the others are counted as left out.
    ``split_map`` (``{"eval2000": "test"}`` or ``["eval2000=test"]``) says the split of a corpus part whose
    name does not; the summary lists the part names that said nothing and were kept as train."""
    all_readers = readers()
    if corpus not in all_readers:
        raise ValueError(f"unknown corpus {corpus!r}; choose one of {', '.join(all_readers)}")
    if shard_hours <= 0:
        raise ValueError(f"shard_hours must be positive, got {shard_hours}")
    keep = parse_splits(splits)
    split_map = parse_split_map(split_map)
    root, out = Path(root), Path(out)
    problem = root_problem(corpus, root)
    if problem:
        raise FileNotFoundError(f"{root}: corpus root {problem}")
    audio_root = root
    if corpus in audio_roots():  # manifests that name audio files anywhere: paths relative to their folder
        audio_root = audio_roots()[corpus](root, **reader_options)
        reader_options["audio_root"] = str(audio_root)
    out.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    written: list[str] = []
    seen_ids: set[str] = set()
    skipped: collections.Counter[str] = collections.Counter()
    skip_list: list[dict] = []
    by_split: dict[str, dict] = {}
    left_out: collections.Counter[str] = collections.Counter()
    seconds_total = 0.0
    shard_seconds = 0.0
    n_rows = 0

    def flush():
        nonlocal rows, shard_seconds
        if rows:
            name = f"manifest-{len(written):05d}.parquet"
            write_parquet(out / name, records.to_table("manifest", rows))
            written.append(name)
            rows, shard_seconds = [], 0.0

    notes: list[str] = []
    for item in all_readers[corpus](root, quiet=quiet, **reader_options):
        if isinstance(item, Note):
            notes.append(item.text)
            continue
        if isinstance(item, Skip):
            skipped[item.reason] += 1
            if len(skip_list) < MAX_LISTED_SKIPS:
                skip_list.append(item.as_dict())
            continue
        if item["id"] in seen_ids:
            skipped["duplicate id"] += 1
            if len(skip_list) < MAX_LISTED_SKIPS:
                skip_list.append(Skip(item["path"], "duplicate id", item["id"]).as_dict())
            continue
        seen_ids.add(item["id"])
        if item["corpus_split"] in split_map:
            item["split"] = split_of(item["corpus_split"], split_map)
        if keep is not None and item["split"] not in keep:
            left_out[item["split"]] += 1
            continue
        part = by_split.setdefault(item["split"], {"utterances": 0, "hours": 0.0, "corpus_splits": collections.Counter()})
        part["utterances"] += 1
        part["hours"] += item["duration"] / 3600
        part["corpus_splits"][item["corpus_split"]] += 1
        rows.append(item)
        n_rows += 1
        seconds_total += item["duration"]
        shard_seconds += item["duration"]
        if shard_seconds >= shard_hours * 3600:
            flush()
    flush()

    for stale in sorted(out.glob("manifest-*.parquet")):
        if stale.name not in written:
            stale.unlink()
    summary = {
        "corpus": corpus,
        "root": str(audio_root.resolve()),
        **({"source": str(root.resolve())} if audio_root != root else {}),
        "options": {"shard_hours": shard_hours, "splits": list(keep) if keep else None,
                    **({"split_map": split_map} if split_map else {}), **reader_options},
        "shards": written,
        "utterances": n_rows,
        "hours": round(seconds_total / 3600, 4),
        "splits": {name: {"utterances": v["utterances"], "hours": round(v["hours"], 4),
                          "corpus_splits": dict(sorted(v["corpus_splits"].items()))}
                   for name, v in sorted(by_split.items())},
        **({"languages": languages()[corpus](root)} if corpus in languages() else {}),
        "left_out_by_split": dict(sorted(left_out.items())),
        # part names that say neither train, dev nor test: kept as train; map them with --split-map if held out
        "unrecognised_split_names": sorted({name for v in by_split.values() for name in v["corpus_splits"]
                                            if split_word(name) is None and name not in split_map}),
        **({"notes": notes} if notes else {}),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": skip_list,
    }
    write_json(out / "summary.json", summary)
    return summary



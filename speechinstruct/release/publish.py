"""``speechinstruct publish``: composed records → a Hugging Face dataset folder with a dataset card.

Layout (``datasets.load_dataset(OUT, "cross_modal")`` reads it; the card's YAML declares the configs)::

    OUT/README.md                                   dataset card
    OUT/speechinstruct.json                         machine-readable provenance (K, extractor, hashes, counts)
    OUT/data/{config}/{split}-00000-of-00002.parquet
    OUT/stats/utterances.parquet                    id, corpus, duration, frames, units (for the report)

Configs: ``cross_modal``, ``chain_of_modality``, ``dialogue``, ``interleaved``, ``pretrain``. Splits: ``train``, and unless ``eval_splits``
is off, ``validation`` and ``test``, holding records made from the corpora's own dev and test audio (never
in ``train``; for ``pretrain``, ``validation`` also holds a hashed share of train utterances). IN is a folder
holding any of ``cross_modal/``, ``chain_of_modality/``, ``dialogue/``, ``interleaved/`` and ``pretrain/`` as
``compose`` writes them.
"""

from __future__ import annotations

import collections
import hashlib
import html
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__, recipe as settings, records
from ..compose.common import check_complete, scores_entry
from ..io import atomic_path, parquet_writer, read_json, write_json, write_parquet, write_text
from ..kinds import RECORD_KINDS
from ..progress import progress
from ..shardfiles import Vocabulary, composed_speech_specs, composed_units_dirs, folder_vocabulary, read_units_spec
from ..sources.corpora import SOURCES
from ..sources.corpora.base import SPLITS
from ..sources.corpora.hf import LANGUAGE_CODE

CONFIGS = tuple(RECORD_KINDS)  # every record kind is a config (kinds.RECORD_KINDS)
# the column each config's records are counted by on the card ("voices": the TTS voices that spoke them)
COUNTED_BY = {name: kind.counted_by for name, kind in RECORD_KINDS.items() if kind.counted_by}


ROWS_PER_BATCH = 4096  # records copied at a time: publish's memory does not grow with the dataset
SAMPLE = "speechinstruct-sample"  # the shipped instruction pairs chain-of-modality speaks (no corpus reader)
SPLIT_RULES = {**{name: c.split_rule for name, c in SOURCES.items() if c.split_rule},  # corpora.SOURCES
               SAMPLE: "the shipped instruction sample: all train"}


def _inputs(folder: Path, eval_splits: bool = True) -> dict[str, dict[str, list[Path]]]:
    """{config: {split: [parquet files]}} of a compose folder (train only unless ``eval_splits``)."""
    found: dict[str, dict[str, list[Path]]] = {}
    for config in CONFIGS:
        for path in sorted((folder / config).glob("*-*.parquet")):
            split = path.name.split("-")[0]
            if split not in SPLITS:
                raise ValueError(f"{path}: not a compose output (splits are {', '.join(SPLITS)}); recompose it")
            if split == "train" or eval_splits:
                found.setdefault(config, {}).setdefault(split, []).append(path)
    if not found:
        raise FileNotFoundError(f"{folder}: no composed records (expected {', '.join(c + '/' for c in CONFIGS)})")
    return found


class InvalidRecords(ValueError):
    """Composed records that ``validate`` fails: publish writes nothing."""


def refuse_invalid(compose_dir: Path, inputs: dict[str, dict[str, list[Path]]]) -> None:
    """Hold every record to ``validate``'s rules before anything is written, so that no dataset ships a record
    its own validation fails (unit ids are checked against K by ``validate`` after publishing, when K is known)."""
    from .validate import Report, check_files

    report = Report()
    for config, splits in inputs.items():
        check_files(report, config, config, [f for files in splits.values() for f in files], compose_dir, 5)
    if not report.ok:
        first = report.examples[0]
        # a repeated id is not a composer's fault that composing again mends: the same records are there twice
        advice = ("a file copied beside itself, or compose folders merged by hand? Take the copy out"
                  if set(report.by_rule) == {"duplicate-id"} else "compose them again with this version")
        raise InvalidRecords(
            f"{compose_dir / first['file']}: row {first['row']} ({first['id']}): [{first['rule']}] {first['message']}; "
            f"{sum(report.failed.values())} records fail validation ({', '.join(f'{r} x{n}' for r, n in sorted(report.by_rule.items()))}): "
            f"nothing published; {advice}")


def _utterance_stats(units_dirs: list[Path]) -> pa.Table | None:
    tables = []
    for d in units_dirs:
        for f in sorted(d.glob("units-*.parquet")):
            t = pq.read_table(f, columns=["id", "corpus", "license", "duration", "n_frames", "units", "text"])
            tables.append(pa.table({
                "id": t["id"], "corpus": t["corpus"], "license": t["license"], "duration": t["duration"],
                "n_frames": t["n_frames"],
                "n_units": pa.compute.list_value_length(t["units"]).cast(pa.int32()),
                "has_text": pa.compute.invert(pa.compute.is_null(t["text"])),
            }))
    return pa.concat_tables(tables) if tables else None


def write_configs(inputs: dict[str, dict[str, list[Path]]], out: Path, owned: set[str] | None = None):
    """Copy each config's composed records into ``OUT/data/{config}/{split}-NNNNN-of-NNNNN-{digest}.parquet``,
    one record batch in memory at a time; returns the card's ``configs`` list, the files written (relative to
    ``out``) and the counts per config and split, per task/format, and per source (corpus, license).
    ``owned``: the files an earlier publish wrote, which may be replaced; any other file in the way is refused."""
    owned = set() if owned is None else owned
    counts: dict[str, dict[str, int]] = {}
    by_kind: dict[str, collections.Counter] = {}
    voices: dict[str, collections.Counter] = {}
    provenance: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    configs_yaml = []
    written: set[str] = set()
    total = sum(pq.read_metadata(f).num_rows for splits in inputs.values() for files in splits.values() for f in files)
    bar = progress(total=total, desc="publish", unit="rec")
    for config, splits in inputs.items():
        schema = records.arrow_schema(config)
        data_files = []
        for split, files in splits.items():
            for f in files:
                if not pq.read_schema(f).remove_metadata().equals(schema.remove_metadata()):
                    raise ValueError(f"{f}: schema differs from schemas/{config}.json; recompose it")
            files = [f for f in files if pq.read_metadata(f).num_rows]  # datasets cannot read zero-row Parquet files
            if not files:
                continue
            paths = []
            column = COUNTED_BY.get(config)
            for i, f in enumerate(files):
                # The name carries a digest of the rows: `datasets` caches a folder's configs by folder name
                # and card, so two datasets in same-named folders would otherwise share a cache entry.
                hashes = hashlib.sha256()
                for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BATCH, columns=["content_hash"]):
                    hashes.update("".join(batch.column(0).to_pylist()).encode())
                target = out / "data" / config / f"{split}-{i:05d}-of-{len(files):05d}-{hashes.hexdigest()[:12]}.parquet"
                refuse_foreign(out, [target.relative_to(out).as_posix()], owned)
                with parquet_writer(target, schema) as writer:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BATCH):  # one batch in memory
                        table = pa.Table.from_batches([batch]).cast(schema)
                        writer.write_table(table)
                        bar.update(table.num_rows)
                        counts.setdefault(config, collections.Counter())[split] += table.num_rows
                        if column:
                            by_kind.setdefault(config, collections.Counter()).update(
                                f"{n} turns" if column == "turns" else n for n in table.column(column).to_pylist())
                        if "voice" in table.column_names:
                            voices.setdefault(config, collections.Counter()).update(
                                v for spoken in table.column("voice").to_pylist() for v in spoken.split(",") if v)
                        for corpus, license in zip(table.column("corpus").to_pylist(), table.column("license").to_pylist()):
                            provenance[f"{corpus}\t{license}"][config] += 1
                written.add(target.relative_to(out).as_posix())
                paths.append(target.relative_to(out).as_posix())
            data_files.append({"split": split, "path": paths})
        if data_files:
            configs_yaml.append({"config_name": config, "data_files": data_files})
    bar.close()
    return configs_yaml, written, counts, by_kind, voices, provenance


# ------------------------------------------------------------------------------ which files are publish's
# ``OUT/.speechinstruct-publish.json`` lists every file publish wrote into OUT. A later publish replaces and
# deletes only those: the user's own files in OUT (their README.md, LICENSE.md, data/mine/…) are never touched,
# and one that stands where publish must write is refused with its name.
OWNED_LIST = ".speechinstruct-publish.json"


def owned_files(out: Path) -> set[str]:
    """The files (relative to ``out``) an earlier publish wrote there. A folder published before the list
    existed (its ``speechinstruct.json`` says ``pipeline_version``) owns the files of publish's layout."""
    listed = out / OWNED_LIST
    if listed.is_file():
        files = read_json(listed, dict, "; delete it and every file publish wrote, or publish into a new folder").get("files")
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError(f"{listed}: 'files' is not a list of paths; publish into a new folder")
        return set(files)
    try:
        legacy = json.loads((out / "speechinstruct.json").read_text()).get("pipeline_version")
    except (OSError, ValueError, AttributeError):
        legacy = None
    if not legacy:
        return set()
    patterns = ["README.md", "LICENSE.md", "speechinstruct.json", "stats/utterances.parquet", "arrow/*/**/*",
                *[f"data/{c}/*-*-of-*.parquet" for c in CONFIGS], *[f"speechgpt/{n}" for n in SPEECHGPT_FILES.values()]]
    return {p.relative_to(out).as_posix() for pattern in patterns for p in out.glob(pattern) if p.is_file()}


def refuse_foreign(out: Path, paths, owned: set[str]) -> None:
    """Refuse to write over a file in ``out`` that publish did not write."""
    for rel in paths:
        target = out / rel
        if (target.is_file() or target.is_symlink()) and rel not in owned:
            raise FileExistsError(f"{target}: already there and not written by publish; move it away or "
                                  "publish into another folder (publish never overwrites a file it did not write)")
        if target.is_dir() and not rel.startswith("arrow/"):
            raise FileExistsError(f"{target}: a folder stands where publish writes a file; move it away")


def _remove_stale(out: Path, owned: set[str], written: set[str]) -> None:
    """Delete what an earlier publish wrote and this one did not, then the folders that left empty."""
    for rel in sorted(owned - written):
        (out / rel).unlink(missing_ok=True)
        parent = (out / rel).parent
        while parent != out and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def one_vocabulary(compose_dir: Path, units_dirs: list[Path]) -> tuple[dict, Vocabulary | None]:
    """The spec (extractor, k-means) and unit vocabulary of every record of a compose folder: from the units folders
    its records came from, and the summaries of the speech it synthesized. One dataset has one vocabulary: records
    of two are refused, naming both."""
    spec, vocabulary, first = {}, None, None
    for d in units_dirs:
        spec_here = read_units_spec(d)
        if spec_here is None:
            continue
        found = folder_vocabulary(d)
        if vocabulary is None:
            spec, vocabulary, first = spec_here, found, d
        elif found != vocabulary:  # one dataset, one unit vocabulary
            raise ValueError(f"{compose_dir}: its records come from units of two vocabularies ({first}: "
                             f"{vocabulary.tokenizer} {vocabulary.size}; {d}: {found.tokenizer} {found.size}); "
                             "compose them into separate folders")
    for where, made in composed_speech_specs(compose_dir):  # synthesized speech: what tokenized it
        found = Vocabulary.from_json(made["vocabulary"], str(where))
        if vocabulary is None:
            spec, vocabulary, first = {**made.get("extractor", {}), "kmeans": made.get("kmeans")}, found, where
        elif (found.tokenizer, found.size) != (vocabulary.tokenizer, vocabulary.size):
            raise ValueError(f"{compose_dir}: its records come from units of two vocabularies ({first}: "
                             f"{vocabulary.tokenizer} {vocabulary.size}; {where}: {found.tokenizer} {found.size}); "
                             "compose them into separate folders")
    return spec, vocabulary


def publish(compose_dir: str | Path, out: str | Path, cfg: settings.Output | None = None, name: str = "SpeechInstruct",
            push_to_hub: str | None = None, save_to_disk: bool = False, speechgpt_files: bool = False) -> dict:
    """Write the dataset; ``save_to_disk`` also writes ``OUT/arrow/{config}`` for ``datasets.load_from_disk``;
    ``cfg`` (the recipe's ``output`` section, its defaults when None): ``eval_splits`` False leaves the validation
    and test records out; ``speechgpt_files`` also writes SpeechGPT's own training files (``export_speechgpt``).
    Only files an earlier publish wrote are replaced or deleted (:data:`OWNED_LIST`)."""
    eval_splits = (cfg or settings.Output()).eval_splits
    compose_dir, out = Path(compose_dir), Path(out)
    inputs = _inputs(compose_dir, eval_splits)
    for config in inputs:  # every shard composed, and from the units as they are now
        check_complete(compose_dir / config)
    units_dirs = composed_units_dirs(compose_dir, missing_ok=False)
    spec, vocabulary = one_vocabulary(compose_dir, units_dirs)
    refuse_invalid(compose_dir, inputs)
    out.mkdir(parents=True, exist_ok=True)
    owned = owned_files(out)
    _refuse_foreign_outputs(out, inputs, owned, save_to_disk, speechgpt_files)
    configs_yaml, written, counts, by_kind, voices, provenance = write_configs(inputs, out, owned)
    hours = _write_utterance_stats(out, units_dirs, written)
    meta = {"name": name, "pipeline_version": __version__, "k": vocabulary.size if vocabulary else None,
            "eval_splits": eval_splits, **_provenance(spec), "templates": _templates(compose_dir),
            "counts": {c: dict(v) for c, v in counts.items()},
            "by_kind": {c: dict(sorted(v.items())) for c, v in by_kind.items()},
            "voices": {c: dict(sorted(v.items())) for c, v in voices.items()},
            "hours": {c: round(h, 4) for c, h in sorted(hours.items())},
            "sources": [{"corpus": key.split("\t")[0], "license": key.split("\t")[1], "records": dict(v)}
                        for key, v in sorted(provenance.items())]}
    if vocabulary is not None:
        meta["vocabulary"] = vocabulary.to_json()
    _measured(meta, compose_dir, units_dirs)
    write_json(out / "speechinstruct.json", meta)
    data = card_data(meta, configs_yaml, out)
    write_text(out / "README.md", dataset_card(meta, configs_yaml, data))
    written |= {"speechinstruct.json", "README.md"}
    if data.license == "other":
        write_text(out / "LICENSE.md", licenses_file(meta))
        written.add("LICENSE.md")
    if save_to_disk:
        written |= write_arrow(out, configs_yaml)
    if speechgpt_files:
        meta["speechgpt_files"] = export_speechgpt(out, out / "speechgpt")
        written |= {f"speechgpt/{n}" for n in meta["speechgpt_files"]}
    _remove_stale(out, owned, written)  # e.g. an earlier export's files, which would no longer match the dataset
    write_json(out / OWNED_LIST, {"written_by": f"speechinstruct {__version__} publish", "files": sorted(written)})
    if push_to_hub:
        meta["pushed"] = push(out, push_to_hub)
    return meta


def _refuse_foreign_outputs(out: Path, inputs: dict, owned: set[str], save_to_disk: bool, speechgpt_files: bool) -> None:
    """Stop before writing when a file publish would write stands there and no earlier publish wrote it."""
    fixed = ["README.md", "LICENSE.md", "speechinstruct.json", "stats/utterances.parquet", OWNED_LIST,
             *(f"speechgpt/{n}" for n in SPEECHGPT_FILES.values() if speechgpt_files)]
    refuse_foreign(out, fixed, owned | {OWNED_LIST})
    if save_to_disk:
        for config in inputs:
            theirs = [p.relative_to(out).as_posix() for p in (out / "arrow" / config).rglob("*") if p.is_file()]
            refuse_foreign(out, theirs, owned)


def _provenance(spec: dict) -> dict:
    """The extractor and k-means of the units, machine-independent: files by name and hash, never by a local
    absolute path."""
    kmeans = {key: v for key, v in (spec.get("kmeans") or {}).items() if key != "source"}
    if (spec.get("kmeans") or {}).get("source"):
        kmeans["file"] = Path(spec["kmeans"]["source"]).name
    extractor = {key: v for key, v in spec.items() if key not in ("manifest", "root", "kmeans", "vocabulary", "checkpoint")}
    if str(extractor.get("source", "")).startswith("hf:/"):
        extractor["source"] = "hf:" + Path(extractor["source"][3:]).name
    return {"extractor": extractor, "kmeans": kmeans}


def _write_utterance_stats(out: Path, units_dirs: list[Path], written: set[str]) -> collections.Counter:
    """``stats/utterances.parquet`` of the units the records came from; hours of audio per corpus."""
    utterances = _utterance_stats(units_dirs)
    hours: collections.Counter = collections.Counter()
    if utterances is not None:
        write_parquet(out / "stats" / "utterances.parquet", utterances)
        written.add("stats/utterances.parquet")
        for corpus, seconds in zip(utterances.column("corpus").to_pylist(), utterances.column("duration").to_pylist()):
            hours[corpus] += seconds / 3600
    return hours


def _templates(compose_dir: Path) -> dict:
    templates = {}
    for cm_summary in sorted((compose_dir / "cross_modal").glob("summary*.json")):
        templates = json.loads(cm_summary.read_text()).get("templates", templates)
    return templates


def _measured(meta: dict, compose_dir: Path, units_dirs: list[Path]) -> None:
    """The languages (declared, or measured by langid when scores hold them) and what dedup checked, into ``meta``."""
    from ..curate.dedup import read_summary

    meta["languages"] = _languages(meta, units_dirs)
    measured = measured_languages(compose_dir)
    if measured:  # what langid found in the transcripts (score --language), not what the sources declare
        meta["languages_measured"] = measured
        meta["languages"] = sorted(c for c in {"en", *measured} if LANGUAGE_CODE.fullmatch(c))
    found = [read_summary(d) for d in units_dirs]  # the units compose read, when dedup wrote them
    if any(found):
        meta["dedup"] = {k: v for k, v in next(f for f in found if f).items() if k not in ("inputs", "examples")}


def write_arrow(out: Path, configs_yaml: list[dict]) -> set[str]:
    """``OUT/arrow/{config}``: each config as ``datasets``' ``save_to_disk`` writes it, for ``load_from_disk``;
    returns the files written (relative to ``out``)."""
    import datasets

    written = set()
    for item in configs_yaml:
        config = item["config_name"]
        dd = datasets.DatasetDict({d["split"]: datasets.Dataset.from_parquet([str(out / p) for p in d["path"]])
                                   for d in item["data_files"]})
        target = out / "arrow" / config
        tmp = target.with_name(f".{config}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        dd.save_to_disk(str(tmp))
        shutil.rmtree(target, ignore_errors=True)  # publish's own (refuse_foreign checked every file in it)
        tmp.rename(target)
        written |= {p.relative_to(out).as_posix() for p in target.rglob("*") if p.is_file()}
    return written


# What a dataset folder uploads: the card, its license notes, the data and statistics, SpeechGPT's files;
# never the save_to_disk copy (arrow/), the pipeline's stage stamps or half-written temporary files.
UPLOAD_PATTERNS = ["README.md", "LICENSE.md", "speechinstruct.json", "data/**/*.parquet", "stats/*.parquet",
                   "speechgpt/**/*.txt", "speechgpt/**/*.jsonl"]


class PushError(OSError):
    """The Hub could not be reached or refused the upload; the local dataset folder is complete."""


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub request raises: huggingface_hub's HTTP errors and its HTTP client's transport errors
    (httpx, or the httpx2 fork newer huggingface_hub releases use), whichever is installed."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    found: list[type[BaseException]] = [HfHubHTTPError, OSError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found.append(getattr(mod, "HTTPError", None) or getattr(mod, "RequestException"))
    return tuple(e for e in found if isinstance(e, type))


def push(folder: str | Path, repo_id: str, api=None, private: bool = False) -> dict:
    """Upload a published dataset folder to the Hub as ``repo_id``: the card is validated by the Hub first
    (as ``DatasetCard.push_to_hub`` does), the dataset repo is created when missing, and only
    :data:`UPLOAD_PATTERNS` go up, in one commit. ``api``: a ``huggingface_hub.HfApi`` (its token and endpoint).
    A Hub that cannot be reached or refuses is one :class:`PushError` line."""
    from huggingface_hub import DatasetCard, HfApi

    folder = Path(folder)
    api = api or HfApi()
    try:
        DatasetCard.load(folder / "README.md").validate(repo_type="dataset")
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder),
                                   allow_patterns=UPLOAD_PATTERNS, commit_message=f"speechinstruct {__version__}: publish")
    except _hub_errors() as e:
        endpoint = getattr(api, "endpoint", None) or "the Hub"
        raise PushError(f"could not push {folder} to {repo_id} at {endpoint}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}. The dataset folder is complete; "
                        "publish again with --push-to-hub when the Hub can be reached") from None
    return {"repo": str(url), "commit": str(getattr(commit, "oid", commit))}


SPEECHGPT_FILES = {  # (config, split) → the file SpeechGPT's scripts read, under their data/stage{N}/ folders
    ("pretrain", "train"): "stage1/train.txt",
    ("pretrain", "validation"): "stage1/dev.txt",
    ("cross_modal", "train"): "stage2/SpeechInstruct_cross_modal.jsonl",
    ("chain_of_modality", "train"): "stage3/SpeechInstruct_chain_of_modality.jsonl",
}


def export_speechgpt(dataset: str | Path, out: str | Path) -> dict:
    """SpeechGPT's own training files from a published dataset: ``stage1/train.txt`` and ``dev.txt`` (one
    ``<sosp>…<eosp>`` per line, for ``ma_pretrain.py``), ``stage2/SpeechInstruct_cross_modal.jsonl`` and
    ``stage3/SpeechInstruct_chain_of_modality.jsonl`` (one ``{"prefix", "plain_text"}`` object per line, for
    ``cm_sft.py``/``com_sft.py``). Train records only, besides stage 1's dev; streamed in record batches."""
    dataset, out = Path(dataset), Path(out)
    written = {}
    for (config, split), name in SPEECHGPT_FILES.items():
        files = sorted((dataset / "data" / config).glob(f"{split}-*.parquet"))
        if not files:
            continue
        count = 0
        with atomic_path(out / name) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for path in files:
                columns = ["text"] if config == "pretrain" else ["prefix", "plain_text"]
                for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_BATCH, columns=columns):
                    for row in batch.to_pylist():
                        f.write(row["text"] + "\n" if config == "pretrain" else
                                json.dumps({"prefix": row["prefix"], "plain_text": row["plain_text"]}, ensure_ascii=False) + "\n")
                        count += 1
        written[name] = count
    return written


# Hub license ids (https://huggingface.co/docs/hub/repositories-licenses) our sources' strings can be
HUB_LICENSES = {"cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc-by-nd-4.0", "cc0-1.0",
                "apache-2.0", "mit", "odc-by", "pddl", "cdla-permissive-2.0"}
# the language of each corpus's speech; the text side (templates, instructions) is the shipped English
CORPUS_LANGUAGES = {**{name: c.language for name, c in SOURCES.items() if c.language}, SAMPLE: "en"}
SPEECHGPT_CITATION = """@article{zhang2023speechgpt,
  title={SpeechGPT: Empowering Large Language Models with Intrinsic Cross-Modal Conversational Abilities},
  author={Zhang, Dong and Li, Shimin and Zhang, Xin and Zhan, Jun and Wang, Pengyu and Zhou, Yaqian and Qiu, Xipeng},
  journal={arXiv preprint arXiv:2305.11000},
  year={2023}
}"""


def measured_languages(compose_dir: Path) -> dict[str, int]:
    """Utterances per language of their transcripts, as ``score --language`` measured them, over the scores folders
    the compose summaries name (cross-modal and pretrain records read them), as those summaries recorded them."""
    found: collections.Counter[str] = collections.Counter()
    folders = set()
    for config in [name for name, kind in RECORD_KINDS.items() if kind.gated and kind.from_units]:
        for summary in sorted((compose_dir / config).glob("summary*.json")):
            said = read_json(summary)
            scores = said.get("scores")  # composed before summaries said what was measured: read it there
            measured = said.get("text_language") or scores_entry(scores).get("text_language")
            if scores and measured and scores not in folders:
                folders.add(scores)
                found.update(measured)
    return dict(found.most_common())


def _languages(meta: dict, units_dirs: list[Path]) -> list[str]:
    """Languages of the records: English for the text side (the shipped templates and instructions), plus each
    corpus's speech language where it is known (Common Voice: the locales in its utterance ids; a Hugging
    Face dataset: its card's ``language``)."""
    found = {"en"}
    for source in meta["sources"]:
        if source["corpus"] in CORPUS_LANGUAGES:
            found.add(CORPUS_LANGUAGES[source["corpus"]])
    for d in units_dirs:  # what a source said of itself at shard time (a Hugging Face card's `language`)
        spec = read_units_spec(d) or {}
        summary = Path(spec.get("manifest", "")) / "summary.json"
        if spec.get("manifest") and summary.is_file():
            found.update(json.loads(summary.read_text()).get("languages") or [])
    if any(s["corpus"] == "commonvoice" for s in meta["sources"]):
        for d in units_dirs:
            for f in sorted(d.glob("units-*.parquet")):
                for batch in pq.ParquetFile(f).iter_batches(batch_size=ROWS_PER_BATCH, columns=["id"]):
                    found.update(i.split("/")[1].split("-")[0] for i in batch.column(0).to_pylist()
                                 if i.startswith("commonvoice/") and i.count("/") >= 2)
    return sorted(code for code in found if isinstance(code, str) and LANGUAGE_CODE.fullmatch(code))


def size_category(n: int) -> str:
    """The Hub's size_categories bucket of ``n`` records."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")):
        if n < limit:
            return label
    return "n>1T" if n >= 10 ** 12 else "1B<n<10B"


def card_data(meta: dict, configs_yaml: list[dict], folder: Path):
    """The card's YAML as huggingface_hub's ``DatasetCardData``, with ``dataset_info`` (features and split
    sizes per config) written by ``datasets``' own ``DatasetInfosDict``, as ``push_to_hub`` writes it."""
    import datasets
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    languages = meta.get("languages") or ["en"]
    licenses = sorted({s["license"] for s in meta["sources"]})
    single = licenses[0].lower() if len(licenses) == 1 and licenses[0].lower() in HUB_LICENSES else None
    license = {"license": single} if single else {
        "license": "other", "license_name": "speechinstruct-sources", "license_link": "LICENSE.md"}
    corpora = sorted({s["corpus"] for s in meta["sources"]})
    data = DatasetCardData(
        language=languages, **license, pretty_name=meta["name"],
        annotations_creators=["machine-generated"], language_creators=["found", "machine-generated"],
        multilinguality="monolingual" if len(languages) == 1 else "multilingual",
        size_categories=[size_category(sum(sum(v.values()) for v in meta["counts"].values()))],
        source_datasets=sorted({f"extended|{c}" if not c.startswith("speechinstruct-") else "original" for c in corpora}),
        task_categories=["automatic-speech-recognition", "text-to-speech", "text-generation"],
        tags=["speech", "discrete-units", "speechgpt", "speechinstruct"], configs=configs_yaml)
    data.license = license["license"]  # DatasetCardData keeps unknown keys as extras, license as a field
    infos = DatasetInfosDict()
    for item in configs_yaml:
        config = item["config_name"]
        splits, stored = datasets.SplitDict(), 0
        for split in item["data_files"]:
            files = [pq.ParquetFile(folder / path) for path in split["path"]]
            size = sum(f.metadata.row_group(i).total_byte_size for f in files for i in range(f.metadata.num_row_groups))
            stored += sum((folder / path).stat().st_size for path in split["path"])
            splits.add(datasets.SplitInfo(name=split["split"], num_bytes=size,
                                          num_examples=meta["counts"][config][split["split"]]))
        infos[config] = datasets.DatasetInfo(features=datasets.Features.from_arrow_schema(records.arrow_schema(config)),
                                             splits=splits, config_name=config, download_size=stored,
                                             dataset_size=sum(s.num_bytes for s in splits.values()))
    infos.to_dataset_card_data(data)
    return data


def cell(text) -> str:
    """A value from the data (a corpus name, a license string a source's card or a user gave) as Markdown text:
    markup escaped, so the card the Hub renders shows it and never runs it, and ``|`` kept inside its cell."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def licenses_file(meta: dict) -> str:
    lines = ["# Licenses of the sources", "", "Each record carries `corpus` and `license`; this dataset combines:", "",
             "| corpus | license | records |", "|---|---|---|"]
    for s in meta["sources"]:
        lines.append(f"| {cell(s['corpus'])} | {cell(s['license'])} | {sum(s['records'].values())} |")
    return "\n".join(lines + ["", "Use each record under the license of its source."]) + "\n"


def dedup_section(dedup: dict | None) -> list[str]:
    """The card's lines on what ``dedup`` checked the training utterances against and what it dropped."""
    if not dedup:
        return ["", "## Duplicates and contamination", "",
                "The utterances were not deduplicated or checked against evaluation sets (no `dedup` stage ran)."]
    checked = dedup["checked_against"]
    sources = [f"`{cell(s['source'])}` ({s['texts']} texts, {s['utterances']} utterances)" for s in checked["eval_sources"]]
    s = dedup["settings"]
    lines = ["", "## Duplicates and contamination", "",
             f"Before composing, `speechinstruct dedup` checked {dedup['utterances']} utterances and kept {dedup['kept']}. "
             f"Checked against: the corpora's own validation and test rows ({checked['eval_split_rows']})"
             + (", " + ", ".join(sources) if sources else "") + f"; {checked['eval_texts']} evaluation texts in all, "
             f"matched by {s['eval_ngram']}-word n-grams. Near duplicates: MinHash of {s['ngram']}-unit n-grams "
             f"({s['num_perm']} permutations, LSH at Jaccard {s['threshold']:g}) verified by a normalised Levenshtein "
             f"similarity of at least {s['similarity']:g}.", "", "| dropped because | utterances |", "|---|---|"]
    lines += [f"| {cell(reason)} | {n} |" for reason, n in dedup["dropped"].items()] or ["| (nothing) | 0 |"]
    shared = dedup.get("speakers_in_train_and_eval") or []
    lines += ["", f"Speakers found in both training and evaluation splits of one corpus: {len(shared)}"
              + (" (their training utterances were dropped)." if s.get("speaker_disjoint") and shared else ".")]
    return lines


def dataset_card(meta: dict, configs_yaml: list[dict], data) -> str:
    """The dataset card (``README.md``): ``data`` (:func:`card_data`) as its YAML, and the body, section by section."""
    from huggingface_hub import DatasetCard

    lines = [f"# {cell(meta['name'])}", "",
             "A SpeechInstruct-style cross-modal speech-instruction dataset (as in SpeechGPT), built with "
             f"speechinstruct {meta['pipeline_version']}. Speech is represented as discrete units "
             "`<sosp><12><7>…<eosp>`.", ""]
    lines += (_sources_section(meta) + _units_section(meta) + _counts_section(meta) + _splits_section(meta)
              + dedup_section(meta.get("dedup")) + _languages_section(meta) + _fields_section(configs_yaml)
              + _uses_section(meta, data.language, configs_yaml))
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _sources_section(meta: dict) -> list[str]:
    lines = ["## Sources and provenance", "", "| corpus | license | hours | records |", "|---|---|---|---|"]
    for s in meta["sources"]:
        lines.append(f"| {cell(s['corpus'])} | {cell(s['license'])} | {meta['hours'].get(s['corpus'], 0):.3f} | "
                     + ", ".join(f"{c}: {n}" for c, n in sorted(s["records"].items())) + " |")
    return lines


def _units_section(meta: dict) -> list[str]:
    """The speech units and the templates."""
    ext, km = meta["extractor"], meta["kmeans"] or {}
    return ["", "## Speech units", "",
            f"- features: `{ext.get('features')}`" + (f", source `{ext.get('source')}`, layer {ext.get('layer')}" if ext.get("layer") else f" ({ext.get('options', '')})"),
            f"- frame rate: {ext.get('frame_rate')} Hz, dimension {ext.get('dim')}",
            f"- k-means: K = {meta['k']}, file `{km.get('file', '')}`" + (f", sha256 `{km['sha256']}`" if km.get("sha256") else ""),
            *([f"- vocabulary: tokenizer `{voc['tokenizer']}`, {voc['size']} unit tokens `<0>`…`<{voc['size'] - 1}>`"
               f" ({voc.get('codebooks', 1)} codebook of {voc.get('codebook_size', voc['size'])})"]
              if (voc := meta.get("vocabulary")) else []),
            "- consecutive repeated units are merged", "",
            "## Templates", ""] + [f"- {t}: `{v}`" for t, v in sorted(meta["templates"].items())]


def _counts_section(meta: dict) -> list[str]:
    """Records per config and split, per kind, and the voices that spoke them."""
    lines = ["", "## Counts", "", "| config | split | records |", "|---|---|---|"]
    for config, splits in meta["counts"].items():
        for split, n in splits.items():
            lines.append(f"| {config} | {split} | {n} |")
    for config, kinds in meta["by_kind"].items():
        lines.append("")
        lines.append(f"{config}: " + ", ".join(f"{k} {n}" for k, n in kinds.items()))
    if meta.get("voices"):
        lines += ["", "## Voices", "", "The TTS voices that spoke the synthesized turns (engine:voice@rate), and how "
                  "many turns or records each spoke:", "", "| config | voices | uses |", "|---|---|---|"]
        for config, used in meta["voices"].items():
            lines.append(f"| {config} | {len(used)} | " + ", ".join(f"`{cell(v)}` {n}" for v, n in used.items()) + " |")
    return lines


def _splits_section(meta: dict) -> list[str]:
    rules = [SPLIT_RULES.get(c, f"{cell(c)}: as its reader marks it") for c in sorted({s["corpus"] for s in meta["sources"]})]
    lines = ["", "## Splits", "",
             "Every record keeps the split of the audio it was made from, as the corpus itself defines it ("
             + "; ".join(rules) + "). No dev or test audio is in `train`."]
    if meta.get("eval_splits", True):
        lines.append("`validation` and `test` hold the records made from the corpora's dev and test audio; for "
                     "`pretrain`, `validation` also holds a hashed share of training utterances (stage 1's dev set).")
    else:
        lines.append("Records made from the corpora's dev and test audio were left out of this dataset.")
    return lines


def _languages_section(meta: dict) -> list[str]:
    if not meta.get("languages_measured"):
        return []
    return (["", "## Languages (measured)", "", "Utterances per language of their transcripts, by langid "
             "(`score --language`), before the quality gates:", "", "| language | utterances |", "|---|---|"]
            + [f"| {cell(code)} | {n} |" for code, n in meta["languages_measured"].items()])


def _fields_section(configs_yaml: list[dict]) -> list[str]:
    """Every config's fields, from its schema."""
    lines = ["", "## Fields", ""]
    for item in configs_yaml:
        schema = records.json_schema(item["config_name"])
        lines += [f"### {item['config_name']}", "", "| field | type | description |", "|---|---|---|"]
        for field, prop in schema["properties"].items():
            lines.append(f"| `{field}` | {prop['x-arrow']} | {prop.get('description', '').replace('|', '/')} |")
        lines.append("")
    return lines


def _uses_section(meta: dict, languages: list[str], configs_yaml: list[dict]) -> list[str]:
    """Intended uses, limitations, loading and citation."""
    return ["## Intended uses", "",
            "Training and evaluating speech-text language models in SpeechGPT's three stages: `pretrain` for "
            "stage 1 (unit language modelling), `cross_modal` for stage 2 (ASR and TTS instructions), "
            "`chain_of_modality` for stage 3 (spoken dialogue), `dialogue` for multi-turn spoken dialogue, `interleaved` (text and speech switching at word boundaries) for "
            "stage-1-style pretraining. "
            "Prompt-completion columns suit TRL's `SFTTrainer`; `dialogue` has `messages` and no prompt-completion "
            "columns, so TRL reads it as chat data (through a chat template, with the loss on the assistant turns: "
            "`assistant_only_loss`); SpeechGPT's text form of the dialogue is `prefix` + `plain_text`.",
            "", "## Limitations", "",
            f"- Units come from one extractor and k-means (K = {meta['k']}); they are meaningless with another.",
            "- Instructions and responses are machine-generated (templates, an LLM or the shipped samples); "
            "spoken answers are synthetic TTS speech, not human recordings (one voice per speaker and record; see Voices).",
            "- Transcripts are the source corpora's own, with their errors and normalisation.",
            f"- Languages: {cell(', '.join(languages))}. Speakers and accents are those of the source corpora.", "",
            "## Loading", "", "```python", "import datasets",
            *[f'{c["config_name"]} = datasets.load_dataset("PATH_OR_REPO", "{c["config_name"]}")' for c in configs_yaml],
            "```", "", "Validate with `speechinstruct validate PATH`. Each record carries `source_id`, `corpus`, "
            "`license`, `pipeline_version` and `content_hash` (sha256 of its content fields).", "",
            "## Citation", "", "This dataset follows SpeechGPT's SpeechInstruct recipe:", "", "```bibtex",
            SPEECHGPT_CITATION, "```", ""]

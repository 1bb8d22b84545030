"""``speechinstruct compose``: SpeechInstruct records in SpeechGPT's exact text form.

* ``cross_modal``: for every utterance with a transcript, an ASR and/or a TTS record
  (``[Human]: {instruction} This is input: {input}<eoh> [SpeechGPT]: {output}<eoa>``).
* ``pretrain``: one ``<sosp>…<eosp>`` line per utterance.

Records keep the split of the audio they come from (``corpora.SPLITS``: train, validation, test), in separate
files named by it: ``train-*``, ``validation-*``, ``test-*``. Validation and test audio never becomes a training
record. For ``pretrain``,
``dev_fraction`` of the train utterances (by a hash of the id) also go to ``validation``, since LibriLight,
stage 1's corpus, has no dev set.
* ``chain_of_modality``: text instruction–response pairs (optionally rewritten for speech by an LLM),
  spoken by a TTS engine, turned into units, in one of four formats:

  speech-speech  ``[Human]: {units(q)}<eoh>. [SpeechGPT]: {q}; [ta] {a}; [ua] {units(a)}<eoa>.``
  speech-text    ``[Human]: {units(q)}<eoh>. [SpeechGPT]: {q}; [ta] {a}<eoa>.``
  text-speech    ``[Human]: {q}<eoh>. [SpeechGPT]: [ta] {a}; [ua] {units(a)}<eoa>.``
  text-text      ``[Human]: {q}<eoh>. [SpeechGPT]: [ta] {a}<eoa>.``

Every record carries provenance (source id, corpus, license, pipeline version, content hash). Choices
(task, template, format, voice) are drawn from a hash of seed and source id, so a record does not depend
on processing order, sharding or reruns. Output is written per input shard (or per chunk of pairs),
atomically; a rerun skips finished parts.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from . import __version__, recipe as settings, records, templates as templates_mod
from .audio import AudioError
from .corpora.base import SPLITS, split_name
from .io import iter_rows, parquet_rows, write_json, write_parquet
from .progress import progress
from .recipe import default
from .score import ScoreError
from .shardfiles import select_shards, shard_suffix, unit_files
from .speechgpt import (DEFAULT_PREFIX, FORMATS, SPEECHGPT_PREFIX, com_text, cross_modal_text, find_markup,  # noqa: F401
                        record_problems, text_problem)


def _draw(seed: int, *parts: str) -> int:
    """A deterministic 64-bit draw from the seed and the given strings."""
    return int.from_bytes(hashlib.sha256("\0".join([str(seed), *parts]).encode()).digest()[:8], "big")


QUALITY_COLUMNS = ("dnsmos_ovrl", "wer", "cer")  # the scores a record carries (null when not scored)


class RecordRefused(ValueError):
    """A record that must not be written: a text holds markup or a control character (after every change made to
    it: markdown stripped, an LLM's rewrite), or an id no UTF-8 file can hold. The composer drops and counts it."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(message for _, message in problems))
        rule, message = problems[0]
        column = message.split(" holds ")[0].split(" turn ")[0]
        self.key = f"dropped: {rule.replace('-', ' ')} in {column}"


def finish(record: dict) -> dict:
    """Add the prompt/completion pair (records in SpeechGPT's text form, not the chat form of ``messages``: TRL would
    read a record with both as either, by the hash seed), the score columns left unset (null), pipeline version
    and content hash (over every other field). Every record of every kind passes here: one that holds markup or a
    control character in a text field is refused (:class:`RecordRefused`), whatever made it so."""
    problems = record_problems(record)
    if problems:
        raise RecordRefused(problems)
    for column in QUALITY_COLUMNS:
        record.setdefault(column, None)
    if "plain_text" in record and "messages" not in record:
        record["prompt"], record["completion"] = record["prefix"], record["plain_text"]
    record["pipeline_version"] = __version__
    record["content_hash"] = records.content_hash(record)
    return record


def _records_file(path: Path, kind: str):
    """Records of ``kind`` streamed into ``path`` (one row group in memory at a time)."""
    return parquet_rows(path, records.arrow_schema(kind), functools.partial(records.to_table, kind))


def _named(part: str | None, suffix: str) -> str:
    return f"{part}-{suffix}" if part else suffix


def _unit_shards(units_dir: Path, num_shards: int = 1, shard_index: int = 0):
    """(suffix, path) of the units shards this worker owns (``--num-shards/--shard-index``)."""

    for path in select_shards(unit_files(units_dir), num_shards, shard_index):
        yield shard_suffix(path), path


class QualityGate:
    """The scores of a units folder's utterances (a ``score`` output, shard by shard) and the gates they must
    pass. ``check(suffix, id)`` → (score columns for the record, reason to drop or None). Without a scores
    folder every utterance passes with null scores. Memory: one shard's scores at a time."""

    def __init__(self, scores: str | Path | None = None, gates=None):
        self.folder, self.gates = (Path(scores) if scores else None), gates
        self._suffix, self._table = None, {}

    def check(self, suffix: str, uid: str) -> tuple[dict, str | None]:
        if self.folder is None:
            return {}, None
        if suffix != self._suffix:
            from .score import read_scores

            self._suffix, self._table = suffix, read_scores(self.folder, suffix)
        found = self._table.get(uid)
        columns = {c: found[c] for c in QUALITY_COLUMNS} if found else {}
        reason = self.gates.reason(found) if self.gates is not None else None
        if reason == "not scored":
            reason = f"not scored (see {self.folder / f'errors-{suffix}.jsonl'})"
        return columns, reason


def _quality_drop(counts, dropped, uid: str, reason: str) -> None:
    counts["dropped: quality: " + reason.split(" (")[0]] += 1
    dropped.append({"where": uid, "reason": f"quality: {reason}"})  # the counted key, then the score


@contextlib.contextmanager
def split_records(out: Path, part: str | None, suffix: str, kind: str):
    """Record sinks of ``kind`` for one units shard, one file per split (``{split}-{part-}{suffix}.parquet``),
    all written when the block ends, so that together they mark the shard done; None when they already are."""
    targets = {s: out / f"{s}-{_named(part, suffix)}.parquet" for s in SPLITS}
    if all(t.exists() for t in targets.values()):
        yield None
        return
    with contextlib.ExitStack() as files:
        yield {s: files.enter_context(_records_file(t, kind)) for s, t in targets.items()}


def gated_units(units_dir: Path, out: Path, part: str | None, kind: str, quality: QualityGate, counts, dropped: list,
                num_shards: int = 1, shard_index: int = 0):
    """(split sinks, units row, its score columns) for every row of the units shards this worker owns that
    passes ``quality``, shard after shard (:func:`split_records`; a shard already written is skipped); a row
    that fails is counted in ``counts`` and ``dropped``."""
    for suffix, path in _unit_shards(units_dir, num_shards, shard_index):
        with split_records(out, part, suffix, kind) as sinks:
            if sinks is None:
                counts["shards skipped (done)"] += 1
                continue
            for u in progress(iter_rows(path), desc=f"{kind} {path.name}", unit="utt"):
                judged, reason = quality.check(suffix, u["id"])
                if reason:
                    _quality_drop(counts, dropped, u["id"], reason)
                    continue
                yield sinks, u, judged


def split_counts(out: Path, part: str | None = None) -> dict[str, int]:
    """Records per split in a compose folder's ``{split}-*.parquet`` files (``part``'s only, when given)."""
    return {split: sum(pq.read_metadata(f).num_rows for f in out.glob(f"{split}-{part + '-' if part else ''}*.parquet"))
            for split in SPLITS}


# ------------------------------------------------------------------------------------------- cross-modal
def cross_modal(units_dir: str | Path, out: str | Path, asr_templates: dict | None = None,
                tts_templates: dict | None = None, mode: str = default(settings.CrossModal, "mode"),
                asr_fraction: float = default(settings.CrossModal, "asr_fraction"), prefix: str = DEFAULT_PREFIX,
                seed: int = default(settings.Compose, "seed"), part: str | None = None, num_shards: int = 1,
                shard_index: int = 0, scores: str | Path | None = None, gates=None) -> dict:
    """ASR/TTS records for every transcribed utterance. ``mode``: both (one of each), random (one, ASR with
    probability ``asr_fraction``), asr, or tts. ``part`` names the files (``train-{part}-NNNNN``) so that
    several corpora can share one output folder. ``scores``: a ``score`` output of these utterances; their
    columns go into the records, and ``gates`` (``score.Gates``) drop those that fail."""
    if mode not in ("both", "random", "asr", "tts"):
        raise ValueError(f"unknown mode {mode!r}: choose both, random, asr or tts")
    sets = {"asr": asr_templates or templates_mod.builtin("asr"), "tts": tts_templates or templates_mod.builtin("tts")}
    for task, data in sets.items():
        templates_mod.check_markup(data, f"{task} templates {data['version']}")
    out = Path(out)
    counts: collections.Counter[str] = collections.Counter()
    dropped: list[dict] = []
    quality = QualityGate(scores, gates)
    for sinks, u, judged in gated_units(Path(units_dir), out, part, "cross_modal", quality, counts, dropped,
                                        num_shards, shard_index):
        text = (u.get("text") or "").strip()
        if not text:
            counts["no transcript"] += 1
            continue
        problem = text_problem(text)
        if problem:
            rule = problem[0].replace("-", " ")
            counts[f"dropped: {rule} in transcript"] += 1
            dropped.append({"where": u["id"], "reason": f"{rule} in transcript ({problem[1]})"})
            continue
        if mode == "both":
            tasks = ["asr", "tts"]
        elif mode == "random":
            tasks = ["asr" if _draw(seed, "task", u["id"]) / 2**64 < asr_fraction else "tts"]
        else:
            tasks = [mode]
        for task in tasks:
            items = sets[task]["templates"]
            template = items[_draw(seed, "template", task, u["id"]) % len(items)]
            try:
                record = finish({
                    "id": f"{task}/{u['id']}", "prefix": prefix,
                    "plain_text": cross_modal_text(task, template["text"], text, u["unit_text"]),
                    "task": task, "units": u["units"], "transcript": text, "template_id": template["id"],
                    "source_id": u["id"], "corpus": u["corpus"], "license": u["license"], **judged,
                })
            except RecordRefused as e:
                counts[e.key] += 1
                dropped.append({"where": u["id"], "reason": f"{e.key.removeprefix('dropped: ')} ({e})"})
                continue
            sinks[split_name(u["split"])].add(record)
    by_split: collections.Counter[str] = collections.Counter()
    for split in SPLITS:  # all shards, not just this run's
        for f in sorted(out.glob(f"{split}-{part + '-' if part else ''}*.parquet")):
            tasks = pq.read_table(f, columns=["task"]).column("task")  # counted in Arrow, not as a Python list
            by_split[split] += len(tasks)
            for pair in pa.compute.value_counts(tasks).to_pylist():
                counts[pair["values"]] += pair["counts"]
    summary = {"records": counts["asr"] + counts["tts"], **dict(sorted(counts.items())), "splits": dict(by_split),
               "templates": {t: sets[t]["version"] for t in sets}, "units": str(Path(units_dir).resolve()),
               **({"scores": str(Path(scores).resolve())} if scores else {}),
               "dropped_examples": dropped[:200]}
    write_json(out / f"summary{'-' + part if part else ''}.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------- pretrain
def pretrain(units_dir: str | Path, out: str | Path, dev_fraction: float = default(settings.Pretrain, "dev_fraction"),
             seed: int = default(settings.Compose, "seed"), part: str | None = None,
             num_shards: int = 1, shard_index: int = 0, scores: str | Path | None = None, gates=None) -> dict:
    """Stage-1 unit text, one record per utterance, in the split of its audio; ``dev_fraction`` of the train
    utterances (by a hash of the id) go to validation too. ``scores``, ``gates``: as for :func:`cross_modal`."""
    if not 0 <= dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    out = Path(out)
    counts: collections.Counter[str] = collections.Counter()
    dropped: list[dict] = []
    for sinks, u, judged in gated_units(Path(units_dir), out, part, "pretrain", QualityGate(scores, gates), counts,
                                        dropped, num_shards, shard_index):
        split = split_name(u["split"])
        if split == "train" and _draw(seed, "split", u["id"]) / 2**64 < dev_fraction:
            split = "validation"
        sinks[split].add(finish({"id": u["id"], "text": u["unit_text"], "units": u["units"],
                                 "source_id": u["id"], "corpus": u["corpus"], "license": u["license"], **judged}))
    counts.update(split_counts(out, part))
    summary = {**{s: counts[s] for s in SPLITS}, **{k: v for k, v in sorted(counts.items()) if k.startswith("dropped")},
               "units": str(Path(units_dir).resolve()), **({"scores": str(Path(scores).resolve())} if scores else {}),
               "dropped_examples": dropped[:200]}
    write_json(out / f"summary{'-' + part if part else ''}.json", summary)
    return summary


# ------------------------------------------------------------------------------------- chain-of-modality
class SpeechRejected(ValueError):
    """Synthesized speech that failed the quality gates (or could not be scored); the pair is dropped."""


class NotScored(SpeechRejected):
    """Synthesized speech the judge could not score (the gates could not be applied)."""


REFERENCE = "The quick brown fox jumps over the lazy dog, and the five boxing wizards jump quickly."


def judge_speech(judge, gates, wav, sr: int, text: str, who: str, say_reference) -> dict:
    """The judge's scores of one synthesized turn (``text``, spoken as voice ``who``); raises SpeechRejected when it
    cannot be scored (:class:`NotScored`) or fails ``gates``. With a speaker encoder, the turn is compared with the voice's reference:
    ``say_reference()`` gives (wav, sr) of the voice saying :data:`REFERENCE`, embedded once per voice."""
    from .audio import resample

    if judge.speaker is not None and who not in judge.references:
        judge.references[who] = judge.speaker.embed(resample(*say_reference()))
    result = judge.scores([resample(wav, sr)], [text], [who])[0]
    if isinstance(result, str):
        raise NotScored(f"not scored ({result})")
    reason = gates.reason(result) if gates is not None else None
    if reason:
        raise SpeechRejected(reason)
    return result


def worst(judged: list[dict]) -> dict:
    """The lowest DNSMOS and highest WER/CER over a record's synthesized turns (null where none has one)."""
    out = {}
    for column, pick in (("dnsmos_ovrl", min), ("wer", max), ("cer", max)):
        values = [j[column] for j in judged if j.get(column) is not None]
        out[column] = pick(values) if values else None
    return out


MAX_WORDS = {"instruction": 40, "response": 80}
MAX_CHARS = {"instruction": 400, "response": 800}  # a 100 kB "word" is one word but no sentence
MAX_WORD_CHARS = 40
_MARKDOWN = re.compile(r"(\*\*|__|`|^#+\s*|^\s*[-*•]\s+)", re.M)


def unfit_for_speech(instruction: str, response: str) -> str | None:
    """Why a pair cannot be spoken naturally (code, URLs, tables, too long), or None."""
    return unfit_text("instruction", instruction) or unfit_text("response", response)


def unfit_text(name: str, text: str, limit: str | None = None) -> str | None:
    """Why one text (named ``name`` in the reason) cannot be spoken naturally, or None; ``limit`` picks the
    length limits (``instruction``'s or ``response``'s; default: ``name``'s)."""
    limit = limit or name
    if not text.strip():
        return f"empty {name}"
    problem = text_problem(text)
    if problem:
        return f"{problem[0].replace('-', ' ')} in {name} ({find_markup(text) or problem[1].split()[-1]})"
    if "```" in text or re.search(r"^\s{4,}\S", text, re.M) or re.search(r"\b(def|class|return|import)\b.*[:(]", text):
        return f"code in {name}"
    if re.search(r"https?://|www\.", text):
        return f"URL in {name}"
    if re.search(r"^\s*\|.*\|\s*$", text, re.M):
        return f"table in {name}"
    if len(text.split()) > MAX_WORDS[limit] or len(text) > MAX_CHARS[limit]:
        return f"{name} too long to speak"
    if any(len(word) > MAX_WORD_CHARS for word in text.split()):
        return f"{name} has a word too long to speak"
    return None


def speakable(text: str) -> str:
    """Light clean-up for TTS: markdown marks removed, whitespace collapsed."""
    return " ".join(_MARKDOWN.sub("", text).split())


REWRITE_PROMPT = (
    "Rewrite this instruction-response pair for a spoken conversation. The instruction should sound like "
    "something a person would say aloud. The response should be a concise spoken answer: plain sentences, "
    "no markdown, lists, code, tables, URLs or symbols that cannot be read aloud. If the pair cannot be "
    "turned into natural speech, set fit to false. Answer with JSON only: "
    '{"fit": true|false, "instruction": "...", "response": "..."}'
)


def rewrite_for_speech(llm, instruction: str, response: str) -> tuple[str, str] | str:
    """(instruction, response) rewritten by the LLM, or a reason the pair was dropped."""
    from .llm import TruncatedAnswer

    try:
        answer = llm.complete([{"role": "system", "content": REWRITE_PROMPT},
                               {"role": "user", "content": json.dumps({"instruction": instruction, "response": response})}])
    except TruncatedAnswer:
        return "LLM answer cut off (max_tokens)"
    match = re.search(r"\{.*\}", answer, re.S)
    try:
        data = json.loads(match.group(0)) if match else None
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or not {"fit", "instruction", "response"} <= set(data):
        return "LLM answer not understood"
    if not data["fit"]:
        return "LLM judged unfit for speech"
    return str(data["instruction"]).strip(), str(data["response"]).strip()


def read_pairs(source: str | Path, instruction_column: str = "instruction", response_column: str = "response",
               id_column: str | None = "id", split: str = "train") -> Iterator[dict | tuple[str, str]]:
    """Pairs ``{id, instruction, response}`` from the shipped sample (``builtin``), a JSONL file, a
    Parquet file, a saved HF dataset folder or an HF dataset name; malformed lines come as
    (where, reason)."""
    for where, fallback_id, obj in read_objects(source, "instructions_sample.jsonl", split):
        if isinstance(obj, str):
            yield (where, obj)
        else:
            yield from _pair(obj, where, instruction_column, response_column, id_column, fallback_id)


def read_objects(source: str | Path, builtin: str, split: str = "train") -> Iterator[tuple[str, str, dict | str]]:
    """(where, fallback id, object or the reason it is not one) for each line of a JSONL file or row of a
    Parquet file, saved HF dataset folder or HF dataset name; ``builtin`` names the shipped sample used for
    the source ``builtin``."""
    from importlib import resources

    if str(source) == "builtin":
        source = resources.files("speechinstruct.data").joinpath(builtin)
    path = Path(str(source))
    if path.suffix in (".jsonl", ".json") and path.is_file():
        name = path.name
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{name}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, "", f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
                    continue
                if not line.strip():
                    continue
                obj = parse_json_object(line)
                if isinstance(obj, str):
                    yield where, "", obj
                    continue
                yield where, f"{path.stem}-{lineno}", obj
        return
    import datasets

    if path.is_dir() and (path / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(path))
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    elif path.suffix == ".parquet" and path.is_file():
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    elif path.exists():
        ds = datasets.load_dataset(str(path), split=split)
    else:  # a hub id: needs internet
        ds = datasets.load_dataset(str(source), split=split)
    for i, obj in enumerate(ds):
        yield f"{path.name}[{i}]", f"{path.name}-{i}", obj


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


def _pair(obj: dict, where: str, icol: str, rcol: str, idcol: str | None, fallback_id: str):
    missing = [c for c in (icol, rcol) if c not in obj]
    if missing:
        yield (where, f"missing columns {missing}")
        return
    instruction, response = obj[icol], obj[rcol]
    if not isinstance(instruction, str) or not isinstance(response, str):
        yield (where, "instruction and response must be strings")
        return
    yield {"id": str(obj.get(idcol) or fallback_id) if idcol else fallback_id, "instruction": instruction,
           "response": response, "where": where}


def _speaks(side: str, fmt: str) -> bool:
    """Whether format ``fmt`` has the question (``q``) or the answer (``a``) as speech."""
    return fmt.startswith("speech") if side == "q" else fmt.endswith("speech")


def unique_pairs(source, instruction_column: str, response_column: str, id_column: str | None,
                 max_pairs: int | None) -> tuple[list[dict], list[dict]]:
    """The usable pairs of ``source`` (at most ``max_pairs``) and what was dropped (:func:`unique_items`)."""
    return unique_items(read_pairs(source, instruction_column, response_column, id_column), max_pairs)


def decontaminated(items: list[dict], dropped: list[dict], eval_texts, fields) -> tuple[list[dict], list[dict]]:
    """``items`` without those whose text (``fields``: keys of text, or of lists of (question, answer) exchanges)
    shares an n-gram with an evaluation text (``dedup.EvalTexts``; None: all kept), which go to ``dropped``."""
    if eval_texts is None:
        return items, dropped
    kept, dropped = [], list(dropped)
    for item in items:
        texts = [t for f in fields for t in ([item[f]] if isinstance(item[f], str) else [x for pair in item[f] for x in pair])]
        found = next((m for m in map(eval_texts.match, texts) if m), None)
        if found:
            dropped.append({"where": item["where"], "id": item["id"],
                            "reason": f"evaluation text ({found[1]}: {found[0][:60]!r})"})
        else:
            kept.append(item)
    return kept, dropped


def unique_items(items, limit: int | None) -> tuple[list[dict], list[dict]]:
    """The usable items (at most ``limit``) of a reader that yields items or (where, reason), and what was
    dropped, with where and why: what the reader refused, and a later item with an id seen before (ids name
    records)."""
    kept, dropped, first_seen = [], [], {}
    for item in items:
        if isinstance(item, dict) and item["id"] in first_seen:
            item = (item["where"], f"duplicate id ({item['id']!r}, first at {first_seen[item['id']]})")
        if isinstance(item, tuple):
            dropped.append({"where": item[0], "reason": item[1]})
            continue
        first_seen[item["id"]] = item["where"]
        kept.append(item)
        if limit and len(kept) >= limit:
            break
    return kept, dropped


class Speaker:
    """Text → TTS speech → units (any speech tokenizer, tokenizer.py), with the speech judged (``judge``,
    ``gates``) when asked: :meth:`units` gives (units, voice, scores), or raises SpeechRejected (quality) or
    AudioError/ValueError (no speech)."""

    def __init__(self, tts, tokenizer, judge=None, gates=None):
        self.tts, self.tokenizer, self.judge, self.gates = tts, tokenizer, judge, gates

    def tokenizer_spec(self) -> dict:
        """What made the units (for a compose summary, so that publish knows the vocabulary of records that
        come from no units folder)."""
        return self.tokenizer.describe()

    def units(self, text: str, key: str) -> tuple[list[int], str, dict]:
        voice, rate = self.tts.voice_for(key)
        wav, sr = self.tts.synthesize(text, voice, rate)
        judged = self._judged(wav, sr, text, voice, rate) if self.judge is not None else {}
        u = self.tokenizer.encode(wav, sr).units
        if not u.size:
            raise ValueError("no speech units")
        return u.tolist(), f"{self.tts.name}:{voice}@{rate}", judged

    def _judged(self, wav, sr: int, text: str, voice: str, rate) -> dict:
        """The quality columns of one synthesized turn (:func:`judge_speech`)."""
        result = judge_speech(self.judge, self.gates, wav, sr, text, f"voice:{voice}@{rate}",
                              lambda: self.tts.synthesize(REFERENCE, voice, rate))
        return {c: result.get(c) for c in QUALITY_COLUMNS}


def _pair_records(pair: dict, speaker: Speaker, llm, formats, all_formats: bool, prefix: str, seed: int,
                  corpus: str, license: str) -> list[dict] | tuple[str, str]:
    """The records of one pair, or (count key, reason) when it is dropped: the LLM could not rewrite it, it is
    unfit for speech, or its speech could not be made or failed the gates (the pair goes whole)."""
    instruction, response = pair["instruction"], pair["response"]
    if llm is not None:
        rewritten = rewrite_for_speech(llm, instruction, response)
        if isinstance(rewritten, str):
            return f"dropped: {rewritten}", rewritten
        instruction, response = rewritten
    # checked as given (code fences, tables) and as spoken and written, markdown stripped (``<eo**a>`` is ``<eoa>``)
    spoken_pair = speakable(instruction), speakable(response)
    reason = unfit_for_speech(instruction, response) or unfit_for_speech(*spoken_pair)
    if reason:
        return f"dropped: {reason.split(' (')[0]}", reason
    instruction, response = spoken_pair
    chosen = formats if all_formats else [formats[_draw(seed, "format", pair["id"]) % len(formats)]]
    spoken: dict[str, tuple[list[int], str, dict]] = {}  # "q"/"a" → (units, voice, scores)
    try:  # speak what the chosen formats need first: a pair that cannot be spoken is dropped whole
        for side, text in (("q", instruction), ("a", response)):
            if any(_speaks(side, fmt) for fmt in chosen):
                spoken[side] = speaker.units(text, f"{seed}/{side}/{pair['id']}")
    except ScoreError:  # a judge that cannot work at all (its server is down) stops the stage
        raise
    except SpeechRejected as e:
        return "dropped: quality: " + str(e).split(" (")[0], f"synthesized speech: {e}"
    except (AudioError, ValueError) as e:
        return "dropped: cannot be spoken", f"cannot be spoken ({str(e).split(': ')[-1][:80]})"
    rows = []
    for fmt in chosen:
        needs = [side for side in ("q", "a") if _speaks(side, fmt)]
        q_units = spoken["q"][0] if "q" in needs else []
        a_units = spoken["a"][0] if "a" in needs else []
        try:
            rows.append(finish({
                "id": f"com/{pair['id']}/{fmt}", "prefix": prefix,
                "plain_text": com_text(fmt, instruction, response, q_units, a_units),
                "format": fmt, "instruction": instruction, "response": response,
                "instruction_units": q_units, "response_units": a_units,
                "voice": ",".join(spoken[side][1] for side in needs),
                "source_id": pair["id"], "corpus": corpus, "license": license,
                **worst([spoken[side][2] for side in needs]),
            }))
        except RecordRefused as e:
            return e.key, str(e)
    return rows


def write_chunks(items: list[dict], out: Path, kind: str, chunk_size: int, counts: collections.Counter,
                 dropped: list[dict], make, count) -> None:
    """Records of ``kind`` made from ``items`` (``make(item)``: a list of records, or (count key, reason) when
    the item is dropped), ``chunk_size`` items to a ``train-NNNNN.parquet`` file with a sidecar of its counts
    (``count(record)`` names a record's) and drops; a rerun skips the chunks already written. ``counts`` and
    ``dropped`` gain every chunk's, done now or before."""
    for start in range(0, len(items), chunk_size):
        chunk = start // chunk_size
        target = out / f"train-{chunk:05d}.parquet"
        if target.exists():
            continue
        rows, chunk_counts, chunk_dropped = [], collections.Counter(), []
        for item in progress(items[start : start + chunk_size], desc=f"{kind} {target.name}", unit="item"):
            made = make(item)
            if isinstance(made, tuple):
                chunk_counts[made[0]] += 1
                chunk_dropped.append({"where": item["where"], "id": item["id"], "reason": made[1]})
                continue
            rows += made
            chunk_counts.update(count(r) for r in made)
        write_json(out / f"train-{chunk:05d}.summary.json", {"counts": chunk_counts, "dropped": chunk_dropped})
        write_parquet(target, records.to_table(kind, rows))
    for sidecar in sorted(out.glob("train-*.summary.json")):
        part = json.loads(sidecar.read_text())
        counts.update(part["counts"])
        dropped.extend(part["dropped"])


def chain_of_modality(source: str | Path, out: str | Path, tokenizer, tts, llm=None,
                      formats: tuple[str, ...] = FORMATS, all_formats: bool = False, prefix: str = DEFAULT_PREFIX,
                      seed: int = 0, corpus: str | None = None, license: str = "unspecified",
                      instruction_column: str = "instruction", response_column: str = "response",
                      id_column: str | None = "id", max_pairs: int | None = None, chunk_size: int = 100,
                      judge=None, gates=None, eval_texts=None) -> dict:
    """Chain-of-modality records from text pairs; see the module docstring for the four formats. ``judge``
    (``score.Judge``) scores each synthesized turn against the text it was meant to say, and a pair whose
    speech fails ``gates`` is dropped with its reason; records carry the worst score of their turns. Pairs
    go ``chunk_size`` to a ``train-NNNNN.parquet`` file, each with a sidecar of its counts; a rerun skips
    the chunks already written."""
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")
    if str(source) == "builtin":
        corpus, license = corpus or "speechinstruct-sample", "Apache-2.0"
    corpus = corpus or Path(str(source)).stem
    out = Path(out)
    pairs, dropped = unique_pairs(source, instruction_column, response_column, id_column, max_pairs)
    pairs, dropped = decontaminated(pairs, dropped, eval_texts, ("instruction", "response"))
    counts = collections.Counter("dropped: " + d["reason"].split(" (")[0] for d in dropped)
    speaker = Speaker(tts, tokenizer, judge, gates)
    write_chunks(pairs, out, "chain_of_modality", chunk_size, counts, dropped,
                 lambda pair: _pair_records(pair, speaker, llm, formats, all_formats, prefix, seed, corpus, license),
                 count=lambda row: row["format"])
    summary = {"pairs": len(pairs), "records": sum(counts[f] for f in FORMATS), **dict(sorted(counts.items())),
               "tts_calls_this_run": getattr(tts, "calls", None),
               "llm_requests_this_run": getattr(llm, "requests", 0) if llm else 0,
               **speaker.tokenizer_spec(), "dropped_examples": dropped[:200]}
    write_json(out / "summary.json", summary)
    return summary

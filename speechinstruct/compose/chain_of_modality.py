"""``speechinstruct compose chain-of-modality``: text instruction–response pairs (optionally rewritten for speech
by an LLM), spoken by a TTS engine, turned into units, in one of four formats:

  speech-speech  ``[Human]: {units(q)}<eoh>. [SpeechGPT]: {q}; [ta] {a}; [ua] {units(a)}<eoa>.``
  speech-text    ``[Human]: {units(q)}<eoh>. [SpeechGPT]: {q}; [ta] {a}<eoa>.``
  text-speech    ``[Human]: {q}<eoh>. [SpeechGPT]: [ta] {a}; [ua] {units(a)}<eoa>.``
  text-text      ``[Human]: {q}<eoh>. [SpeechGPT]: [ta] {a}<eoa>.``

The format and voice are drawn from a hash of seed and pair id; written per chunk of pairs, atomically; a rerun
skips finished chunks.
"""

from __future__ import annotations

import collections
from pathlib import Path

from .. import recipe as settings
from ..audio import AudioError
from ..io import sha256_json, write_json
from ..judges import ScoreError
from ..recipe import default
from ..speechgpt import DEFAULT_PREFIX, FORMATS, com_text, shape_errors, to_text
from .common import RecordRefused, _draw, finish, write_chunks
from .speech import SpeechRejected, Speaker, rewrite_for_speech, speakable, unfit_for_speech, worst
from .texts import decontaminated, unique_pairs


def _speaks(side: str, fmt: str) -> bool:
    """Whether format ``fmt`` has the question (``q``) or the answer (``a``) as speech."""
    return fmt.startswith("speech") if side == "q" else fmt.endswith("speech")


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


def chain_of_modality(source: str | Path, out: str | Path, tokenizer, tts, cfg: settings.ChainOfModality | None = None,
                      llm=None, formats: tuple[str, ...] = FORMATS, prefix: str = DEFAULT_PREFIX,
                      seed: int = default(settings.Compose, "seed"), corpus: str | None = None,
                      instruction_column: str = "instruction", response_column: str = "response",
                      id_column: str | None = "id", chunk_size: int = 100, judge=None, gates=None,
                      eval_texts=None) -> dict:
    """Chain-of-modality records from text pairs; see the module docstring for the four formats. ``cfg``: the
    recipe's ``compose.chain_of_modality`` (``all_formats``, ``max_pairs``, ``license``; its defaults when None;
    ``tts`` and ``llm`` were built from the rest). ``judge`` (``judges.judge.Judge``) scores each synthesized turn
    against the text it was meant to say, and a pair whose speech fails ``gates`` is dropped with its reason;
    records carry the worst score of their turns. Pairs go ``chunk_size`` to a ``train-NNNNN.parquet`` file, each
    with a sidecar of its counts; a rerun skips the chunks already written."""
    cfg = cfg or settings.ChainOfModality()
    all_formats, license, max_pairs = cfg.all_formats, cfg.license, cfg.max_pairs
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
    made_with = {"pairs": sha256_json(pairs), "formats": list(formats), "all_formats": all_formats,
                 "prefix": sha256_json(prefix), "seed": seed, "corpus": corpus, "license": license,
                 "llm": getattr(llm, "model", None) if llm else None, **speaker.spec()}
    write_chunks(pairs, out, "chain_of_modality", chunk_size, counts, dropped,
                 lambda pair: _pair_records(pair, speaker, llm, formats, all_formats, prefix, seed, corpus, license),
                 count=lambda row: row["format"], settings=made_with)
    summary = {"pairs": len(pairs), "records": sum(counts[f] for f in FORMATS), **dict(sorted(counts.items())),
               "tts_calls_this_run": getattr(tts, "calls", None),
               "llm_requests_this_run": getattr(llm, "requests", 0) if llm else 0,
               **speaker.tokenizer_spec(), "dropped_examples": dropped[:200]}
    write_json(out / "summary.json", summary)
    return summary


def record_errors(r: dict, k: int | None) -> list[tuple[str, str]]:
    """A chain-of-modality record's plain_text has its format's shape, and its unit columns are filled as the
    format says and are the units in the text."""
    shape = r["format"]
    errors, m = shape_errors(r, shape)
    if m is None:
        return errors
    groups = m.groupdict()
    if groups.get("q_units") is not None and groups["q_units"] != to_text(r["instruction_units"]):
        errors.append(("units-match", "instruction units in plain_text differ from instruction_units"))
    if groups.get("a_units") is not None and groups["a_units"] != to_text(r["response_units"]):
        errors.append(("units-match", "response units in plain_text differ from response_units"))
    needs_q, needs_a = shape.startswith("speech"), shape.endswith("speech")
    if bool(r["instruction_units"]) != needs_q or bool(r["response_units"]) != needs_a:
        errors.append(("units-match", f"{shape} record has unit columns filled wrongly"))
    if r["plain_text"] != com_text(shape, r["instruction"], r["response"], r["instruction_units"], r["response_units"]) \
            and not any(rule == "units-match" for rule, _ in errors):
        errors.append(("text-match", "instruction/response in plain_text differ from their columns"))
    return errors

"""Text made into speech for records: what is fit to be spoken (:func:`unfit_for_speech`, markdown stripped by
:func:`speakable`), an LLM's rewrite for speech, the synthesized speech judged against the recipe's gates
(:func:`judge_speech`), and :class:`Speaker`: text → TTS → units by any speech tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import re

from ..speechgpt import find_markup, text_problem
from .common import QUALITY_COLUMNS


class SpeechRejected(ValueError):
    """Synthesized speech that failed the quality gates (or could not be scored); the pair is dropped."""


class NotScored(SpeechRejected):
    """Synthesized speech the judge could not score (the gates could not be applied)."""


REFERENCE = "The quick brown fox jumps over the lazy dog, and the five boxing wizards jump quickly."


def judge_speech(judge, gates, wav, sr: int, text: str, who: str, say_reference) -> dict:
    """The judge's scores of one synthesized turn (``text``, spoken as voice ``who``); raises SpeechRejected when it
    cannot be scored (:class:`NotScored`) or fails ``gates``. With a speaker encoder, the turn is compared with the voice's reference:
    ``say_reference()`` gives (wav, sr) of the voice saying :data:`REFERENCE`, embedded once per voice."""
    from ..audio import resample

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
    from ..llm import TruncatedAnswer

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

    def spec(self) -> dict:
        """What the speech depends on (the TTS engine, model, voices and rates, the tokenizer, the gates), for a
        compose folder's spec (common.claim_folder)."""
        engine = getattr(self.tts, "engine", self.tts)  # CachedTTS: the engine it wraps
        model = getattr(engine, "model_id", None) or getattr(engine, "model", None)  # vits: name and weights digest
        tts = {"engine": getattr(engine, "name", type(engine).__name__), "model": model if isinstance(model, str) else None,
               "voices": list(getattr(engine, "voices", ())), "rates": list(getattr(engine, "rates", ()))}
        gates = dataclasses.asdict(self.gates) if dataclasses.is_dataclass(self.gates) else None
        return {"tts": tts, **self.tokenizer_spec(), "gates": gates if self.judge is not None else None}

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

"""``compose duplex CONVERSATIONS OUT``: full-duplex spoken conversations, as kyutai's moshi-finetune reads them.

Each conversation (read as ``compose dialogue`` reads them) is spoken by two voices and laid on one timeline,
seeded by its id:

* **turn-taking**: each turn starts after the previous one ends by an offset drawn from a normal distribution
  (mean ``gap_mean`` 0.2 s, sd ``gap_sd`` 0.45 s, clipped to [-1, 2] s). The defaults follow conversation analysis:
  the modal and mean floor-transfer offset in English is about +200 ms (Stivers et al. 2009, PNAS 106:10587;
  Levinson and Torreira 2015), and in Heldner and Edlund's (2010, J. Phonetics 38:555) corpora about 40 % of
  speaker changes overlap; with these defaults 33 % do. A negative offset is an **overlap**: the next turn starts
  before the previous one ends;
* **interruptions**: with probability ``interruption_rate`` an overlapping turn interrupts: the interrupted speaker
  stops at the first word boundary after ``reaction`` s (0.2) of hearing the other, and the transcript holds only
  the words spoken;
* **backchannels**: in a turn of over ``backchannel_after`` s (2.5) the listener says short acknowledgements
  ("mm-hmm", "yeah", "right", "okay", "I see") at word boundaries, ``backchannel_rate`` per second of the turn
  (0.15: one every 6-7 s of the other's speech; backchannels are 19 % of Switchboard's utterances, Jurafsky et al.
  1997), never in its first second or last half second.

Written as moshi-finetune reads it: ``OUT/audio/{id}.wav``, stereo 16-bit at ``sample_rate`` (24 kHz, Mimi's),
the **left channel the main speaker (the assistant), the right the user**; beside it ``{id}.json``,
``{"alignments": [[word, [start, end], "SPEAKER_MAIN" | "SPEAKER_OTHER"], ...]}`` sorted by start, seconds from
the start of the file, from the TTS's own word events (espeak-ng), each turn's last word ending where its audio
does; and ``OUT/duplex.jsonl``, one ``{"path": "audio/{id}.wav", "duration": seconds}`` per file (paths relative
to the manifest's folder). ``OUT/stats.jsonl`` holds each conversation's gaps, overlaps, interruptions,
backchannels and talk time per speaker; ``summary.json`` their totals and distributions. A rerun writes them all
again and removes its own files that it did not write this time; a user's file where one of them goes stops it
(one line) before anything is written.
"""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import numpy as np

from .. import recipe as settings
from ..io import atomic_path, claim_outputs, write_json, write_text, wrote_before
from ..recipe import default

MAIN, OTHER = "SPEAKER_MAIN", "SPEAKER_OTHER"  # moshi's names: the model (left channel) and the user (right)
BACKCHANNELS = ("mm-hmm", "yeah", "right", "okay", "I see")
SILENCE_DB = -50.0


def speech_end(wav: np.ndarray, sr: int) -> float:
    """Seconds to the last sample above :data:`SILENCE_DB` of the peak (the TTS's trailing silence left out)."""
    loud = np.flatnonzero(np.abs(wav) > np.abs(wav).max() * 10 ** (SILENCE_DB / 20)) if wav.size else []
    return (loud[-1] + 1) / sr if len(loud) else 0.0


class Voice:
    """One speaker: a TTS engine with word events, a voice and a rate; ``say(text)`` → (wav at ``sr``, words)."""

    def __init__(self, tts, voice: str, rate, sr: int):
        engine = tts if hasattr(tts, "synthesize_words") else getattr(tts, "engine", None)  # a cache's engine
        if not hasattr(engine, "synthesize_words"):
            raise ValueError(f"compose duplex needs word timings from the TTS itself: {type(engine).__name__} gives "
                             "none (use --tts espeak)")
        self.tts, self.voice, self.rate, self.sr = engine, voice, rate, sr

    def say(self, text: str) -> tuple[np.ndarray, list[dict]]:
        from ..audio import resample

        wav, sr, words = self.tts.synthesize_words(text, self.voice, self.rate)
        if not words or not np.size(wav):
            raise ValueError(f"no words spoken of {text[:40]!r}")
        end = speech_end(wav, sr)
        wav = resample(np.asarray(wav, np.float32)[: int(round(end * sr))], sr, self.sr)
        words[-1]["end"] = min(words[-1]["end"], end)
        return wav, [w for w in words if w["end"] > w["start"]]


def timeline(turns: list[tuple[str, str]], voices: dict[str, Voice], rng: random.Random, gap_mean: float = 0.2,
             gap_sd: float = 0.45, interruption_rate: float = 0.2, reaction: float = 0.2,
             backchannel_rate: float = 0.15, backchannel_after: float = 2.5) -> dict:
    """The conversation laid out: ``events`` (speaker, start seconds, wav, words with times from the start,
    kind: turn or backchannel), and its statistics. ``turns``: (speaker, text), speakers MAIN or OTHER."""
    events, stats = [], {"gaps": [], "overlaps": [], "interruptions": 0, "backchannels": 0, "turns": len(turns)}
    previous = None  # the last turn event
    for speaker, text in turns:
        wav, words = voices[speaker].say(text)
        if previous is None:
            start = 0.3
        else:
            offset = min(2.0, max(-1.0, rng.gauss(gap_mean, gap_sd)))
            offset = max(offset, -previous["duration"] + 0.3)  # never before the previous turn has begun
            start = previous["start"] + previous["duration"] + offset
            if offset < 0 and rng.random() < interruption_rate:
                _interrupt(previous, start + reaction, voices)
                stats["interruptions"] += 1
                offset = start - (previous["start"] + previous["duration"])
            (stats["overlaps"] if offset < 0 else stats["gaps"]).append(round(-offset if offset < 0 else offset, 4))
        event = {"speaker": speaker, "start": start, "wav": wav, "duration": wav.size / voices[speaker].sr,
                 "words": words, "kind": "turn"}
        events.append(event)
        previous = event
    for event in [e for e in events if e["kind"] == "turn"]:
        listener = OTHER if event["speaker"] == MAIN else MAIN
        stats["backchannels"] += _backchannels(event, listener, voices, rng, events, backchannel_rate, backchannel_after)
    return {"events": events, "stats": stats}


def _interrupt(turn: dict, at: float, voices: dict[str, Voice]) -> None:
    """The turn stops at its first word boundary after ``at`` (seconds on the timeline); later words are unsaid."""
    local = at - turn["start"]
    kept = [w for w in turn["words"] if w["start"] < local]
    if not kept or len(kept) == len(turn["words"]):
        return
    cut = kept[-1]["end"]
    turn["words"], turn["interrupted"] = kept, True
    turn["wav"] = turn["wav"][: int(round(cut * voices[turn["speaker"]].sr))]
    turn["duration"] = turn["wav"].size / voices[turn["speaker"]].sr


def _backchannels(turn: dict, listener: str, voices: dict[str, Voice], rng: random.Random, events: list,
                  rate: float, after: float) -> int:
    """The listener's acknowledgements inside a long turn, each starting at one of its word boundaries."""
    if turn["duration"] <= after:
        return 0
    boundaries = [w["end"] for w in turn["words"] if 1.0 <= w["end"] <= turn["duration"] - 0.5]
    n = min(len(boundaries), int(rate * turn["duration"] + rng.random()))
    placed = 0
    for at in sorted(rng.sample(boundaries, n)) if n else []:
        wav, words = voices[listener].say(rng.choice(BACKCHANNELS))
        events.append({"speaker": listener, "start": turn["start"] + at, "wav": wav,
                       "duration": wav.size / voices[listener].sr, "words": words, "kind": "backchannel"})
        placed += 1
    return placed


def render(layout: dict, sr: int) -> tuple[np.ndarray, list]:
    """(samples, 2) float32, left MAIN and right OTHER, and the sorted alignments."""
    events = layout["events"]
    end = max(e["start"] + e["duration"] for e in events) + 0.3
    out = np.zeros((int(np.ceil(end * sr)), 2), np.float32)
    alignments = []
    for e in events:
        channel = 0 if e["speaker"] == MAIN else 1
        first = int(round(e["start"] * sr))
        out[first: first + e["wav"].size, channel] += e["wav"]
        alignments += [[w["word"], [round(e["start"] + w["start"], 3), round(e["start"] + w["end"], 3)], e["speaker"]]
                       for w in e["words"]]
    np.clip(out, -1.0, 1.0, out=out)
    return out, sorted(alignments, key=lambda a: (a[1][0], a[1][1], a[2]))


def units_record(conversation: dict, path: str, samples: np.ndarray, sr: int, alignments: list, tokenizer,
                 corpus: str, license: str) -> dict:
    """The ``duplex`` record of one rendered conversation: each channel's units frame by frame (a codec's codes, or
    features and k-means, every frame kept) and each speaker's per-frame text stream: the words that start in a
    frame, '' elsewhere (Moshi's inner-monologue alignment)."""
    from ..audio import resample
    from .common import finish

    rate, codebooks = tokenizer.sample_rate, tokenizer.codebooks
    channels = [resample(np.ascontiguousarray(samples[:, c]), sr, rate) for c in (0, 1)]
    units = [np.repeat(*tokenizer.encode(ch, rate)[:2]) for ch in channels]  # repeats put back: every frame
    frames = min(len(u) for u in units) // codebooks
    units = [np.asarray(u[: frames * codebooks], dtype=np.int64).tolist() for u in units]
    streams = {MAIN: [""] * frames, OTHER: [""] * frames}
    for word, (start, _), speaker in alignments:
        frame = min(frames - 1, int(start * tokenizer.frame_rate))
        streams[speaker][frame] = f"{streams[speaker][frame]} {word}".strip()
    return finish({"id": f"duplex/{conversation['id']}", "path": path, "duration": samples.shape[0] / sr,
                   "frame_rate": float(tokenizer.frame_rate), "codebooks": codebooks, "main_units": units[0],
                   "other_units": units[1], "main_text": streams[MAIN], "other_text": streams[OTHER],
                   "alignments": [{"word": w, "start": a, "end": b, "speaker": s} for w, (a, b), s in alignments],
                   "source_id": conversation["id"], "corpus": corpus, "license": license})


OWN_FILES = r"audio/[^/]+\.(wav|json)|duplex\.jsonl|stats\.jsonl|summary\.json|train-00000\.parquet"  # io.claim_outputs


def duplex(source, out, tts, cfg: settings.Duplex | None = None, seed: int = default(settings.Compose, "seed"),
           tokenizer=None, judge=None, gates=None, corpus: str | None = None) -> dict:
    """Full-duplex conversations from text conversations (see the module docstring; ``cfg``: the recipe's
    ``compose.duplex``, its defaults when None); returns the summary. With a speech ``tokenizer`` (tokenizer.py),
    also ``duplex`` records of both channels' units (``OUT/train-00000.parquet``); with ``judge`` and ``gates``,
    each turn's speech is judged as compose dialogue judges it, and a conversation with a turn that fails is
    dropped whole."""
    from ..progress import progress
    from .dialogue import read_conversations
    from .texts import unique_items

    cfg = cfg or settings.Duplex()
    sample_rate, license = cfg.sample_rate, cfg.license
    out = Path(out)
    claim_outputs(out, "duplex", OWN_FILES,
                  wrote_before(out / "summary.json", {"conversations", "overlap_share", "sample_rate"}))
    (out / "audio").mkdir(parents=True, exist_ok=True)
    if str(source) == "builtin":
        corpus, license = corpus or "speechinstruct-dialogues-sample", "Apache-2.0"
    corpus = corpus or Path(str(source)).stem
    conversations, dropped = unique_items(read_conversations(source), cfg.max_conversations)
    timing = {"gap_mean": cfg.gap_mean, "gap_sd": cfg.gap_sd, "seed": seed, "interruption_rate": cfg.interruption_rate,
              "backchannel_rate": cfg.backchannel_rate}
    manifest, stats_lines, rows = [], [], []
    for conversation in progress(conversations, desc="duplex", unit="conversation"):
        made = speak(conversation, tts, sample_rate, judge, gates, **timing)
        if isinstance(made, str):
            dropped.append({"where": conversation["where"], "id": conversation["id"], "reason": made})
            continue
        layout, samples, alignments = made
        path = write_conversation(out, conversation["id"], samples, sample_rate, alignments)
        manifest.append({"path": path, "duration": samples.shape[0] / sample_rate})
        if tokenizer is not None:
            rows.append(units_record(conversation, path, samples, sample_rate, alignments, tokenizer, corpus, license))
        talk = {s: round(sum(e["duration"] for e in layout["events"] if e["speaker"] == s), 3) for s in (MAIN, OTHER)}
        stats_lines.append({"id": conversation["id"], "duration": round(manifest[-1]["duration"], 3),
                            **layout["stats"], "talk_seconds": talk})
    return write_outputs(out, manifest, stats_lines, rows if tokenizer is not None else None, dropped,
                         {"sample_rate": sample_rate, "settings": timing})


def speak(conversation: dict, tts, sample_rate: int, judge, gates, seed: int, **settings) -> tuple | str:
    """(layout, stereo samples, alignments) of one conversation, or why it is dropped (a turn unfit for speech,
    one that cannot be spoken, or one that fails the gates)."""
    from ..judges import ScoreError
    from .dialogue import speaker_keys
    from .speech import SpeechRejected, speakable

    keys = speaker_keys(tts, seed, conversation["id"])
    voices = {MAIN: Voice(tts, *tts.voice_for(keys["assistant"]), sample_rate),
              OTHER: Voice(tts, *tts.voice_for(keys["user"]), sample_rate)}
    turns = [(who, text) for q, a in conversation["exchanges"] for who, text in ((OTHER, q), (MAIN, a))]
    unfit = _unfit(turns)
    if unfit:  # markup, control characters, code or text too long to speak, as compose dialogue refuses
        return unfit
    try:
        layout = timeline([(who, speakable(text)) for who, text in turns], voices,
                          random.Random(f"{seed}/{conversation['id']}"), **settings)
        if judge is not None:
            _judge_turns(layout, voices, sample_rate, judge, gates)
    except ScoreError:  # a judge that cannot work at all stops the stage
        raise
    except (ValueError, RuntimeError) as e:
        return str(e) if isinstance(e, SpeechRejected) else f"cannot be spoken ({e})"
    return (layout, *render(layout, sample_rate))


def write_conversation(out: Path, uid: str, samples: np.ndarray, sample_rate: int, alignments: list) -> str:
    """``OUT/audio/{name}.wav`` (stereo, 16-bit) and its ``.json`` alignments; the WAV's path relative to OUT."""
    import soundfile as sf

    name = _file_name(uid)
    with atomic_path(out / "audio" / f"{name}.wav") as tmp:
        sf.write(tmp, samples, sample_rate, subtype="PCM_16", format="WAV")
    write_text(out / "audio" / f"{name}.json", json.dumps({"alignments": alignments}, ensure_ascii=False) + "\n")
    return f"audio/{name}.wav"


def write_outputs(out: Path, manifest: list, stats_lines: list, rows: list | None, dropped: list, extra: dict) -> dict:
    """The manifest, the statistics, the records (when units were made) and the summary, which is returned; the
    files an earlier run wrote that this one did not (duplex claimed them: :data:`OWN_FILES`) go."""
    write_text(out / "duplex.jsonl", "".join(json.dumps(m) + "\n" for m in manifest))
    if rows is not None:
        from .. import records
        from ..io import write_parquet

        write_parquet(out / "train-00000.parquet", records.to_table("duplex", rows))
    else:  # records of an earlier run's audio, which publish would take for this run's
        (out / "train-00000.parquet").unlink(missing_ok=True)
    spoken = {Path(m["path"]).stem for m in manifest}
    for stale in sorted((out / "audio").glob("*")):
        if stale.is_file() and stale.suffix in (".wav", ".json") and stale.stem not in spoken:
            stale.unlink()
    write_text(out / "stats.jsonl", "".join(json.dumps(s) + "\n" for s in stats_lines))
    totals = collections.Counter()
    for s in stats_lines:
        totals.update(turns=s["turns"], gaps=len(s["gaps"]), overlaps=len(s["overlaps"]),
                      interruptions=s["interruptions"], backchannels=s["backchannels"])
    changes = totals["gaps"] + totals["overlaps"]
    summary = {"conversations": len(manifest), "records": len(rows or []),
               "hours": round(sum(m["duration"] for m in manifest) / 3600, 4), **dict(totals),
               "overlap_share": round(totals["overlaps"] / changes, 4) if changes else None, **extra,
               "dropped": len(dropped), "dropped_examples": dropped[:200]}
    write_json(out / "summary.json", summary)
    return summary


def _unfit(turns: list[tuple[str, str]]) -> str | None:
    """Why a conversation cannot be spoken (as compose dialogue checks each turn: as given, and as spoken with
    markdown stripped), or None."""
    from .speech import speakable, unfit_text

    for n, (who, text) in enumerate(turns, 1):
        name, limit = ("assistant turn", "response") if who == MAIN else ("user turn", "instruction")
        reason = unfit_text(name, text, limit) or unfit_text(name, speakable(text), limit)
        if reason:
            return f"turn {n}: {reason}"
    return None


def _judge_turns(layout: dict, voices: dict[str, Voice], sr: int, judge, gates) -> None:
    """Each turn's speech as spoken (an interrupted one cut), judged against its words and its voice as compose
    dialogue judges a turn (:func:`~speechinstruct.compose.speech.judge_speech`); raises SpeechRejected with the first gate
    a turn fails."""
    from .speech import REFERENCE, NotScored, SpeechRejected, judge_speech

    for event in layout["events"]:
        if event["kind"] != "turn":
            continue
        voice = voices[event["speaker"]]
        said = " ".join(w["word"] for w in event["words"])
        try:
            judge_speech(judge, gates, event["wav"], sr, said, f"voice:{voice.voice}@{voice.rate}",
                         lambda: voice.tts.synthesize(REFERENCE, voice.voice, voice.rate))
        except NotScored:
            raise
        except SpeechRejected as e:
            raise SpeechRejected(f"quality: {e}") from None


def _file_name(uid: str) -> str:
    """A conversation id as a file name: letters, digits, '-', '_' and '.' kept; an id that needed changing (or
    was too long) gets a hash of itself appended, so two ids never share a file; never '..'."""
    import hashlib
    import re

    name = re.sub(r"[^A-Za-z0-9._-]", "_", uid).strip(".")[:100] or "conversation"
    if name != uid:
        name += "-" + hashlib.sha1(uid.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return name


def record_errors(r: dict, k: int | None) -> list[tuple[str, str]]:
    """A duplex record's channels have one length in frames, its text streams one entry a frame, its alignments
    are in order, and each word stands in its speaker's stream at the frame it starts in."""
    errors = []
    frames, codebooks = len(r["main_text"]), r["codebooks"]
    if len(r["other_text"]) != frames or len(r["main_units"]) != frames * codebooks or len(r["other_units"]) != frames * codebooks:
        errors.append(("frames", f"{frames} frames of text but {len(r['other_text'])}, and {len(r['main_units'])} / "
                                 f"{len(r['other_units'])} units for {codebooks} codebooks a frame"))
        return errors
    bad = [u for u in r["main_units"] + r["other_units"] if k is not None and not 0 <= u < k]
    if bad:
        errors.append(("unit-range", f"units outside [0, {k}): {bad[:5]}"))
    starts = [a["start"] for a in r["alignments"]]
    if starts != sorted(starts) or any(a["end"] <= a["start"] or a["end"] > r["duration"] + 1e-3 for a in r["alignments"]):
        errors.append(("alignments", "alignments out of order, or a word that ends before it starts or after the file"))
    streams = {"SPEAKER_MAIN": r["main_text"], "SPEAKER_OTHER": r["other_text"]}
    for a in r["alignments"]:
        frame = min(frames - 1, int(a["start"] * r["frame_rate"]))
        if not set(a["word"].split()) <= set(streams[a["speaker"]][frame].split()):  # an entry may be "in the"
            errors.append(("text-stream", f"{a['word']!r} at {a['start']} s is not in the {a['speaker']} stream's frame {frame}"))
            break
    return errors

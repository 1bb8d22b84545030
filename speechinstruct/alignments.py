"""Word alignments: when each word of an utterance's transcript is spoken (seconds from the utterance's start).

They reach the manifest's ``words`` column from what a corpus already has, and travel with the utterance to its
units (``compose interleaved`` cuts units at word boundaries with them):

* Praat TextGrids beside the audio (``{utt}.TextGrid``), as the Montreal Forced Aligner writes them (a
  ``words`` interval tier, silences as empty intervals), read with praatio, which MFA itself writes them with;
* lhotse supervisions' ``alignment["word"]`` (items timed from the start of the recording);
* espeak-ng's own word events, for the speech we synthesize (the demo corpus writes them as TextGrids).

An alignment that does not fit its audio (a word ending after the audio does, overlapping words, a word that
ends before it starts, an empty word) is not used: the utterance keeps no ``words``, and the reader says why.
"""

from __future__ import annotations

from pathlib import Path

TOLERANCE = 0.02  # seconds: alignments are written rounded (MFA: to the 10 ms frame)


def check_words(words: list[dict], duration: float) -> str | None:
    """Why ``words`` ({word, start, end}, in order) cannot be the alignment of ``duration`` seconds, or None."""
    previous_end = 0.0
    for n, w in enumerate(words, 1):
        if not w["word"].strip():
            return f"word {n} is empty"
        if w["end"] <= w["start"]:
            return f"word {n} ({w['word']!r}) ends at {w['end']:g} s, not after its start {w['start']:g} s"
        if w["start"] < previous_end - TOLERANCE:
            return f"word {n} ({w['word']!r}) starts at {w['start']:g} s, before word {n - 1} ends ({previous_end:g} s)"
        if w["end"] > duration + TOLERANCE:
            return f"word {n} ({w['word']!r}) ends at {w['end']:g} s, after the audio ({duration:g} s)"
        previous_end = w["end"]
    return None if words else "no words"


def read_textgrid(path: str | Path, tier: str = "words") -> list[dict]:
    """The words of a TextGrid's ``tier`` (MFA's name; a TextGrid of one interval tier is read whatever its name),
    silences left out. ValueError with the file's name when it cannot be read."""
    from praatio import textgrid

    path = Path(path)
    try:
        grid = textgrid.openTextgrid(str(path), includeEmptyIntervals=False)
    except Exception as e:  # praatio raises bare exceptions of several kinds for a damaged file
        raise ValueError(f"{path.name}: not a readable TextGrid ({type(e).__name__}: {str(e)[:80]})") from None
    names = grid.tierNames
    if tier not in names:
        if len(names) != 1:
            raise ValueError(f"{path.name}: no {tier!r} tier (tiers: {', '.join(names) or 'none'})")
        tier = names[0]
    found = grid.getTier(tier)
    if not hasattr(found, "entries") or found.entryType.__name__ != "Interval":
        raise ValueError(f"{path.name}: tier {tier!r} is not an interval tier")
    return [{"word": label.strip(), "start": float(start), "end": float(end)}
            for start, end, label in found.entries if label.strip()]


def write_textgrid(path: str | Path, words: list[dict], duration: float) -> None:
    """A TextGrid of one ``words`` tier, in Praat's long text format as MFA writes it (silences as empty
    intervals)."""
    from praatio import textgrid

    from .io import atomic_path

    grid = textgrid.Textgrid()
    entries = [(round(w["start"], 3), round(min(w["end"], duration), 3), w["word"]) for w in words]
    grid.addTier(textgrid.IntervalTier("words", entries, 0, round(duration, 3)))
    with atomic_path(Path(path)) as tmp:
        grid.save(str(tmp), format="long_textgrid", includeBlankSpaces=True)


def textgrid_words(audio: Path, duration: float) -> tuple[list[dict] | None, str | None]:
    """(words, None) from the TextGrid beside ``audio`` ({stem}.TextGrid); (None, why not) when it is there but
    cannot be used; (None, None) when there is none."""
    path = audio.with_suffix(".TextGrid")
    if not path.is_file():
        return None, None
    try:
        words = read_textgrid(path)
    except ValueError as e:
        return None, str(e)
    problem = check_words(words, duration)
    return (None, f"{path.name}: {problem}") if problem else (words, None)


def lhotse_words(supervision) -> list[dict] | None:
    """A lhotse supervision's word alignment, timed from the supervision's start (lhotse times it from the
    recording's)."""
    items = (supervision.alignment or {}).get("word") if supervision.alignment else None
    if not items:
        return None
    return [{"word": it.symbol, "start": round(it.start - supervision.start, 6),
             "end": round(it.start + it.duration - supervision.start, 6)} for it in items]

"""Word alignments: when each word of an utterance's transcript is spoken (seconds from the utterance's start).

They reach the manifest's ``words`` column from what a corpus already has, and travel with the utterance to its
units (``compose interleaved`` cuts units at word boundaries with them):

* Praat TextGrids beside the audio (``{utt}.TextGrid``), as the Montreal Forced Aligner writes them (a
  ``words`` interval tier, silences as empty intervals), read with praatio, which MFA itself writes them with;
* lhotse supervisions' ``alignment["word"]`` (items timed from the start of the recording);
* espeak-ng's own word events, for the speech we synthesize (the demo corpus writes them as TextGrids);
* for a corpus that has none, CTC forced alignment (``speechinstruct align``): a transformers wav2vec2-CTC
  model's emissions and the transcript's letters, the best CTC path by a Viterbi search (:func:`ctc_viterbi`;
  torchaudio's ``forced_align`` cannot load here).

An alignment that does not fit its audio (a word ending after the audio does, overlapping words, a word that
ends before it starts, an empty word) is not used: the utterance keeps no ``words``, and the reader says why.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..memory import attempt, even_alone

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

    from ..io import atomic_path

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


# ------------------------------------------------------------------------------------- CTC forced alignment
def ctc_viterbi(log_probs, tokens: list[int], blank: int) -> list[int] | None:
    """The best CTC path of ``tokens`` through ``log_probs`` (frames × symbols): for each frame, the index of the
    token it emits, or -1 for a blank. None when the frames are too few for the tokens. The path is over the
    tokens with blanks between and around them (a repeated token needs a blank between its two emissions)."""
    import numpy as np

    lp = np.asarray(log_probs, dtype=np.float64)
    frames, states = lp.shape[0], 2 * len(tokens) + 1
    symbols = np.full(states, blank)
    symbols[1::2] = tokens
    skip = np.zeros(states, dtype=bool)  # s may be reached from s - 2: a token after a different token
    skip[3::2] = np.asarray(tokens[1:]) != np.asarray(tokens[:-1])
    score = np.full(states, -np.inf)
    score[0], score[1] = lp[0, blank], lp[0, tokens[0]] if tokens else -np.inf
    back = np.zeros((frames, states), dtype=np.int8)  # 0: stayed, 1: from s - 1, 2: from s - 2
    for t in range(1, frames):
        stay, one = score, np.concatenate([[-np.inf], score[:-1]])
        two = np.where(skip, np.concatenate([[-np.inf, -np.inf], score[:-2]]), -np.inf)
        choice = np.argmax(np.stack([stay, one, two]), axis=0)
        score = np.choose(choice, [stay, one, two]) + lp[t, symbols]
        back[t] = choice
    end = states - 1 if states == 1 or score[-1] >= score[-2] else states - 2
    if not np.isfinite(score[end]):
        return None
    path, s = [], end
    for t in range(frames - 1, -1, -1):
        path.append((s - 1) // 2 if s % 2 else -1)
        s -= back[t, s]
    return path[::-1]


class CtcAligner:
    """Word timings from a transformers CTC model folder (wav2vec2 and its kind, with a character vocabulary):
    ``words(wav_16k, transcript)`` → {word, start, end} per transcript word, or why there are none."""

    def __init__(self, model: str | Path, device: str = "cpu"):
        import transformers

        from ..checkpoints import load_pretrained

        local = Path(model).is_dir()
        if local and not (Path(model) / "config.json").is_file():  # said before transformers' own long riddle
            raise FileNotFoundError(f"{model}: not a transformers model folder (no config.json): --model takes a CTC "
                                    "model as save_pretrained writes it, or a hub id")
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(str(model), local_files_only=local)
        except Exception as e:  # noqa: BLE001  a malformed vocab.json or config, whatever it raises
            raise ValueError(f"{model}: cannot load a CTC model's processor ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:200]})") from None
        self.model = load_pretrained(transformers.AutoModelForCTC, str(model), "CTC model", local,
                                     unexpected_ok=True).eval().to(device)
        tokenizer = self.processor.tokenizer
        self.vocab = tokenizer.get_vocab()
        size = int(self.model.config.vocab_size)
        beyond = sorted((i, t) for t, i in self.vocab.items() if not 0 <= i < size)
        if beyond:
            raise ValueError(f"{model}: its vocab.json gives {beyond[0][1]!r} the id {beyond[0][0]}, beyond the "
                             f"model's {size} outputs: the tokenizer is not this model's")
        self.blank = tokenizer.pad_token_id
        self.delimiter = self.vocab.get(getattr(tokenizer, "word_delimiter_token", "|") or "|")
        letters = [c for c in self.vocab if len(c) == 1 and c.isalpha()]
        self.upper = bool(letters) and all(c.isupper() for c in letters)
        self.ratio = int(self.model.config.inputs_to_logits_ratio)
        self.source, self.device = str(model), device

    def tokens(self, words: list[str]) -> list[list[int]] | str:
        """Each word's letters as token ids (letters the vocabulary lacks left out), or why a word has none."""
        out = []
        for word in words:
            ids = [self.vocab[c] for c in (word.upper() if self.upper else word.lower()) if c in self.vocab]
            if not ids:
                return f"a word has no letters the model knows ({word!r})"
            out.append(ids)
        return out

    def words(self, wav, transcript: str, sample_rate: int = 16000) -> list[dict] | str:
        import torch

        words = transcript.split()
        per_word = self.tokens(words) if words else "empty transcript"
        if isinstance(per_word, str):
            return per_word
        tokens, owner = [], []  # the whole sequence, word delimiters between words; owner: token → word (or -1)
        for n, ids in enumerate(per_word):
            if n and self.delimiter is not None:
                tokens.append(self.delimiter)
                owner.append(-1)
            tokens += ids
            owner += [n] * len(ids)
        inputs = self.processor(wav, sampling_rate=sample_rate, return_tensors="pt")
        with torch.inference_mode():
            logits, said = attempt(lambda: self.model(inputs["input_values"].to(self.device)).logits[0])
        if said is not None:  # attention over a long utterance: this row is kept without words, the others aligned
            return even_alone(f"an utterance of {len(wav) / sample_rate:.1f} s", said)
        path = ctc_viterbi(logits.log_softmax(-1).float().cpu().numpy(), tokens, self.blank)
        if path is None:
            return f"audio too short for its transcript ({logits.shape[0]} frames for {len(tokens)} letters)"
        first, last = {}, {}
        for frame, token in enumerate(path):
            if token >= 0 and owner[token] >= 0:
                first.setdefault(owner[token], frame)
                last[owner[token]] = frame
        seconds = self.ratio / sample_rate
        return [{"word": word, "start": round(first[n] * seconds, 4), "end": round((last[n] + 1) * seconds, 4)}
                for n, word in enumerate(words)]


def align_manifest(manifest: str | Path, out: str | Path, aligner: CtcAligner) -> dict:
    """A copy of a shard folder whose rows with a transcript and no ``words`` get them from ``aligner``; rows it
    cannot align are kept without, counted by reason. Shard by shard, resumable (a shard finished with the same
    manifest and model, which ``out/align.json`` keeps, is skipped; another model is one line); a
    shard with an utterance that storage failed to give for a while is not written, and the run ends with one line
    (:class:`shardfiles.Unfinished`), so that the rerun aligns it."""
    import collections
    import shutil

    from .. import records
    from ..io import iter_rows, write_json, write_parquet, wrote_before
    from ..progress import progress
    from ..shardfiles import check_read, check_spec, corpus_root, finished, made_from, manifest_files
    from .decoding import MayPass, check_root, decode_row

    manifest, out = Path(manifest), Path(out)
    if out.resolve() == manifest.resolve():
        raise ValueError(f"{out}: align writes a new shard folder; give another one")
    root = check_root(corpus_root(manifest), manifest)
    model = str(Path(aligner.source).resolve()) if Path(aligner.source).is_dir() else aligner.source
    out.mkdir(parents=True, exist_ok=True)
    check_spec(out, {"manifest": str(manifest.resolve()), "model": model}, "align.json", r"manifest-\d{5}\.parquet",
               legacy=wrote_before(out / "summary.json", {"alignment"}))  # another model's, or copied in: never done
    counts: collections.Counter[str] = collections.Counter()
    examples: list[dict] = []
    passing: dict[str, list[str]] = {}  # shard → utterances storage failed to give: the shard is left for the rerun
    for shard in manifest_files(manifest):
        target = out / shard.name
        if finished(target, shard):
            counts["shards skipped (done)"] += 1
            continue
        rows = []
        for row in progress(iter_rows(shard), desc=f"align {shard.name}", unit="utt"):
            if row.get("words") or not (row.get("text") or "").strip():
                counts["kept as they were"] += 1
            else:
                wav = decode_row(row, root)
                if isinstance(wav, MayPass):
                    passing.setdefault(shard.name, []).append(wav)
                    continue
                found = wav if isinstance(wav, str) else aligner.words(wav, row["text"])
                if isinstance(found, str):
                    counts["not aligned: " + found.split(" (")[0]] += 1
                    if len(examples) < 50:
                        examples.append({"id": row["id"], "reason": found})
                else:
                    row["words"] = found
                    counts["aligned"] += 1
            rows.append(row)
        if shard.name not in passing:
            write_parquet(target, records.to_table("manifest", rows), made_from(shard))
    summary = {**json.loads((manifest / "summary.json").read_text()),
               "alignment": {"model": aligner.source, **dict(sorted(counts.items())), "examples": examples}}
    write_json(out / "summary.json", summary)
    for extra in manifest.glob("*.json"):  # whatever else shard wrote beside the shards
        if extra.name != "summary.json" and not extra.name.startswith(".") and not (out / extra.name).exists():
            shutil.copy2(extra, out / extra.name)
    check_read(out, passing, summary["alignment"])
    return summary["alignment"]

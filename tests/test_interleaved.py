"""Word alignments (speechinstruct.sources.alignments) and interleaved text/speech records (speechinstruct.compose.interleaved):
espeak-ng's own word events, TextGrids as the Montreal Forced Aligner writes them (praatio, which MFA writes them
with), lhotse's word alignments; records read back by a parser written here and held to the alignment's frames."""

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from typer.testing import CliRunner

from conftest import speechlike
from speechinstruct import units as U
from speechinstruct import recipe as sections
from speechinstruct.cli import app
from speechinstruct.sources.shard import shard_corpus
from speechinstruct.shardfiles import manifest_files

runner = CliRunner()
SEGMENT = re.compile(r"\[(TEXT|SPEECH)\]((?:(?!\[(?:TEXT|SPEECH)\]).)*)", re.S)


def parse(text: str) -> list[tuple[str, str]]:
    """(marker, body) segments of an interleaved text, which must be nothing else."""
    found = SEGMENT.findall(text)
    assert "".join(f"[{m}]{b}" for m, b in found) == text
    return found


@pytest.fixture(scope="module")
def espeak():
    from speechinstruct.sources.tts import EspeakTTS

    return EspeakTTS()


def test_espeak_word_events_time_every_word_of_the_text(espeak):
    text = "A travelling painter painted a heavy letter for the very first time, then slept."
    wav, sr, words = espeak.synthesize_words(text, "en-us", 165)
    plain, _ = espeak.synthesize(text, "en-us", 165)
    assert np.array_equal(wav, plain)  # the same speech, with its timing
    assert " ".join(w["word"] for w in words).split() == re.sub(r"[,.]", "", text).split()
    assert "for the" in [w["word"] for w in words]  # espeak-ng sends no event for this "the": one entry
    starts = [w["start"] for w in words]
    assert starts[0] == 0.0 and all(a < b for a, b in zip(starts, starts[1:]))
    assert all(w["end"] == n["start"] for w, n in zip(words, words[1:])) and words[-1]["end"] == wav.size / sr
    for w in words:  # each word's span holds speech
        span = wav[int(w["start"] * sr): int(w["end"] * sr)]
        assert np.sqrt(np.mean(span ** 2)) > 0.01, w


@pytest.fixture(scope="module")
def demo_units(tmp_path_factory):
    """A demo corpus of 12 sentences (espeak-ng, TextGrids beside the audio) → MFCC → k-means 16 → units."""
    from speechinstruct.units.cluster import cluster
    from speechinstruct.sources.demo import make_demo_corpus
    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import MFCC
    from speechinstruct.units.quantize import quantize

    root = tmp_path_factory.mktemp("interleaved")
    make_demo_corpus(root / "corpus", 12, seed=0)
    shard_corpus("speechinstruct-demo", root / "corpus", root / "manifest")
    extract(root / "manifest", root / "features", MFCC())
    cluster(root / "features", root / "km", sections.KMeans(k=16))
    quantize(root / "features", U.load_kmeans(root / "km"), root / "units")
    return root


def test_the_demo_corpus_textgrids_are_espeaks_word_events_and_reach_the_units(demo_units, espeak):
    from praatio import textgrid

    from speechinstruct.sources.tts import ESPEAK_RATES, ESPEAK_VOICES

    first = demo_units / "corpus" / "train" / "1000" / "1" / "1000-1-0000.TextGrid"
    grid = textgrid.openTextgrid(str(first), includeEmptyIntervals=False)
    assert list(grid.tierNames) == ["words"]
    entries = grid.getTier("words").entries
    text = (demo_units / "corpus" / "train" / "1000" / "1" / "1000-1.trans.txt").read_text().split("\n")[0].split(" ", 1)[1]
    _, _, words = espeak.synthesize_words(text.lower(), ESPEAK_VOICES[0], ESPEAK_RATES[1 % len(ESPEAK_RATES)])
    assert [e.label for e in entries] == [w["word"] for w in words]
    assert all(abs(e.start - w["start"]) <= 5e-4 for e, w in zip(entries, words))
    rows = [r for f in sorted((demo_units / "units").glob("units-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 12 and all(r["words"] for r in rows)
    row = next(r for r in rows if r["id"].endswith("1000-1-0000"))
    assert [(w["word"], round(w["start"], 3)) for w in row["words"]] == [(e.label, round(e.start, 3)) for e in entries]


def test_interleaved_records_switch_at_word_boundaries_with_the_words_frames(demo_units):
    from speechinstruct.compose.interleaved import interleaved

    summary = interleaved(demo_units / "units", demo_units / "composed" / "interleaved", sections.Interleaved(max_words=4),
                          seed=3)
    assert summary["train"] == 12
    rows = {r["id"]: r for f in sorted((demo_units / "units").glob("units-*.parquet")) for r in pq.read_table(f).to_pylist()}
    records = [r for f in sorted((demo_units / "composed" / "interleaved").glob("train-*.parquet"))
               for r in pq.read_table(f).to_pylist()]
    assert len(records) == 12
    for rec in records:
        row = rows[rec["source_id"]]
        segments = parse(rec["text"])
        markers = [m for m, _ in segments]
        assert len(segments) >= 2 and all(a != b for a, b in zip(markers, markers[1:]))
        assert markers == [m.upper() for m in rec["modalities"]]
        # every transcript word once, in order, across the segments
        assert " ".join(rec["segment_texts"]).split() == row["text"].split()
        frames = np.repeat(row["units"], row["durations"])
        first_word = 0
        for (marker, body), words_text in zip(segments, rec["segment_texts"]):
            n = sum(len(w["word"].split()) for w in row["words"])
            assert n == len(row["text"].split())
            k = 0  # the alignment entries this segment covers (an entry may hold several words: "for the")
            covered = 0
            while covered < len(words_text.split()):
                covered += len(row["words"][first_word + k]["word"].split())
                k += 1
            span = row["words"][first_word: first_word + k]
            if marker == "TEXT":
                assert body == words_text
            else:
                start, end = round(span[0]["start"] * 100), round(span[-1]["end"] * 100)
                expected = U.dedup(frames[start:end])[0].tolist()
                assert [int(u) for u in re.findall(r"<(\d+)>", body)] == expected and expected
            first_word += k
        assert first_word == len(row["words"])
    again = interleaved(demo_units / "units", demo_units / "again", sections.Interleaved(max_words=4), seed=3)
    assert again["train"] == 12
    assert [r for f in sorted((demo_units / "again").glob("train-*.parquet")) for r in pq.read_table(f).to_pylist()] == records


def test_interleaved_publishes_and_validates_and_a_tampered_record_fails(demo_units, tmp_path):
    from speechinstruct import records as R
    from speechinstruct.compose.interleaved import interleaved
    from speechinstruct.release.publish import publish
    from speechinstruct.release.validate import validate

    result = runner.invoke(app, ["compose", "interleaved", str(demo_units / "units"), str(tmp_path / "composed" / "interleaved"), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train"] == 12
    publish(tmp_path / "composed", tmp_path / "dataset")
    report = validate(tmp_path / "dataset")
    assert report.ok and report.records["interleaved"] == 12 and report.k == 16, report.as_dict()
    good = [r for f in sorted((tmp_path / "composed" / "interleaved").glob("train-*.parquet")) for r in pq.read_table(f).to_pylist()]
    bad = [dict(good[0]), dict(good[1])]
    bad[0]["text"] = bad[0]["text"].replace("[TEXT]", "[TEXT] ", 1)
    bad[1]["segment_units"] = [[99] if units else [] for units in bad[1]["segment_units"]]
    for r in bad:
        r["content_hash"] = R.content_hash(r)
    pq.write_table(R.to_table("interleaved", bad), tmp_path / "train-00000.parquet")
    rules = validate(tmp_path / "train-00000.parquet", k=16).as_dict()["errors_by_rule"]
    assert rules == {"shape": 1, "unit-range": 1}, rules
    with pytest.raises(ValueError, match="min_words 3 and max_words 2"):
        interleaved(demo_units / "units", tmp_path / "x", sections.Interleaved(min_words=3, max_words=2))


def test_textgrids_that_do_not_fit_their_audio_are_skipped_with_the_utterance_kept(librispeech_root, tmp_path):
    from praatio import textgrid

    chapter = librispeech_root / "train-clean-100" / "1272" / "128104"

    def grid(utt, entries, xmax):
        tg = textgrid.Textgrid()
        tg.addTier(textgrid.IntervalTier("words", entries, 0, xmax))
        tg.save(str(chapter / f"{utt}.TextGrid"), format="long_textgrid", includeBlankSpaces=True)

    # 1.0 s: fits (MFA writes lowercase words and empty intervals for silence)
    grid("1272-128104-0000", [(0.1, 0.4, "mister"), (0.4, 0.6, "quilter"), (0.6, 0.7, "is"), (0.7, 0.8, "the"),
                              (0.8, 0.98, "apostle")], 1.0)
    grid("1272-128104-0001", [(0.1, 0.5, "nor"), (0.5, 1.9, "is")], 1.9)  # the audio is 1.5 s long
    (chapter / "1272-128104-0002.TextGrid").write_text("File type = \"ooTextFile\"\nnot a grid\n")
    summary = shard_corpus("librispeech", librispeech_root, tmp_path / "manifest")
    assert summary["skipped"]["alignment not used"] == 2
    details = {e["path"].rsplit("/", 1)[1]: e["detail"] for e in summary["skipped_examples"] if e["reason"] == "alignment not used"}
    assert "word 2 ('is') ends at 1.9 s, after the audio (1.5 s)" in details["1272-128104-0001.TextGrid"]
    assert "not a readable TextGrid" in details["1272-128104-0002.TextGrid"]
    rows = {r["id"].rsplit("/", 1)[1]: r for f in manifest_files(tmp_path / "manifest") for r in pq.read_table(f).to_pylist()}
    assert [w["word"] for w in rows["1272-128104-0000"]["words"]] == ["mister", "quilter", "is", "the", "apostle"]
    assert rows["1272-128104-0001"]["words"] is None and rows["1272-128104-0002"]["words"] is None  # kept, no words
    assert rows["1462-170138-0000"]["words"] is None  # no TextGrid at all


def test_check_words_names_overlaps_and_backwards_words():
    from speechinstruct.sources.alignments import check_words

    w = lambda word, a, b: {"word": word, "start": a, "end": b}  # noqa: E731
    assert check_words([w("a", 0, 0.5), w("b", 0.4, 0.8)], 1.0) == "word 2 ('b') starts at 0.4 s, before word 1 ends (0.5 s)"
    assert check_words([w("a", 0.5, 0.5)], 1.0) == "word 1 ('a') ends at 0.5 s, not after its start 0.5 s"
    assert check_words([w("a", 0, 0.5), w("b", 0.5, 0.8)], 1.0) is None


def test_lhotse_word_alignments_are_timed_from_the_supervision_start(tmp_path):
    from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet
    from lhotse.supervision import AlignmentItem

    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "r0.flac", speechlike(3.0, seed=1), 16000)
    recording = Recording.from_file(audio / "r0.flac", recording_id="r0")
    sups = [SupervisionSegment(id="r0-b", recording_id="r0", start=1.0, duration=1.5, channel=0, text="hello there",
                               alignment={"word": [AlignmentItem("hello", 1.1, 0.4), AlignmentItem("there", 1.6, 0.5)]}),
            SupervisionSegment(id="r0-c", recording_id="r0", start=0.0, duration=1.0, channel=0, text="too long",
                               alignment={"word": [AlignmentItem("too", 0.1, 0.3), AlignmentItem("long", 0.5, 0.9)]})]
    RecordingSet.from_recordings([recording]).to_file(tmp_path / "ls_recordings_train.jsonl.gz")
    SupervisionSet.from_segments(sups).to_file(tmp_path / "ls_supervisions_train.jsonl.gz")
    summary = shard_corpus("lhotse", tmp_path, tmp_path / "manifest")
    rows = {r["id"]: r for f in manifest_files(tmp_path / "manifest") for r in pq.read_table(f).to_pylist()}
    assert [(w["word"], round(w["start"], 6), round(w["end"], 6)) for w in rows["lhotse/train/r0-b"]["words"]] == [
        ("hello", 0.1, 0.5), ("there", 0.6, 1.1)]
    assert rows["lhotse/train/r0-c"]["words"] is None and summary["skipped"] == {"alignment not used": 1}


def brute_force_best_path(log_probs: np.ndarray, tokens: list[int], blank: int):
    """Every frame labelling whose CTC collapse (merge repeats, drop blanks) is ``tokens``: the best one, as the
    per-frame token index (-1 for blank), by enumeration."""
    import itertools

    frames, symbols = log_probs.shape
    best, best_path = -np.inf, None
    for labels in itertools.product(range(symbols), repeat=frames):
        collapsed = [s for i, s in enumerate(labels) if s != blank and (i == 0 or labels[i - 1] != s)]
        if collapsed != tokens:
            continue
        score = sum(log_probs[t, s] for t, s in enumerate(labels))
        if score > best:
            best, position, path = score, -1, []
            for i, s in enumerate(labels):
                if s == blank:
                    path.append(-1)
                    continue
                if i == 0 or labels[i - 1] != s:
                    position += 1
                path.append(position)
            best_path = path
    return best_path


@pytest.mark.parametrize("tokens,frames,seed", [([1, 2], 5, 0), ([1, 1], 5, 1), ([2, 1, 3], 7, 2), ([3], 4, 3),
                                               ([1, 2, 1], 6, 4)])
def test_ctc_viterbi_finds_the_best_path_an_enumeration_finds(tokens, frames, seed):
    from speechinstruct.sources.alignments import ctc_viterbi

    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (frames, 4))
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert ctc_viterbi(log_probs, tokens, blank=0) == brute_force_best_path(log_probs, tokens, blank=0)
    # a repeated token needs a blank between its emissions, however unlikely blanks are
    unlikely_blank = log_probs.copy()
    unlikely_blank[:, 0] -= 50
    assert ctc_viterbi(unlikely_blank, [1, 1], blank=0) == brute_force_best_path(unlikely_blank, [1, 1], blank=0)
    assert ctc_viterbi(unlikely_blank[:2], [1, 1], blank=0) is None  # two frames cannot hold 1, blank, 1


def test_align_gives_a_corpus_word_timings_with_a_ctc_model(librispeech_root, tmp_path):
    from asr_fixture import write_tiny_ctc

    write_tiny_ctc(tmp_path / "ctc")
    shard_corpus("librispeech", librispeech_root, tmp_path / "manifest")
    result = runner.invoke(app, ["align", str(tmp_path / "manifest"), str(tmp_path / "aligned"),
                                 "--model", str(tmp_path / "ctc"), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = [r for f in manifest_files(tmp_path / "aligned") for r in pq.read_table(f).to_pylist()]
    assert report["aligned"] == len(rows) == 4
    for r in rows:
        assert [w["word"] for w in r["words"]] == r["text"].split()
        starts = [w["start"] for w in r["words"]]
        assert all(a < b for a, b in zip(starts, starts[1:])) and all(w["end"] > w["start"] for w in r["words"])
        assert r["words"][-1]["end"] <= r["duration"] + 0.02
    before = [r for f in manifest_files(tmp_path / "manifest") for r in pq.read_table(f).to_pylist()]
    assert [{k: v for k, v in r.items() if k != "words"} for r in rows] == [{k: v for k, v in r.items() if k != "words"} for r in before]
    again = runner.invoke(app, ["align", str(tmp_path / "manifest"), str(tmp_path / "aligned"), "--model", str(tmp_path / "ctc"), "-q"])
    assert json.loads(again.stdout)["shards skipped (done)"] == 1
    # the corpus sharded again into the manifest folder (its shards cut elsewhere): not taken for done
    shard_corpus("librispeech", librispeech_root, tmp_path / "manifest", sections.Shard(shard_hours=2.5 / 3600))
    resharded = runner.invoke(app, ["align", str(tmp_path / "manifest"), str(tmp_path / "aligned"), "--model",
                                    str(tmp_path / "ctc"), "-q"])
    assert resharded.exit_code == 2 and "Traceback" not in resharded.output, resharded.output
    assert ("manifest-00000.parquet: made from manifest-00000.parquet as it was before it was written again"
            in resharded.output.replace("\n", "")), resharded.output
    shard_corpus("librispeech", librispeech_root, tmp_path / "manifest")  # as it was: the same bytes, done again
    again = runner.invoke(app, ["align", str(tmp_path / "manifest"), str(tmp_path / "aligned"), "--model", str(tmp_path / "ctc"), "-q"])
    assert json.loads(again.stdout)["shards skipped (done)"] == 1
    same = runner.invoke(app, ["align", str(tmp_path / "manifest"), str(tmp_path / "manifest"), "--model", str(tmp_path / "ctc")])
    assert same.exit_code == 2 and "align writes a new shard folder" in same.output
    # another model's rerun took the first model's shards for done; a shard align did not write was taken too
    write_tiny_ctc(tmp_path / "ctc2", seed=1)
    other = runner.invoke(app, ["align", str(tmp_path / "manifest"), str(tmp_path / "aligned"), "--model", str(tmp_path / "ctc2")])
    assert other.exit_code == 2 and "align.json: " in other.output and "other settings" in other.output, other.output
    (tmp_path / "copied").mkdir()
    (tmp_path / "copied" / "manifest-00000.parquet").write_bytes((tmp_path / "manifest" / "manifest-00000.parquet").read_bytes())
    copied = runner.invoke(app, ["align", str(tmp_path / "manifest"), str(tmp_path / "copied"), "--model", str(tmp_path / "ctc")])
    assert copied.exit_code == 2 and "manifest-00000.parquet: already there, but" in copied.output, copied.output
    (tmp_path / "aligned" / "align.json").unlink()  # a folder an earlier version aligned: its shards are done
    again = runner.invoke(app, ["align", str(tmp_path / "manifest"), str(tmp_path / "aligned"), "--model", str(tmp_path / "ctc"), "-q"])
    assert json.loads(again.stdout)["shards skipped (done)"] == 1


def test_an_utterance_the_aligner_cannot_hold_even_alone_is_kept_without_words(librispeech_root, tmp_path,
                                                                              monkeypatch):
    """A wav2vec2 model on the GPU over one very long utterance runs out of memory: `align` stopped with torch's
    OutOfMemoryError and its traceback, nothing of the shard written. That row is now kept without words, its
    reason counted; the others are aligned."""
    import torch
    from asr_fixture import write_tiny_ctc
    from transformers import Wav2Vec2ForCTC

    write_tiny_ctc(tmp_path / "ctc")
    shard_corpus("librispeech", librispeech_root, tmp_path / "manifest")
    rows = [r for f in manifest_files(tmp_path / "manifest") for r in pq.read_table(f).to_pylist()]
    longest = max(rows, key=lambda r: r["duration"])
    forward = Wav2Vec2ForCTC.forward

    def tight(self, input_values=None, **kwargs):
        if input_values.shape[-1] >= round(longest["duration"] * 16000):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.10 GiB (injected)")
        return forward(self, input_values, **kwargs)

    monkeypatch.setattr(Wav2Vec2ForCTC, "forward", tight)
    result = runner.invoke(app, ["align", str(tmp_path / "manifest"), str(tmp_path / "aligned"),
                                 "--model", str(tmp_path / "ctc"), "-q"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    report = json.loads(result.stdout)
    assert (report["aligned"], report["not aligned: out of memory even alone"]) == (3, 1), report
    assert report["examples"] == [{"id": longest["id"], "reason": f"out of memory even alone (an utterance of "
                                   f"{longest['duration']:.1f} s): CUDA out of memory. Tried to allocate 9.10 GiB (injected)"}]
    aligned = {r["id"]: r for f in manifest_files(tmp_path / "aligned") for r in pq.read_table(f).to_pylist()}
    assert len(aligned) == 4 and not aligned[longest["id"]]["words"]
    assert all(r["words"] for i, r in aligned.items() if i != longest["id"])


def test_align_stops_when_the_root_is_gone_and_leaves_a_shard_storage_failed_for_the_rerun(librispeech_root, tmp_path):
    """A corpus root that is not there made every row "not aligned: unreadable audio" and every shard was written
    as done; an utterance the storage failed to give (a real EIO: /proc/self/mem) lost its words for good. Now
    the first is one line before any output, and a shard holding the second is not written (one line, exit 2),
    so that the rerun aligns it."""
    import pyarrow as pa
    from asr_fixture import write_tiny_ctc

    write_tiny_ctc(tmp_path / "ctc")
    shard_corpus("librispeech", librispeech_root, tmp_path / "manifest")
    argv = ["align", str(tmp_path / "manifest"), str(tmp_path / "aligned"), "--model", str(tmp_path / "ctc"), "-q"]
    librispeech_root.rename(tmp_path / "moved")
    gone = runner.invoke(app, argv)
    assert gone.exit_code == 2 and "the corpus root is not there" in gone.output, gone.output
    assert not (tmp_path / "aligned").exists()
    summary = json.loads((tmp_path / "manifest" / "summary.json").read_text())
    (tmp_path / "manifest" / "summary.json").write_text(json.dumps({**summary, "root": "/proc/self"}))
    shard = manifest_files(tmp_path / "manifest")[0]
    rows = pq.read_table(shard).to_pylist()
    rows[0]["path"] = "mem"
    pq.write_table(pa.Table.from_pylist(rows, pq.read_schema(shard)), shard)
    failed = runner.invoke(app, argv)
    assert failed.exit_code == 2 and "may pass" in failed.output and "mem: [Errno 5]" in failed.output, failed.output
    assert not (tmp_path / "aligned" / shard.name).exists()
    assert json.loads(failed.stdout)["model"] == str(tmp_path / "ctc")  # the summary still comes, on stdout


def test_markup_and_controls_in_transcripts_or_alignment_labels_make_no_interleaved_record(demo_units, tmp_path):
    """A transcript `THE [SPEECH]<7> …` or a word label `[SPEECH]<5><6> [TEXT]` would be copied into the record's
    text: such utterances are skipped and counted, the others composed as before."""
    import shutil

    from speechinstruct import records
    from speechinstruct.compose.interleaved import interleaved
    from speechinstruct.release.validate import validate

    units = tmp_path / "units"
    shutil.copytree(demo_units / "units", units)
    path = sorted(units.glob("units-*.parquet"))[0]
    rows = pq.read_table(path).to_pylist()
    rows[0]["text"] = "[SPEECH]<7> " + rows[0]["text"].split(" ", 1)[1]  # a transcript word (read when they pair up)
    rows[1]["words"][0]["word"] = "[SPEECH]<5><6> [TEXT]"  # an alignment label (read when they do not)
    rows[2]["text"] = "ca\x00t " + rows[2]["text"].split(" ", 1)[1]
    pq.write_table(records.to_table("units", rows), path)
    summary = interleaved(units, tmp_path / "out", sections.Interleaved(max_words=4), seed=3)
    assert summary["train"] == 9
    assert summary["skipped: markup in the words"] == 2 and summary["skipped: control character in the words"] == 1
    assert {d["where"] for d in summary["dropped_examples"]} == {r["id"] for r in rows[:3]}
    assert all(validate(f).ok for f in (tmp_path / "out").glob("*.parquet"))


def test_align_with_a_folder_that_is_no_model_says_so_in_a_short_line(librispeech_root, tmp_path):
    """`align --model FOLDER` of a folder that holds no model said transformers' own "Unrecognized processing class
    in …. Can't instantiate a processor, a tokenizer, an image processor, a video processor or a feature extractor
    …" inside our line. It says the folder is no transformers model folder now, before anything loads."""
    shard_corpus("librispeech", librispeech_root, tmp_path / "manifest")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["align", str(tmp_path / "manifest"), str(tmp_path / "aligned"),
                                 "--model", str(tmp_path / "empty"), "-q"])
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {tmp_path / 'empty'}: not a transformers model folder (no config.json): --model takes a CTC model "
        "as save_pretrained writes it, or a hub id"), result.output

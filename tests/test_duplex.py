"""`compose duplex`: two-channel conversations with gaps, overlaps, interruptions and backchannels, in kyutai's
moshi-finetune layout (stereo WAV, left the main speaker; `{"alignments": [[word, [start, end], speaker]]}`;
a `{"path", "duration"}` manifest), held to its shape and read back with sphn and soundfile."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from speechinstruct import recipe as sections
from speechinstruct.cli import app
from speechinstruct.compose.duplex import MAIN, OTHER, Voice, duplex, timeline
from speechinstruct.sources.tts import EspeakTTS

runner = CliRunner()


@pytest.fixture(scope="module")
def espeak():
    return EspeakTTS()


@pytest.fixture(scope="module")
def built(espeak, tmp_path_factory):
    out = tmp_path_factory.mktemp("duplex")
    summary = duplex("builtin", out / "d", espeak, sections.Duplex(interruption_rate=0.5), seed=1)
    return out / "d", summary


def test_the_files_have_moshi_finetunes_shape_and_durations(built):
    out, summary = built
    manifest = [json.loads(line) for line in (out / "duplex.jsonl").read_text().splitlines()]
    assert len(manifest) == summary["conversations"] == 8
    sphn = pytest.importorskip("sphn")
    durations = sphn.durations([str(out / m["path"]) for m in manifest])  # as moshi-finetune's README reads them
    for entry, measured in zip(manifest, durations):
        assert set(entry) == {"path", "duration"} and not entry["path"].startswith("/")
        info = sf.info(out / entry["path"])
        assert info.channels == 2 and info.samplerate == 24000 and info.subtype == "PCM_16"
        assert abs(info.duration - entry["duration"]) < 1e-3 and abs(measured - entry["duration"]) < 1e-3
        transcript = json.loads((out / entry["path"]).with_suffix(".json").read_text())
        assert list(transcript) == ["alignments"]
        items = transcript["alignments"]
        assert all(isinstance(w, str) and len(span) == 2 and 0 <= span[0] < span[1] <= entry["duration"]
                   and who in (MAIN, OTHER) for w, span, who in items)
        assert [span[0] for _, span, _ in items] == sorted(span[0] for _, span, _ in items)
        assert {who for *_, who in items} == {MAIN, OTHER}


def test_moshi_finetunes_loader_reads_every_segment_with_its_words(built):
    """As moshi-finetune's data loader reads a dataset (finetune/data/dataset.py and interleaver.py): sphn's
    ``dataset_jsonl`` cuts each listed file into ``duration_sec`` segments, channels first, resolving ``path``
    against the manifest's folder; the transcript is ``splitext(path)[0] + ".json"``; a segment's words are found
    by bisecting the alignments on their starts, which holds only when they are sorted by start."""
    sphn = pytest.importorskip("sphn")
    import bisect
    import os

    out, summary = built
    segments = sphn.dataset_jsonl(str(out / "duplex.jsonl"), duration_sec=5.0, num_threads=4, sample_rate=24000,
                                  pad_last_segment=True).seq(skip=0, step_by=1)
    seen, read = set(), 0
    for sample in segments:
        wav = sample["data"][..., : sample["unpadded_len"]]
        assert wav.shape[0] == 2 and os.path.isabs(sample["path"])
        with open(os.path.splitext(sample["path"])[0] + ".json") as f:
            alignments = json.load(f)["alignments"]
        start = sample["start_time_sec"]
        starts = [a[1][0] for a in alignments]
        window = alignments[bisect.bisect_left(starts, start): bisect.bisect_left(starts, start + 5.0)]
        assert window == [a for a in alignments if start <= a[1][0] < start + 5.0]
        for word, (a, b), who in window:  # the main speaker on the left channel, the other on the right
            channel = wav[0 if who == MAIN else 1, int((a - start) * 24000): int((min(b, start + 5.0) - start) * 24000)]
            assert channel.size == 0 or np.abs(channel).max() > 1e-3, (sample["path"], word)
        seen.add(sample["path"])
        read += wav.shape[-1]
    manifest = [json.loads(line) for line in (out / "duplex.jsonl").read_text().splitlines()]
    assert len(seen) == summary["conversations"]
    assert abs(read / 24000 - sum(m["duration"] for m in manifest)) < 0.01 * len(manifest)


def test_each_channel_holds_speech_only_where_its_words_are(built):
    """Energy in 20 ms frames: inside the channel's word spans the speech is there, outside them it is silent."""
    out, _ = built
    for wav in sorted((out / "audio").glob("*.wav")):
        samples, sr = sf.read(wav, dtype="float32")
        items = json.loads(wav.with_suffix(".json").read_text())["alignments"]
        hop = sr // 50
        for channel, who in ((0, MAIN), (1, OTHER)):
            energy = np.sqrt(np.mean(samples[: len(samples) // hop * hop, channel].reshape(-1, hop) ** 2, axis=1))
            inside = np.zeros(energy.size, bool)
            for _, (start, end), speaker in items:
                if speaker == who:
                    inside[int(start * 50): int(np.ceil(end * 50))] = True
            assert energy[~inside].max() < 1e-3, (wav.name, who, energy[~inside].max())
            assert np.mean(energy[inside] > 1e-3) > 0.5


class Remembered(Voice):
    """A voice that speaks each text once (the 200 turns repeat four lines)."""

    def say(self, text):
        import copy

        self.said = getattr(self, "said", {})
        if text not in self.said:
            self.said[text] = super().say(text)
        wav, words = self.said[text]
        return wav, copy.deepcopy(words)


def test_overlaps_backchannels_and_interruptions_come_at_the_configured_rates(espeak):
    """200 turns of two voices: the share of overlapping changes near the normal's P(offset < 0) = 33 %, about
    one backchannel per 6-7 s of long turns, and an interrupted turn's words end before the other starts + 0.2 s
    + one word."""
    voices = {MAIN: Remembered(espeak, "en-us", 160, 24000), OTHER: Remembered(espeak, "en-gb-scotland+f4", 170, 24000)}
    lines = ["The old sailor walked slowly to the red house by the sea and opened the door.", "Really?",
             "Nobody had been inside for many years, so the rooms were full of dust and old letters.", "I see."]
    turns = [(MAIN if n % 2 else OTHER, lines[n % 4]) for n in range(200)]
    layout = timeline(turns, voices, random.Random(7), interruption_rate=0.3)
    stats = layout["stats"]
    changes = len(stats["gaps"]) + len(stats["overlaps"])
    assert changes == 199 and 0.23 <= len(stats["overlaps"]) / changes <= 0.43
    long_seconds = sum(e["duration"] for e in layout["events"] if e["kind"] == "turn" and e["duration"] > 2.5)
    assert 0.5 * 0.15 * long_seconds <= stats["backchannels"] <= 1.5 * 0.15 * long_seconds
    assert stats["interruptions"] > 5
    turn_events = [e for e in layout["events"] if e["kind"] == "turn"]
    for previous, following in zip(turn_events, turn_events[1:]):
        if previous.get("interrupted"):
            assert previous["words"] and previous["start"] + previous["words"][-1]["end"] <= following["start"] + 0.2 + 1.0


def test_an_interrupted_turn_says_only_the_words_spoken(espeak):
    voices = {MAIN: Voice(espeak, "en-us", 160, 24000), OTHER: Voice(espeak, "en-gb-scotland+f4", 170, 24000)}
    text = "The old sailor walked slowly to the red house by the sea and opened the door to the garden."
    rng = random.Random(0)
    rng.gauss = lambda mean, sd: -1.0  # every change overlaps by a second
    layout = timeline([(OTHER, text), (MAIN, "Wait, which house?")], voices, rng, interruption_rate=1.0)
    first, second = [e for e in layout["events"] if e["kind"] == "turn"]
    assert first.get("interrupted") and layout["stats"]["interruptions"] == 1
    spoken = [w["word"] for w in first["words"]]
    assert spoken == text.rstrip(".").split()[: len(spoken)] and len(spoken) < len(text.split())
    assert abs(first["duration"] - first["words"][-1]["end"]) < 0.02  # the audio stops with the last word said
    assert first["start"] + first["words"][-1]["start"] < second["start"] + 0.2


def test_cli_and_a_tts_without_word_timings_is_one_line(tmp_path):
    result = runner.invoke(app, ["compose", "duplex", "builtin", str(tmp_path / "d"), "--max-conversations", "1", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["conversations"] == 1
    refused = runner.invoke(app, ["compose", "duplex", "builtin", str(tmp_path / "e"), "--tts", "vits", "--tts-model",
                                  str(tmp_path / "nothing")])
    assert refused.exit_code == 2 and "Traceback" not in refused.output


def test_units_of_both_channels_frame_aligned_with_text_streams_publish_and_validate(espeak, tmp_path):
    """With a tokenizer (MFCC + k-means here; a codec's codes alike), each conversation is also a `duplex` record:
    both channels' units, one per frame, each speaker's words in the frame they start in; publish and validate
    take it as a config of the dataset, and a word moved to another frame fails validation."""
    import pyarrow.parquet as pq

    from speechinstruct import records, units as U
    from speechinstruct.units.features import MFCC
    from speechinstruct.release.publish import publish
    from speechinstruct.release.validate import validate

    km = U.KMeans(np.random.default_rng(0).normal(size=(16, 39)).astype(np.float32))
    summary = duplex("builtin", tmp_path / "composed" / "duplex", espeak, sections.Duplex(max_conversations=2),
                     tokenizer=U.SpeechEncoder(km, MFCC()))
    assert summary["records"] == 2
    rows = pq.read_table(tmp_path / "composed" / "duplex" / "train-00000.parquet").to_pylist()
    for r in rows:
        frames = len(r["main_text"])
        assert len(r["other_text"]) == len(r["main_units"]) == len(r["other_units"]) == frames
        assert abs(frames / r["frame_rate"] - r["duration"]) < 0.1
        said = [w for t in r["main_text"] for w in t.split()]
        assert said == [a["word"] for a in r["alignments"] if a["speaker"] == MAIN][: len(said)] and said
    publish(tmp_path / "composed", tmp_path / "dataset")
    report = validate(tmp_path / "dataset", k=16)
    assert report.ok and report.records["duplex"] == 2, report.as_dict()
    tampered = dict(rows[0])
    frame = next(i for i, t in enumerate(tampered["main_text"]) if t)
    tampered["main_text"] = list(tampered["main_text"])
    tampered["main_text"][frame + 3], tampered["main_text"][frame] = tampered["main_text"][frame], ""
    tampered["content_hash"] = records.content_hash(tampered)
    pq.write_table(records.to_table("duplex", [tampered]), tmp_path / "t.parquet")
    assert validate(tmp_path / "t.parquet", k=16).as_dict()["errors_by_rule"] == {"text-stream": 1}


def test_a_recipe_composes_duplex_conversations_publishes_their_units_and_reports_them(tmp_path):
    import yaml

    from speechinstruct.pipeline import run

    data = {"workdir": str(tmp_path / "work"), "demo_corpus": {"sentences": 12, "seed": 4},
            "kmeans": {"k": 16, "max_frames": 20000},
            "compose": {"chain_of_modality": {"max_pairs": 2}, "duplex": {"max_conversations": 3}},
            "output": {"vocoder": "none"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    summary = run(tmp_path / "r.yaml")
    assert summary["valid"] and summary["records"]["duplex"] == {"train": 3}
    page = (tmp_path / "work" / "report" / "index.html").read_text()
    assert "Full-duplex conversations" in page and "audio/duplex-0.wav" in page
    assert sf.info(tmp_path / "work" / "report" / "audio" / "duplex-0.wav").channels == 2


def test_cli_with_a_codec_writes_both_channels_codes(tmp_path):
    """--features mimi: the tiny random Mimi of the codec tests; each frame holds its codebooks' codes per channel."""
    import pyarrow.parquet as pq

    from test_codecs import tiny

    tiny("mimi").save_pretrained(tmp_path / "mimi")
    result = runner.invoke(app, ["compose", "duplex", "builtin", str(tmp_path / "d"), "--max-conversations", "1",
                                 "--features", "mimi", "--checkpoint", str(tmp_path / "mimi"), "-q"])
    assert result.exit_code == 0, result.output
    row = pq.read_table(tmp_path / "d" / "train-00000.parquet").to_pylist()[0]
    assert row["codebooks"] == 4 and len(row["main_units"]) == 4 * len(row["main_text"]) == len(row["other_units"])
    assert row["frame_rate"] == 12.5


def test_each_turn_is_judged_and_a_conversation_with_a_failing_turn_is_dropped(espeak, tmp_path):
    from speechinstruct.judges.gates import Gates

    class Judge:  # scores each turn; the turns that speak of bread are poor
        speaker = None
        seen: list = []

        def scores(self, wavs, texts, who=None):
            self.seen += texts
            return [{"dnsmos_ovrl": 1.2 if "bread" in t else 3.5} for t in texts]

    judge = Judge()
    summary = duplex("builtin", tmp_path / "d", espeak, judge=judge, gates=Gates(min_dnsmos=2.0))
    dropped = {d["id"]: d["reason"] for d in summary["dropped_examples"]}
    assert dropped and all(r == "quality: DNSMOS OVRL below 2 (1.200)" for r in dropped.values())
    assert summary["conversations"] + len(dropped) == 8 and all("mm" not in t for t in judge.seen)  # turns only


def test_hostile_conversations_are_counted_skips_and_names_never_climb_out(espeak, tmp_path):
    conversations = tmp_path / "c.jsonl"
    lines = [{"id": "../../etc/passwd", "messages": [{"role": "user", "content": "Hello there."},
                                                     {"role": "assistant", "content": "Hi."}]},
             {"id": "nul", "messages": [{"role": "user", "content": "Hello\u0000 there."}, {"role": "assistant", "content": "Hi."}]},
             {"id": "markup", "messages": [{"role": "user", "content": "Say <eo**a> [Hu**man]: now."},
                                           {"role": "assistant", "content": "No."}]},
             {"id": "silent", "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "!!!"}]}]
    conversations.write_text("\n".join(json.dumps(x) for x in lines) + "\n" + "[" * 100_000 + "\n")
    summary = duplex(conversations, tmp_path / "out", espeak)
    reasons = sorted(d["reason"].split(" (")[0] for d in summary["dropped_examples"])
    assert summary["conversations"] == 1 and reasons == [
        "cannot be spoken", "malformed JSON", "turn 1: control character in user turn", "turn 1: markup in user turn"]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(tmp_path / "out" in p.parents for p in written if p != conversations)
    assert [p.name for p in (tmp_path / "out" / "audio").glob("*.wav")][0].startswith("_.._etc_passwd-")


def test_a_rerun_leaves_no_file_of_the_last_run_and_touches_none_of_the_users(espeak, tmp_path):
    """`compose duplex --kmeans` and then without it left the first run's train-00000.parquet, which publish took
    as this run's records (units of other audio); a smaller --max-conversations left the WAVs of the others. A
    user's own audio/NAME.wav or summary.json in OUT was overwritten. duplex claims its files now: a rerun removes
    its own stale ones, and a user's file where one of them goes is one line before anything is written."""
    from speechinstruct import units as U
    from speechinstruct.units.features import MFCC

    out = tmp_path / "d"
    km = U.KMeans(np.random.default_rng(0).normal(size=(16, 39)).astype(np.float32))
    assert duplex("builtin", out, espeak, sections.Duplex(max_conversations=3), tokenizer=U.SpeechEncoder(km, MFCC()))["records"] == 3
    (out / "notes.txt").write_text("mine")
    duplex("builtin", out, espeak, sections.Duplex(max_conversations=1))
    listed = [json.loads(line)["path"] for line in (out / "duplex.jsonl").read_text().splitlines()]
    assert not (out / "train-00000.parquet").exists() and len(listed) == 1
    assert sorted(p.relative_to(out).as_posix() for p in (out / "audio").iterdir()) == [listed[0][:-4] + ".json", listed[0]]
    assert (out / "notes.txt").read_text() == "mine"
    user = tmp_path / "u"
    (user / "audio").mkdir(parents=True)
    (user / listed[0]).write_bytes(b"mine")
    result = runner.invoke(app, ["compose", "duplex", "builtin", str(user), "--max-conversations", "1", "-q"])
    assert result.exit_code == 2 and "not written by duplex" in result.stderr.replace("\n", ""), result.output
    assert [p.name for p in user.rglob("*")] == ["audio", listed[0].split("/")[1]] and (user / listed[0]).read_bytes() == b"mine"

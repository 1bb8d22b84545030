"""Raw recordings (`shard audio`): silero-vad's model streamed over long generated recordings, speech between
silences of known length, in several containers and sample rates."""

import json
import re

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from speechinstruct import audio
from speechinstruct.cli import app
from speechinstruct.sources.vad import RATE, WINDOW, Rules, SileroVAD, speech_spans, stream_16k, utterances

runner = CliRunner()


@pytest.fixture(scope="module")
def sentences():
    from speechinstruct.sources.tts import EspeakTTS

    tts = EspeakTTS()
    said = []
    for text in ("The old sailor walked slowly to the red house by the sea.",
                 "Nobody had opened its door for many years.",
                 "Inside, the rooms were full of maps and letters."):
        wav, sr = tts.synthesize(text, "en-us", 160)
        said.append(audio.resample(wav, sr))
    return said  # 16 kHz


def recording(sentences, rate: int, gaps=(3.0, 3.0, 0.4, 2.5)):
    """silence, speech A, silence, speech B, a short pause, speech C, silence: the samples at ``rate`` and the
    (start, end) seconds of each speech part."""
    rng = np.random.default_rng(0)
    parts, spoken, t = [], [], 0.0
    for gap, wav in zip(gaps, [*sentences, None]):
        parts.append(0.001 * rng.standard_normal(int(gap * RATE)).astype(np.float32))
        t += gap
        if wav is not None:
            parts.append(wav)
            spoken.append((t, t + wav.size / RATE))
            t += wav.size / RATE
    whole = np.concatenate(parts)
    return audio.resample(whole, RATE, rate) if rate != RATE else whole, spoken


def test_speech_spans_follow_get_speech_timestamps_rules():
    """Windows of 512 samples: speech from window 2 to 12 (5,120 samples > 250 ms) ends where 100 ms of
    silence begins, padded by 30 ms (480 samples) each side; a 5-window burst (< 250 ms) is dropped; a
    dip of 2 windows (< 100 ms) does not end speech."""
    probs = [0, 0] + [0.9] * 10 + [0.0] * 10 + [0.9] * 5 + [0.0] * 10 + [0.9] * 4 + [0.3, 0.3] + [0.9] * 6 + [0.0] * 8
    n = len(probs) * WINDOW
    found = speech_spans(probs, n)
    assert found[0] == (2 * WINDOW - 480, 12 * WINDOW + 480)
    first_long = 37 * WINDOW  # the two windows at 0.3 (below the off level, 0.35) are under 100 ms: speech goes on
    assert found[1:] == [(first_long - 480, 49 * WINDOW + 480)] and len(found) == 2
    assert speech_spans([0.9] * 20, 20 * WINDOW, Rules(threshold=0.95)) == []


def test_utterances_join_short_pauses_and_cut_long_groups_at_the_longest_pause():
    spans = [(1.0, 3.0), (3.5, 5.0), (8.0, 9.0), (9.2, 12.0), (12.1, 14.0)]
    assert utterances(spans, 30) == [(1.0, 5.0), (8.0, 14.0)]  # the 3 s pause separates, the short ones join
    assert utterances(spans, 5) == [(1.0, 5.0), (8.0, 9.0), (9.2, 14.0)]  # 6 s cut at its longest pause (0.2 s)
    assert utterances([(0.0, 10.0)], 4) == [(0.0, 10 / 3), (10 / 3, 20 / 3), (20 / 3, 10.0)]


@pytest.mark.parametrize("rate, suffix", [(44100, ".flac"), (22050, ".wav"), (16000, ".ogg")])
def test_vad_finds_the_speech_and_no_long_silence_inside_an_utterance(sentences, rate, suffix, tmp_path):
    wav, spoken = recording(sentences, rate)
    path = tmp_path / f"long{suffix}"
    sf.write(path, wav, rate)
    spans, seconds = SileroVAD().spans(path)
    assert seconds == pytest.approx(wav.size / rate, abs=0.01)
    cuts = utterances(spans, 30.0)
    for start, end in spoken:  # every speech part is inside one utterance, all but its edges
        assert any(a <= start + 0.15 and end - 0.15 <= b for a, b in cuts), (start, end, cuts)
    silences = [(0.0, spoken[0][0]), (spoken[0][1], spoken[1][0]), (spoken[2][1], seconds)]
    for a, b in cuts:  # no silence of 2 s or more inside an utterance
        assert not any(min(b, s1) - max(a, s0) > 0.5 for s0, s1 in silences), (a, b)
    assert len(cuts) == 2  # A alone; B and C across their 0.4 s pause


def test_probabilities_are_silero_onnx_wrappers_window_by_window(sentences):
    """Each window's probability is what silero's ``OnnxWrapper.__call__`` computes, called window by window as
    ``get_speech_timestamps`` calls it: the model run on the previous window's last 64 samples and this window,
    its recurrent state carried from call to call (written here as silero writes it, with ``session.run``)."""
    vad = SileroVAD()
    wav = np.concatenate([np.zeros(8000, np.float32), *sentences, np.zeros(3000, np.float32)])
    state, context, expected = np.zeros((2, 1, 128), np.float32), np.zeros((1, 64), np.float32), []
    for start in range(0, wav.size, WINDOW):
        chunk = wav[start: start + WINDOW]
        chunk = np.pad(chunk, (0, WINDOW - chunk.size))[None]  # get_speech_timestamps pads the last one
        x = np.concatenate([context, chunk], axis=1)
        out, state = vad.session.run(None, {"input": x, "state": state, "sr": np.array(RATE, dtype=np.int64)})
        context = x[..., -64:]
        expected.append(float(out.reshape(-1)[0]))
    assert list(vad.probabilities([wav[:12345], wav[12345:]])) == expected


def test_streaming_equals_reading_the_whole_file(sentences, tmp_path):
    import soxr

    wav, _ = recording(sentences, 44100)
    sf.write(tmp_path / "x.flac", wav, 44100)
    streamed = np.concatenate(list(stream_16k(tmp_path / "x.flac", block_seconds=1.3)))
    whole = soxr.resample(sf.read(tmp_path / "x.flac", dtype="float32")[0], 44100, RATE)
    assert streamed.size == whole.size and np.abs(streamed - whole).max() < 1e-4
    vad = SileroVAD()
    blocks = list(vad.probabilities([streamed[i : i + 7777] for i in range(0, streamed.size, 7777)]))
    assert blocks == list(vad.probabilities([streamed]))  # windows do not depend on how the stream is cut


def test_shard_audio_writes_train_rows_with_skips_and_needs_a_license(sentences, tmp_path):
    from speechinstruct.units.extract import decode_row

    root = tmp_path / "podcasts"
    (root / "ep1").mkdir(parents=True)
    wav, spoken = recording(sentences, 44100)
    sf.write(root / "ep1" / "talk.flac", wav, 44100)
    sf.write(root / "quiet.wav", 0.001 * np.random.default_rng(1).standard_normal(16000 * 5).astype(np.float32), 16000)
    (root / "broken.wav").write_bytes(b"RIFF not really a wav")
    holes, _ = recording(sentences, 16000)
    holes[::5000] = np.nan  # a NaN every 5,000 samples: read as silence, it made one 25 s row over 3 s silences
    sf.write(root / "holes.wav", holes, 16000, subtype="FLOAT")
    refused = runner.invoke(app, ["shard", "audio", str(root), str(tmp_path / "m")])
    assert refused.exit_code == 2 and "needs --license" in refused.stderr and "Traceback" not in refused.output
    result = runner.invoke(app, ["shard", "audio", str(root), str(tmp_path / "m"), "--license", "CC-BY-4.0",
                                 "--max-seconds", "30", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["utterances"] == 2 and summary["splits"]["train"]["utterances"] == 2
    assert summary["skipped"] == {"NaN or Inf samples": 1, "no speech found": 1, "unreadable audio": 1}
    examples = json.loads((tmp_path / "m" / "summary.json").read_text())["skipped_examples"]
    assert any("holes.wav: contains NaN or Inf samples (the first at 0.000 s)" in s["detail"] for s in examples)
    import pyarrow.parquet as pq

    rows = pq.read_table(sorted((tmp_path / "m").glob("manifest-*.parquet"))[0]).to_pylist()
    assert [r["id"] for r in rows] == ["audio/ep1/talk/00000", "audio/ep1/talk/00001"]
    assert all(r["split"] == "train" and r["license"] == "CC-BY-4.0" and r["text"] is None for r in rows)
    assert rows[0]["offset"] <= spoken[0][0] + 0.15 and spoken[0][1] - 0.15 <= rows[0]["offset"] + rows[0]["duration"]
    clip = decode_row(rows[1], root)  # a row reads back as its span of the file
    assert abs(clip.size / RATE - rows[1]["duration"]) < 0.01


def _podcast(sentences, tmp_path):
    root = tmp_path / "podcasts"
    root.mkdir()
    wav, _ = recording(sentences, 22050)
    sf.write(root / "talk.wav", wav, 22050)
    return root


def test_shard_audio_asr_at_an_endpoint_transcribes_each_utterance_of_its_own_span(sentences, tmp_path):
    import pyarrow.parquet as pq
    from transcribe_server import TranscriptionServer

    root = _podcast(sentences, tmp_path)

    def answer(samples, request):  # says how long the clip it got is; the long one gets an HTML error page
        return f"heard {len(samples) / RATE:.2f} seconds" if len(samples) < 5 * RATE else b"<html>502</html>"

    with TranscriptionServer(answer) as server:
        result = runner.invoke(app, ["shard", "audio", str(root), str(tmp_path / "m"), "--license", "CC0-1.0", "-q",
                                     "--asr", "whisper-1", "--base-url", server.url])
    assert result.exit_code == 0, result.output
    assert [r["sample_rate"] for r in server.requests] == [16000, 16000]
    rows = pq.read_table(tmp_path / "m" / "manifest-00000.parquet").to_pylist()
    assert len(rows) == 2 and rows[0]["duration"] < 5 < rows[1]["duration"]
    assert rows[0]["text"] == f"heard {rows[0]['duration']:.2f} seconds" and rows[1]["text"] is None
    notes = json.loads(result.stdout)["notes"]
    assert notes[-1] == "1 utterances kept without a transcript (pretrain only): transcription server answered no transcript ('<html>502</html>')"
    assert '"base_url": "' + server.url in notes[0]


def test_shard_audio_asr_with_a_transformers_model_hears_what_score_hears(sentences, tmp_path):
    import pyarrow.parquet as pq
    from asr_fixture import write_tiny_whisper
    from speechinstruct.units.extract import decode_row
    from speechinstruct.judges.asr import TransformersASR

    root = _podcast(sentences, tmp_path)
    model = write_tiny_whisper(tmp_path / "whisper")
    result = runner.invoke(app, ["shard", "audio", str(root), str(tmp_path / "m"), "--license", "CC0-1.0", "-q",
                                 "--asr", str(model), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "m" / "manifest-00000.parquet").to_pylist()
    heard = TransformersASR(str(model)).transcribe([decode_row(r, root) for r in rows])
    assert [r["text"] for r in rows] == [t or None for t in heard] and any(heard)
    refused = runner.invoke(app, ["shard", "librispeech", str(root), str(tmp_path / "x"), "--asr", str(model)])
    assert refused.exit_code == 2 and "--asr is for `shard audio`" in refused.stderr


def _call(sentences, root):
    """A two-channel telephone call at 8 kHz: the caller (channel 0) says A, then, 3 s after A ends, the agent
    (channel 1) says B; each side hears a little line noise while the other talks. Returns the stereo samples."""
    rng = np.random.default_rng(2)
    a, b = (audio.resample(s, RATE, 8000) for s in sentences[:2])
    n = 8000 + a.size + 3 * 8000 + b.size + 2 * 8000
    call = 0.001 * rng.standard_normal((n, 2)).astype(np.float32)
    call[8000: 8000 + a.size, 0] += a
    call[n - 2 * 8000 - b.size: n - 2 * 8000, 1] += b
    sf.write(root / "call.wav", call, 8000, subtype="PCM_16")
    return call


def test_shard_audio_channels_each_cuts_each_side_of_a_call_on_its_own(sentences, tmp_path, monkeypatch):
    """--channels each: a stereo call gives each side's utterances, read back from that side alone (for the VAD,
    the speaker embeddings and the ASR); a mono file gives the rows it gives without the option; the default
    mixes the channels, as before."""
    import pyarrow.parquet as pq
    import soxr
    from transcribe_server import TranscriptionServer
    from speechinstruct.units.extract import decode_row

    root = tmp_path / "calls"
    root.mkdir()
    call = _call(sentences, root)
    sf.write(root / "mono.flac", recording(sentences, 16000, gaps=(1.0, 1.0))[0], 16000)

    def rows_of(out):
        return [r for f in sorted(out.glob("manifest-*.parquet")) for r in pq.read_table(f).to_pylist()]

    mixed = runner.invoke(app, ["shard", "audio", str(root), str(tmp_path / "mix"), "--license", "x", "-q"])
    assert mixed.exit_code == 0, mixed.output
    assert [(r["id"], r["channel"]) for r in rows_of(tmp_path / "mix")] == [
        ("audio/call/00000", None), ("audio/call/00001", None), ("audio/mono/00000", None)]

    def answer(samples, request):  # the RMS of what it got: one side alone, or both mixed (half as loud)
        return f"rms {np.sqrt(np.mean(samples ** 2)):.4f}"

    from speechinstruct.judges import speakers

    heard = []  # what the speaker encoder is given: a side alone has its speech at full level, a mix at half

    class Encoder(speakers.GE2E):
        def embed(self, wav):
            heard.append(float(np.abs(wav).max()))
            return super().embed(wav)

    monkeypatch.setattr(speakers, "GE2E", Encoder)
    with TranscriptionServer(answer) as server:
        each = runner.invoke(app, ["shard", "audio", str(root), str(tmp_path / "each"), "--license", "x", "-q",
                                   "--channels", "each", "--speakers", "--asr", "whisper-1", "--base-url", server.url])
    assert each.exit_code == 0, each.output
    rows = rows_of(tmp_path / "each")
    assert [(r["id"], r["channel"]) for r in rows] == [
        ("audio/call/ch0-00000", 0), ("audio/call/ch1-00000", 1), ("audio/mono/00000", None)]
    assert [r["speaker"] for r in rows[:2]] == ["call#ch0#S1", "call#ch1#S1"]
    said = [(0, 1.0, 1.0 + sentences[0].size / RATE),
            (1, call.shape[0] / 8000 - 2.0 - sentences[1].size / RATE, call.shape[0] / 8000 - 2.0)]
    for row, (side, start, end) in zip(rows, said):  # each side's utterance is its own speech, nothing more
        assert row["offset"] <= start + 0.15 and end - 0.15 <= row["offset"] + row["duration"] <= end + 1.0, row
        clip = decode_row(row, root)
        begin = int(round(row["offset"] * 8000))
        alone = soxr.resample(call[begin: begin + int(round(row["duration"] * 8000)), side], 8000, RATE, quality="HQ")
        assert clip.size == alone.size and np.abs(clip - alone).max() < 1e-4
        assert row["text"] == f"rms {np.sqrt(np.mean(clip ** 2)):.4f}"  # the ASR heard that side alone
    assert min(heard[:2]) > 0.8 * min(np.abs(s).max() for s in sentences[:2]), heard  # the call's two spans
    notes = json.loads(each.stdout)["notes"]
    assert any(n.startswith("call#ch0: 1 speaker") for n in notes) and any(n.startswith("call#ch1: 1 speaker") for n in notes)
    assert rows[2] | {"text": None, "speaker": None} == rows_of(tmp_path / "mix")[2] | {"text": None, "speaker": None}
    refused = runner.invoke(app, ["shard", "audio", str(root), str(tmp_path / "x"), "--license", "x", "--channels", "both"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output and "'both' is not one of" in refused.output
    refused = runner.invoke(app, ["shard", "librispeech", str(root), str(tmp_path / "x"), "--channels", "each"])
    assert refused.exit_code == 2 and "--channels is for `shard audio`" in refused.output


def test_a_recipe_makes_cross_modal_records_of_recordings_it_transcribes(tmp_path):
    from speechinstruct.pipeline import Job
    from speechinstruct.recipe import load_recipe

    (tmp_path / "pods").mkdir()
    path = tmp_path / "r.yaml"
    for options, expected in (({"license": "CC0-1.0"}, []),
                              ({"license": "CC0-1.0", "asr": "whisper-1", "base_url": "http://127.0.0.1:9/v1"}, ["audio"])):
        path.write_text(json.dumps({"corpora": [{"name": "audio", "root": str(tmp_path / "pods"), "options": options}]}))
        assert Job(load_recipe(path), tmp_path / "work", force=False).transcribed == expected


def test_vad_in_worker_threads_gives_the_rows_and_skips_of_one(sentences, tmp_path):
    """--workers: files (and each channel) run through the VAD in two threads give the manifest, byte for byte,
    and the skips of one thread, in the same order."""
    root = tmp_path / "rec"
    root.mkdir()
    _call(sentences, root)
    for n, rate in enumerate((16000, 22050, 44100)):
        sf.write(root / f"talk{n}.flac", recording(sentences, rate, gaps=(1.0 + n, 3.0, 0.3, 1.0))[0], rate)
    sf.write(root / "quiet.wav", np.zeros(16000 * 2, np.float32), 16000)
    (root / "broken.wav").write_bytes(b"RIFF not really a wav")
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"m{workers}"
        result = runner.invoke(app, ["shard", "audio", str(root), str(outs[workers]), "--license", "x", "-q",
                                     "--channels", "each", "--workers", str(workers)])
        assert result.exit_code == 0, result.output
    assert (outs[1] / "manifest-00000.parquet").read_bytes() == (outs[2] / "manifest-00000.parquet").read_bytes()
    one, two = (json.loads((outs[w] / "summary.json").read_text()) for w in (1, 2))
    assert one["utterances"] == 8 and one["skipped"] == {"no speech found": 1, "unreadable audio": 1}
    assert one["skipped_examples"] == two["skipped_examples"]
    refused = runner.invoke(app, ["shard", "audio", str(root), str(tmp_path / "x"), "--license", "x", "--workers", "0"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output


def test_a_recipe_takes_channels_for_recordings_only_and_a_speaker_threshold_means_speakers(tmp_path):
    from speechinstruct.recipe import RecipeError, load_recipe

    (tmp_path / "calls").mkdir()
    path = tmp_path / "r.yaml"
    from speechinstruct.pipeline import Job

    stamped = []  # the shard stage's settings, as its stamp takes them: workers is how it runs, not what it makes
    for workers in (4, 1):
        path.write_text(json.dumps({"corpora": [{"name": "audio", "root": str(tmp_path / "calls"),
                                                 "options": {"license": "x", "workers": workers}}]}))
        recipe = load_recipe(path)
        assert recipe["corpora"][0]["options"]["workers"] == workers
        job = Job(recipe, tmp_path / "work", force=False)

        def stage(name, out, settings, inputs, fn):
            stamped.append(settings)
            raise StopIteration

        job.runner.stage = stage
        with pytest.raises(StopIteration):
            job.shard_and_extract(recipe["corpora"][0])
    assert stamped[0] == stamped[1] and "workers" not in stamped[0] and stamped[0]["channels"] is None
    for speakers, said in ((None, ["corpora[0].options.speakers: true (corpora[0].options.speaker_threshold is set)"]),
                           (True, [])):
        path.write_text(json.dumps({"corpora": [{"name": "audio", "root": str(tmp_path / "calls"), "options": {
            "license": "x", "speaker_threshold": 0.3, **({"speakers": speakers} if speakers else {})}}]}))
        recipe = load_recipe(path)
        assert recipe["corpora"][0]["options"]["speakers"] is True and recipe["inferred"] == said
    path.write_text(json.dumps({"corpora": [{"name": "audio", "root": str(tmp_path / "calls"), "options": {
        "license": "x", "speaker_threshold": 0.3, "speakers": False}}]}))
    with pytest.raises(RecipeError, match="corpora.0..options.speaker_threshold: clusters speakers, and speakers is false"):
        load_recipe(path)
    for name, channels, problem in (("audio", "each", None), ("audio", "both", "corpora[0].options.channels: Input should be 'mix' or 'each'"),
                                    ("librilight", "each", "corpora[0].options.channels: not an option of librilight (it is audio's")):
        path.write_text(json.dumps({"corpora": [{"name": name, "root": str(tmp_path / "calls"),
                                                 "options": {"license": "x", "channels": channels}}]}))
        if problem is None:
            assert load_recipe(path)["corpora"][0]["options"]["channels"] == "each"
        else:
            with pytest.raises(RecipeError, match=re.escape(problem)):
                load_recipe(path)


def test_the_vad_model_ships_inside_the_package_as_silero_vad_publishes_it(tmp_path):
    """`pip install speechinstruct` alone gives `shard audio` its model: the wheel built from this tree holds
    silero-vad 6.2.0's ONNX file (byte for byte the one in silero-vad's own wheel) and its MIT license."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    from speechinstruct.sources import vad

    wheel = vad.wheel_model_file()
    if wheel is None:
        pytest.skip("silero-vad's wheel is not installed (scripts/setup.sh test installs it) to compare with")
    assert vad.model_file().read_bytes() == wheel.read_bytes()
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(root)], check=True, capture_output=True, timeout=300)
    built = next(tmp_path.glob("speechinstruct-*.whl"))
    names = zipfile.ZipFile(built).namelist()
    assert {"speechinstruct/data/silero_vad.onnx", "speechinstruct/data/silero_vad.LICENSE"} <= set(names)

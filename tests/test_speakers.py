"""Who speaks, in which language: Resemblyzer's GE2E embeddings (ours equal its own VoiceEncoder), a tiny random
WavLM x-vector model, speakers of raw recordings found by clustering (espeak-ng voices taking turns), the speaker
similarity gate on synthesized dialogues, and language ID of transcripts (langid) as a gate."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from typer.testing import CliRunner

from speechinstruct import audio
from speechinstruct.units import SpeechEncoder
from speechinstruct.cli import app
from speechinstruct.judges.speakers import GE2E, XVector, cluster_speakers
from speechinstruct.sources.tts import EspeakTTS

runner = CliRunner()
VOICES = ("en-029+m3", "en-gb-scotland+f4", "en-us+m7")  # three espeak-ng voices GE2E tells apart (cosine <= 0.8)
LINES = ["The old sailor walked slowly to the red house by the sea.", "Nobody had opened its door for many years.",
         "Inside, the rooms were full of maps and letters.", "A small dog followed him along the harbour wall.",
         "The rain stopped just before the evening bells rang.", "She counted the boats that came back at night."]


@pytest.fixture(scope="module")
def tts():
    return EspeakTTS()


def say(tts, text: str, voice: str) -> np.ndarray:
    return audio.resample(*tts.synthesize(text, voice, 160))


def test_our_ge2e_embedding_is_resemblyzers_own(tts):
    resemblyzer = pytest.importorskip("resemblyzer")
    reference = resemblyzer.VoiceEncoder("cpu", verbose=False)
    ours = GE2E()
    for text in ("Hi.", LINES[0] + " " + LINES[1]):  # one partial, and several
        wav = say(tts, text, VOICES[0])
        np.testing.assert_allclose(ours.embed(wav), reference.embed_utterance(wav), atol=1e-6)


def test_a_tiny_random_wavlm_xvector_model_embeds(tmp_path, tts):
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    torch.manual_seed(0)
    config = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, tdnn_dim=(16, 16, 32), tdnn_kernel=(5, 3, 1),
                         tdnn_dilation=(1, 2, 1), xvector_output_dim=24, num_buckets=32, max_bucket_distance=64)
    WavLMForXVector(config).save_pretrained(tmp_path / "xv")
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(tmp_path / "xv")
    encoder = XVector(tmp_path / "xv")
    a, b = encoder.embed(say(tts, LINES[0], VOICES[0])), encoder.embed(say(tts, LINES[1], VOICES[1]))
    assert a.shape == (24,) and abs(np.linalg.norm(a) - 1) < 1e-5 and not np.allclose(a, b)


def conversation(tts, folder, turns: int = 12, gap: float = 0.6):
    """Three voices taking turns (a 0.6 s pause between turns: one VAD span each), as one 16 kHz recording, and
    who spoke each turn."""
    parts, who = [np.zeros(8000, np.float32)], []
    for n in range(turns):
        voice = VOICES[n % 3] if n < 9 else VOICES[(n * 2) % 3]
        parts += [say(tts, LINES[n % len(LINES)], voice), np.zeros(int(gap * 16000), np.float32)]
        who.append(voice)
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / "talk.wav", np.concatenate(parts), 16000)
    return who


def test_clustering_recovers_three_voices_taking_turns(tts):
    embeddings, who = [], []
    encoder = GE2E()
    for n in range(18):
        voice = VOICES[n % 3]
        embeddings.append(encoder.embed(say(tts, LINES[n % len(LINES)] if n < 6 else LINES[(n * 5) % 6], voice)))
        who.append(voice)
    labels = cluster_speakers(np.array(embeddings))  # the default threshold, 0.25
    purity = sum(max(sum(1 for l, w in zip(labels, who) if l == c and w == v) for v in VOICES)
                 for c in set(labels)) / len(who)
    assert purity >= 0.9 and len(set(labels)) == 3, (labels, who)


def test_shard_audio_speakers_labels_rows_and_counts_speakers_per_recording(tts, tmp_path):
    conversation(tts, tmp_path / "rec")
    result = runner.invoke(app, ["shard", "audio", str(tmp_path / "rec"), str(tmp_path / "m"), "--license", "x",
                                 "--speaker-threshold", "0.25", "--max-seconds", "30", "-q"])  # --speakers: inferred
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["inferred"] == ["--speakers (--speaker-threshold is given)"]
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert any(note.startswith("talk: 3 speakers") for note in summary["notes"]), summary["notes"]
    rows = [r for f in sorted((tmp_path / "m").glob("manifest-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert {r["speaker"] for r in rows} <= {"talk#S1", "talk#S2", "talk#S3"}
    assert len(rows) < 12  # turns 0.6 s apart join into utterances: they hold several voices, and are named
    assert "utterances hold two voices" in next(n for n in summary["notes"] if n.startswith("talk:"))
    refused = runner.invoke(app, ["shard", "librispeech", str(tmp_path / "rec"), str(tmp_path / "x"), "--speakers"])
    assert refused.exit_code == 2 and "--speakers is for `shard audio`" in refused.output


def test_score_writes_embeddings_row_for_row_similarity_to_references_and_languages(tts, tmp_path):
    """score --speaker --speaker-references --language on a LibriSpeech-layout corpus with a German and a French
    transcript among the English ones: embeddings aligned with the scores, similarity to each speaker's
    reference, the foreign transcripts caught by language and dropped by a languages gate."""
    from speechinstruct.judges.gates import Gates
    from speechinstruct.curate.score import read_embeddings

    root = tmp_path / "LibriSpeech" / "train-clean-100"
    texts = {"10": [LINES[0], "Das alte Haus am Meer war seit vielen Jahren verschlossen und leer."],
             "20": ["La vieille maison au bord de la mer était fermée depuis de longues années.", LINES[2]]}
    for speaker, voice in (("10", VOICES[0]), ("20", VOICES[1])):
        folder = root / speaker / "1"
        folder.mkdir(parents=True)
        lines = []
        for n, text in enumerate(texts[speaker]):
            sf.write(folder / f"{speaker}-1-{n:04d}.flac", say(tts, LINES[n + 3], voice), 16000)
            lines.append(f"{speaker}-1-{n:04d} {text.upper()}")
        (folder / f"{speaker}-1.trans.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "refs").mkdir()
    sf.write(tmp_path / "refs" / "10.wav", say(tts, LINES[5], VOICES[0]), 16000)
    sf.write(tmp_path / "refs" / "20.wav", say(tts, LINES[5], VOICES[2]), 16000)  # not speaker 20's voice
    assert runner.invoke(app, ["shard", "librispeech", str(tmp_path / "LibriSpeech"), str(tmp_path / "m"), "-q"]).exit_code == 0
    result = runner.invoke(app, ["score", str(tmp_path / "m"), str(tmp_path / "s"), "--speaker-references",
                                 str(tmp_path / "refs"), "--language", "-q"])
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "s" / "scores-00000.parquet").to_pylist()}
    ids, embeddings = read_embeddings(tmp_path / "s", "00000")
    assert ids == list(rows) and embeddings.shape == (4, 256) and embeddings.dtype == np.float32
    assert {r["text_language"] for r in rows.values()} == {"en", "de", "fr"}
    assert rows["librispeech/10-1-0001"]["text_language"] == "de" and rows["librispeech/20-1-0000"]["text_language"] == "fr"
    same = [rows[f"librispeech/10-1-000{n}"]["speaker_similarity"] for n in (0, 1)]
    other = [rows[f"librispeech/20-1-000{n}"]["speaker_similarity"] for n in (0, 1)]
    assert min(same) > 0.75 > max(other), (same, other)
    gates = Gates(languages=("en",))
    assert gates.reason(rows["librispeech/10-1-0001"]) == "transcript in de, not en"
    assert gates.reason(rows["librispeech/10-1-0000"]) is None


def good_and_bad_chats(tmp_path):
    """Two conversations: ``good``, one exchange; ``bad``, the same and a second whose question is 'Then what
    happened next?', which :func:`swapped_voice` makes a TTS speak in the wrong voice."""
    chats = tmp_path / "chats.jsonl"
    good = [("user", "Tell me a story about the sea."), ("assistant", "An old sailor walked to the red house.")]
    bad = good + [("user", "Then what happened next?"), ("assistant", "Nobody had opened its door for years.")]
    chats.write_text("\n".join(json.dumps({"id": i, "messages": [{"role": r, "content": c} for r, c in m]})
                               for i, m in (("good", good), ("bad", bad))) + "\n")
    return chats


def swapped_voice(text, voice):
    """The voice a TTS gone wrong (a VITS speaker id mixed up) speaks ``text`` in: not ``voice`` for one question."""
    if text.startswith("Then what happened"):
        return VOICES[2] if voice != VOICES[2] else VOICES[0]
    return voice


def test_a_dialogue_turn_spoken_in_the_wrong_voice_is_dropped_by_the_similarity_gate(tts, tmp_path):
    """A TTS that speaks one turn in another voice than the one it names (a VITS speaker id gone wrong): the
    turn's embedding against the voice's reference falls under min_speaker_similarity, and the conversation goes."""
    from speechinstruct import units as U
    from speechinstruct.compose.dialogue import dialogue
    from speechinstruct.units.features import MFCC
    from speechinstruct.judges.gates import Gates
    from speechinstruct.judges.judge import Judge
    from speechinstruct.sources.tts import CachedTTS

    class Swapped(CachedTTS):
        """Speaks the text 'Then what happened next?' in a voice it does not name."""

        def synthesize(self, text, voice, rate):
            return super().synthesize(text, swapped_voice(text, voice), rate)

    engine = Swapped(EspeakTTS(voices=VOICES[:2]), tmp_path / "tts")
    chats = good_and_bad_chats(tmp_path)
    km = U.KMeans(np.random.default_rng(0).normal(size=(8, 39)).astype(np.float32))
    summary = dialogue(chats, tmp_path / "out", SpeechEncoder(km, MFCC()), engine, judge=Judge(speaker=GE2E()),
                       gates=Gates(min_speaker_similarity=0.8))
    assert summary["records"] == 1 and summary["dropped: quality: speaker similarity below 0.8"] == 1
    assert [d["id"] for d in summary["dropped_examples"]] == ["bad"]


def test_a_duplex_turn_spoken_in_the_wrong_voice_is_dropped_and_the_others_kept(tmp_path):
    """compose duplex judges its turns as compose dialogue does: each against its voice's reference, so the
    similarity gate keeps the conversations spoken in their own voices and drops the one with a swapped turn."""
    from speechinstruct.compose.duplex import duplex
    from speechinstruct.judges.gates import Gates
    from speechinstruct.judges.judge import Judge

    class Swapped(EspeakTTS):
        """Speaks 'Then what happened next?' in a voice it does not name."""

        def synthesize_words(self, text, voice, rate):
            return super().synthesize_words(text, swapped_voice(text, voice), rate)

    chats = good_and_bad_chats(tmp_path)
    summary = duplex(chats, tmp_path / "out", Swapped(voices=VOICES[:2]), judge=Judge(speaker=GE2E()),
                     gates=Gates(min_speaker_similarity=0.8))
    assert summary["conversations"] == 1
    assert [(d["id"], d["reason"].split(" (")[0]) for d in summary["dropped_examples"]] == [
        ("bad", "quality: speaker similarity below 0.8")]


def test_a_recipe_with_language_and_speaker_gates_judges_measures_and_reports(tmp_path):
    """quality.languages and quality.synthesized.min_speaker_similarity turn the language and speaker judges on
    (said in the summary); the card's languages are the measured ones, and the report shows speakers,
    talk time and languages."""
    import yaml

    from speechinstruct.pipeline import run

    data = {"workdir": str(tmp_path / "work"), "demo_corpus": {"sentences": 12, "seed": 4},
            "kmeans": {"k": 16, "max_frames": 20000}, "compose": {"chain_of_modality": {"max_pairs": 2}},
            "quality": {"languages": ["en"], "synthesized": {"min_speaker_similarity": 0.5}},
            "output": {"vocoder": "none"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    summary = run(tmp_path / "r.yaml")
    assert summary["valid"] and summary["inferred"] == [
        "quality.speaker: resemblyzer (quality.synthesized.min_speaker_similarity is set)",
        "quality.language: true (quality.languages is set)"]
    work = tmp_path / "work"
    scores = json.loads((work / "speechinstruct-demo" / "scores" / "summary.json").read_text())
    assert scores["text_language"] == {"en": 12}
    card = (work / "dataset" / "README.md").read_text()
    assert "## Languages (measured)" in card and "| en | 12 |" in card
    # the compose folder published again after the scores folder went (cleaned up, or left on another machine):
    # the card still says what was measured (it fell silent, the section gone)
    from speechinstruct.release.publish import publish

    (work / "speechinstruct-demo" / "scores").rename(tmp_path / "scores-elsewhere")
    again = publish(work / "composed", tmp_path / "again")
    assert again["languages_measured"] == {"en": 12} and "| en | 12 |" in (tmp_path / "again" / "README.md").read_text()
    (tmp_path / "scores-elsewhere").rename(work / "speechinstruct-demo" / "scores")
    page = (work / "report" / "index.html").read_text()
    assert "Speakers and languages" in page and (work / "report" / "talk_time.png").is_file()
    com = json.loads((work / "composed" / "chain_of_modality" / "summary.json").read_text())
    assert com["records"] >= 1  # espeak-ng's voices stay themselves: nothing dropped by the speaker gate

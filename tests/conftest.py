"""Tiny corpora in each native layout, built on the fly with real encoded audio (flac, ogg-opus, mp3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


def speechlike(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-modulated harmonic signal: not speech, but it has speech's structure in time."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 110 + 60 * rng.random() + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = 0.5 * (1 + np.sin(2 * np.pi * (3 + rng.random()) * t)) ** 2
    wav = wav * syllables + 0.01 * rng.standard_normal(t.size)
    return (0.3 * wav / np.abs(wav).max()).astype(np.float32)


def write_librispeech(root: Path, split: str = "train-clean-100") -> Path:
    """2 speakers × 1 chapter × 3 utterances, one chapter with a missing and a corrupt flac."""
    texts = {
        "1272-128104": ["MISTER QUILTER IS THE APOSTLE", "NOR IS MISTER QUILTER'S MANNER", "HE HAS GRAVE DOUBTS"],
        "1462-170138": ["HE HAD WRITTEN A NUMBER OF BOOKS", "IT WAS A LONG TIME", "AND THEN HE SAID"],
    }
    for seed, (chapter_id, lines) in enumerate(texts.items()):
        spk, chap = chapter_id.split("-")
        folder = root / split / spk / chap
        folder.mkdir(parents=True)
        trans = []
        for i, text in enumerate(lines):
            utt = f"{chapter_id}-{i:04d}"
            trans.append(f"{utt} {text}")
            if chapter_id == "1462-170138" and i == 1:
                continue  # missing audio file
            if chapter_id == "1462-170138" and i == 2:
                (folder / f"{utt}.flac").write_bytes(b"fLaC this is not a flac stream")
                continue
            sf.write(folder / f"{utt}.flac", speechlike(1.0 + 0.5 * i, seed=seed * 10 + i), 16000)
        (folder / f"{chapter_id}.trans.txt").write_text("\n".join(trans) + "\n")
    return root


def write_librispeech_release(root: Path) -> Path:
    """LibriSpeech as released: the top-level text files beside train-clean-100, dev-clean and test-clean."""
    write_librispeech(root, "train-clean-100")
    for split, (spk, chap), seed in (("dev-clean", ("2277", "149896"), 40), ("test-clean", ("1089", "134686"), 50)):
        folder = root / split / spk / chap
        folder.mkdir(parents=True)
        lines = []
        for i, text in enumerate(["HE HOPED THERE WOULD BE STEW FOR DINNER", "STUFF IT INTO YOU HIS BELLY COUNSELLED HIM"]):
            utt = f"{spk}-{chap}-{i:04d}"
            sf.write(folder / f"{utt}.flac", speechlike(1.2, seed=seed + i), 16000)
            lines.append(f"{utt} {text}")
        (folder / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    for name in ("BOOKS.TXT", "CHAPTERS.TXT", "SPEAKERS.TXT", "README.TXT", "LICENSE.TXT"):
        (root / name).write_text(f";{name} as shipped with LibriSpeech\n")
    return root


def write_librilight(root: Path) -> Path:
    folder = root / "small" / "100" / "sea_fairies_0812_librivox"
    folder.mkdir(parents=True)
    sf.write(folder / "01_baum_sea_fairies_64kb.flac", speechlike(12.0, seed=1), 16000)
    vad = [[0.2, 2.0], [2.5, 4.0], [4.4, 9.6], [10.0, 11.8]]
    (folder / "01_baum_sea_fairies_64kb.json").write_text(json.dumps({"speaker": "100", "voice_activity": vad}))
    sf.write(folder / "02_no_json_64kb.flac", speechlike(2.0, seed=2), 16000)
    (folder / "03_bad_json_64kb.json").write_text("{not json")
    sf.write(folder / "03_bad_json_64kb.flac", speechlike(2.0, seed=3), 16000)
    return root


def write_gigaspeech(root: Path) -> Path:
    (root / "audio" / "podcast" / "P0000").mkdir(parents=True)
    rel = "audio/podcast/P0000/POD0000000001.opus"
    sf.write(root / rel, speechlike(6.0, seed=4), 16000, format="OGG", subtype="OPUS")
    for aid, subset in (("YOU1000000038", "{DEV}"), ("YOU1000000019", "{TEST}")):
        sf.write(root / f"audio/podcast/P0000/{aid}.opus", speechlike(3.0, seed=len(aid) + len(subset)), 16000,
                 format="OGG", subtype="OPUS")
    eval_audios = [  # evaluation files are labelled end to end, garbage segments included
        {"aid": aid, "title": "an evaluation file", "path": f"audio/podcast/P0000/{aid}.opus", "md5": "0" * 32,
         "duration": 3.0, "source": "podcast", "format": "opus", "sample_rate": 16000, "channels": 1,
         "segments": [
             {"sid": f"{aid}_S0000000", "speaker": "N/A", "begin_time": 0.0, "end_time": 0.5, "text_tn": "<SIL>",
              "subsets": [subset]},
             {"sid": f"{aid}_S0000001", "speaker": "N/A", "begin_time": 0.5, "end_time": 3.0,
              "text_tn": "WE WILL BE RIGHT BACK <PERIOD>", "subsets": [subset]}]}
        for aid, subset in (("YOU1000000038", "{DEV}"), ("YOU1000000019", "{TEST}"))]
    meta = {
        "dataset": "GigaSpeech", "language": "EN", "version": "v1.0.0", "description": "fixture",
        "audios": eval_audios + [
            {
                "aid": "POD0000000001",
                "path": rel,
                "duration": 6.0,
                "segments": [
                    {"sid": "POD0000000001_S0000000", "begin_time": 0.0, "end_time": 2.0,
                     "text_tn": "AS THEY'RE LEAVING <COMMA> CAN KASH PULL ZAHRA ASIDE <QUESTIONMARK>", "subsets": ["{XL}", "{L}", "{M}", "{S}", "{XS}"]},
                    {"sid": "POD0000000001_S0000001", "begin_time": 2.0, "end_time": 3.0,
                     "text_tn": "<MUSIC>", "subsets": ["{XL}", "{L}"]},
                    {"sid": "POD0000000001_S0000002", "begin_time": 3.0, "end_time": 5.5,
                     "text_tn": "I THINK SO <PERIOD>", "subsets": ["{XL}", "{L}"]},
                ],
            },
            {"aid": "POD0000000002", "path": "audio/podcast/P0000/POD0000000002.opus",
             "segments": [{"sid": "POD0000000002_S0000000", "begin_time": 0, "end_time": 1, "text_tn": "HELLO", "subsets": ["{XL}"]}]},
        ]
    }
    (root / "GigaSpeech.json").write_text(json.dumps(meta))
    return root


def write_commonvoice(root: Path) -> Path:
    """A Common Voice release as its tools write it: unquoted TSVs (raw quotes inside sentences), disjoint
    train/dev/test TSVs, validated.tsv listing the dev and test clips too, clip_durations.tsv."""
    (root / "clips").mkdir(parents=True)
    for i in range(6):
        sf.write(root / "clips" / f"common_voice_en_{i}.mp3", speechlike(1.5, sr=48000, seed=20 + i), 48000, format="MP3")
    header = "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\taccents\tvariant\tlocale\tsegment"
    rows = {
        0: 'aaa\tcommon_voice_en_0.mp3\ts0\t"Quoted," she said, "twice."\t\t2\t0\t\t\t\t\ten\t',
        1: "bbb\tcommon_voice_en_1.mp3\ts1\tA plain sentence.\t\t3\t0\ttwenties\tfemale_feminine\t\t\ten\t",
        2: "ccc\tcommon_voice_en_2.mp3\ts2\t\t\t2\t0\t\t\t\t\ten\t",                        # empty sentence
        3: "ddd\tcommon_voice_en_missing.mp3\ts3\tNo such clip.\t\t2\t0\t\t\t\t\ten\t",       # missing clip
        4: "eee\tcommon_voice_en_3.mp3\ttoo\tfew",                                                 # malformed row
        5: 'fff\tcommon_voice_en_4.mp3\ts5\t"""Good-bye,"" said the dev clip.\t\t2\t0\t\t\t\t\ten\t',  # in dev.tsv
        6: "ggg\tcommon_voice_en_5.mp3\ts6\tThis clip is a test clip.\t\t2\t0\t\t\t\t\ten\t",      # in test.tsv
    }

    def tsv(name, keys):
        (root / name).write_text(header + "\n" + "".join(rows[k] + "\n" for k in keys))

    tsv("validated.tsv", range(7))
    tsv("train.tsv", [0, 1])
    tsv("dev.tsv", [5])
    tsv("test.tsv", [6])
    tsv("invalidated.tsv", [])
    (root / "clip_durations.tsv").write_text("clip\tduration[ms]\n" + "".join(
        f"common_voice_en_{i}.mp3\t1500\n" for i in range(6)))
    # A re-saved TSV (pandas, spreadsheets) whose quoted field holds a tab and a newline.
    quoted = [header, 'fff\tcommon_voice_en_1.mp3\ts9\t"Tab\there and\nnewline ""too"""\t\t1\t0\t\t\t\t\ten\t']
    (root / "resaved.tsv").write_text("\n".join(quoted) + "\n")
    return root


@pytest.fixture
def librispeech_root(tmp_path):
    return write_librispeech(tmp_path / "LibriSpeech")


@pytest.fixture
def librispeech_release(tmp_path):
    return write_librispeech_release(tmp_path / "LibriSpeech")


@pytest.fixture
def librilight_root(tmp_path):
    return write_librilight(tmp_path / "librilight")


@pytest.fixture
def gigaspeech_root(tmp_path):
    return write_gigaspeech(tmp_path / "gigaspeech")


@pytest.fixture
def commonvoice_root(tmp_path):
    return write_commonvoice(tmp_path / "cv-corpus" / "en")


@pytest.fixture
def units_dir(librispeech_root, tmp_path):
    """A quantized mini corpus: LibriSpeech layout → manifest → MFCC → k-means (k=8) → units."""
    return make_units(librispeech_root, tmp_path)


def make_units(librispeech_root: Path, tmp_path: Path) -> Path:
    """``units_dir``'s steps: ``tmp_path``/manifest, features, kmeans and units made from ``librispeech_root``."""
    from speechinstruct import recipe as sections
    from speechinstruct.units.cluster import cluster
    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import MFCC
    from speechinstruct.units.quantize import quantize
    from speechinstruct.sources.shard import shard_corpus
    from speechinstruct.units import load_kmeans

    shard_corpus("librispeech", librispeech_root, tmp_path / "manifest", sections.Shard(shard_hours=2.5 / 3600))
    extract(tmp_path / "manifest", tmp_path / "features", MFCC())
    cluster(tmp_path / "features", tmp_path / "kmeans", sections.KMeans(k=8))
    quantize(tmp_path / "features", load_kmeans(tmp_path / "kmeans"), tmp_path / "units")
    return tmp_path / "units"


def fixed_dnsmos(monkeypatch) -> None:
    """DNSMOS networks that give every window 3.0 (ovrl, sig, bak and p808), for tests of what happens around the
    judge: which rows score judges or skips, with how many threads, where its files go. The networks' own scores
    (tested against speechmos in test_score.py) took most of those tests' time: about 2 s a clip on 2 cores."""
    from speechinstruct.judges.dnsmos import DNSMOS

    monkeypatch.setattr(DNSMOS, "score_windows", lambda self, windows: [np.full(4, 3.0)] * len(windows))


# The quick subset for iteration (`scripts/test.sh -m "not slow"`, under 3 minutes on 2 cores): everything but
# the files and tests that take seconds each (whole runs of the pipeline, Ray clusters, training, kills).
SLOW_FILES = ("test_ray.py", "test_reliability.py", "test_run.py", "test_train.py", "test_listen.py")
SLOW_TESTS = ("test_compose_memory_does_not_grow", "test_publish_memory_does_not_grow", "test_run_quality_gate",
              "test_dnsmos_equals_speechmos", "test_run_with_mimi_units", "test_the_dialogue_config_is_chat_data",
              "test_resynth_speaks_every_record_kind", "test_a_recipe_dedups_every_corpus", "test_stage3_trains",
              "test_trl_trains_on_messages", "test_asr_and_dnsmos_batches", "test_a_recipe_with_language_and_speaker",
              "test_a_recipe_composes_duplex", "test_decoding_threads_default_to_every_cpu",
              "test_storage_that_fails_for_a_while_then_recovers_is_finished_by_the_rerun[score]",
              "test_quiet_means_no_progress_bars", "test_codecs_that_attend_over_the_whole_clip_encode_a_batch_with_each_"
              "utterances_own_codes[xcodec", "test_xcodec2_units_are_the_models_own_codes",
              "test_bad_buckets_and_credentials_are_one_line", "test_score_reads_tar_members_too",
              "test_extract_with_mimi_writes_units_a_dataset_validates_on", "test_a_recipe_may_name_models_and_files_in_a",
              "test_each_turn_is_judged_and_a_conversation_with_a_failing_turn_is_dropped",
              # 3.5 to 5.5 s each on 2 cores (2026-12-07), which kept the subset at 3 minutes
              "test_shard_audio_channels_each_cuts_each_side_of_a_call_on_its_own",
              "test_a_codec_encodes_a_batch_in_one_call_with_each_utterances_own_codes[dac",
              "test_transformers_asr_batched_equals_one_at_a_time[whisper", "test_espeak_voices_can_be_chosen",
              "test_resynth_never_writes_over_files_it_did_not_write", "test_the_vad_model_ships_inside_the_package",
              "test_a_rerun_leaves_no_file_of_the_last_run_and_touches_none_of_the_users",
              "test_modules_moved_out_of_the_flat_package", "test_a_judge_actor_on_a_node_without_the_copy")


# The files that take longest (test_train.py 473 s and test_ray.py 450 s of a 19-minute suite on 2 cores,
# 2026-12-07, before that day's trims), longest first: scripts/test.sh hands files to its two workers in collection order
# (--no-loadscope-reorder; xdist's own order is by number of tests, in which test_ray.py came 14th of 29), so these
# start first and the short files fill in beside them.
LONGEST_FIRST = ("test_train.py", "test_ray.py", "test_run.py", "test_reliability.py", "test_score.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES or item.name.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests stay in order

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


def write_librispeech(root: Path, split: str = "dev-clean") -> Path:
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
    meta = {
        "audios": [
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
    (root / "clips").mkdir(parents=True)
    for i in range(4):
        sf.write(root / "clips" / f"common_voice_en_{i}.mp3", speechlike(1.5, sr=48000, seed=20 + i), 48000, format="MP3")
    header = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\tlocale"
    rows = [
        'aaa\tcommon_voice_en_0.mp3\t"Quoted," she said, "twice."\t2\t0\t\t\ten',
        "bbb\tcommon_voice_en_1.mp3\tA plain sentence.\t3\t0\ttwenties\tfemale\ten",
        "ccc\tcommon_voice_en_2.mp3\t\t2\t0\t\t\ten",                   # empty sentence
        "ddd\tcommon_voice_en_missing.mp3\tNo such clip.\t2\t0\t\t\ten",  # missing clip
        "eee\tcommon_voice_en_3.mp3\ttoo\tfew",                          # malformed row
    ]
    (root / "validated.tsv").write_text(header + "\n" + "\n".join(rows) + "\n")
    # A re-saved TSV whose quoted field holds a tab and a newline.
    quoted = [header, 'fff\tcommon_voice_en_1.mp3\t"Tab\there and\nnewline ""too"""\t1\t0\t\t\ten']
    (root / "train.tsv").write_text("\n".join(quoted) + "\n")
    return root


@pytest.fixture
def librispeech_root(tmp_path):
    return write_librispeech(tmp_path / "LibriSpeech")


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
    from speechinstruct.cluster import cluster
    from speechinstruct.extract import extract
    from speechinstruct.features import MFCC
    from speechinstruct.quantize import quantize
    from speechinstruct.shard import shard_corpus
    from speechinstruct.units import load_kmeans

    shard_corpus("librispeech", librispeech_root, tmp_path / "manifest", shard_hours=2.5 / 3600, quiet=True)
    extract(tmp_path / "manifest", tmp_path / "features", MFCC(), quiet=True)
    cluster(tmp_path / "features", tmp_path / "kmeans", k=8, quiet=True)
    quantize(tmp_path / "features", load_kmeans(tmp_path / "kmeans"), tmp_path / "units", quiet=True)
    return tmp_path / "units"

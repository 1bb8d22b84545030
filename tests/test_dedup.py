"""`dedup`: near-duplicate audio by unit MinHash (datasketch) verified by Levenshtein similarity (rapidfuzz),
repeated transcripts capped, evaluation texts and audio kept out of training, speakers across splits. The
duplicates are planted with real tools: libsndfile's MP3 (64 kbit/s) and Opus encoders, soxr resampling, a cut,
white noise at 20 dB SNR; the corpus is espeak-ng speech in LibriSpeech's layout, MFCC units (K = 100)."""

from __future__ import annotations

import io
import json

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr
from typer.testing import CliRunner

from speechinstruct import recipe as sections
from speechinstruct import audio
from speechinstruct.units import SpeechEncoder
from speechinstruct.cli import app
from speechinstruct.curate.dedup import EvalTexts, Signer, dedup, ngram_hashes, words

runner = CliRunner()
COPIES = ("mp3", "opus", "resampled", "cut", "noise")


def reencoded(wav: np.ndarray, fmt: str, subtype: str | None = None, **options) -> np.ndarray:
    buffer = io.BytesIO()
    sf.write(buffer, wav, 16000, format=fmt, subtype=subtype, **options)
    buffer.seek(0)
    return sf.read(buffer, dtype="float32")[0]


def copy_of(wav: np.ndarray, kind: str, seed: int) -> np.ndarray:
    if kind == "mp3":  # libsndfile's LAME at a constant 64 kbit/s: for 16 kHz (MPEG-2) level 0 is 160 kbit/s and
        # each 1/152 of a level 1 kbit/s less (measured: 0.5 gave 83 kbit/s, this 67 with the file's headers)
        return reencoded(wav, "MP3", bitrate_mode="CONSTANT", compression_level=96 / 152)
    if kind == "opus":
        return reencoded(wav, "OGG", "OPUS")
    if kind == "resampled":
        return soxr.resample(soxr.resample(wav, 16000, 22050), 22050, 16000).astype(np.float32)
    if kind == "cut":
        return wav[: int(wav.size * 0.9)]
    noise = np.random.default_rng(seed).standard_normal(wav.size).astype(np.float32)
    noise *= np.sqrt(np.mean(wav ** 2) / np.mean(noise ** 2) / 10 ** (20 / 10))
    return (wav + noise).astype(np.float32)


def spoken_sentences(texts: list[str]) -> list[tuple[np.ndarray, str]]:
    """(16 kHz samples, text) of each sentence spoken by espeak-ng, the voices taking turns."""
    from speechinstruct.sources.tts import ESPEAK_VOICES, EspeakTTS

    tts = EspeakTTS()
    spoken = []
    for i, text in enumerate(texts):
        wav, sr = tts.synthesize(text, ESPEAK_VOICES[i % len(ESPEAK_VOICES)], 160)
        spoken.append((audio.resample(wav, sr), text))
    return spoken


def write_utterances(root, split: str, speaker: str, items: list[tuple[np.ndarray, str]], chapter: str = "1") -> list[str]:
    folder = root / split / speaker / chapter
    folder.mkdir(parents=True, exist_ok=True)
    lines, ids = [], []
    for n, (wav, text) in enumerate(items):
        utt = f"{speaker}-{chapter}-{n:04d}"
        sf.write(folder / f"{utt}.flac", wav, 16000)
        lines.append(f"{utt} {text.upper()}")
        ids.append(f"librispeech/{utt}")
    (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return ids


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """60 distinct espeak-ng sentences (speakers 100-105), the copies of 12 of them (speaker 200), a test split of
    3 utterances (speaker 300), one of them also read in training (speaker 100 reads the test text), and units."""
    from speechinstruct.units.cluster import cluster
    from speechinstruct.sources.demo import sentences
    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import MFCC
    from speechinstruct.units.quantize import quantize
    from speechinstruct.sources.shard import shard_corpus
    from speechinstruct.units import load_kmeans

    tmp = tmp_path_factory.mktemp("dedup")
    texts = list(dict.fromkeys(sentences(80, seed=5)))[:64]
    spoken = spoken_sentences(texts)
    root = tmp / "LibriSpeech"
    originals = []
    for s in range(6):
        originals += write_utterances(root, "train-clean-100", f"10{s}", spoken[s * 10: s * 10 + 10])
    copies = {}
    items = []
    for i in range(12):
        for kind in COPIES:
            items.append((copy_of(spoken[i][0], kind, i), spoken[i][1]))
            copies[f"librispeech/200-1-{len(items) - 1:04d}"] = (originals[i], kind)
    write_utterances(root, "train-clean-100", "200", items)
    test_ids = write_utterances(root, "test-clean", "300", spoken[60:63])
    contaminated = write_utterances(root, "train-clean-360", "400", [spoken[60]])  # a test utterance read in training
    shared = write_utterances(root, "train-clean-360", "300", [spoken[63]], chapter="2")  # a test speaker, in training
    shard_corpus("librispeech", root, tmp / "manifest")
    extract(tmp / "manifest", tmp / "features", MFCC())
    cluster(tmp / "features", tmp / "km", sections.KMeans(k=100))
    quantize(tmp / "features", load_kmeans(tmp / "km"), tmp / "units")
    return {"root": tmp, "originals": originals, "copies": copies, "test": test_ids, "contaminated": contaminated,
            "shared": shared, "texts": texts}


def dropped_rows(folder):
    return {d["id"]: d for f in sorted(folder.glob("dropped-*.jsonl")) for d in map(json.loads, f.read_text().splitlines())}


def test_planted_copies_are_found_and_distinct_utterances_kept(planted, tmp_path):
    summary = dedup(planted["root"] / "units", tmp_path / "out")
    gone = dropped_rows(tmp_path / "out")
    found = {kind: [] for kind in COPIES}
    for uid, (original, kind) in planted["copies"].items():
        found[kind].append(uid in gone and gone[uid]["duplicate_of"] in (original, *planted["copies"]))
    re_encoded = [x for kind in ("mp3", "opus", "resampled", "cut") for x in found[kind]]
    assert np.mean(re_encoded) >= 0.95, {k: np.mean(v) for k, v in found.items()}
    false = [uid for uid in planted["originals"][12:] if uid in gone]  # 48 originals with no copy
    assert len(false) / 48 <= 0.01, [gone[u] for u in false]
    assert not any(uid in gone for uid in planted["originals"][:12])  # each group keeps its smallest id: the original
    print("noisy copies (20 dB SNR) found:", np.mean(found["noise"]))  # reported, not a target
    assert summary["dropped"].get("near duplicate", 0) + summary["dropped"].get("exact duplicate", 0) >= 46
    kept = [r["id"] for f in sorted((tmp_path / "out").glob("units-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(kept) == summary["kept"] and not set(kept) & set(gone)
    assert (tmp_path / "out" / "units.json").read_bytes() == (planted["root"] / "units" / "units.json").read_bytes()


def test_evaluation_texts_and_audio_are_kept_out_and_a_rerun_is_the_same(planted, tmp_path):
    """The test split's transcripts and audio count as evaluation data across the corpus: a training utterance
    reading a test sentence is dropped, as is one whose transcript holds 13 words of an evaluation text file."""
    (tmp_path / "bench.txt").write_text(f"Something else entirely.\n{planted['texts'][5].lower()}\n")  # a short text: whole
    summary = dedup(planted["root"] / "units", tmp_path / "out", sections.Dedup(eval=[str(tmp_path / "bench.txt")]))
    gone = dropped_rows(tmp_path / "out")
    assert gone[planted["contaminated"][0]]["reason"] in ("evaluation text", "evaluation audio")
    assert gone[planted["originals"][5]]["reason"] == "evaluation text" and "bench.txt:2" in gone[planted["originals"][5]]["duplicate_of"]
    assert not any(t in gone for t in planted["test"])  # evaluation rows are never dropped
    assert summary["checked_against"]["eval_sources"] == [{"source": str(tmp_path / "bench.txt"), "texts": 2, "utterances": 0}]
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    again = dedup(planted["root"] / "units", tmp_path / "out", sections.Dedup(eval=[str(tmp_path / "bench.txt")]))
    assert again == summary and {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before


def test_transcripts_are_capped_with_distinct_speakers_first_and_shared_speakers_reported(planted, tmp_path):
    summary = dedup(planted["root"] / "units", tmp_path / "out", sections.Dedup(max_per_transcript=1, similarity=1.0))
    gone = dropped_rows(tmp_path / "out")
    # the 12 sentences speaker 200 read again (5 copies each): one reading of each stays
    for i in range(12):
        readings = [planted["originals"][i]] + [u for u, (o, _) in planted["copies"].items() if o == planted["originals"][i]]
        assert sum(u not in gone for u in readings) == 1
    assert summary["speakers_in_train_and_eval"] == [{"corpus": "librispeech", "speaker": "300"}]  # reported
    assert planted["shared"][0] not in gone  # but kept without --speaker-disjoint
    cli = runner.invoke(app, ["dedup", str(planted["root"] / "units"), str(tmp_path / "cli"), "--speaker-disjoint", "-q"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["dropped"]["speaker in an evaluation split"] == 1
    assert dropped_rows(tmp_path / "cli")[planted["shared"][0]]["duplicate_of"] == "librispeech: 300"


def test_signatures_are_datasketchs_minhash_of_the_unit_ngrams():
    from datasketch import MinHash

    units = np.random.default_rng(0).integers(0, 100, 200)
    signer = Signer(ngram=4, num_perm=64)
    reference = MinHash(num_perm=64, seed=1, hashfunc=int)
    reference.update_batch(ngram_hashes(units, 4).tolist())
    np.testing.assert_array_equal(signer.signature(units), reference.hashvalues.astype(np.uint32))
    assert len(ngram_hashes([1, 2, 3], 4)) == 1 and len(ngram_hashes([], 4)) == 0


def test_evaluation_texts_match_by_thirteen_word_ngrams_and_short_texts_whole():
    texts = EvalTexts(13)
    texts.add("What is the capital of France? Paris is the capital and the largest city of the country.", "bench:1")
    texts.add("Hi there!", "bench:2")
    assert texts.match("the capital of France: Paris is the capital and the largest city of the country, they said")[1] == "bench:1"
    assert texts.match("paris is the capital and the largest city") is None  # 8 words: shares no 13-gram
    assert texts.match("HI, THERE.")[1] == "bench:2" and texts.match("hi there friend") is None
    assert words("It's  Paris—the CITY!") == ["its", "paris", "the", "city"]


def test_bad_inputs_are_one_line(planted, tmp_path):
    for args, says in ((["dedup", str(tmp_path / "none"), str(tmp_path / "o")], "no units-*.parquet"),
                       (["dedup", str(planted["root"] / "units"), str(tmp_path / "o"), "--eval", str(tmp_path / "x.txt")],
                        "no such evaluation file"),
                       (["dedup", str(planted["root"] / "units"), str(tmp_path / "o"), "--threshold", "0"], "threshold")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output, result.output


def test_dedup_never_deletes_or_overwrites_files_it_did_not_write(units_dir, tmp_path):
    """OUT holding a user's units-00007.parquet and dropped-00009.jsonl lost both without a word (dedup deletes
    the shards of inputs no longer there); OUT = UNITS overwrote the input with the kept rows, the dropped ones
    gone for good. Both are one line now, before anything is written."""
    import shutil

    out = tmp_path / "out"
    out.mkdir()
    mine = {"units-00007.parquet": sorted(units_dir.glob("units-*.parquet"))[0].read_bytes(), "dropped-00009.jsonl": b"mine\n"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    result = runner.invoke(app, ["dedup", str(units_dir), str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "dropped-00009.jsonl: already there and not written by dedup" in result.output.replace("\n", "")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == mine
    before = {p.name: p.read_bytes() for p in units_dir.iterdir()}
    result = runner.invoke(app, ["dedup", str(units_dir), str(units_dir)])
    assert result.exit_code == 2 and "dedup writes the kept rows into a folder of their own" in result.output, result.output
    assert {p.name: p.read_bytes() for p in units_dir.iterdir()} == before
    # its own folder: a rerun replaces its files, and the shard of an input file no longer there goes
    units = tmp_path / "copy"
    shutil.copytree(units_dir, units)
    assert runner.invoke(app, ["dedup", str(units), str(tmp_path / "own")]).exit_code == 0
    last = sorted(units.glob("units-*.parquet"))[-1]
    last.unlink()
    assert runner.invoke(app, ["dedup", str(units), str(tmp_path / "own")]).exit_code == 0
    assert not (tmp_path / "own" / last.name).exists()
    # a folder an earlier version wrote (dedup.json, no claim) is its own
    (tmp_path / "own" / ".speechinstruct-dedup.json").unlink()
    assert runner.invoke(app, ["dedup", str(units), str(tmp_path / "own")]).exit_code == 0


def test_the_signature_cache_keeps_one_file_per_units_file(units_dir, tmp_path):
    """A units file that changed (quantized again) got new cached signatures and kept the old ones for good, and a
    units file gone kept its own: at SpeechGPT's 9 million utterances each set is 4.6 GB (128 uint32 a row)."""
    import os
    import shutil

    units = tmp_path / "copy"
    shutil.copytree(units_dir, units)
    files = sorted(units.glob("units-*.parquet"))
    assert runner.invoke(app, ["dedup", str(units), str(tmp_path / "out")]).exit_code == 0
    cache = tmp_path / "out" / ".signatures"
    first = sorted(p.name for p in cache.iterdir())
    assert len(first) == len(files)
    os.utime(files[0], ns=(files[0].stat().st_atime_ns, files[0].stat().st_mtime_ns + 10**9))  # changed since
    assert runner.invoke(app, ["dedup", str(units), str(tmp_path / "out")]).exit_code == 0
    now = sorted(p.name for p in cache.iterdir())
    assert len(now) == len(files) and now != first
    files[-1].unlink()
    assert runner.invoke(app, ["dedup", str(units), str(tmp_path / "out")]).exit_code == 0
    assert sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir()) == [f.stem for f in files[:-1]]


@pytest.mark.parametrize("bad, tasks", [({"id": None}, 1), ({"units": None}, 1), ({"units": [-5, 3]}, 1),
                                        ({"split": "holdout"}, 1), ({"id": None}, 2), ({"units": [-5, 3]}, 2)], ids=str)
def test_a_hand_edited_units_row_is_one_line_naming_file_and_row(units_dir, tmp_path, bad, tasks):
    """A null id or units, a negative unit or an unknown split (another tool's file, or a hand edit) was a
    traceback (TypeError, OverflowError) or, for the split, a row dedup took as training data; it is one line
    naming the file and row, in the deciding run and in a job-array task's signatures (id and units) alike."""
    import pyarrow as pa
    from speechinstruct import records

    path = sorted(units_dir.glob("units-*.parquet"))[0]
    rows = pq.read_table(path).to_pylist()
    rows[1].update(bad)
    pq.write_table(pa.Table.from_pylist(rows, pa.schema([f.with_nullable(True) for f in records.arrow_schema("units")])), path)
    result = runner.invoke(app, ["dedup", str(units_dir), str(tmp_path / "o"), "--num-shards", str(tasks)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"{path} row 1: not a units row (" in result.output, result.output


def test_audio_hash_drops_the_same_samples_and_a_storage_failure_stops_it(units_dir, tmp_path, monkeypatch):
    """`--audio-hash` had no test. A row whose units share nothing with another's but whose audio is the same
    file is an exact duplicate with it and only with it. An utterance whose audio storage failed to give for a
    while was skipped silently (that run's check was weaker, and said nothing); dedup decides over every row
    together, so it now stops with one line, writing nothing, and the rerun finishes. A corpus root that is not
    there is one line too (every row was skipped silently)."""
    import errno
    import shutil

    from speechinstruct import records
    from speechinstruct.sources import decoding
    from speechinstruct.speechgpt import to_text

    path = sorted(units_dir.glob("units-*.parquet"))[0]
    rows = pq.read_table(path).to_pylist()
    units = [(u + 3) % 8 for u in reversed(rows[0]["units"])]
    rows.append({**rows[0], "id": "librispeech/copy", "units": units, "durations": list(reversed(rows[0]["durations"])),
                 "unit_text": to_text(units)})
    pq.write_table(records.to_table("units", rows), path)
    plain = dedup(units_dir, tmp_path / "plain")
    assert plain["dropped"] == {}, plain
    hashed = dedup(units_dir, tmp_path / "hashed", sections.Dedup(audio_hash=True))
    assert hashed["dropped"] == {"exact duplicate": 1}, hashed
    assert set(dropped_rows(tmp_path / "hashed")) & {rows[0]["id"], "librispeech/copy"}

    whole = decoding._load_file

    def failing(file, row, sample_rate):
        if row["id"] == "librispeech/copy":
            raise OSError(errno.EIO, "Input/output error")
        return whole(file, row, sample_rate)

    monkeypatch.setattr(decoding, "_load_file", failing)
    failed = runner.invoke(app, ["dedup", str(units_dir), str(tmp_path / "down"), "--audio-hash"])
    assert failed.exit_code == 2 and "may pass" in failed.output and "nothing is written" in failed.output, failed.output
    assert not list((tmp_path / "down").glob("units-*.parquet"))
    monkeypatch.setattr(decoding, "_load_file", whole)
    assert dedup(units_dir, tmp_path / "down", sections.Dedup(audio_hash=True))["dropped"] == {"exact duplicate": 1}

    spec = json.loads((units_dir / "units.json").read_text())
    shutil.move(spec["root"], tmp_path / "moved")
    gone = runner.invoke(app, ["dedup", str(units_dir), str(tmp_path / "gone"), "--audio-hash"])
    assert gone.exit_code == 2 and "the corpus root is not there" in gone.output, gone.output


def test_a_recipe_dedups_every_corpus_before_compose_and_the_card_says_what_was_checked(tmp_path):
    """recipe.dedup: a stage after quantize; compose reads its output; the card and the report say what was
    checked against and what was dropped; without the section a rerun removes the stage's folders."""
    import yaml

    from speechinstruct.pipeline import run

    data = {"workdir": str(tmp_path / "work"), "demo_corpus": {"sentences": 16, "seed": 2},
            "kmeans": {"k": 16, "max_frames": 20000}, "compose": {"chain_of_modality": {"max_pairs": 2}},
            "dedup": {"max_per_transcript": 1, "eval": [str(tmp_path / "bench.txt")]}, "output": {"vocoder": "none"}}
    (tmp_path / "bench.txt").write_text("nothing in the demo corpus says this\n")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    summary = run(tmp_path / "r.yaml")
    assert summary["valid"]
    work = tmp_path / "work"
    cm = json.loads(next((work / "composed" / "cross_modal").glob("summary*.json")).read_text())
    assert cm["units"] == str((work / "speechinstruct-demo" / "dedup").resolve())
    card = (work / "dataset" / "README.md").read_text()
    assert "## Duplicates and contamination" in card and "bench.txt" in card and "13-word n-grams" in card
    page = (work / "report" / "index.html").read_text()
    assert "Duplicates and contamination" in page

    # a test set added to the evaluation file since: the next run checks against it (dedup was "up to date")
    def transcripts():
        splits = datasets.load_dataset(str(work / "dataset"), "cross_modal")
        return {t for ds in splits.values() for t in ds["transcript"]}

    leaked = sorted(transcripts())[0]
    (tmp_path / "bench.txt").write_text(f"nothing in the demo corpus says this\n{leaked}\n")
    assert run(tmp_path / "r.yaml")["valid"]
    assert leaked not in transcripts()
    del data["dedup"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    run(tmp_path / "r.yaml")
    assert not (work / "speechinstruct-demo" / "dedup").exists()
    assert "no `dedup` stage ran" in (work / "dataset" / "README.md").read_text()


def test_the_report_plays_a_dropped_copy_beside_what_it_duplicates(planted, tmp_path):
    from speechinstruct.compose.pretrain import pretrain
    from speechinstruct.release.publish import publish
    from speechinstruct.release.report import report

    dedup(planted["root"] / "units", tmp_path / "librispeech" / "dedup")
    pretrain(tmp_path / "librispeech" / "dedup", tmp_path / "composed" / "pretrain")
    publish(tmp_path / "composed", tmp_path / "dataset")
    report(tmp_path / "dataset", tmp_path / "report", work=tmp_path)
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Duplicates and contamination" in page and "near duplicate" in page
    pairs = sorted((tmp_path / "report" / "audio").glob("dup-*.wav"))
    assert len(pairs) >= 2 and all(sf.info(p).duration > 0.5 for p in pairs)


def test_a_benchmark_prompt_among_the_instruction_pairs_is_dropped_before_it_is_spoken(tmp_path):
    """compose chain-of-modality and dialogue --eval: a pair (or any turn of a conversation) that shares a 13-word
    n-gram with an evaluation text, or equals a short one, is dropped and counted, never spoken."""
    from speechinstruct import units as U
    from speechinstruct.compose.chain_of_modality import chain_of_modality
    from speechinstruct.compose.dialogue import dialogue
    from speechinstruct.units.features import MFCC
    from speechinstruct.sources.tts import CachedTTS, EspeakTTS

    question = "Which planet in our solar system has the largest number of known moons orbiting it today?"
    (tmp_path / "bench.jsonl").write_text(json.dumps({"question": question, "answer": "Saturn."}) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in [
        {"id": "fine", "instruction": "Say hello to me.", "response": "Hello there, friend."},
        {"id": "leaked", "instruction": f"Quick question. {question}", "response": "I think it is Saturn."},
        {"id": "short", "instruction": "Saturn.", "response": "A planet."}]) + "\n")
    from speechinstruct.curate.dedup import eval_texts

    texts = eval_texts([str(tmp_path / "bench.jsonl")])
    km = U.KMeans(np.random.default_rng(0).normal(size=(8, 39)).astype(np.float32))
    tts = CachedTTS(EspeakTTS(), tmp_path / "tts")
    summary = chain_of_modality(pairs, tmp_path / "com", SpeechEncoder(km, MFCC()), tts, formats=("text-text",),
                                        eval_texts=texts)
    assert summary["records"] == 1 and summary["dropped: evaluation text"] == 2
    reasons = {d["id"]: d["reason"] for d in summary["dropped_examples"]}
    assert reasons["leaked"].startswith("evaluation text (bench.jsonl:1") and reasons["short"].startswith("evaluation text")
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"id": "c1", "messages": [{"role": "user", "content": "Hi!"},
                                                           {"role": "assistant", "content": "Hello."},
                                                           {"role": "user", "content": question},
                                                           {"role": "assistant", "content": "Saturn."}]}) + "\n")
    result = dialogue(chats, tmp_path / "dlg", SpeechEncoder(km, MFCC()), tts, eval_texts=texts)
    assert result["records"] == 0 and result["dropped: evaluation text"] == 1


def test_job_array_tasks_cache_signatures_and_the_final_run_uses_them(planted, tmp_path, monkeypatch):
    from speechinstruct.curate import dedup as D

    parts = [dedup(planted["root"] / "units", tmp_path / "out", num_shards=2, shard_index=i)
             for i in range(2)]
    assert sum(p["signatures_of_shards"] for p in parts) == len(list((planted["root"] / "units").glob("units-*.parquet")))
    assert not list((tmp_path / "out").glob("units-*.parquet"))  # the tasks decide nothing
    computed = []
    monkeypatch.setattr(D.Signer, "signature", lambda self, units: computed.append(1) or np.zeros(self.num_perm, np.uint32))
    final = dedup(planted["root"] / "units", tmp_path / "out")
    assert computed == []  # every signature came from the tasks' cache
    monkeypatch.undo()
    assert final["dropped"] == dedup(planted["root"] / "units", tmp_path / "single")["dropped"]


def test_candidate_pairs_are_the_pairs_datasketchs_minhashlsh_finds():
    """Our banding (numpy keys, sorted) gives exactly the candidates MinHashLSH's own index gives for the same
    signatures and threshold; a bucket too large for all its pairs still connects every member."""
    from datasketch import MinHashLSH

    from speechinstruct.curate.dedup import UnionFind, candidate_pairs

    rng = np.random.default_rng(3)
    signer = Signer(ngram=4, num_perm=64)
    base = [rng.integers(0, 50, 120) for _ in range(60)]
    seqs = base + [np.where(rng.random(120) < 0.1, rng.integers(0, 50, 120), b) for b in base[:20]]
    matrix = np.stack([signer.signature(s) for s in seqs])
    ours = {tuple(sorted(p)) for p in candidate_pairs(matrix, 0.3)}
    lsh = MinHashLSH(threshold=0.3, num_perm=64)
    from datasketch import LeanMinHash, MinHash

    leans = [LeanMinHash(MinHash(num_perm=64, seed=1, hashvalues=m.astype(np.uint64), scheme="affine32",
                                 permutations=signer._permutations)) for m in matrix]
    for i, lean in enumerate(leans):
        lsh.insert(i, lean)
    theirs = {tuple(sorted((i, j))) for i, lean in enumerate(leans) for j in lsh.query(lean) if j != i}
    assert ours == theirs and len(ours) >= 15  # most of the 20 near copies
    same = np.tile(matrix[:1], (100, 1))
    groups = UnionFind()
    for a, b in candidate_pairs(same, 0.3, largest=10):
        groups.union(str(a), str(b))
    assert len(groups.groups()) == 1 and len(groups.groups()[0]) == 100


def test_compose_after_dedup_ran_again_is_not_taken_for_done(units_dir, tmp_path):
    """dedup run again with an evaluation set (a row that reads it now dropped), then compose into the folder of the
    first run: every shard was taken for done, and the contaminated row's records stayed in the training data.
    The records of a units shard that was written again since are one line now; an identical rerun is done."""
    def run(*args):
        result = runner.invoke(app, [str(a) for a in [*args, "-q"]])
        return result.exit_code, result.output.replace("\n", "")

    assert run("dedup", units_dir, tmp_path / "dd")[0] == 0
    assert run("compose", "cross-modal", tmp_path / "dd", tmp_path / "comp")[0] == 0
    assert run("dedup", units_dir, tmp_path / "dd")[0] == 0  # the same again: the same bytes, the records done
    code, output = run("compose", "cross-modal", tmp_path / "dd", tmp_path / "comp")
    assert code == 0 and '"shards skipped (done)": 2' in output, output
    (tmp_path / "bench.txt").write_text("Mister Quilter is the apostle.\n")
    code, output = run("dedup", units_dir, tmp_path / "dd", "--eval", tmp_path / "bench.txt")
    assert code == 0 and '"evaluation text": 1' in output, output
    code, output = run("compose", "cross-modal", tmp_path / "dd", tmp_path / "comp")
    assert code == 2 and "Traceback" not in output, output
    assert "train-00000.parquet: made from units-00000.parquet as it was before it was written again" in output, output


def test_an_evaluation_jsonl_of_odd_shapes_is_read_as_far_as_it_is_text(planted, tmp_path):
    """A JSONL evaluation line whose `messages` was a number stopped dedup with "TypeError: 'int' object is not
    iterable"; a line that looks like JSON but is not was left out without a word, so its text was never kept out.
    Each line is read for the text it holds now: a malformed one as the line itself."""
    from speechinstruct.curate.dedup import _read_eval_file

    bench = tmp_path / "bench.jsonl"
    sentence = "the quick brown fox jumps over the lazy dog while thirteen words or more are needed here"
    bench.write_text('{"messages": 5}\n{"messages": "a string"}\n{"messages": [{"content": 7}, "x"]}\n'
                     '{"text": "' + sentence + '", oops}\n{"question": "What is held out here?"}\n')
    texts = EvalTexts(13)
    _read_eval_file(bench, texts)
    assert texts.match(sentence)[1] == "bench.jsonl:4" and texts.match("what is held out here")[1] == "bench.jsonl:5"
    result = runner.invoke(app, ["dedup", str(planted["root"] / "units"), str(tmp_path / "o"), "--eval", str(bench), "-q"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output

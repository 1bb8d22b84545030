"""Where users' data already is: Hugging Face audio datasets (Hub-style Parquet and save_to_disk), lhotse
manifests and Kaldi data directories. Fixtures are written by the tools themselves (``datasets``, lhotse)
or in the exact text layout Kaldi's recipes write."""

import io
import os
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml
from conftest import speechlike
from typer.testing import CliRunner

from speechinstruct.cli import app
from speechinstruct.units.extract import decode_row, extract
from speechinstruct.units.features import MFCC
from speechinstruct.sources.shard import shard_corpus
from speechinstruct.shardfiles import corpus_root, manifest_files

runner = CliRunner()
CARD = """---
license: cc-by-4.0
language:
- fr
pretty_name: Tiny ASR
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
---
# Tiny ASR

A fixture.
"""


def flac_bytes(seconds: float, seed: int, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, speechlike(seconds, sr=sr, seed=seed), sr, format="FLAC")
    return buf.getvalue()


def hf_rows(n: int, seed: int, split: str) -> dict:
    return {"audio": [{"bytes": flac_bytes(1.0 + 0.25 * i, seed + i), "path": f"{split}-{i}.flac"} for i in range(n)],
            "text": [f"{split} sentence number {i}" for i in range(n)],
            "speaker_id": [f"spk{i % 2}" for i in range(n)]}


def hub_dataset(root, corrupt: bool = True):
    """Two train files and one validation file under data/, as `push_to_hub` names them, written by
    `datasets` (audio column struct<bytes, path>, the features in the Parquet schema metadata). One train
    row holds bytes that are not audio."""
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text(CARD)
    for name, rows in (("train-00000-of-00002", hf_rows(3, 0, "train")), ("train-00001-of-00002", hf_rows(3, 10, "train")),
                       ("validation-00000-of-00001", hf_rows(2, 20, "validation"))):
        if corrupt and name == "train-00001-of-00002":
            rows["audio"][1] = {"bytes": b"fLaC" + bytes(range(256)) * 4, "path": "broken.flac"}
        if corrupt and name == "train-00000-of-00002":  # a valid header, half the data: fails only when decoded
            whole = rows["audio"][2]["bytes"]
            rows["audio"][2] = {"bytes": whole[: len(whole) // 2], "path": "cut.flac"}
        ds = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio(sampling_rate=16000))
        ds.to_parquet(str(root / "data" / f"{name}.parquet"))
    return root


def test_hub_parquet_folder_shards_with_splits_license_and_a_counted_corrupt_row(tmp_path):
    root = hub_dataset(tmp_path / "tiny-asr")
    assert "huggingface" in pq.read_schema(root / "data" / "train-00000-of-00002.parquet").metadata.keys().__repr__()
    summary = shard_corpus("hf", root, tmp_path / "manifest", speaker_column="speaker_id")
    assert summary["skipped"] == {"unreadable audio": 1}
    assert summary["skipped_examples"][0]["path"] == "data/train-00001-of-00002.parquet row 1"
    assert summary["splits"]["train"]["utterances"] == 5 and summary["splits"]["validation"]["utterances"] == 2
    assert summary["splits"]["validation"]["corpus_splits"] == {"validation": 2}
    rows = [r for f in manifest_files(tmp_path / "manifest") for r in pq.read_table(f).to_pylist()]
    first = rows[0]
    assert first["path"] == "data/train-00000-of-00002.parquet" and first["row"] == 0 and first["audio_column"] == "audio"
    assert first["license"] == "cc-by-4.0" and first["corpus"] == "tiny-asr" and first["speaker"] == "spk0"
    assert first["text"] == "train sentence number 0" and first["duration"] == pytest.approx(1.0)
    # the manifest points into the dataset; nothing was copied
    assert not list((tmp_path / "manifest").glob("*.flac")) and sum(f.stat().st_size for f in (tmp_path / "manifest").iterdir()) < 40_000
    # extract reads the bytes back out of the Parquet row: the very samples datasets stored
    wav = decode_row(rows[4], corpus_root(tmp_path / "manifest"))  # train-00001 row 2 (row 1 was skipped)
    assert rows[4]["row"] == 2
    expected, _ = sf.read(io.BytesIO(pq.read_table(root / "data" / "train-00001-of-00002.parquet")
                                     .column("audio")[2].as_py()["bytes"]), dtype="float32")
    np.testing.assert_array_equal(wav, expected)


@pytest.mark.parametrize("configs", [True, False], ids=["card-configs", "file-names"])
def test_a_hub_id_is_fetched_by_huggingface_hub_and_every_row_extracted(tmp_path, monkeypatch, configs):
    """`shard hf owner/name` as a user runs it: huggingface_hub's own snapshot_download against the loopback Hub
    (tests/hub_server.py) fills its cache, where each file of the snapshot is a link to ``../../blobs/<hash>``;
    extract reads every row through those links, as from the same files in a plain folder. A link that leaves the
    cache's repo folder is one line, as any link out of a dataset folder. Ids and ``corpus`` carry the dataset's
    name, not the snapshot's commit. With --split, only that split's files are fetched: those the card's default
    config names for it, or (a card without configs) those the Hub names by split."""
    from hub_server import Hub

    plain = hub_dataset(tmp_path / "plain" / "tiny-asr", corrupt=False)
    if not configs:
        (plain / "README.md").write_text(CARD[:CARD.index("configs:")] + "---\n")
    hub = Hub()
    try:
        hub.serve_huggingface_hub(monkeypatch, cache=tmp_path / "hub-cache")
        hub.add_repo("user/tiny-asr", plain)
        one = runner.invoke(app, ["shard", "hf", "user/tiny-asr", str(tmp_path / "v"), "--split", "validation", "-q"])
        fetched = hub.fetched()
        other = runner.invoke(app, ["shard", "hf", "user/tiny-asr", str(tmp_path / "o"), "--split", "dev", "-q"])
        shard = runner.invoke(app, ["shard", "hf", "user/tiny-asr", str(tmp_path / "m"), "-q"])
    finally:
        hub.close()
    assert one.exit_code == 0 and json.loads(one.stdout)["utterances"] == 2, one.output
    assert fetched == ["README.md", "data/validation-00000-of-00001.parquet"]  # --split: that split's files, not all
    assert other.exit_code == 2 and "no split 'dev' in this dataset (it has train, validation)" in other.stderr
    assert shard.exit_code == 0, shard.output
    assert json.loads(shard.stdout)["utterances"] == 8
    snapshot = corpus_root(tmp_path / "m")
    assert all(f.is_symlink() for f in (snapshot / "data").iterdir())  # the cache as huggingface_hub lays it out
    row = pq.read_table(manifest_files(tmp_path / "m")[0]).to_pylist()[0]
    assert row["corpus"] == "tiny-asr" and row["id"].startswith("tiny-asr/data/")  # the dataset's name, not the commit
    assert row["license"] == "cc-by-4.0"  # from the card, itself a link into the blobs
    done = runner.invoke(app, ["extract", str(tmp_path / "m"), str(tmp_path / "f"), "-q"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["utterances"] == 8 and json.loads(done.stdout)["errors"] == 0
    shard_corpus("hf", plain, tmp_path / "plain-m")
    extract(tmp_path / "plain-m", tmp_path / "plain-f", MFCC())
    assert arrow_rows(tmp_path / "f") == arrow_rows(tmp_path / "plain-f")  # ids, splits and frames alike

    outside = tmp_path / "elsewhere.parquet"  # a link out of the cache's repo folder: refused as any other
    link = snapshot / "data" / "train-00000-of-00002.parquet"
    outside.write_bytes(link.read_bytes())
    link.unlink()
    link.symlink_to(outside)
    again = runner.invoke(app, ["shard", "hf", str(snapshot), str(tmp_path / "m2"), "-q"])
    assert again.exit_code == 2 and "data/train-00000-of-00002.parquet' leaves the corpus root" in again.stderr
    assert "--follow-links" in again.stderr and "Traceback" not in again.output


def test_an_hf_url_at_a_revision_names_the_corpus_by_the_dataset(tmp_path, monkeypatch):
    """`shard hf hf://datasets/owner/name@main`: the copy's folder is `name@main`; ids and `corpus` are `name`'s, as
    for the same dataset fetched by its hub id."""
    from hub_server import Hub

    from speechinstruct.sources import storage

    plain = hub_dataset(tmp_path / "plain" / "tiny-asr", corrupt=False)
    hub = Hub()
    try:
        hub.serve_huggingface_hub(monkeypatch)
        monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
        hub.add_repo("user/tiny-asr", plain)
        summary = shard_corpus("hf", "hf://datasets/user/tiny-asr@main", tmp_path / "m")
    finally:
        hub.close()
    assert summary["utterances"] == 8
    rows = pq.read_table(manifest_files(tmp_path / "m")[0]).to_pylist()
    assert {r["corpus"] for r in rows} == {"tiny-asr"} and rows[0]["id"].startswith("tiny-asr/data/")


def arrow_rows(folder):
    import pyarrow as pa

    return [pa.ipc.open_file(str(f)).read_all().to_pylist() for f in sorted(folder.glob("features-*.arrow"))]


def test_hub_parquet_bad_columns_and_unknown_split_are_one_line(tmp_path):
    root = hub_dataset(tmp_path / "tiny", corrupt=False)
    bad = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "m"), "--text-column", "sentence"])
    assert bad.exit_code == 2 and "no text column 'sentence'" in bad.output and "columns: audio, text, speaker_id" in bad.output
    assert "Traceback" not in bad.output
    missing = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "m"), "--split", "test"])
    assert missing.exit_code == 2 and "no split 'test'" in missing.output and "train, validation" in missing.output
    only = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "v"), "--split", "validation", "-q"])
    assert only.exit_code == 0, only.output
    assert json.loads(only.stdout)["splits"] == {"validation": {"utterances": 2, "hours": 0.0006, "corpus_splits": {"validation": 2}}}
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = runner.invoke(app, ["shard", "hf", str(empty), str(tmp_path / "n")])
    assert nothing.exit_code == 2 and "not a Hugging Face dataset folder" in nothing.output


def test_save_to_disk_folder_reads_like_its_parquet_twin(tmp_path):
    rows = {"train": hf_rows(3, 0, "train"), "test": hf_rows(2, 5, "test")}
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(r).cast_column("audio", datasets.Audio()) for s, r in rows.items()})
    dd.save_to_disk(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "dataset_dict.json").is_file()
    summary = shard_corpus("hf", tmp_path / "saved", tmp_path / "manifest")
    assert summary["skipped"] == {} and {k: v["utterances"] for k, v in summary["splits"].items()} == {"train": 3, "test": 2}
    manifest = [r for f in manifest_files(tmp_path / "manifest") for r in pq.read_table(f).to_pylist()]
    assert manifest[0]["path"] == "train/data-00000-of-00001.arrow"
    root = corpus_root(tmp_path / "manifest")
    for row in manifest:
        split, i = row["corpus_split"], row["row"]
        expected, _ = sf.read(io.BytesIO(rows[split]["audio"][i]["bytes"]), dtype="float32")
        np.testing.assert_array_equal(decode_row(row, root), expected)


def run_source(tmp_path, source: str, root, options: dict) -> dict:
    """`speechinstruct run` on one source (no demo corpus, K=8), as a new user would; its summary."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": f"from-{source}", "workdir": str(tmp_path / "work"), "demo_corpus": None,
        "corpora": [{"name": source, "root": str(root), "options": options}],
        "kmeans": {"k": 8, "max_frames": 20000},
        "compose": {"pretrain": {"dev_fraction": 0.2}, "chain_of_modality": {"max_pairs": 2}},
        "output": {"vocoder": "none"}}))
    result = runner.invoke(app, ["run", str(recipe), "-q"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_hub_dataset_runs_through_the_whole_pipeline_with_its_split_kept(tmp_path):
    """A new user's path: shard hf → extract → cluster → quantize → compose → publish → validate."""
    root = hub_dataset(tmp_path / "tiny-asr")
    summary = run_source(tmp_path, "hf", root, {"speaker_column": "speaker_id"})
    assert summary["valid"]
    # ASR + TTS per utterance; the truncated flac is counted by extract, with its file and row
    assert summary["records"]["cross_modal"] == {"train": 8, "validation": 4}
    errors = [json.loads(line) for f in (tmp_path / "work" / "hf" / "features").glob("errors-*.jsonl")
              for line in f.read_text().splitlines()]
    assert len(errors) == 1 and "data/train-00000-of-00002.parquet row 2: unreadable audio" in errors[0]["reason"], errors
    ds = datasets.load_dataset(str(tmp_path / "work" / "dataset"), "cross_modal", split="validation")
    assert {r["source_id"] for r in ds} == {"tiny-asr/data/validation-00000-of-00001/000000",
                                            "tiny-asr/data/validation-00000-of-00001/000001"}
    meta = json.loads((tmp_path / "work" / "dataset" / "speechinstruct.json").read_text())
    assert {s["corpus"]: s["license"] for s in meta["sources"]}["tiny-asr"] == "cc-by-4.0"
    # the card's languages come from the data: the dataset's own card (fr) and the English text side
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(tmp_path / "work" / "dataset" / "README.md").data
    assert card.language == ["en", "fr"] and card.multilinguality == "multilingual"
    assert card.license == "other" and "| tiny-asr | cc-by-4.0 |" in (tmp_path / "work" / "dataset" / "LICENSE.md").read_text()
    # the report answers "did it pass, what was dropped and why": both bad rows, each at its stage
    numbers = json.loads((tmp_path / "work" / "report" / "report.json").read_text())
    assert numbers["valid"] and numbers["dropped"] == {"shard hf: unreadable audio": 1, "extract hf: unreadable audio": 1}
    page = (tmp_path / "work" / "report" / "index.html").read_text()
    assert "data/train-00001-of-00002.parquet row 1" in page and "data/train-00000-of-00002.parquet row 2" in page
    assert "<h2 id='timings'>" in page and "extract hf (mfcc)</td><td>" in page


def kaldi_dir(tmp_path):
    """data/train and data/dev_clean as a Kaldi recipe writes them: absolute paths in wav.scp, segments
    with start/end seconds, text, utt2spk, every file sorted by key in C order (utils/fix_data_dir.sh);
    one recording is a `flac ... |` pipe as in egs/librispeech."""
    audio = tmp_path / "corpus" / "wav"
    audio.mkdir(parents=True)
    for i in range(3):
        sf.write(audio / f"rec{i}.flac", speechlike(4.0, seed=i), 16000)
    train, dev = tmp_path / "data" / "train", tmp_path / "data" / "dev_clean"
    train.mkdir(parents=True)
    dev.mkdir(parents=True)
    (train / "wav.scp").write_text(f"rec0 {audio / 'rec0.flac'}\nrec1 {audio / 'rec1.flac'}\n"
                                   f"recp flac -c -d -s {audio / 'rec1.flac'} |\n")
    (train / "segments").write_text("spkA-rec0-0000 rec0 0.00 1.50\nspkA-rec0-0001 rec0 1.50 3.90\n"
                                    "spkB-rec1-0000 rec1 0.20 2.00\nspkB-rec1-0001 rec1 3.00 9.00\n"
                                    "spkB-recp-0000 recp 0.00 1.00\n")
    (train / "text").write_text("spkA-rec0-0000 HELLO THERE\nspkA-rec0-0001 GENERAL   KENOBI\nspkB-rec1-0000 ONE TWO\n"
                                "spkB-rec1-0001 TOO LONG\nspkB-recp-0000 PIPED\n")
    (train / "utt2spk").write_text("spkA-rec0-0000 spkA\nspkA-rec0-0001 spkA\nspkB-rec1-0000 spkB\nspkB-rec1-0001 spkB\n"
                                   "spkB-recp-0000 spkB\n")
    (dev / "wav.scp").write_text(f"rec2 {audio / 'rec2.flac'}\n")  # no segments: the recording is the utterance
    (dev / "text").write_text("rec2 A DEV UTTERANCE\n")
    (dev / "utt2spk").write_text("rec2 spkC\n")
    return tmp_path / "data", audio


def test_kaldi_data_dirs_shard_with_segments_splits_and_decoding_pipes_read(tmp_path):
    data, audio = kaldi_dir(tmp_path)
    result = runner.invoke(app, ["shard", "kaldi", str(data), str(tmp_path / "manifest"), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["root"] == str(audio)  # the deepest folder holding every wav.scp file
    assert summary["skipped"] == {"segment outside its recording": 1}
    assert {k: v["utterances"] for k, v in summary["splits"].items()} == {"validation": 1, "train": 4}
    rows = {r["id"]: r for f in manifest_files(tmp_path / "manifest") for r in pq.read_table(f).to_pylist()}
    seg = rows["kaldi/train/spkA-rec0-0001"]
    assert (seg["path"], seg["offset"], seg["duration"], seg["text"], seg["speaker"]) == ("rec0.flac", 1.5, pytest.approx(2.4),
                                                                                         "GENERAL KENOBI", "spkA")
    assert rows["kaldi/dev_clean/rec2"]["split"] == "validation" and rows["kaldi/dev_clean/rec2"]["duration"] == pytest.approx(4.0)
    full, _ = sf.read(audio / "rec0.flac", dtype="float32")
    np.testing.assert_allclose(decode_row(seg, audio), full[24000:24000 + 38400], atol=1e-6)
    piped = rows["kaldi/train/spkB-recp-0000"]  # `flac -c -d -s rec1.flac |`: rec1.flac, never run
    assert (piped["path"], piped["text"]) == ("rec1.flac", "PIPED")
    np.testing.assert_allclose(decode_row(piped, audio), sf.read(audio / "rec1.flac", dtype="float32")[0][:16000], atol=1e-6)
    stats = extract(tmp_path / "manifest", tmp_path / "feats", MFCC())
    assert stats["utterances"] == 5 and stats["errors"] == 0


def test_kaldi_commands_that_only_decode_a_file_are_read_as_it_and_no_command_is_run(tmp_path, monkeypatch):
    """Kaldi recipes write wav.scp as commands: `flac -c -d -s F |` (LibriSpeech), `sph2pipe -f wav -p -c 1 F |` (WSJ,
    Switchboard), `sox F -t wav -r 16k - |`, and lhotse's export to Kaldi `ffmpeg … -i F -ar 16000 -map_channel 0.0.0
    … pipe:1 |` or `sph2pipe F … | ffmpeg -i pipe:0 … |` (written here by lhotse's own function). Each that only
    decodes one file is read as that file (resampling and mixing to mono are what every stage does anyway), a
    channel it picks of a file with several as the row's `channel` (one side of a call); no command is ever run (a
    tripwire program proves it). A command that changes the audio (an effect, a time range), and any other program,
    are counted skips."""
    from lhotse.audio import AudioSource
    from lhotse.kaldi import make_wavscp_channel_string_map

    audio = tmp_path / "corpus"
    (audio / "sph").mkdir(parents=True)
    sf.write(audio / "a b.flac", speechlike(2.0, seed=1), 16000)
    sf.write(audio / "sph" / "mono.sph", speechlike(2.0, seed=2, sr=8000), 8000, format="NIST", subtype="PCM_16")
    stereo = np.stack([speechlike(2.0, seed=3, sr=8000), speechlike(2.0, seed=4, sr=8000)], axis=1)
    sf.write(audio / "sph" / "stereo.sph", stereo, 8000, format="NIST", subtype="PCM_16")
    sf.write(audio / "c.wav", speechlike(2.0, seed=5, sr=44100), 44100)
    sf.write(audio / "d.flac", speechlike(2.0, seed=6), 16000)

    def lhotse_writes(name: str, channels: list[int]) -> str:  # the last channel's wav.scp entry
        source = AudioSource(type="file", channels=channels, source=str(audio / name))
        return make_wavscp_channel_string_map(source, 16000)[channels[-1]]

    tripwire = tmp_path / "bin"
    tripwire.mkdir()
    for program in ("flac", "sph2pipe", "sox", "ffmpeg", "cat"):  # were any run, it would leave its mark
        (tripwire / program).write_text(f"#!/bin/sh\ntouch {tmp_path}/ran-{program}\n")
        (tripwire / program).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tripwire}:{os.environ['PATH']}")
    entries = {
        "flac": f"flac --decode --stdout --silent '{audio / 'a b.flac'}' |",  # a name with a space, quoted
        "wsj": f"/opt/kaldi/tools/sph2pipe_v2.5/sph2pipe -f wav -p -c 1 {audio / 'sph' / 'mono.sph'} |",
        "swbd-A": f"sph2pipe -f wav -p -c 1 {audio / 'sph' / 'stereo.sph'} |",  # one side of a call
        "whole": f"sph2pipe -f wav -p {audio / 'sph' / 'stereo.sph'} |",  # both channels: mixed, as any stereo file
        "sox": f"sox {audio / 'c.wav'} -t wav -r 16k -b 16 -e signed-integer -c 1 - |",
        "effect": f"sox {audio / 'c.wav'} -t wav - speed 1.1 |",
        "range": f"sph2pipe -f wav -p -t 0.5:1.5 {audio / 'sph' / 'mono.sph'} |",
        "chain": f"flac -c -d -s {audio / 'a b.flac'} | sox -t wav - -t wav - gain -3 |",
        "cat": f"cat {audio / 'c.wav'} |",
        "lhotse-flac": lhotse_writes("d.flac", [0]),  # ffmpeg -threads 1 -i F -ar 16000 -map_channel 0.0.0 …
        "lhotse-sph": lhotse_writes("sph/mono.sph", [0]),  # sph2pipe F -f wav -c 1 -p | ffmpeg … -i pipe:0 …
        "lhotse-swbd-B": lhotse_writes("sph/stereo.sph", [0, 1]),  # … -c 2 … : the other side of a call
    }
    assert entries["lhotse-sph"].startswith(f"sph2pipe {audio / 'sph' / 'mono.sph'} -f wav -c 1 -p | ffmpeg")
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "wav.scp").write_text("".join(f"{k} {v}\n" for k, v in sorted(entries.items())))
    result = runner.invoke(app, ["shard", "kaldi", str(tmp_path / "data"), str(tmp_path / "m"), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    rows = {r["id"].split("/")[-1]: r for f in manifest_files(tmp_path / "m") for r in pq.read_table(f).to_pylist()}
    assert {k: (r["path"], r["channel"]) for k, r in rows.items()} == {
        "flac": ("a b.flac", None), "wsj": ("sph/mono.sph", None), "whole": ("sph/stereo.sph", None), "sox": ("c.wav", None),
        "lhotse-flac": ("d.flac", None), "lhotse-sph": ("sph/mono.sph", None), "swbd-A": ("sph/stereo.sph", 0),
        "lhotse-swbd-B": ("sph/stereo.sph", 1)}
    assert summary["root"] == str(audio) and summary["skipped"] == {"wav.scp entry is a command (not run)": 4}
    assert not list(tmp_path.glob("ran-*"))
    np.testing.assert_allclose(decode_row(rows["wsj"], audio, sample_rate=8000),
                               sf.read(audio / "sph" / "mono.sph", dtype="float32")[0], atol=1e-6)
    np.testing.assert_allclose(decode_row(rows["whole"], audio, sample_rate=8000), stereo.mean(axis=1), atol=1e-4)
    for side, key in enumerate(("swbd-A", "lhotse-swbd-B")):  # each side of the call alone
        np.testing.assert_allclose(decode_row(rows[key], audio, sample_rate=8000), stereo[:, side], atol=1e-4)
    assert extract(tmp_path / "m", tmp_path / "f", MFCC())["utterances"] == 8


def test_lhotse_manifests_of_a_kaldi_dir_with_decoding_commands_read_their_files(tmp_path):
    """lhotse's own import of a Kaldi data dir (`load_kaldi_data_dir`, durations from `reco2dur`, so that it runs
    nothing either) keeps `flac -c -d -s F |` as a `command` source: read as F, as `shard kaldi` reads it; a command
    picking one side of a two-channel file reads that channel alone."""
    from lhotse.kaldi import load_kaldi_data_dir

    data, audio = kaldi_dir(tmp_path)
    train = data / "train"
    stereo = np.stack([speechlike(4.0, seed=7), speechlike(4.0, seed=8)], axis=1)
    sf.write(audio / "call.sph", stereo, 16000, format="NIST", subtype="PCM_16")
    with open(train / "wav.scp", "a") as f:
        f.write(f"call sph2pipe -f wav -p -c 2 {audio / 'call.sph'} |\n")
    (train / "reco2dur").write_text("rec0 4.0\nrec1 4.0\nrecp 4.0\ncall 4.0\n")
    with open(train / "segments", "a") as f:
        f.write("spkC-call-0000 call 0.00 2.00\n")
    for name, line in (("utt2spk", "spkC-call-0000 spkC"), ("text", "spkC-call-0000 HELLO")):
        with open(train / name, "a") as f:
            f.write(line + "\n")
    recordings, supervisions, _ = load_kaldi_data_dir(train, sampling_rate=16000)
    assert recordings["recp"].sources[0].type == "command"
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    recordings.to_file(manifests / "kaldi_recordings_train.jsonl.gz")
    supervisions.to_file(manifests / "kaldi_supervisions_train.jsonl.gz")
    summary = shard_corpus("lhotse", manifests, tmp_path / "m")
    rows = {r["id"]: r for f in manifest_files(tmp_path / "m") for r in pq.read_table(f).to_pylist()}
    assert rows["lhotse/train/spkB-recp-0000"]["path"] == "rec1.flac" and summary["root"] == str(audio)
    assert summary["skipped"] == {"segment outside its recording": 1}  # the fixture's 3-9 s of a 4 s file
    call = rows["lhotse/train/spkC-call-0000"]
    assert (call["path"], call["channel"], rows["lhotse/train/spkB-recp-0000"]["channel"]) == ("call.sph", 1, None)
    np.testing.assert_allclose(decode_row(call, audio), stereo[:32000, 1], atol=1e-4)
    np.testing.assert_allclose(decode_row(rows["lhotse/train/spkB-recp-0000"], audio),
                               sf.read(audio / "rec1.flac", dtype="float32")[0][:16000], atol=1e-6)


def test_lhotse_supervisions_on_one_channel_of_a_call_read_that_channel_alone(tmp_path):
    """A two-channel telephone call as lhotse's recipes keep one (Switchboard, Fisher: one recording, each speaker's
    supervisions on a channel): each row reads its speaker's channel alone (it mixed both, the other side's
    backchannels and crosstalk in every utterance), as lhotse's own `load_audio` does; a supervision on both
    channels mixes them; a four-channel array's supervision on two of them is a counted skip. Cuts too."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    audio = tmp_path / "calls"
    audio.mkdir()
    call = np.stack([speechlike(3.0, seed=1, sr=8000), speechlike(3.0, seed=2, sr=8000)], axis=1)
    sf.write(audio / "call.wav", call, 8000)
    sf.write(audio / "array.wav", np.stack([speechlike(2.0, seed=i, sr=8000) for i in range(4)], axis=1), 8000)
    recordings = RecordingSet.from_recordings([Recording.from_file(audio / "call.wav"), Recording.from_file(audio / "array.wav")])
    assert recordings["call"].num_channels == 2
    sups = SupervisionSet.from_segments([
        SupervisionSegment(id="A-0", recording_id="call", start=0.0, duration=1.5, channel=0, text="hello", speaker="A"),
        SupervisionSegment(id="B-0", recording_id="call", start=1.0, duration=1.5, channel=1, text="hi", speaker="B"),
        SupervisionSegment(id="AB", recording_id="call", start=0.0, duration=1.0, channel=[0, 1], text="both", speaker="A"),
        SupervisionSegment(id="two", recording_id="array", start=0.0, duration=1.0, channel=[0, 2], text="x", speaker="C"),
        SupervisionSegment(id="ghost", recording_id="call", start=0.0, duration=1.0, channel=[1, 5], text="y", speaker="D")])
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    recordings.to_file(manifests / "calls_recordings_train.jsonl.gz")
    sups.to_file(manifests / "calls_supervisions_train.jsonl.gz")
    summary = shard_corpus("lhotse", manifests, tmp_path / "m")
    rows = {r["id"].split("/")[-1]: r for f in manifest_files(tmp_path / "m") for r in pq.read_table(f).to_pylist()}
    assert {k: r["channel"] for k, r in rows.items()} == {"A-0": 0, "B-0": 1, "AB": None}
    assert summary["skipped"] == {"several channels of a recording (not read apart)": 1, "channel not in its recording": 1}
    for uid in ("A-0", "B-0", "AB"):  # lhotse's own reading of each supervision
        sup = sups[uid]
        theirs = recordings[sup.recording_id].load_audio(channels=sup.channel, offset=sup.start, duration=sup.duration)
        np.testing.assert_allclose(decode_row(rows[uid], audio, sample_rate=8000), theirs.mean(axis=0), atol=1e-4)
    cuts = CutSet.from_manifests(recordings=recordings.filter(lambda r: r.id == "call"),
                                 supervisions=sups.filter(lambda s: s.id in ("A-0", "B-0"))).trim_to_supervisions(
        keep_overlapping=False)
    cuts_dir = tmp_path / "cuts"
    cuts_dir.mkdir()
    cuts.to_file(cuts_dir / "calls_cuts_train.jsonl.gz")
    shard_corpus("lhotse", cuts_dir, tmp_path / "c")
    by_cut = sorted((r["offset"], r["channel"]) for f in manifest_files(tmp_path / "c") for r in pq.read_table(f).to_pylist())
    assert by_cut == [(0.0, 0), (1.0, 1)]


def test_lhotse_recordings_kept_as_one_file_per_channel_read_each_speakers_file(tmp_path):
    """A meeting as lhotse's AMI recipe keeps its headsets (`mic="ihm"`): one recording, one file per channel, each
    speaker's supervisions on their headset's channel. Each row reads that speaker's file (it was "audio source is
    not one file" for every supervision), as lhotse's own `load_audio` does; a supervision on every channel (the
    files are not mixed) is a counted skip."""
    from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet
    from lhotse.audio import AudioSource

    audio = tmp_path / "amicorpus" / "ES2002a" / "audio"
    audio.mkdir(parents=True)
    for i in range(2):
        sf.write(audio / f"ES2002a.Headset-{i}.wav", speechlike(3.0, seed=10 + i), 16000)
    meeting = Recording(id="ES2002a", sampling_rate=16000, num_samples=48000, duration=3.0, sources=[
        AudioSource(type="file", channels=[i], source=str(audio / f"ES2002a.Headset-{i}.wav")) for i in range(2)])
    sups = SupervisionSet.from_segments([
        SupervisionSegment(id="A", recording_id="ES2002a", start=0.5, duration=1.0, channel=0, text="okay", speaker="MEE006"),
        SupervisionSegment(id="B", recording_id="ES2002a", start=1.0, duration=1.5, channel=1, text="right", speaker="FEE005"),
        SupervisionSegment(id="all", recording_id="ES2002a", start=0.0, duration=1.0, channel=[0, 1], text="x", speaker="x")])
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    RecordingSet.from_recordings([meeting]).to_file(manifests / "ami-ihm_recordings_dev.jsonl.gz")
    sups.to_file(manifests / "ami-ihm_supervisions_dev.jsonl.gz")
    summary = shard_corpus("lhotse", manifests, tmp_path / "m")
    rows = {r["id"].split("/")[-1]: r for f in manifest_files(tmp_path / "m") for r in pq.read_table(f).to_pylist()}
    assert {k: (r["path"], r["channel"], r["split"]) for k, r in rows.items()} == {
        "A": ("ES2002a.Headset-0.wav", None, "validation"), "B": ("ES2002a.Headset-1.wav", None, "validation")}
    assert summary["root"] == str(audio) and summary["skipped"] == {"channels in several files (not mixed)": 1}
    for uid in ("A", "B"):
        sup = sups[uid]
        theirs = meeting.load_audio(channels=sup.channel, offset=sup.start, duration=sup.duration)
        np.testing.assert_allclose(decode_row(rows[uid], audio), theirs[0], atol=1e-4)


def test_lhotse_cuts_as_training_recipes_leave_them_padded_mixed_or_perturbed(tmp_path):
    """Cuts saved after lhotse's own `pad` (a MixedCut of the cut and padding: it was an AttributeError that
    stopped shard), `mix` (two recordings in one cut), `perturb_speed`/`perturb_volume` (a transform on the
    recording: the row read the file as it is, at the perturbed cut's times, the wrong audio) and `resample`. A
    padded cut is its speech; a mix and a perturbed recording are counted skips naming what they are; a resampled
    one is read as it is (every stage resamples anyway)."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(2):
        sf.write(audio / f"r{i}.wav", speechlike(3.0, seed=i), 16000)
    recordings = RecordingSet.from_recordings([Recording.from_file(audio / f"r{i}.wav") for i in range(2)])
    sups = SupervisionSet.from_segments([SupervisionSegment(id=f"r{i}-0", recording_id=f"r{i}", start=0.5, duration=2.0,
                                                            channel=0, text=f"utterance {i}") for i in range(2)])
    cuts = CutSet.from_manifests(recordings=recordings, supervisions=sups).trim_to_supervisions()
    a, b = list(cuts)
    kinds = {"padded": CutSet.from_cuts([a.pad(duration=3.0)]), "mixed": CutSet.from_cuts([a.mix(b, offset_other_by=0.5)]),
             "speed": cuts.subset(first=1).perturb_speed(1.1), "volume": cuts.subset(first=1).perturb_volume(2.0),
             "resampled": cuts.subset(first=1).resample(8000)}
    folder = tmp_path / "cuts"
    folder.mkdir()
    for name, kind in kinds.items():
        kind.to_file(folder / f"x_cuts_{name}.jsonl.gz")
    summary = shard_corpus("lhotse", folder, tmp_path / "m")
    rows = {r["corpus_split"]: r for f in manifest_files(tmp_path / "m") for r in pq.read_table(f).to_pylist()}
    assert sorted(rows) == ["padded", "resampled"]
    assert summary["skipped"] == {"a mix of several recordings (not read)": 1, "a transformed recording (not read)": 2}
    for name in ("padded", "resampled"):  # the speech of cut a: the same samples as lhotse's own reading of it
        assert (rows[name]["offset"], rows[name]["duration"], rows[name]["text"]) == (0.5, 2.0, "utterance 0")
        np.testing.assert_allclose(decode_row(rows[name], audio), a.load_audio()[0], atol=1e-4)
    details = " ".join(e["detail"] for e in summary["skipped_examples"])
    assert "Speed" in details and "Volume" in details


def test_lhotse_manifests_written_by_lhotse_shard_alike_for_supervisions_and_cuts(tmp_path):
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet
    from lhotse.audio import AudioSource

    audio = tmp_path / "LibriSpeech" / "dev-clean"
    audio.mkdir(parents=True)
    recordings = []
    for i in range(2):
        sf.write(audio / f"r{i}.flac", speechlike(3.0, seed=i), 16000)
        recordings.append(Recording.from_file(audio / f"r{i}.flac", recording_id=f"r{i}"))
    remote = Recording(id="web", sources=[AudioSource(type="url", channels=[0], source="https://example.org/a.flac")],
                       sampling_rate=16000, num_samples=16000, duration=1.0)
    sups = [SupervisionSegment(id="r0-a", recording_id="r0", start=0.0, duration=1.2, channel=0, text="first half", speaker="s0"),
            SupervisionSegment(id="r0-b", recording_id="r0", start=1.2, duration=1.8, channel=0, text="second half", speaker="s0"),
            SupervisionSegment(id="r1-a", recording_id="r1", start=0.5, duration=2.0, channel=0, text="another one", speaker="s1"),
            SupervisionSegment(id="web-a", recording_id="web", start=0.0, duration=1.0, channel=0, text="remote", speaker="s2")]
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    RecordingSet.from_recordings(recordings + [remote]).to_file(manifests / "librispeech_recordings_dev-clean.jsonl.gz")
    SupervisionSet.from_segments(sups).to_file(manifests / "librispeech_supervisions_dev-clean.jsonl.gz")
    summary = shard_corpus("lhotse", manifests, tmp_path / "manifest")
    assert summary["root"] == str(audio)
    assert summary["skipped"] == {"audio source is not one file (not read)": 1}
    assert summary["splits"] == {"validation": {"utterances": 3, "hours": 0.0014, "corpus_splits": {"dev-clean": 3}}}
    rows = [r for f in manifest_files(tmp_path / "manifest") for r in pq.read_table(f).to_pylist()]
    assert [(r["id"], r["path"], r["offset"], r["text"]) for r in rows[:2]] == [
        ("lhotse/dev-clean/r0-a", "r0.flac", 0.0, "first half"), ("lhotse/dev-clean/r0-b", "r0.flac", 1.2, "second half")]

    # the same data as lhotse cuts: one row per cut, its supervisions' text
    cuts = CutSet.from_manifests(recordings=RecordingSet.from_recordings(recordings),
                                 supervisions=SupervisionSet.from_segments(sups[:3])).trim_to_supervisions()
    cuts_dir = tmp_path / "cuts"
    cuts_dir.mkdir()
    cuts.to_file(cuts_dir / "librispeech_cuts_train-clean-5.jsonl.gz")
    by_cut = shard_corpus("lhotse", cuts_dir, tmp_path / "from-cuts")
    assert by_cut["splits"]["train"]["utterances"] == 3 and by_cut["skipped"] == {}
    cut_rows = sorted((r["offset"], r["duration"], r["text"]) for f in manifest_files(tmp_path / "from-cuts")
                      for r in pq.read_table(f).to_pylist())
    assert cut_rows == sorted((s.start, pytest.approx(s.duration), s.text) for s in sups[:3])


def test_lhotse_cuts_split_into_chunks_by_lhotse_read_as_one_part(tmp_path):
    """A large cuts manifest is split into chunks by lhotse (`lhotse split-lazy`, as icefall's recipes split
    GigaSpeech and Libriheavy: ``cuts_XL.00000000.jsonl.gz``; ``CutSet.split_lazy(prefix="cuts")``:
    ``cuts.00000000.jsonl.gz``; with no prefix: ``split.00000000.jsonl.gz``). Each chunk was a part of its own, named
    ``train-clean-5.00000001`` in every row's corpus split; chunks named ``cuts.N`` or ``split.N`` were no manifest at
    all. The chunks of a part are read as that part."""
    from click.testing import CliRunner as ClickRunner
    from lhotse import CutSet, Recording
    from lhotse.bin.modes.manipulation import split_lazy

    audio = tmp_path / "audio"
    audio.mkdir()
    recordings = []
    for i in range(5):
        sf.write(audio / f"r{i}.flac", speechlike(1.0 + 0.2 * i, seed=i), 16000)
        recordings.append(Recording.from_file(audio / f"r{i}.flac", recording_id=f"r{i}"))
    whole = tmp_path / "whole"
    whole.mkdir()
    CutSet.from_manifests(recordings=recordings).to_file(whole / "librispeech_cuts_train-clean-5.jsonl.gz")
    CutSet.from_manifests(recordings=recordings[:2]).to_file(whole / "librispeech_cuts_dev-clean.jsonl.gz")
    expected = shard_corpus("lhotse", whole, tmp_path / "from-whole")
    assert expected["splits"]["train"]["corpus_splits"] == {"train-clean-5": 5}

    chunks = tmp_path / "chunks"
    for name in ("librispeech_cuts_train-clean-5", "librispeech_cuts_dev-clean"):
        done = ClickRunner().invoke(split_lazy, [str(whole / f"{name}.jsonl.gz"), str(chunks), "2"])
        assert done.exit_code == 0, done.output
    assert sorted(p.name for p in chunks.iterdir())[:3] == [
        "librispeech_cuts_dev-clean.00000000.jsonl.gz", "librispeech_cuts_train-clean-5.00000000.jsonl.gz",
        "librispeech_cuts_train-clean-5.00000001.jsonl.gz"]
    by_chunk = shard_corpus("lhotse", chunks, tmp_path / "from-chunks")
    assert by_chunk["splits"] == expected["splits"] and by_chunk["skipped"] == {}

    CutSet.from_manifests(recordings=recordings).split_lazy(tmp_path / "bare", chunk_size=2, prefix="cuts")
    bare = shard_corpus("lhotse", tmp_path / "bare", tmp_path / "from-bare")
    assert bare["splits"]["train"]["utterances"] == 5 and bare["skipped"] == {}
    rows = lambda folder: sorted((r["path"], r["duration"]) for f in manifest_files(folder)  # noqa: E731
                                 for r in pq.read_table(f).to_pylist())
    assert rows(tmp_path / "from-chunks") == rows(tmp_path / "from-whole")
    assert [r[0] for r in rows(tmp_path / "from-bare")] == [f"r{i}.flac" for i in range(5)]

    # lhotse's default prefix names the chunks split.00000000.jsonl.gz, nothing saying their kind or part: the kind
    # is their records' (as lhotse's load_manifest_lazy tells it), the part their folder's name (as a Shar folder's)
    CutSet.from_manifests(recordings=recordings[:3]).split_lazy(tmp_path / "dev-clean", chunk_size=2)
    assert sorted(p.name for p in (tmp_path / "dev-clean").iterdir()) == ["split.00000000.jsonl.gz",
                                                                         "split.00000001.jsonl.gz"]
    default = shard_corpus("lhotse", tmp_path / "dev-clean", tmp_path / "from-default")
    assert default["splits"]["validation"]["corpus_splits"] == {"dev-clean": 3} and default["skipped"] == {}
    assert [r[0] for r in rows(tmp_path / "from-default")] == [f"r{i}.flac" for i in range(3)]


def test_lhotse_and_kaldi_refuse_what_they_are_not(tmp_path):
    (tmp_path / "nothing").mkdir()
    for corpus, message in (("lhotse", "no lhotse manifests"), ("kaldi", "not a Kaldi data directory")):
        result = runner.invoke(app, ["shard", corpus, str(tmp_path / "nothing"), str(tmp_path / corpus)])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "x_recordings_dev.jsonl.gz").write_bytes(b"")
    half = runner.invoke(app, ["shard", "lhotse", str(tmp_path / "half"), str(tmp_path / "h")])
    assert half.exit_code == 2 and "needs recordings with supervisions, or cuts" in half.output


def lhotse_parts(tmp_path):
    """Two parts (train-clean-5, dev-clean) as lhotse's recipes write them, with lhotse's own classes."""
    from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet

    folder = tmp_path / "manifests"
    folder.mkdir()
    for part, seed in (("train-clean-5", 0), ("dev-clean", 10)):
        audio = tmp_path / "audio" / part
        audio.mkdir(parents=True)
        recs, sups = [], []
        for i in range(3 if part.startswith("train") else 1):
            sf.write(audio / f"{part}-{i}.flac", speechlike(2.0, seed=seed + i), 16000)
            recs.append(Recording.from_file(audio / f"{part}-{i}.flac", recording_id=f"{part}-{i}"))
            sups.append(SupervisionSegment(id=f"{part}-{i}-0", recording_id=f"{part}-{i}", start=0.1, duration=1.8,
                                           channel=0, text=f"utterance {i} of {part}", speaker=f"s{i}"))
        RecordingSet.from_recordings(recs).to_file(folder / f"tiny_recordings_{part}.jsonl.gz")
        SupervisionSet.from_segments(sups).to_file(folder / f"tiny_supervisions_{part}.jsonl.gz")
    return folder


def shar_parts(tmp_path):
    """lhotse_parts' cuts (one per supervision) written by lhotse's own ``to_shar``, a Shar folder per part."""
    from lhotse import CutSet, load_manifest

    manifests = lhotse_parts(tmp_path)
    for part in ("train-clean-5", "dev-clean"):
        cuts = CutSet.from_manifests(load_manifest(manifests / f"tiny_recordings_{part}.jsonl.gz"),
                                     load_manifest(manifests / f"tiny_supervisions_{part}.jsonl.gz"))
        (tmp_path / "shar" / part).mkdir(parents=True)
        cuts.trim_to_supervisions().to_shar(tmp_path / "shar" / part, fields={"recording": "flac"}, shard_size=2)
    return tmp_path / "shar"


@pytest.mark.parametrize("source", ["lhotse", "kaldi", "shar"])
def test_lhotse_and_kaldi_sources_run_through_the_whole_pipeline(tmp_path, source):
    root = {"lhotse": lhotse_parts, "shar": shar_parts}.get(source, lambda t: kaldi_dir(t)[0])(tmp_path)
    summary = run_source(tmp_path, "kaldi" if source == "kaldi" else "lhotse", root, {"license": "CC-BY-4.0"})
    assert summary["valid"] and summary["records"]["cross_modal"] == {"train": 8 if source == "kaldi" else 6, "validation": 2}
    dev = datasets.load_dataset(str(tmp_path / "work" / "dataset"), "cross_modal", split="validation")
    assert {r["source_id"].split("/")[1] for r in dev} == {"dev_clean" if source == "kaldi" else "dev-clean"}


def test_rows_holding_only_a_path_read_that_file_inside_the_dataset_and_are_counted_skips_else(tmp_path, monkeypatch):
    """`Dataset.to_parquet` keeps what `cast_column("audio", Audio())` made of file names: cells with a path and no
    bytes (only `save_to_disk` and `push_to_hub` embed the audio). A path to a file inside the dataset folder
    (absolute, or relative to that folder) is read from that file, as `extract` reads LibriSpeech's; a file
    elsewhere, a missing one or a URL is a counted skip naming the data file and row. Before, every such row was
    "no embedded audio bytes": a dataset written this way sharded to nothing."""
    ds = tmp_path / "ds"
    (ds / "wavs").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for i, where in enumerate(("wavs/a.flac", "wavs/b.flac", "../elsewhere/c.flac", "wavs/gone.flac")):
        (ds / where).write_bytes(flac_bytes(1.0 + 0.25 * i, i))
    (tmp_path / "alias").symlink_to(ds)  # a link on the way into the dataset (macOS: /tmp is /private/tmp)
    cells = [str(ds / "wavs" / "a.flac"), "wavs/b.flac", str(tmp_path / "elsewhere" / "c.flac"), "wavs/gone.flac",
             str(tmp_path / "alias" / "wavs" / "b.flac")]
    monkeypatch.chdir(ds)  # a relative name, as a user in the dataset's folder writes it
    table = datasets.concatenate_datasets([datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio()) for rows in (
        {"audio": [{"bytes": flac_bytes(1.0, 7), "path": "e.flac"}], "text": ["zero"]},  # one embedded, as before
        {"audio": cells, "text": ["one", "two", "three", "four", "five"]})])
    table.to_parquet(str(ds / "train-00000-of-00001.parquet"))  # datasets reads every named file's size here
    (ds / "wavs" / "gone.flac").unlink()  # moved away since
    written = pq.read_table(ds / "train-00000-of-00001.parquet")
    assert written.column("audio").to_pylist()[1] == {"bytes": None, "path": cells[0]}  # as datasets wrote it
    url = {"audio": {"bytes": None, "path": "https://example.com/d.flac"}, "text": "six"}  # a cell naming a URL
    pq.write_table(pa.concat_tables([written, pa.Table.from_pylist([url], schema=written.schema)]),
                   ds / "train-00000-of-00001.parquet")
    summary = shard_corpus("hf", ds, tmp_path / "m")
    rows = [r for f in manifest_files(tmp_path / "m") for r in pq.read_table(f).to_pylist()]
    assert [(r["path"], r["row"], r["text"]) for r in rows] == [
        ("train-00000-of-00001.parquet", 0, "zero"), ("wavs/a.flac", None, "one"), ("wavs/b.flac", None, "two"),
        ("wavs/b.flac", None, "five")]
    assert [r["id"] for r in rows] == [f"ds/train-00000-of-00001/{i:06d}" for i in (0, 1, 2, 5)]
    assert summary["utterances"] == 4 and summary["skipped"] == {
        "audio outside the dataset folder": 1, "missing audio file": 1, "no embedded audio bytes": 1}
    outside, url, missing = sorted(summary["skipped_examples"], key=lambda e: e["path"])
    assert outside["path"] == "train-00000-of-00001.parquet row 3" and cells[2] in outside["detail"]
    assert missing == {"path": "wavs/gone.flac", "reason": "missing audio file",
                       "detail": "named by train-00000-of-00001.parquet row 4"}
    assert url["path"] == "train-00000-of-00001.parquet row 6" and "https://example.com/d.flac" in url["detail"]
    assert summary["root"] == str(ds.resolve()) and "languages" in summary
    # extract reads those files as it reads any corpus's: the same frames as the same audio embedded
    (tmp_path / "embedded").mkdir()
    datasets.Dataset.from_dict({"audio": [{"bytes": (ds / "wavs" / n).read_bytes(), "path": n} for n in ("a.flac", "b.flac")],
                                "text": ["one", "two"]}).to_parquet(str(tmp_path / "embedded" / "train.parquet"))
    shard_corpus("hf", tmp_path / "embedded", tmp_path / "em")
    assert extract(tmp_path / "m", tmp_path / "f", MFCC())["utterances"] == 4
    extract(tmp_path / "em", tmp_path / "ef", MFCC())
    features = [r["features"] for f in arrow_rows(tmp_path / "f") for r in f]
    assert features[1:3] == [r["features"] for f in arrow_rows(tmp_path / "ef") for r in f] and features[3] == features[2]


def test_a_lhotse_cuts_file_is_a_root_in_a_recipe_too(tmp_path):
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    from speechinstruct.pipeline import load_recipe

    sf.write(tmp_path / "a.flac", speechlike(2.0, seed=1), 16000)
    recording = Recording.from_file(tmp_path / "a.flac", recording_id="a")
    cuts = CutSet.from_manifests(recordings=RecordingSet.from_recordings([recording]), supervisions=SupervisionSet.from_segments(
        [SupervisionSegment(id="a-0", recording_id="a", start=0.0, duration=2.0, channel=0, text="one file")]))
    cuts.to_file(tmp_path / "tiny_cuts_train.jsonl.gz")
    recipe = tmp_path / "r.yaml"
    for root, ok in ((tmp_path / "tiny_cuts_train.jsonl.gz", True), (tmp_path / "missing.jsonl.gz", False)):
        recipe.write_text(yaml.safe_dump({"demo_corpus": None, "corpora": [{"name": "lhotse", "root": str(root)}]}))
        if ok:
            assert load_recipe(recipe)["corpora"][0]["root"] == str(root)
            assert shard_corpus("lhotse", root, tmp_path / "m")["utterances"] == 1
        else:
            with pytest.raises(Exception, match="is neither a folder nor a manifest file"):
                load_recipe(recipe)


def test_a_data_file_that_is_not_parquet_is_a_counted_skip(tmp_path):
    root = hub_dataset(tmp_path / "tiny", corrupt=False)
    (root / "data" / "validation-00001-of-00001.parquet").write_bytes(b"not parquet at all")  # the card's validation
    result = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "m")])  # with its progress bar
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["skipped"] == {"unreadable data file": 1} and summary["utterances"] == 8

"""shard webdataset (speechinstruct.sources.corpora.webdataset): tar shards written by the webdataset package itself,
read as streams; the manifest names each audio member's bytes in its tar, and extract decodes them in place."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from typer.testing import CliRunner

from conftest import speechlike
from speechinstruct.cli import app
from speechinstruct.sources.shard import shard_corpus
from speechinstruct.shardfiles import manifest_files

runner = CliRunner()


def encoded(wav: np.ndarray, sr: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wav, sr, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path)


def write_shards(tmp_path):
    """Three shards as webdataset's TarWriter writes them: train-000000.tar and train-000001.tar (FLAC + JSON with
    Emilia's keys, WAV + TXT, a sample with no audio, one unreadable clip), validation-000000.tar."""
    import webdataset as wds

    folder = tmp_path / "shards"
    folder.mkdir()
    clips = {}
    with wds.TarWriter(str(folder / "train-000000.tar")) as sink:
        for i in range(3):
            wav = speechlike(1.0 + 0.25 * i, seed=i)
            clips[f"s{i:03d}"] = wav
            sink.write({"__key__": f"s{i:03d}", "flac": encoded(wav, 16000, "FLAC"),
                        "json": {"id": f"s{i:03d}", "text": f"sample number {i}", "speaker": f"spk{i % 2}",
                                 "language": "en", "duration": len(wav) / 16000}})
        sink.write({"__key__": "s003", "json": {"text": "no audio here"}})
    with wds.TarWriter(str(folder / "train-000001.tar")) as sink:
        wav = speechlike(0.8, seed=7, sr=24000)
        clips["w000"] = wav
        sink.write({"__key__": "w000", "wav": encoded(wav, 24000, "WAV"), "txt": "a wav sample"})
        sink.write({"__key__": "w001", "flac": b"fLaC but not audio", "txt": "broken"})
    with wds.TarWriter(str(folder / "validation-000000.tar")) as sink:
        wav = speechlike(1.1, seed=9)
        clips["v000"] = wav
        sink.write({"__key__": "v000", "flac": encoded(wav, 16000, "FLAC"), "json": {"sentence": "held out"}})
    return folder, clips


def rows_of(folder):
    return {r["id"]: r for f in manifest_files(folder) for r in pq.read_table(f).to_pylist()}


def test_shards_become_rows_that_point_into_their_tars(shards, tmp_path):
    from speechinstruct.units.extract import decode_row

    folder, clips = shards
    summary = shard_corpus("webdataset", f"{folder}/train-{{000000..000001}}.tar", tmp_path / "m", license="CC-BY-4.0")
    assert summary["root"] == str(folder.resolve())
    assert summary["skipped"] == {"sample without audio": 1, "unreadable audio": 1}
    rows = rows_of(tmp_path / "m")
    assert sorted(rows) == ["webdataset/train-000000/s000", "webdataset/train-000000/s001", "webdataset/train-000000/s002",
                            "webdataset/train-000001/w000"]
    s1 = rows["webdataset/train-000000/s001"]
    assert (s1["text"], s1["speaker"], s1["split"], s1["path"], s1["license"]) == (
        "sample number 1", "spk1", "train", "train-000000.tar", "CC-BY-4.0")
    assert rows["webdataset/train-000001/w000"]["text"] == "a wav sample" and rows["webdataset/train-000001/w000"]["sample_rate"] == 24000
    raw = (folder / "train-000000.tar").read_bytes()
    assert sf.read(io.BytesIO(raw[s1["tar_offset"]: s1["tar_offset"] + s1["tar_size"]]))[0].size == clips["s001"].size
    for uid, key in (("webdataset/train-000000/s001", "s001"), ("webdataset/train-000001/w000", "w000")):
        wav = decode_row(rows[uid], summary["root"])  # read in place, at 16 kHz
        expected = clips[key] if key != "w000" else None
        if expected is not None:
            assert np.allclose(wav, expected, atol=1e-4)
        else:
            assert abs(wav.size - round(clips[key].size * 16000 / 24000)) <= 1


def test_the_split_comes_from_the_tar_name_and_a_license_is_required(shards, tmp_path):
    folder, _ = shards
    summary = shard_corpus("webdataset", str(folder / "validation-000000.tar"), tmp_path / "v", license="CC0-1.0")
    assert summary["splits"]["validation"]["utterances"] == 1
    assert rows_of(tmp_path / "v")["webdataset/validation-000000/v000"]["text"] == "held out"
    result = runner.invoke(app, ["shard", "webdataset", f"{folder}/train-{{000000..000001}}.tar", str(tmp_path / "x")])
    assert result.exit_code == 2 and "needs --license" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["shard", "webdataset", f"{folder}/nothing-{{0..3}}.tar", str(tmp_path / "y"), "--license", "x"])
    assert result.exit_code == 2 and "matches no tar files" in result.output


def test_a_truncated_tar_keeps_its_samples_before_the_cut(shards, tmp_path):
    folder, _ = shards
    raw = (folder / "train-000000.tar").read_bytes()
    shard_corpus("webdataset", str(folder / "train-000000.tar"), tmp_path / "full", license="x")
    second = rows_of(tmp_path / "full")["webdataset/train-000000/s001"]
    cut = tmp_path / "cut" / "train-000000.tar"
    cut.parent.mkdir()
    cut.write_bytes(raw[: second["tar_offset"] + second["tar_size"] // 2])  # in the middle of s001's audio
    summary = shard_corpus("webdataset", str(cut), tmp_path / "m", license="x")
    rows = rows_of(tmp_path / "m")
    assert sorted(rows) == ["webdataset/train-000000/s000"]
    assert summary["skipped"] == {"truncated or damaged tar": 1}
    assert "after s001" in summary["skipped_examples"][0]["detail"]


def test_score_reads_tar_members_too(shards, tmp_path):
    """score decodes the same rows (DNSMOS, from the speechmos wheel): every sample scored, none unreadable."""
    from speechinstruct.judges.dnsmos import DNSMOS
    from speechinstruct.judges.judge import Judge
    from speechinstruct.curate.score import score

    folder, _ = shards
    shard_corpus("webdataset", f"{folder}/train-{{000000..000001}}.tar", tmp_path / "m", license="x")
    summary = score(tmp_path / "m", tmp_path / "s", Judge(DNSMOS()))
    assert summary["utterances"] == 4 and summary["skipped"] == 0 and summary["scores"]["dnsmos_ovrl"]["count"] == 4, summary


def test_compressed_tars_are_skipped_whole_and_a_nested_json_member_is_one_skip(shards, tmp_path):
    """A .tar.gz (webdataset reads them) holds no byte offsets a row could be read back at: it is skipped, counted,
    with what to do; the plain tars beside it are read as before. A .json member of 100,000 '[' is one sample's
    skip, not a RecursionError that ends the whole shard."""
    import gzip
    import webdataset as wds

    folder, _ = shards
    for name in ("train-000000", "train-000001"):
        (folder / f"{name}.tar.gz").write_bytes(gzip.compress((folder / f"{name}.tar").read_bytes()))
    with wds.TarWriter(str(folder / "train-000002.tar")) as sink:
        sink.write({"__key__": "deep", "flac": encoded(speechlike(1.0, seed=3), 16000, "FLAC"), "json": b"[" * 100_000})
        sink.write({"__key__": "fine", "flac": encoded(speechlike(1.0, seed=4), 16000, "FLAC"), "txt": "fine"})
    summary = shard_corpus("webdataset", f"{folder}/train-{{000000..000002}}.tar{{,.gz}}", tmp_path / "m",
                           license="x")
    assert summary["skipped"] == {"compressed tar": 2, "sample without audio": 1, "unreadable audio": 1,
                                  "unreadable .json": 1}
    assert {s["path"] for s in summary["skipped_examples"] if s["reason"] == "compressed tar"} == {
        "train-000000.tar.gz", "train-000001.tar.gz"}
    assert "gzip" in summary["skipped_examples"][0]["detail"] or any(
        "gzip" in s["detail"] for s in summary["skipped_examples"])
    assert summary["utterances"] == 5  # 3 + 1 from the plain tars, and "fine"


def test_members_webdataset_ignores_are_ignored_and_a_repeated_member_is_one_skip(tmp_path):
    """Member names webdataset's own reader takes no sample from are left out here too, and counted in a note:
    its `__meta__` members, names without a key (`._a.flac`, macOS's AppleDouble files in a tar made there; `README`,
    no dot). A sample that holds one extension twice (webdataset: "duplicate file name", the whole stream stops) is
    one counted skip, not the second member read in place of the first."""
    import tarfile

    import webdataset as wds

    def member(tar, name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    clean = tmp_path / "shards" / "train-000000.tar"
    clean.parent.mkdir()
    with tarfile.open(clean, "w") as tar:
        member(tar, "__index__", b"0 1 2")
        for i, key in enumerate(("a", "b")):
            member(tar, f"._{key}.flac", b"\x00\x05\x16\x07AppleDouble")
            member(tar, f"{key}.flac", encoded(speechlike(1.0, seed=i), 16000, "FLAC"))
            member(tar, f"{key}.txt", f"sample {key}".encode())
        member(tar, "README", b"made on a Mac")
    theirs = [s["__key__"] for s in wds.WebDataset(str(clean), shardshuffle=False)]
    summary = shard_corpus("webdataset", str(clean), tmp_path / "m", license="x")
    assert theirs == ["a", "b"] and sorted(rows_of(tmp_path / "m")) == [f"webdataset/train-000000/{k}" for k in theirs]
    assert summary["skipped"] == {} and summary["notes"] == [
        "4 tar members that webdataset takes no sample from (its __meta__ files, names without a key such as "
        "._a.flac or README), left out: train-000000.tar: __index__, ._a.flac, ._b.flac …"]

    twice = tmp_path / "twice" / "train-000000.tar"
    twice.parent.mkdir()
    with tarfile.open(twice, "w") as tar:
        member(tar, "a.flac", encoded(speechlike(1.0, seed=0), 16000, "FLAC"))
        member(tar, "a.flac", encoded(speechlike(2.0, seed=1), 16000, "FLAC"))
        member(tar, "b.flac", encoded(speechlike(1.0, seed=2), 16000, "FLAC"))
    with pytest.raises(ValueError, match="duplicate file name"):
        list(wds.WebDataset(str(twice), shardshuffle=False))
    summary = shard_corpus("webdataset", str(twice), tmp_path / "t", license="x")
    assert sorted(rows_of(tmp_path / "t")) == ["webdataset/train-000000/b"]
    assert summary["skipped"] == {"member twice in one sample": 1}
    assert summary["skipped_examples"][0]["path"] == "train-000000.tar: a"


def test_a_samples_json_gives_its_transcript_under_the_names_the_hub_uses(tmp_path):
    """`transcription` (FLEURS) and `normalized_text` are transcripts too, as for `shard hf`; Common Voice's
    `client_id` is the speaker."""
    import webdataset as wds

    folder = tmp_path / "shards"
    folder.mkdir()
    with wds.TarWriter(str(folder / "train-000000.tar")) as sink:
        for i, meta in enumerate(({"transcription": "fleurs says", "speaker_id": 7},
                                  {"normalized_text": "normalised", "client_id": "cv-voice"},
                                  # an object where a speaker is read was the speaker "{'name': 'x'}": passed over now,
                                  # as a transcript that is not text is
                                  {"text": {"raw": "x"}, "transcript": "spoken", "speaker": {"name": "x"},
                                   "speaker_id": "spk9"})):
            sink.write({"__key__": f"s{i}", "flac": encoded(speechlike(1.0, seed=i), 16000, "FLAC"), "json": meta})
    shard_corpus("webdataset", str(folder / "train-000000.tar"), tmp_path / "m", license="x")
    rows = rows_of(tmp_path / "m")
    assert [(r["text"], r["speaker"]) for r in rows.values()] == [("fleurs says", "7"), ("normalised", "cv-voice"),
                                                                   ("spoken", "spk9")]


def split_folders(tmp_path, name="wds"):
    """The Hub's layout for a WebDataset dataset: a folder of split folders of numbered tars, as webdataset's
    TarWriter writes them; a hidden folder's tar (datasets reads none) and a card beside them."""
    import shutil

    folder, clips = write_shards(tmp_path)
    root = tmp_path / name
    for split, tars in {"train": ["train-000000.tar", "train-000001.tar"], "validation": ["validation-000000.tar"]}.items():
        (root / split).mkdir(parents=True)
        for n, tar in enumerate(tars):
            shutil.copy(folder / tar, root / split / f"{n:06d}.tar")
    (root / ".cache").mkdir()
    shutil.copy(folder / "train-000000.tar", root / ".cache" / "000000.tar")
    (root / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n")
    return root, clips


def test_a_folder_of_tars_is_read_whole_and_each_tar_takes_its_folders_split(tmp_path):
    """ROOT a folder (the Hub's `validation/000000.tar` layout): every tar under it, in order of their paths, each
    tar's split from its name or the folders between it and ROOT; hidden folders left out, as datasets leaves them.
    It was "corpus root matches no tar files", though the folder held them."""
    from speechinstruct.units.extract import decode_row

    root, clips = split_folders(tmp_path)
    (root / "validation" / "000001.tar").write_bytes(b"not a tar")  # skips name a tar by its path under ROOT
    result = runner.invoke(app, ["shard", "webdataset", str(root), str(tmp_path / "m"), "--license", "CC-BY-4.0", "-q"])
    assert result.exit_code == 0, result.output
    rows = rows_of(tmp_path / "m")
    assert {uid: (r["split"], r["path"]) for uid, r in rows.items()} == {
        **{f"webdataset/train/000000/s00{i}": ("train", "train/000000.tar") for i in range(3)},
        "webdataset/train/000001/w000": ("train", "train/000001.tar"),
        "webdataset/validation/000000/v000": ("validation", "validation/000000.tar")}
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["root"] == str(root.resolve())
    assert {e["path"]: e["reason"] for e in summary["skipped_examples"]} == {
        "train/000000.tar: s003": "sample without audio", "train/000001.tar: w001": "unreadable audio",
        "validation/000001.tar": "truncated or damaged tar"}
    assert np.allclose(decode_row(rows["webdataset/validation/000000/v000"], summary["root"]), clips["v000"], atol=1e-4)

    only_held_out = tmp_path / "held"  # a folder of one split's folder: its split still, not train
    (only_held_out / "validation").mkdir(parents=True)
    (root / "validation" / "000000.tar").rename(only_held_out / "validation" / "000000.tar")
    shard_corpus("webdataset", only_held_out, tmp_path / "h", license="x")
    assert {r["split"] for r in rows_of(tmp_path / "h").values()} == {"validation"}

    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    (empty / ".hidden" / "0.tar").write_bytes(b"")
    result = runner.invoke(app, ["shard", "webdataset", str(empty), str(tmp_path / "e"), "--license", "x", "-q"])
    assert result.exit_code == 2 and "no tar files" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("given", ["pattern", "one tar"])
def test_tars_named_in_a_split_folder_take_its_split(given, tmp_path):
    """`shard webdataset 'data/validation/{000000..000001}.tar'` (or one tar there): the README says a tar's folder
    names its split, but only folders below the tars' common folder were read, so validation audio became
    training data."""
    root, _ = split_folders(tmp_path)
    named = f"{root}/validation/{{000000..000001}}.tar" if given == "pattern" else f"{root}/validation/000000.tar"
    summary = shard_corpus("webdataset", named, tmp_path / "m", license="x")
    assert summary["splits"]["validation"]["utterances"] == 1 and "train" not in summary["splits"], summary["splits"]


def test_a_tar_linked_in_from_outside_a_folder_root_is_a_counted_skip(tmp_path):
    """A folder ROOT is a corpus folder like any other: a tar linked in from outside it is read only with
    --follow-links. (Named in a pattern, a tar is the user's own choice, and read.)"""
    import shutil
    root, _ = split_folders(tmp_path)
    outside = tmp_path / "elsewhere.tar"
    (root / "validation" / "000000.tar").rename(outside)
    (root / "validation" / "000000.tar").symlink_to(outside)
    summary = shard_corpus("webdataset", root, tmp_path / "m", license="x")
    assert summary["skipped"]["a link out of the corpus root (--follow-links reads it)"] == 1
    assert "validation" not in summary["splits"]
    summary = shard_corpus("webdataset", root, tmp_path / "f", license="x", follow_links=True)
    assert summary["splits"]["validation"]["utterances"] == 1

    # a folder of tars linked in (test/ -> a folder elsewhere): listed, as every corpus reader lists linked folders,
    # and read only with --follow-links; its tars named and split by where they are linked in
    elsewhere = tmp_path / "held-out-copy"
    elsewhere.mkdir()
    shutil.copy(outside, elsewhere / "000000.tar")
    (root / "test").symlink_to(elsewhere, target_is_directory=True)
    summary = shard_corpus("webdataset", root, tmp_path / "l", license="x")
    assert summary["skipped"]["a link out of the corpus root (--follow-links reads it)"] == 2
    assert {e["path"] for e in summary["skipped_examples"]} >= {"test/000000.tar", "validation/000000.tar"}
    summary = shard_corpus("webdataset", root, tmp_path / "lf", license="x", follow_links=True)
    assert summary["splits"]["test"]["utterances"] == 1
    assert {r["path"] for r in rows_of(tmp_path / "lf").values() if r["split"] == "test"} == {"test/000000.tar"}


def test_a_folder_with_a_dataset_card_takes_its_license_and_languages_and_says_so(tmp_path):
    """The Hub's WebDataset repos carry a card (README.md) naming their license. `shard webdataset FOLDER` refused
    such a folder without --license, though the license was written beside the tars; it is the card's now, said in
    a note, with the card's languages as `shard hf` takes them. --license still wins; a folder without a card (or a
    pattern) still needs it."""
    root, _ = split_folders(tmp_path)
    (root / "README.md").write_text("---\nlicense: cc-by-4.0\nlanguage:\n- en\n---\n# shards\n")
    result = runner.invoke(app, ["shard", "webdataset", str(root), str(tmp_path / "m"), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {r["license"] for r in rows_of(tmp_path / "m").values()} == {"cc-by-4.0"}
    assert summary["languages"] == ["en"]
    assert "license 'cc-by-4.0': the dataset card's (README.md)" in summary["notes"]
    given = shard_corpus("webdataset", root, tmp_path / "g", license="CC0-1.0")
    assert {r["license"] for r in rows_of(tmp_path / "g").values()} == {"CC0-1.0"} and not given.get("notes")

    (root / "README.md").unlink()
    refused = runner.invoke(app, ["shard", "webdataset", str(root), str(tmp_path / "r"), "-q"])
    assert refused.exit_code == 2 and "needs --license" in refused.output

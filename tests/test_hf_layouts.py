"""`shard hf` on the Hugging Face layouts beyond Parquet file names, read as the maker reads them:
``datasets.load_dataset`` itself gives the rows each test compares with. An audiofolder dataset (audio files beside
metadata.csv/.jsonl/.parquet); a card whose ``configs`` name each config's files (``load_dataset(path, config)``).
Hostile metadata (names that climb or are absolute, URLs, links out, malformed lines) are counted skips naming the
metadata file and row, where ``datasets`` fails the whole dataset."""

import collections
import json
import sys
import types

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import speechlike
from typer.testing import CliRunner

from speechinstruct.cli import app
from speechinstruct.shardfiles import manifest_files
from speechinstruct.sources.decoding import decode_row
from speechinstruct.sources.shard import shard_corpus

runner = CliRunner()


def manifest_rows(folder):
    return [r for f in manifest_files(folder) for r in pq.read_table(f).to_pylist()]


def wav(path, seconds: float, seed: int, fmt: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, speechlike(seconds, seed=seed), 16000, format=fmt)
    return path


def write_metadata(path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)  # as datasets' own users write it
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


def split_folders(root):
    """train/ and test/, each with its metadata.csv; a file in a subfolder named with a backslash (datasets reads
    Windows names), an audio file no metadata row names, transcripts that look like numbers."""
    wav(root / "train" / "a.wav", 1.0, 0)
    wav(root / "train" / "sub" / "b.flac", 1.2, 1, "FLAC")
    wav(root / "train" / "unlisted.wav", 0.6, 2)
    wav(root / "test" / "c.wav", 0.8, 3)
    write_metadata(root / "train" / "metadata.csv", [
        {"file_name": "a.wav", "transcription": "hello there", "speaker": "s1"},
        {"file_name": "sub\\b.flac", "transcription": "007 is back", "speaker": "s2"}])
    write_metadata(root / "test" / "metadata.csv", [{"file_name": "c.wav", "transcription": "bye now", "speaker": "s3"}])


def flat_jsonl(root):
    """One folder, one metadata.jsonl: every file is train."""
    for i in range(3):
        wav(root / "clips" / f"{i}.wav", 0.5 + 0.2 * i, 10 + i)
    write_metadata(root / "metadata.jsonl", [{"file_name": f"clips/{i}.wav", "transcription": f"clip {i}",
                                              "speaker": f"p{i % 2}"} for i in range(3)])


def data_parquet(root):
    """data/train/ and data/validation/ with metadata.parquet, as the docs' second layout; split folder names with
    numbers (datasets' train[-._ 0-9]* patterns)."""
    wav(root / "data" / "train_1" / "x.wav", 0.7, 20)
    wav(root / "data" / "validation" / "y.wav", 0.9, 21)
    write_metadata(root / "data" / "train_1" / "metadata.parquet",
                   [{"file_name": "x.wav", "transcription": "ex", "speaker": "q"}])
    write_metadata(root / "data" / "validation" / "metadata.parquet",
                   [{"file_name": "y.wav", "transcription": "why", "speaker": "r"}])


def load_dataset(monkeypatch, tmp_path, *args, **kwargs) -> datasets.DatasetDict:
    """`datasets.load_dataset(*args, **kwargs)`, its audio left encoded. Its Audio feature imports torchcodec to
    encode even a path (not installed here): a stand-in module lets it store what it is given."""
    for name in ("torchcodec", "torchcodec.encoders"):
        module = types.ModuleType(name)
        module.AudioEncoder = None
        monkeypatch.setitem(sys.modules, name, module)
    loaded = datasets.load_dataset(*args, cache_dir=str(tmp_path / "hf-cache"), **kwargs)
    return datasets.DatasetDict({split: ds.cast_column(column, datasets.Audio(decode=False))
                                 for split, ds in loaded.items() for column, feature in ds.features.items()
                                 if isinstance(feature, datasets.Audio)})


def makers_rows(loaded: datasets.DatasetDict, audio: str = "audio") -> set:
    """(split, file, transcription, speaker) of every row `datasets` gave."""
    return {(split, r[audio]["path"], r["transcription"], r["speaker"]) for split in loaded for r in loaded[split]}


@pytest.mark.parametrize("names", [
    ["test-clean.parquet", "dev-other.parquet", "train-clean-100.parquet"],  # LibriSpeech's parts as file names
    ["data/librispeech-test.parquet", "data/librispeech-train.parquet"],
    ["default/librispeech_asr-test.clean.parquet", "default/librispeech_asr-train.clean.100-00000-of-00002.parquet"],
    ["mydata.parquet"],
    ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
     "data/validation-00000-of-00001-5f6c3c7bd8a2e1f0.parquet"],  # push_to_hub's, an older one's fingerprint
    ["train/0000.parquet", "test/0000.parquet", ".cache/train-00000-of-00001.parquet"],  # the Parquet conversion's
    ["test.parquet", "valid.parquet", "eval_set.parquet"],
    ["data/train-00000-of-00001.parquet", "test.parquet", "default/validation/0000.parquet"],  # two layouts: one read
])
def test_parquet_files_splits_are_those_load_dataset_gives(tmp_path, monkeypatch, names):
    """Which Parquet file is whose split, where no card names them, is `datasets`' decision (its split patterns and
    split words), not a reading of our own: `test-clean.parquet` was a train file here (the name did not fit our
    pattern), and so was the Hub's older Parquet conversion's `default/NAME-test.clean.parquet` (by its folder's
    name), so test audio became training data. (The conversion's current layout, `{split}/0000.parquet`, is named
    by its folders, as the Hub's viewer names its splits: the test of `--revision refs/convert/parquet`.)"""
    from test_sources import hf_rows

    root = tmp_path / "ds"
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(hf_rows(1 + i, 10 * i, name)).cast_column("audio", datasets.Audio()).to_parquet(
            str(root / name))
    loaded = load_dataset(monkeypatch, tmp_path, str(root))
    summary = shard_corpus("hf", root, tmp_path / "m")
    rows = manifest_rows(tmp_path / "m")
    assert sorted((r["corpus_split"], r["text"]) for r in rows) == sorted(
        (split, r["text"]) for split in loaded for r in loaded[split])
    assert {r["split"] for r in rows if "test" in r["corpus_split"]} <= {"test"}
    left = sorted({n for n in names if not n.startswith(".")} - {r["path"] for r in rows})  # said, not lost silently
    assert [n for n in summary.get("notes", []) if "Parquet file" in n] == ([
        f"{len(left)} Parquet file{'s' if len(left) > 1 else ''} that datasets' split patterns leave out (a second "
        f"layout beside the one it reads), left out: {', '.join(left)}"] if left else [])


def test_the_audio_and_text_columns_are_found_where_only_one_can_be_meant_and_said(tmp_path):
    """Common Voice on the Hub names its transcript `sentence`, FLEURS `transcription`, others their audio `speech`:
    where the named column (`audio`, `text` by default) is missing and one column alone can be meant (the one
    `struct<bytes, path>` column, the one of `sentence`/`transcription`/`transcript`/`normalized_text`), it is read,
    and the summary's notes say so; the one of `speaker_id`/`speaker`/`client_id` names the speakers (they were
    all "unknown" without --speaker-column). It was one line asking for --text-column. Two candidates stay that
    line."""
    from test_sources import hf_rows

    root = tmp_path / "cv"
    root.mkdir()
    rows = hf_rows(2, 0, "cv")
    rows["speech"], rows["sentence"], rows["up_votes"] = rows.pop("audio"), rows.pop("text"), [2, 3]
    datasets.Dataset.from_dict(rows).cast_column("speech", datasets.Audio()).to_parquet(str(root / "train.parquet"))
    summary = shard_corpus("hf", root, tmp_path / "m")
    assert sorted((r["text"], r["speaker"]) for r in manifest_rows(tmp_path / "m")) == sorted(
        zip(rows["sentence"], rows["speaker_id"]))
    assert summary["utterances"] == 2 and [n for n in summary["notes"] if "column" in n] == [
        "audio column 'speech': no column 'audio', and 'speech' is the only one holding audio (struct<bytes, path>)",
        "text column 'sentence': no column 'text', and 'sentence' is the only transcript column",
        "speaker column 'speaker_id': the only column naming speakers"]
    both = tmp_path / "both"
    both.mkdir()
    rows["transcription"], rows["client_id"] = list(rows["sentence"]), ["a", "b"]
    datasets.Dataset.from_dict(rows).cast_column("speech", datasets.Audio()).to_parquet(str(both / "train.parquet"))
    result = runner.invoke(app, ["shard", "hf", str(both), str(tmp_path / "b")])
    assert result.exit_code == 2 and "no text column 'text' (columns: " in result.stderr
    assert "sentence" in result.stderr and "transcription" in result.stderr and "Traceback" not in result.output


def test_one_parquet_file_is_a_root_of_its_own(tmp_path):
    """`shard hf data/test-clean.parquet`: one Parquet file (a `Dataset.to_parquet` export, one shard of a Hub
    dataset), read as its folder's dataset holding that file alone, its split by its name (`datasets`' rule; a lone
    file it would call train whatever its name, which would make test audio training data); extract reads it. It
    was "corpus root is not a folder". A file of another kind is one line."""
    from test_sources import arrow_rows, hf_rows

    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import MFCC

    root = tmp_path / "ds"
    (root / "data").mkdir(parents=True)
    for name, seed in (("test-clean", 0), ("train", 10)):
        datasets.Dataset.from_dict(hf_rows(2, seed, name)).cast_column("audio", datasets.Audio()).to_parquet(
            str(root / "data" / f"{name}.parquet"))
    result = runner.invoke(app, ["shard", "hf", str(root / "data" / "test-clean.parquet"), str(tmp_path / "m"), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["root"] == str((root / "data").resolve()) and summary["source"] == str(root / "data" / "test-clean.parquet")
    rows = manifest_rows(tmp_path / "m")
    assert {(r["path"], r["split"], r["corpus"]) for r in rows} == {("test-clean.parquet", "test", "data")}
    assert len(rows) == 2 and extract(tmp_path / "m", tmp_path / "f", MFCC())["utterances"] == 2
    shard_corpus("hf", root / "data", tmp_path / "whole")  # the same rows as in the folder read whole
    whole = [r for r in manifest_rows(tmp_path / "whole") if r["path"] == "test-clean.parquet"]
    assert [{k: v for k, v in r.items()} for r in rows] == whole
    extract(tmp_path / "whole", tmp_path / "wf", MFCC())
    assert arrow_rows(tmp_path / "f")[0] == [r for r in arrow_rows(tmp_path / "wf")[0] if "test-clean" in r["id"]]
    (root / "notes.txt").write_text("not a dataset")
    other = runner.invoke(app, ["shard", "hf", str(root / "notes.txt"), str(tmp_path / "x")])
    assert other.exit_code == 2 and "Traceback" not in other.output and "notes.txt" in other.stderr, other.output


def test_split_names_datasets_refuses_are_one_line_naming_the_folder(tmp_path, monkeypatch):
    """`data/test-clean-00000-of-00001.parquet`: `datasets` refuses a split name outside `\\w+(\\.\\w+)*`, and so
    do we, in one line naming the folder and the way out (it was a train file here, by its folder's name)."""
    from test_sources import hf_rows

    root = tmp_path / "ds"
    (root / "data").mkdir(parents=True)
    for name in ("test-clean", "train"):
        datasets.Dataset.from_dict(hf_rows(1, 0, name)).cast_column("audio", datasets.Audio()).to_parquet(
            str(root / "data" / f"{name}-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match="Split name should match"):
        load_dataset(monkeypatch, tmp_path, str(root))
    result = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "m")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().startswith(f"error: {root}: datasets refuses the split names of its data/{{split}}-")
    assert len(result.stderr.strip().splitlines()) == 1 and "card's configs (data_files)" in result.stderr


@pytest.mark.parametrize("layout", [split_folders, flat_jsonl, data_parquet])
def test_an_audiofolder_shards_as_datasets_reads_it(tmp_path, monkeypatch, layout):
    root = tmp_path / "my_dataset"
    layout(root)
    expected = makers_rows(load_dataset(monkeypatch, tmp_path, "audiofolder", data_dir=str(root)))
    summary = shard_corpus("hf", root, tmp_path / "m", text_column="transcription", speaker_column="speaker")
    rows = manifest_rows(tmp_path / "m")
    assert {(r["corpus_split"], str(root / r["path"]), r["text"], r["speaker"]) for r in rows} == expected
    assert len(rows) == len(expected) and {r["corpus"] for r in rows} == {"my_dataset"}
    assert all(r["split"] == {"train_1": "train"}.get(r["corpus_split"], r["corpus_split"]) for r in rows)
    for row in rows:  # extract's reader: each row's audio, the whole file
        samples = decode_row(row, root)
        assert not isinstance(samples, str) and len(samples) == round(row["duration"] * 16000)
    if layout is split_folders:
        assert summary["utterances"] == 3 and "1 audio file named by no metadata file" in " ".join(summary["notes"])
        assert {r["id"] for r in rows} == {"my_dataset/train/a", "my_dataset/train/sub/b", "my_dataset/test/c"}
        one = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "t"), "--split", "test",
                                  "--text-column", "transcription", "-q"])
        assert one.exit_code == 0 and json.loads(one.stdout)["utterances"] == 1, one.output
        dev = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "d"), "--split", "validation"])
        assert dev.exit_code == 2 and "no split 'validation' in this dataset (it has test, train)" in dev.stderr


def test_a_named_file_name_column_is_the_audio_column_datasets_makes_of_it(tmp_path, monkeypatch):
    """`speech_file_name` in the metadata: datasets' audio column `speech`, ours with --audio-column speech."""
    root = tmp_path / "named"
    wav(root / "a.wav", 0.5, 0)
    wav(root / "b.wav", 0.7, 1)
    write_metadata(root / "metadata.csv", [{"speech_file_name": n, "transcription": t, "speaker": "s"}
                                           for n, t in (("a.wav", "one"), ("b.wav", "two"))])
    expected = makers_rows(load_dataset(monkeypatch, tmp_path, "audiofolder", data_dir=str(root)), audio="speech")
    shard_corpus("hf", root, tmp_path / "m", audio_column="speech", text_column="transcription", speaker_column="speaker")
    rows = manifest_rows(tmp_path / "m")
    assert {(r["corpus_split"], str(root / r["path"]), r["text"], r["speaker"]) for r in rows} == expected
    assert len(rows) == 2
    plain = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "p"), "--text-column", "transcription"])
    assert plain.exit_code == 2 and "no audio file name column 'file_name' or 'audio_file_name'" in plain.stderr


def test_hostile_metadata_rows_are_counted_skips_naming_file_and_row(tmp_path):
    root = tmp_path / "ds"
    outside = wav(tmp_path / "secret.wav", 0.5, 5)
    wav(root / "ok.wav", 0.5, 0)
    wav(root / "numbers.wav", 0.5, 1)
    (root / "notes.txt").write_text("not audio")
    (root / "linked.wav").symlink_to(outside)
    lines = [{"file_name": "ok.wav", "text": "NA"},  # pandas' missing value: text here
             {"file_name": "numbers.wav", "text": "007"},
             {"file_name": "../secret.wav", "text": "climbs"},
             {"file_name": str(outside), "text": "absolute"},
             {"file_name": f"file://{outside}", "text": "a url"},
             {"file_name": "missing.wav", "text": "gone"},
             {"file_name": "notes.txt", "text": "not audio"},
             {"file_name": 12, "text": "a number"},
             {"file_name": "a\x00b.wav", "text": "nul"},
             {"file_name": "linked.wav", "text": "a link out"}]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    text += "{not json\n" + '{"file_name": "ok.wav", "text": "\\ud800"}\n' + "[" * 100_000 + "\n"
    (root / "metadata.jsonl").write_text("\ufeff" + text)  # with a BOM, as Windows editors save it
    result = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "m"), "-q"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    summary = json.loads(result.stdout)
    rows = manifest_rows(tmp_path / "m")
    assert sorted((r["path"], r["text"]) for r in rows) == [("numbers.wav", "007"), ("ok.wav", "NA")]
    assert summary["skipped"] == {"not an audio file name": 5, "missing audio file": 1, "unreadable audio": 1,
                                  "a link out of the corpus root (--follow-links reads it)": 1,
                                  "unreadable metadata line": 3}
    examples = (tmp_path / "m" / "summary.json").read_text()
    for line in (3, 4, 5, 8, 9, 11, 12, 13):
        assert f"metadata.jsonl line {line}" in examples, line
    assert "named by metadata.jsonl line 6" in examples
    followed = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "f"), "--follow-links", "-q"])
    assert followed.exit_code == 0 and json.loads(followed.stdout)["utterances"] == 3, followed.output

    (root / "metadata.jsonl").unlink()  # the same cells in a CSV: text as written, where pandas reads NaN and 7
    (root / "metadata.csv").write_text("file_name,text\nok.wav,NA\nnumbers.wav,007\n")
    shard_corpus("hf", root, tmp_path / "csv")
    assert sorted((r["path"], r["text"]) for r in manifest_rows(tmp_path / "csv")) == [("numbers.wav", "007"), ("ok.wav", "NA")]

    (tmp_path / "own.csv").write_text("file_name,text\nok.wav,a user's own table\n")  # metadata linked in from outside
    (root / "metadata.csv").unlink()
    (root / "metadata.csv").symlink_to(tmp_path / "own.csv")
    linked = shard_corpus("hf", root, tmp_path / "linked")
    assert linked["utterances"] == 0 and linked["skipped"] == {"a link out of the corpus root (--follow-links reads it)": 1}
    assert shard_corpus("hf", root, tmp_path / "linked2", follow_links=True)["utterances"] == 1


def test_audiofolder_metadata_that_cannot_be_used_is_one_line(tmp_path):
    root = tmp_path / "ds"
    wav(root / "train" / "a.wav", 0.5, 0)
    write_metadata(root / "train" / "metadata.csv", [{"file_name": "a.wav", "transcription": "hi"}])
    no_text = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "m")])
    assert no_text.exit_code == 2 and "Traceback" not in no_text.output
    assert "metadata.csv: no column 'text' (columns: file_name, transcription)" in no_text.stderr
    wav(root / "test" / "b.wav", 0.5, 1)
    write_metadata(root / "test" / "metadata.jsonl", [{"file_name": "b.wav", "transcription": "yo"}])
    mixed = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "m2"), "--text-column", "transcription"])
    assert mixed.exit_code == 2 and "metadata files of different kinds (.csv, .jsonl)" in mixed.stderr
    (root / "test" / "metadata.jsonl").unlink()
    (root / "train" / "metadata.csv").write_text('file_name,transcription\na.wav,"never closed\n')
    broken = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "m3"), "--text-column", "transcription", "-q"])
    assert broken.exit_code == 0, broken.output
    summary = json.loads(broken.stdout)  # the test split, without metadata: its audio without transcripts
    assert summary["skipped"] == {"unreadable metadata file": 1} and summary["utterances"] == 1
    assert "split test: no metadata file" in " ".join(summary["notes"])


def test_a_hub_id_kept_as_an_audiofolder_is_fetched_and_every_row_extracted(tmp_path, monkeypatch):
    """`shard hf owner/name` for a Hub repo kept as an audiofolder: the repo's listing read as datasets reads it (its
    split patterns, its builder choice), huggingface_hub's own snapshot_download against the loopback Hub fetches
    the audio and metadata files of the splits (of `--split`'s only), links into the cache's blobs; extract reads
    every row."""
    from hub_server import Hub

    plain = tmp_path / "voices"
    split_folders(plain)
    (plain / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# Voices\n")
    (plain / "notes.txt").write_text("not fetched")
    wav(plain / "test" / "odd [1].wav", 0.5, 9)  # a name with glob characters: fetched as itself
    hub = Hub()
    try:
        hub.serve_huggingface_hub(monkeypatch, cache=tmp_path / "hub-cache")
        hub.add_repo("user/voices", plain)
        one = runner.invoke(app, ["shard", "hf", "user/voices", str(tmp_path / "t"), "--split", "test",
                                  "--text-column", "transcription", "-q"])
        fetched_one = hub.fetched()
        shard = runner.invoke(app, ["shard", "hf", "user/voices", str(tmp_path / "m"), "--text-column", "transcription",
                                    "--speaker-column", "speaker", "-q"])
        fetched = hub.fetched()
        missing = runner.invoke(app, ["shard", "hf", "user/missing", str(tmp_path / "x")])
    finally:
        hub.close()
    gone = runner.invoke(app, ["shard", "hf", "user/voices-2", str(tmp_path / "x")])  # the Hub unreachable
    for result in (missing, gone):
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("error: user/") and "the Hub did not give this dataset" in line, result.stderr
    assert one.exit_code == 0 and json.loads(one.stdout)["utterances"] == 1, one.output
    assert fetched_one == ["README.md", "test/c.wav", "test/metadata.csv", "test/odd [1].wav"]
    assert shard.exit_code == 0 and json.loads(shard.stdout)["utterances"] == 3, shard.output
    assert fetched == sorted([*fetched_one, "train/a.wav", "train/metadata.csv", "train/sub/b.flac",
                              "train/unlisted.wav"])
    rows = manifest_rows(tmp_path / "m")
    assert {(r["id"], r["text"], r["license"]) for r in rows} == {
        ("voices/train/a", "hello there", "cc-by-4.0"), ("voices/train/sub/b", "007 is back", "cc-by-4.0"),
        ("voices/test/c", "bye now", "cc-by-4.0")}
    done = runner.invoke(app, ["extract", str(tmp_path / "m"), str(tmp_path / "f"), "-q"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["utterances"] == 3 and json.loads(done.stdout)["errors"] == 0


def test_a_parquet_dataset_with_audio_files_beside_it_is_read_as_parquet(tmp_path):
    """As datasets picks a folder's builder: the commonest format among the files its splits hold, Parquet on a draw."""
    from test_sources import hub_dataset

    root = hub_dataset(tmp_path / "tiny", corrupt=False)  # data/train-00000-of-00002.parquet …: the splits' files
    for i in range(4):
        wav(root / "samples" / f"{i}.wav", 0.5, i)  # outside data/: no split's
    assert shard_corpus("hf", root, tmp_path / "m")["utterances"] == 8
    flat = tmp_path / "flat"  # one folder, all train: one Parquet file and one clip, a draw
    (flat / "rows.parquet").parent.mkdir()
    (root / "data" / "validation-00000-of-00001.parquet").rename(flat / "rows.parquet")
    wav(flat / "0.wav", 0.5, 0)
    assert shard_corpus("hf", flat, tmp_path / "f")["utterances"] == 2
    wav(flat / "1.wav", 0.5, 1)  # two clips: an audiofolder without metadata
    summary = shard_corpus("hf", flat, tmp_path / "f2")
    assert summary["utterances"] == 2 and "no metadata file" in " ".join(summary["notes"])


LIBRI_CARD = """---
license: cc-by-4.0
configs:
- config_name: clean
  data_files:
  - split: train.100
    path: clean/train.100/*.parquet
  - split: validation
    path: clean/validation/*.parquet
- config_name: other
  data_files:
  - split: validation
    path: other/validation/*.parquet
- config_name: noisy
  data_dir: noisy
---
"""


def configs_dataset(root):
    """LibriSpeech-shaped configs (clean, other): one folder of Parquet files per config and split, the card's
    `configs` naming them, no default config; and a config kept as an audiofolder under its `data_dir`."""
    from test_sources import hf_rows

    for config, split, seed in (("clean", "train.100", 0), ("clean", "validation", 10), ("other", "validation", 20)):
        (root / config / split).mkdir(parents=True)
        rows = hf_rows(2, seed, f"{config} {split}")
        rows["transcription"], rows["speaker"] = rows.pop("text"), rows.pop("speaker_id")
        datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio()).to_parquet(
            str(root / config / split / "0000.parquet"))
    split_folders(root / "noisy")
    (root / "README.md").write_text(LIBRI_CARD)
    return root


@pytest.mark.parametrize("config", ["clean", "other"])
def test_a_cards_configs_pick_the_files_as_load_dataset_does(tmp_path, monkeypatch, config):
    root = configs_dataset(tmp_path / "libri")
    (root / "README.md").write_text(LIBRI_CARD.split("- config_name: noisy")[0] + "---\n")  # datasets: one builder
    loaded = load_dataset(monkeypatch, tmp_path, str(root), config)
    shard_corpus("hf", root, tmp_path / "m", config=config, text_column="transcription", speaker_column="speaker")
    rows = manifest_rows(tmp_path / "m")
    assert sorted((r["corpus_split"], r["text"], r["speaker"]) for r in rows) == sorted(
        (split, r["transcription"], r["speaker"]) for split in loaded for r in loaded[split])
    assert all(r["path"].startswith(f"{config}/") for r in rows)
    assert {r["split"] for r in rows} == ({"validation"} if config == "other" else {"validation", "train"})


def test_a_default_config_with_a_data_dir_is_read_as_load_dataset_reads_it(tmp_path, monkeypatch):
    root = tmp_path / "voices"
    split_folders(root / "noisy")
    flat_jsonl(root / "quiet")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: quiet\n  data_dir: quiet\n- config_name: noisy\n"
                                    "  data_dir: noisy\n  default: true\n---\n")
    expected = makers_rows(load_dataset(monkeypatch, tmp_path, str(root)))  # the default config: noisy
    summary = shard_corpus("hf", root, tmp_path / "m", text_column="transcription", speaker_column="speaker")
    rows = manifest_rows(tmp_path / "m")
    assert {(r["corpus_split"], str(root / r["path"]), r["text"], r["speaker"]) for r in rows} == expected
    assert len(rows) == 3 and all(r["path"].startswith("noisy/") for r in rows)
    assert "config 'noisy': the dataset card's default config" in summary["notes"]  # inferred: said


def test_a_config_to_pick_is_one_line_naming_them(tmp_path):
    root = configs_dataset(tmp_path / "libri")
    none = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "m")])
    assert none.exit_code == 2 and "Traceback" not in none.output
    assert "the dataset card names configs clean, other, noisy and no default one: pick one with --config" in none.stderr
    unknown = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "m"), "--config", "all"])
    assert unknown.exit_code == 2 and "no config 'all' in the dataset card (it names clean, other, noisy)" in unknown.stderr
    split = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "m"), "--config", "other", "--split", "test"])
    assert split.exit_code == 2 and "no split 'test' in this dataset (it has validation)" in split.stderr
    (root / "README.md").write_text(LIBRI_CARD.replace("data_dir: noisy", "data_dir: ../elsewhere"))
    climbs = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "m"), "--config", "noisy"])
    assert climbs.exit_code == 2 and "README.md: path '../elsewhere' leaves the corpus root" in climbs.stderr
    (root / "README.md").write_text(LIBRI_CARD.replace("- split: train.100", "- split: 7"))
    broken = runner.invoke(app, ["shard", "hf", str(root), str(tmp_path / "m"), "--config", "clean"])
    assert broken.exit_code == 2 and "README.md: its configs cannot be read" in broken.stderr, broken.output
    plain = tmp_path / "plain"
    split_folders(plain)
    no_configs = runner.invoke(app, ["shard", "hf", str(plain), str(tmp_path / "p"), "--config", "clean"])
    assert no_configs.exit_code == 2 and "no config 'clean': the dataset card names no configs" in no_configs.stderr


def test_a_hub_id_with_configs_fetches_that_configs_split_only(tmp_path, monkeypatch):
    """`shard hf owner/name --config clean --split validation` on a repo with LibriSpeech-shaped configs: the card
    first, then only that config's split (a full copy of such a repo would be every config's audio)."""
    from hub_server import Hub

    plain = configs_dataset(tmp_path / "libri")
    hub = Hub()
    try:
        hub.serve_huggingface_hub(monkeypatch, cache=tmp_path / "hub-cache")
        hub.add_repo("user/libri", plain)
        shard = runner.invoke(app, ["shard", "hf", "user/libri", str(tmp_path / "m"), "--config", "clean", "--split",
                                    "validation", "--text-column", "transcription", "-q"])
        fetched = hub.fetched()
        noisy = runner.invoke(app, ["shard", "hf", "user/libri", str(tmp_path / "n"), "--config", "noisy",
                                    "--text-column", "transcription", "-q"])
    finally:
        hub.close()
    assert shard.exit_code == 0 and json.loads(shard.stdout)["utterances"] == 2, shard.output
    assert sorted(set(fetched)) == ["README.md", "clean/validation/0000.parquet"]
    assert noisy.exit_code == 0 and json.loads(noisy.stdout)["utterances"] == 3, noisy.output


def test_a_dataset_repos_url_fetches_what_its_hub_id_would_and_a_machine_without_the_files_fetches_them(
        tmp_path, monkeypatch):
    """A recipe names a Hub dataset by its URL, `hf://datasets/owner/name[@rev]`: the card first, then the config's
    split alone, as for the hub id (a copy of the whole repo would be every config's audio); the same at the Hub's
    Parquet branch, written as the Hub writes it (`@refs%2Fconvert%2Fparquet`). A folder inside the repo is copied
    as any URL is. A machine without the downloaded files (a Ray node, a job-array task elsewhere) fetches each file
    its rows name into the same cache path when it reads them."""
    import huggingface_hub.utils._http
    from hub_server import Hub
    from test_sources import arrow_rows, hf_rows

    from speechinstruct.sources import storage
    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import MFCC

    plain = configs_dataset(tmp_path / "libri")
    converted = tmp_path / "converted"
    (converted / "en" / "validation").mkdir(parents=True)
    rows = hf_rows(2, 30, "en validation")
    rows["transcription"] = rows.pop("text")
    datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio()).to_parquet(
        str(converted / "en" / "validation" / "0000.parquet"))
    hub = Hub()
    try:
        hub.serve_huggingface_hub(monkeypatch, cache=tmp_path / "hub-cache")
        monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "copies"))
        hub.add_repo("user/libri", plain)
        hub.add_repo("user/libri", converted, branch="refs/convert/parquet")
        options = {"split": "validation", "text_column": "transcription"}
        fetched = [[]]  # what each step downloaded

        def step(result):
            fetched.append(sorted((collections.Counter(hub.fetched()) - collections.Counter(sum(fetched, []))).elements()))
            return result

        clean = step(shard_corpus("hf", "hf://datasets/user/libri", tmp_path / "m", config="clean", **options))
        other = step(shard_corpus("hf", "hf://datasets/user/libri@main/", tmp_path / "o", config="other", **options))
        branch = step(shard_corpus("hf", "hf://datasets/user/libri@refs%2Fconvert%2Fparquet", tmp_path / "b",
                                   config="en", **options))
        folder = step(shard_corpus("hf", "hf://datasets/user/libri/clean", tmp_path / "f",
                                   **{**options, "split": "train.100"}))
        step(None)
    finally:
        hub.close()
    gone = tmp_path / "hub-cache"  # this machine never downloaded them: extract fetches the rows' files
    for path in sorted(gone.rglob("*"), reverse=True):
        path.unlink() if not path.is_dir() or path.is_symlink() else path.rmdir()
    # first with the Hub down (huggingface_hub tries each file 6 times, its waits skipped here): every row an
    # error that may pass, the stage not finished; then with the Hub back, the rerun finishes it
    monkeypatch.setattr(huggingface_hub.utils._http, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    down = runner.invoke(app, ["extract", str(tmp_path / "m"), str(tmp_path / "mf"), "-q"])
    errors = [json.loads(line) for line in (tmp_path / "mf" / "errors-00000.jsonl").read_text().splitlines()]
    hub = Hub()
    try:
        hub.serve_huggingface_hub(monkeypatch, cache=tmp_path / "hub-cache")
        hub.add_repo("user/libri", plain)
        back = runner.invoke(app, ["extract", str(tmp_path / "m"), str(tmp_path / "mf"), "-q"])
        back_folder = runner.invoke(app, ["extract", str(tmp_path / "f"), str(tmp_path / "ff"), "-q"])
        refetched = hub.fetched()
    finally:
        hub.close()
    _, fetched_clean, fetched_other, fetched_branch, fetched_folder, _ = fetched
    assert clean["utterances"] == 2 and clean["remote"] == "hf://datasets/user/libri"
    assert fetched_clean == ["README.md", "clean/validation/0000.parquet"]
    assert other["utterances"] == 2 and fetched_other == ["other/validation/0000.parquet"]
    assert branch["utterances"] == 2 and fetched_branch == ["en/validation/0000.parquet"]
    assert {r["corpus"] for r in manifest_rows(tmp_path / "m") + manifest_rows(tmp_path / "b")} == {"libri"}
    # a folder inside the repo: its split's files alone, into huggingface_hub's cache, the corpus named by the
    # folder (as the copy named it: `clean` and `other` keep apart)
    assert folder["utterances"] == 2 and fetched_folder == ["clean/train.100/0000.parquet"]
    assert folder["root"].startswith(str(tmp_path / "hub-cache")) and folder["root"].endswith("/clean")
    assert {r["corpus"] for r in manifest_rows(tmp_path / "f")} == {"clean"}
    assert down.exit_code == 2 and "Traceback" not in down.output, down.output
    assert "may pass" in down.output.strip().splitlines()[-1] and json.loads(down.stdout)["utterances"] == 0
    assert len(errors) == 2 and all(e["may_pass"] and "cannot reach the Hub" in e["reason"] for e in errors), errors
    assert back.exit_code == 0 and json.loads(back.stdout)["utterances"] == 2, back.output
    assert back_folder.exit_code == 0 and json.loads(back_folder.stdout)["utterances"] == 2, back_folder.output
    assert refetched == ["clean/train.100/0000.parquet", "clean/validation/0000.parquet"]
    shard_corpus("hf", plain, tmp_path / "local", config="clean", **options)
    extract(tmp_path / "local", tmp_path / "lf", MFCC())
    assert arrow_rows(tmp_path / "mf") == arrow_rows(tmp_path / "lf")  # ids, splits and frames alike


def test_a_repo_url_the_hub_fails_to_resolve_for_a_while_is_one_line_not_a_copy_of_the_whole_repo(tmp_path, monkeypatch):
    """The Hub not answering while the URL is read (a dropped connection) is the storage's one line, that a rerun
    may pass; the URL is not then copied whole (every config's audio) as if it named no repo. The repo's file list
    dropped is one line too."""
    import importlib
    import importlib.util

    from huggingface_hub import HfApi, HfFileSystem
    from hub_server import Hub

    from speechinstruct.sources import storage

    plain = configs_dataset(tmp_path / "libri")
    hub = Hub()
    calls = []

    def dropped(self, path, revision=None):  # the first call only: the Hub answers again right after
        calls.append(path)
        if len(calls) == 1:
            raise ConnectionError("Connection reset by peer")
        return resolve(self, path, revision)

    resolve = HfFileSystem.resolve_path

    try:
        hub.serve_huggingface_hub(monkeypatch, cache=tmp_path / "hub-cache")
        monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "copies"))
        hub.add_repo("user/libri", plain)
        with monkeypatch.context() as m:
            m.setattr(HfFileSystem, "resolve_path", dropped)
            with pytest.raises(storage.StorageError, match=r"^hf://datasets/user/libri: cannot reach the storage") as e:
                shard_corpus("hf", "hf://datasets/user/libri", tmp_path / "m", config="clean", split="validation",
                             text_column="transcription")
        fetched = hub.fetched()
        # the repo's file list dropped (huggingface_hub's transport raises neither OSError nor ValueError): one line
        transport = importlib.import_module(next(m for m in ("httpx2", "httpx") if importlib.util.find_spec(m)))

        def refused(*args, **kwargs):
            raise transport.ConnectError("[Errno 111] Connection refused")

        monkeypatch.setattr(HfApi, "list_repo_files", refused)
        listing = runner.invoke(app, ["shard", "hf", "hf://datasets/user/libri/clean", str(tmp_path / "l")])
    finally:
        hub.close()
    assert len(calls) == 1 and e.value.may_pass and fetched == []
    assert listing.exit_code == 2 and listing.output.strip().splitlines()[-1] == (
        "error: user/libri: the Hub did not give this dataset: [Errno 111] Connection refused"), listing.output


def test_the_hubs_web_address_of_a_dataset_is_read_as_its_hf_url_and_said(tmp_path, monkeypatch):
    """A dataset's page on the Hub, pasted from a browser (`https://huggingface.co/datasets/owner/name`, a folder's
    `…/tree/REV/folder`), is read as its `hf://` URL (and fetched as that is, its split alone), and said; before,
    it went to fsspec's HTTP file system, which lists a web page's links. A file's address (`…/resolve/…`, which
    HTTP reads as it is) and other sites' are left alone."""
    from hub_server import Hub

    from speechinstruct.sources.corpora.hf import hub_url

    site = "https://huggingface.co/datasets"
    assert hub_url(f"{site}/openslr/librispeech_asr") == "hf://datasets/openslr/librispeech_asr"
    assert hub_url(f"{site}/openslr/librispeech_asr/") == "hf://datasets/openslr/librispeech_asr"
    assert hub_url(f"{site}/o/n/tree/main") == "hf://datasets/o/n@main"
    assert hub_url(f"{site}/o/n/tree/main/clean/train.100?not-a-path=1") == "hf://datasets/o/n@main/clean/train.100"
    assert hub_url(f"{site}/o/n/tree/refs%2Fconvert%2Fparquet/en") == "hf://datasets/o/n@refs%2Fconvert%2Fparquet/en"
    assert hub_url(f"{site}/o/n/tree/main/two%20words") == "hf://datasets/o/n@main/two words"
    for other in (f"{site}/o/n/resolve/main/data/train.parquet", f"{site}/o/n/blob/main/README.md", f"{site}/o",
                  "https://huggingface.co/openai/whisper-tiny", "https://example.com/datasets/o/n", "s3://b/k",
                  f"{site}/o/n/tree/main/a%00b", f"{site}/o/n/tree/main/%ED%A0%80"):  # no names: HTTP's, as given
        assert hub_url(other) is None, other

    plain = configs_dataset(tmp_path / "libri")
    hub = Hub()
    try:
        hub.serve_huggingface_hub(monkeypatch, cache=tmp_path / "hub-cache")
        hub.add_repo("user/libri", plain)
        page = f"{hub.url}/datasets/user/libri/tree/main/clean"  # the Hub at HF_ENDPOINT, as a mirror's users have it
        result = runner.invoke(app, ["shard", "hf", page, str(tmp_path / "m"), "--split", "validation",
                                     "--text-column", "transcription"])
        fetched = hub.fetched()
    finally:
        hub.close()
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["utterances"] == 2 and summary["remote"] == "hf://datasets/user/libri@main/clean"
    assert summary["inferred"] == [f"hf://datasets/user/libri@main/clean (the Hub's web address {page})"]
    assert fetched == ["clean/validation/0000.parquet"]


def test_a_recipes_hub_id_is_read_as_its_url_and_said(tmp_path, monkeypatch):
    """`root: owner/name` for an hf corpus, where no such folder is: the hub id, as `shard hf` takes it, read as
    `hf://datasets/owner/name` and said among the recipe's inferred settings. A folder of that name is a folder;
    any other source's root stays a path that must exist."""
    import yaml

    from speechinstruct.recipe import RecipeError, load_recipe

    def recipe(name: str, root: str):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": "r", "demo_corpus": None, "corpora": [
            {"name": name, "root": root, "options": {"config": "clean"} if name == "hf" else {}}]}))
        return path

    monkeypatch.chdir(tmp_path)
    loaded = load_recipe(recipe("hf", "openslr/librispeech_asr"))
    assert loaded["corpora"][0]["root"] == "hf://datasets/openslr/librispeech_asr"
    assert loaded["inferred"] == ["corpora[0].root: hf://datasets/openslr/librispeech_asr (the hub id "
                                  "openslr/librispeech_asr; no such folder here)"]
    (tmp_path / "openslr" / "librispeech_asr").mkdir(parents=True)
    assert load_recipe(recipe("hf", "openslr/librispeech_asr"))["corpora"][0]["root"] == "openslr/librispeech_asr"
    with pytest.raises(RecipeError, match=r"corpora\[0\]\.root: librispeech root 'openslr/other' is not a folder"):
        load_recipe(recipe("librispeech", "openslr/other"))
    with pytest.raises(RecipeError, match=r"corpora\[0\]\.root: hf root 'corpora/a/b' is neither a folder nor a Parquet"):
        load_recipe(recipe("hf", "corpora/a/b"))  # not a hub id: two parts only
    page = "https://huggingface.co/datasets/openslr/librispeech_asr/tree/main/clean"
    loaded = load_recipe(recipe("hf", page))
    assert loaded["corpora"][0]["root"] == "hf://datasets/openslr/librispeech_asr@main/clean"
    assert loaded["inferred"] == [f"corpora[0].root: hf://datasets/openslr/librispeech_asr@main/clean (the Hub's web "
                                  f"address {page})"]


def test_a_webdataset_repo_is_one_line_saying_how_to_read_it_and_that_way_works(tmp_path, monkeypatch):
    """A dataset kept as WebDataset tar shards (datasets' webdataset builder) is not `shard hf`'s: one line naming
    `shard webdataset` and the shards, locally and for a hub id (before any shard is downloaded); the command it
    suggests reads the repo."""
    from hub_server import Hub
    from test_webdataset import write_shards

    from speechinstruct.sources import storage

    folder, _ = write_shards(tmp_path)  # train-000000.tar, train-000001.tar, validation-000000.tar
    (folder / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n")
    local = runner.invoke(app, ["shard", "hf", str(folder), str(tmp_path / "l")])
    assert local.exit_code == 2 and "Traceback" not in local.output
    assert f"a WebDataset dataset (3 tar shards, train-000000.tar … validation-000000.tar): read it with `shard " \
           f"webdataset '{folder}'` (every tar under it)" in local.stderr
    as_said = runner.invoke(app, ["shard", "webdataset", str(folder), str(tmp_path / "s"), "--license", "cc-by-4.0", "-q"])
    assert as_said.exit_code == 0 and json.loads(as_said.stdout)["utterances"] == 5, as_said.output
    hub = Hub()
    try:
        hub.serve_huggingface_hub(monkeypatch, cache=tmp_path / "hub-cache")
        monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "copies"))
        hub.add_repo("user/shards", folder)
        refused = runner.invoke(app, ["shard", "hf", "user/shards", str(tmp_path / "m")])
        fetched = hub.fetched()
        suggested = runner.invoke(app, ["shard", "webdataset", "hf://datasets/user/shards", str(tmp_path / "w"),
                                        "--license", "cc-by-4.0", "-q"])
        some = runner.invoke(app, ["shard", "webdataset", "hf://datasets/user/shards/train-{000000..000001}.tar",
                                   str(tmp_path / "some"), "--license", "cc-by-4.0", "-q"])
    finally:
        hub.close()
    assert refused.exit_code == 2 and "`shard webdataset 'hf://datasets/user/shards'`" in refused.stderr
    assert fetched == ["README.md"]
    assert suggested.exit_code == 0, suggested.output
    assert json.loads(suggested.stdout)["splits"] == json.loads(as_said.stdout)["splits"]  # the whole repo, as locally
    assert some.exit_code == 0 and json.loads(some.stdout)["utterances"] == 4, some.output


def test_the_hubs_parquet_conversion_is_read_from_its_branch_one_config_and_split(tmp_path, monkeypatch):
    """A dataset whose data the Hub keeps as Parquet only on its `refs/convert/parquet` branch (a script-era
    dataset), one folder per config there, `{config}/{split}/0000.parquet` or `partial-{split}` where the Hub
    converted a part: `--revision` reads that branch, `--config` one config's folder, `--split` one split, and
    only that split's files are fetched."""
    from hub_server import Hub
    from test_sources import hf_rows

    converted = tmp_path / "converted"
    for config, split, seed in (("en", "partial-train", 0), ("en", "validation", 10), ("fr", "validation", 20)):
        (converted / config / split).mkdir(parents=True)
        datasets.Dataset.from_dict(hf_rows(2, seed, f"{config} {split}")).cast_column("audio", datasets.Audio()).to_parquet(
            str(converted / config / split / "0000.parquet"))
    main = tmp_path / "main"
    (main / "cv.py").parent.mkdir()
    (main / "cv.py").write_text("# a loading script: datasets 4 and later no longer run these\n")
    (main / "README.md").write_text("---\nlicense: cc0-1.0\n---\n")
    hub = Hub()
    try:
        hub.serve_huggingface_hub(monkeypatch, cache=tmp_path / "hub-cache")
        hub.add_repo("user/cv", main)
        hub.add_repo("user/cv", converted, branch="refs/convert/parquet")
        on_main = runner.invoke(app, ["shard", "hf", "user/cv", str(tmp_path / "x")])
        one = runner.invoke(app, ["shard", "hf", "user/cv", str(tmp_path / "m"), "--revision", "refs/convert/parquet",
                                  "--config", "en", "--split", "validation", "-q"])
        fetched = hub.fetched()
        train = runner.invoke(app, ["shard", "hf", "user/cv", str(tmp_path / "t"), "--revision", "refs/convert/parquet",
                                    "--config", "en", "-q"])
    finally:
        hub.close()
    assert on_main.exit_code == 2 and "user/cv: no data files, but a loading script" in on_main.stderr
    assert "read with --revision refs/convert/parquet (a URL: hf://datasets/user/cv@refs%2Fconvert%2Fparquet) and " \
           "--config NAME, one of its folders" in " ".join(on_main.stderr.split())
    assert one.exit_code == 0 and json.loads(one.stdout)["utterances"] == 2, one.output
    assert fetched == ["README.md", "en/validation/0000.parquet"]
    assert {r["corpus_split"] for r in manifest_rows(tmp_path / "m")} == {"validation"}
    assert train.exit_code == 0, train.output
    summary = json.loads(train.stdout)
    assert summary["utterances"] == 4 and summary["splits"]["train"]["corpus_splits"] == {"partial-train": 2}
    assert {r["corpus"] for r in manifest_rows(tmp_path / "t")} == {"cv"}
    local = runner.invoke(app, ["shard", "hf", str(converted), str(tmp_path / "l"), "--revision", "main"])
    assert local.exit_code == 2 and "--revision is for `shard hf` with a hub id" in local.stderr
    assert shard_corpus("hf", converted, tmp_path / "fr", config="fr")["utterances"] == 2  # a local copy of the branch


def test_hub_patterns_fetch_exactly_the_wanted_files_in_few_patterns():
    """huggingface_hub's own filter (what snapshot_download runs) on the patterns: the wanted files, no others, and a
    folder's one pattern where it is wanted whole (a pattern a file would make snapshot_download test N x N)."""
    from huggingface_hub.utils import filter_repo_objects

    from speechinstruct.sources.corpora.hf import hub_patterns

    listed = [f"train/spk{i % 50}/{i}.flac" for i in range(3000)] + [f"test/spk{i % 5}/{i}.flac" for i in range(300)]
    listed += ["train/metadata.csv", "test/metadata.csv", "README.md", ".gitattributes", "test/odd [1]*?.wav",
               "test/spk10/x.flac", "test1/y.flac"]
    for wanted in ([n for n in listed if n.startswith("test/")],
                   [n for n in listed if n.startswith("test/spk1/")] + ["train/spk3/3.flac", "test/odd [1]*?.wav"]):
        patterns = hub_patterns(wanted, listed)
        assert sorted(filter_repo_objects(listed, allow_patterns=patterns)) == sorted(wanted) and len(patterns) <= 3


def test_a_metadata_cell_that_is_a_json_object_or_array_is_no_transcript_or_speaker(tmp_path):
    """A metadata.jsonl line whose `text` was an object became the transcript "{'a': 1}", Python's spelling of it,
    and trained on as such (`speaker` and an id column alike). Such a line is a counted skip naming the line and
    the column; numbers stay text ("007" as written, 12 as "12")."""
    root = tmp_path / "af"
    for name in ("obj", "arr", "spk", "num", "ok"):
        wav(root / f"{name}.wav", 0.5, len(name))
    write_metadata(root / "metadata.jsonl", [
        {"file_name": "obj.wav", "text": {"a": 1}, "speaker": "s"},
        {"file_name": "arr.wav", "text": ["two", "readings"], "speaker": "s"},
        {"file_name": "spk.wav", "text": "fine", "speaker": {"id": 3}},
        {"file_name": "num.wav", "text": 12, "speaker": 7},
        {"file_name": "ok.wav", "text": "hello", "speaker": "s"}])
    summary = shard_corpus("hf", root, tmp_path / "m", speaker_column="speaker")
    rows = {r["path"]: (r["text"], r["speaker"]) for r in manifest_rows(tmp_path / "m")}
    assert rows == {"num.wav": ("12", "7"), "ok.wav": ("hello", "s")}
    assert {(e["path"], e["detail"]) for e in summary["skipped_examples"] if e["reason"] == "a cell that is not text"} == {
        ("metadata.jsonl line 1", "text: a JSON object"), ("metadata.jsonl line 2", "text: a JSON array"),
        ("metadata.jsonl line 3", "speaker: a JSON object")}


def test_a_parquet_struct_transcript_is_a_counted_skip_and_a_null_id_cell_the_rows_own_id(tmp_path):
    """The same in a Parquet file: a struct column read as the transcript is "a cell that is not text" for each row;
    a null cell of --id-column gave the id "None" (two of them: one a duplicate), the row's own id now."""
    from test_sources import flac_bytes

    root = tmp_path / "pq"
    write_metadata(root / "data" / "train-00000-of-00001.parquet", [
        {"audio": {"bytes": flac_bytes(0.5, i), "path": f"{i}.flac"}, "text": f"clip {i}", "notes": {"raw": "x"},
         "id": None if i < 2 else f"u{i}"} for i in range(3)])
    summary = shard_corpus("hf", root, tmp_path / "m", id_column="id")
    assert sorted(r["id"] for r in manifest_rows(tmp_path / "m")) == [
        "pq/data/train-00000-of-00001/000000", "pq/data/train-00000-of-00001/000001", "pq/u2"]
    summary = shard_corpus("hf", root, tmp_path / "n", text_column="notes")
    assert summary["utterances"] == 0 and summary["skipped"] == {"a cell that is not text": 3}

"""Sources as an attacker or a careless tool writes them (issue 25): data files named outside ROOT, metadata of
the wrong JSON type, lhotse manifests that are not gzip, cut short or hold wrong types, markup in a card, a
BOM in wav.scp, NaN transcripts, plain binary audio columns. Each is one clear line naming the file, or a
counted skip with its reason; never a traceback, never a foreign file's rows in the manifest."""

import gzip
import json
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import speechlike
from test_sources import flac_bytes, hf_rows
from typer.testing import CliRunner

from speechinstruct.cli import app
from speechinstruct import recipe as sections
from speechinstruct.units.extract import decode_row
from speechinstruct.sources.shard import shard_corpus
from speechinstruct.shardfiles import manifest_files

runner = CliRunner()


def manifest_rows(folder):
    return [r for f in manifest_files(folder) for r in pq.read_table(f).to_pylist()]


def shard_cli(*args):
    result = runner.invoke(app, ["shard", *map(str, args), "-q"])
    assert "Traceback" not in result.output and not isinstance(result.exception, (TypeError, AttributeError, KeyError))
    return result


def saved(tmp_path, name="saved"):
    """A DatasetDict written by `datasets`' own save_to_disk, and a secret split beside it (outside ROOT)."""
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict(hf_rows(2, 0, "train"))})
    ds.save_to_disk(str(tmp_path / name))
    secret = datasets.Dataset.from_dict({**hf_rows(1, 50, "secret"), "text": ["the secret transcript"]})
    secret.save_to_disk(str(tmp_path / "outside"))
    return tmp_path / name


def test_save_to_disk_metadata_naming_files_outside_root_is_refused(tmp_path):
    root = saved(tmp_path)
    # a split folder outside ROOT
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "../outside"]}))
    result = shard_cli("hf", root, tmp_path / "m1")
    assert result.exit_code == 2 and "dataset_dict.json" in result.stderr and "leaves the corpus root" in result.stderr
    assert not (tmp_path / "m1").exists() or not list((tmp_path / "m1").glob("manifest-*"))
    # a data file outside ROOT named by a split's state.json
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    state = json.loads((root / "train" / "state.json").read_text())
    arrow = next((tmp_path / "outside").glob("*.arrow")).name
    state["_data_files"] = [{"filename": f"../../outside/{arrow}"}]
    (root / "train" / "state.json").write_text(json.dumps(state))
    result = shard_cli("hf", root, tmp_path / "m2")
    assert result.exit_code == 2 and "train/state.json" in result.stderr and "leaves the corpus root" in result.stderr
    # an absolute name, and a symlink leading out
    state["_data_files"] = [{"filename": str(tmp_path / "outside" / arrow)}]
    (root / "train" / "state.json").write_text(json.dumps(state))
    assert "absolute path" in shard_cli("hf", root, tmp_path / "m3").stderr
    state["_data_files"] = [{"filename": "link.arrow"}]
    (root / "train" / "state.json").write_text(json.dumps(state))
    (root / "train" / "link.arrow").symlink_to(tmp_path / "outside" / arrow)
    result = shard_cli("hf", root, tmp_path / "m4")
    assert result.exit_code == 2 and "leaves the corpus root" in result.stderr
    for m in ("m1", "m2", "m3", "m4"):
        rows = manifest_rows(tmp_path / m) if list((tmp_path / m).glob("manifest-*")) else []
        assert not any(r["text"] == "the secret transcript" for r in rows)


@pytest.mark.parametrize("file, content, message", [
    ("dataset_dict.json", "[1, 2]", "must be a JSON object, got list"),
    ("dataset_dict.json", '{"splits": "train"}', "'splits' must be a list of split names"),
    ("dataset_dict.json", '{"splits": [1]}', "'splits' must be a list of split names"),
    ("dataset_dict.json", '{"splits": ["train",}', "not valid JSON"),
    ("train/state.json", "[1, 2]", "must be a JSON object, got list"),
    ("train/state.json", '{"_data_files": ["data-00000-of-00001.arrow"]}', "'_data_files' must be a list of"),
    ("train/state.json", '{"_data_files": [{"filename": 7}]}', "7 is not a file or folder name"),
    ("train/state.json", '{"_data_files": [{"filename": "a.arrow"},}', "not valid JSON"),
])
def test_save_to_disk_metadata_of_the_wrong_shape_is_one_line_naming_the_file(tmp_path, file, content, message):
    root = saved(tmp_path)
    (root / file).write_text(content)
    result = shard_cli("hf", root, tmp_path / "m")
    assert result.exit_code == 2, result.output
    assert file.split("/")[-1] in result.stderr and message in result.stderr


def test_single_split_save_to_disk_with_a_wrong_dataset_info(tmp_path):
    datasets.Dataset.from_dict(hf_rows(2, 0, "train")).save_to_disk(str(tmp_path / "one"))
    (tmp_path / "one" / "dataset_info.json").write_text("[]")
    result = shard_cli("hf", tmp_path / "one", tmp_path / "m")
    assert result.exit_code == 2 and "dataset_info.json: must be a JSON object, got list" in result.stderr
    (tmp_path / "one" / "dataset_info.json").write_text('{"split": 3}')
    assert "'split' must be a name, got 3" in shard_cli("hf", tmp_path / "one", tmp_path / "m").stderr


def hub_folder(tmp_path, card: str, table: pa.Table):
    root = tmp_path / "ds"
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text(card)
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
    return root


def test_card_values_that_are_not_text_or_hold_markup_are_not_taken(tmp_path):
    table = pa.table({"audio": [{"bytes": flac_bytes(1.0, 0), "path": "a.flac"}], "text": ["hi"]})
    card = "---\nlicense: other\nlicense_name: <script>alert(1)</script>\nlanguage: 5\n---\n# x\n"
    root = hub_folder(tmp_path, card, table)
    result = shard_cli("hf", root, tmp_path / "m")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["languages"] == []
    assert "<script>" not in manifest_rows(tmp_path / "m")[0]["license"]
    (root / "README.md").write_text('---\nlicense: cc-by-4.0\nlanguage: ["en", "<img src=x onerror=alert(1)>", 3]\n---\n')
    summary = json.loads(shard_cli("hf", root, tmp_path / "m").stdout)
    assert summary["languages"] == ["en"] and manifest_rows(tmp_path / "m")[0]["license"] == "cc-by-4.0"


def test_nan_transcripts_binary_audio_and_skip_details_are_what_they_are(tmp_path):
    """A NaN transcript (pandas' missing value) is no transcript, not the text "nan"; a plain `binary` column of
    FLAC bytes is audio; an unreadable row's detail names the row, not a Python object's address."""
    good, other = flac_bytes(1.0, 0), flac_bytes(1.2, 1)
    table = pa.table({"audio": pa.array([good, other, b"not audio at all"], pa.binary()),
                      "text": pa.array([float("nan"), 2.0, 1.0])})
    root = hub_folder(tmp_path, "---\nlicense: cc0-1.0\n---\n", table)
    summary = shard_corpus("hf", root, tmp_path / "m")
    rows = manifest_rows(tmp_path / "m")
    assert [r["text"] for r in rows] == [None, "2.0"]
    assert summary["skipped"] == {"unreadable audio": 1}
    detail = summary["skipped_examples"][0]["detail"]
    assert "0x" not in detail and "BytesIO" not in detail and "row 2" in detail
    assert len(decode_row(rows[1], root)) == pytest.approx(1.2 * 16000, abs=2)  # extract reads binary cells too
    again = shard_corpus("hf", root, tmp_path / "m2")
    assert again["skipped_examples"] == summary["skipped_examples"]  # same input, same summary


def test_a_bom_at_the_start_of_wav_scp_is_not_part_of_the_first_id(tmp_path):
    data = tmp_path / "data" / "train"
    data.mkdir(parents=True)
    sf.write(tmp_path / "r0.flac", speechlike(1.0), 16000)
    (data / "wav.scp").write_text(f"\ufeffr0 {tmp_path / 'r0.flac'}\n", encoding="utf-8")
    (data / "text").write_text("\ufeffr0 HELLO THERE\n", encoding="utf-8")
    shard_corpus("kaldi", data, tmp_path / "m")
    (row,) = manifest_rows(tmp_path / "m")
    assert row["id"] == "kaldi/train/r0" and row["text"] == "HELLO THERE"


def lhotse_pair(folder, sup_lines, audio_file):
    """recordings + supervisions of one part, the supervisions as raw JSONL lines (gzipped)."""
    from lhotse import Recording, RecordingSet

    folder.mkdir(parents=True, exist_ok=True)
    RecordingSet.from_recordings([Recording.from_file(audio_file, recording_id="r0")]).to_file(
        folder / "x_recordings_train.jsonl.gz")
    with gzip.open(folder / "x_supervisions_train.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(line) + "\n" for line in sup_lines))
    return folder


def test_lhotse_records_of_the_wrong_shape_are_counted_skips_naming_file_and_line(tmp_path):
    sf.write(tmp_path / "r0.flac", speechlike(3.0), 16000)
    good = {"id": "ok", "recording_id": "r0", "start": 0.0, "duration": 1.0, "channel": 0, "text": "fine", "speaker": "s"}
    lines = [good, {**good, "id": "num", "text": 123}, {"id": "missing", "recording_id": "r0"},
             {**good, "id": "start", "start": "abc"}, [1, 2],
             {**good, "id": "half", "text": "a lone \udc80 surrogate"}, {**good, "id": "sp", "speaker": "\ud800"}]
    folder = lhotse_pair(tmp_path / "man", lines, tmp_path / "r0.flac")  # json.dumps writes \udc80 as an escape
    result = shard_cli("lhotse", folder, tmp_path / "m")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["utterances"] == 1 and summary["skipped"] == {"malformed manifest record": 6}
    rows = manifest_rows(tmp_path / "m")
    assert [r["id"] for r in rows] == ["lhotse/train/ok"]
    full = json.loads((tmp_path / "m" / "summary.json").read_text())["skipped_examples"]
    assert [s["path"] for s in full] == [f"x_supervisions_train.jsonl.gz:{n}" for n in (2, 3, 4, 5, 6, 7)]
    assert "text must be a string, got 123" in full[0]["detail"] and "start must be a number" in full[2]["detail"]
    assert "not valid Unicode" in full[4]["detail"] and "not valid Unicode" in full[5]["detail"]


def test_a_lone_surrogate_from_any_reader_is_a_counted_skip_not_a_stopped_shard(tmp_path):
    """JSON may spell a lone surrogate (\\udc80), which no UTF-8 file can hold: a WebDataset sample's .json
    with one in its transcript (or its key) was the whole shard's one line, and nothing written."""
    import io
    import tarfile

    with tarfile.open(tmp_path / "train-000.tar", "w") as tar:
        for key, meta in (("ok", {"text": "fine"}), ("bad", {"text": "half \udc80 a character"})):
            for ext, data in ((".flac", flac_bytes(1.0, 0)), (".json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(key + ext)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    result = shard_cli("webdataset", tmp_path / "train-000.tar", tmp_path / "m", "--license", "x")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skipped"] == {"not valid Unicode": 1}
    assert [r["id"] for r in manifest_rows(tmp_path / "m")] == ["webdataset/train-000/ok"]
    (example,) = json.loads((tmp_path / "m" / "summary.json").read_text())["skipped_examples"]
    assert example["path"] == "train-000.tar" and "text" in example["detail"] and "bad" in example["detail"]


def test_lhotse_manifest_that_is_not_gzip_or_is_cut_short_is_one_line(tmp_path):
    sf.write(tmp_path / "r0.flac", speechlike(3.0), 16000)
    good = {"id": "ok", "recording_id": "r0", "start": 0.0, "duration": 1.0, "channel": 0, "text": "fine"}
    folder = lhotse_pair(tmp_path / "man", [good] * 200, tmp_path / "r0.flac")
    sups = folder / "x_supervisions_train.jsonl.gz"
    whole = sups.read_bytes()
    sups.write_bytes(whole[: len(whole) // 2])  # truncated gzip
    result = shard_cli("lhotse", folder, tmp_path / "m")
    assert result.exit_code == 2 and "x_supervisions_train.jsonl.gz: unreadable manifest" in result.stderr
    assert "Aborted" not in result.output
    sups.write_bytes(b'{"id": "plain json, not gzip"}\n')
    result = shard_cli("lhotse", folder, tmp_path / "m")
    assert result.exit_code == 2 and "x_supervisions_train.jsonl.gz: unreadable manifest" in result.stderr


def test_lhotse_skips_name_the_part_once(tmp_path):
    sf.write(tmp_path / "r0.flac", speechlike(1.0), 16000)
    sup = {"id": "late", "recording_id": "r0", "start": 5.0, "duration": 1.0, "channel": 0, "text": "beyond the end"}
    folder = lhotse_pair(tmp_path / "man", [sup], tmp_path / "r0.flac")
    summary = shard_corpus("lhotse", folder, tmp_path / "m")
    assert summary["skipped_examples"][0]["path"] == "train/late"


def test_unreadable_parquet_or_arrow_name_their_file(tmp_path):
    root = saved(tmp_path)
    arrow = next((root / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:200])
    summary = shard_corpus("hf", root, tmp_path / "m")
    assert summary["skipped"] == {"unreadable data file": 1}
    assert summary["skipped_examples"][0]["path"].startswith("train/data-")
    shutil.rmtree(root)
    table = pa.table({"audio": [{"bytes": flac_bytes(1.0, 0), "path": "a.flac"}], "text": ["hi"]})
    hub = hub_folder(tmp_path, "---\nlicense: cc0-1.0\n---\n", table)
    parquet = hub / "data" / "train-00000-of-00001.parquet"
    parquet.write_bytes(parquet.read_bytes()[:-30])
    summary = shard_corpus("hf", hub, tmp_path / "m2")
    assert summary["skipped"] == {"unreadable data file": 1}
    assert summary["skipped_examples"][0]["path"] == "data/train-00000-of-00001.parquet"


def test_truncated_stage_files_are_named_in_the_error(librispeech_root, tmp_path):
    """pyarrow says only "Parquet magic bytes not found in footer": every stage names the file."""
    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import MFCC

    shard_corpus("librispeech", librispeech_root, tmp_path / "m")
    extract(tmp_path / "m", tmp_path / "f", MFCC())
    from speechinstruct.units.cluster import cluster

    cluster(tmp_path / "f", tmp_path / "km", sections.KMeans(k=4))
    feats = tmp_path / "f" / "features-00000.arrow"
    feats.write_bytes(feats.read_bytes()[:300])
    result = runner.invoke(app, ["quantize", str(tmp_path / "f"), str(tmp_path / "km"), str(tmp_path / "u"), "-q"])
    assert result.exit_code == 2 and "features-00000.arrow: unreadable arrow file" in result.stderr
    manifest = tmp_path / "m" / "manifest-00000.parquet"
    manifest.write_bytes(manifest.read_bytes()[:-40])
    result = runner.invoke(app, ["extract", str(tmp_path / "m"), str(tmp_path / "f2"), "-q"])
    assert result.exit_code == 2 and "manifest-00000.parquet: unreadable parquet file" in result.stderr
    result = runner.invoke(app, ["validate", str(manifest)])
    assert result.exit_code == 2 and "manifest-00000.parquet: unreadable parquet file" in result.stderr


@pytest.mark.parametrize("summary", ['{"root": 5}', '{"root": {"a": 1}}', '[1]'], ids=["number", "object", "array"])
def test_a_manifest_summary_whose_root_is_not_a_path_is_one_line(librispeech_root, tmp_path, summary):
    """A manifest folder's summary.json (an edited one) whose corpus root was a number or an object, or which was
    not an object, stopped extract and score with "expected str, bytes or os.PathLike object, not int" or "list
    indices must be integers" tracebacks; a summary without a root was already one line, as these are now."""
    shard_corpus("librispeech", librispeech_root, tmp_path / "m")
    (tmp_path / "m" / "summary.json").write_text(summary)
    for command in (["extract", tmp_path / "m", tmp_path / "f"], ["score", tmp_path / "m", tmp_path / "s", "--dnsmos"]):
        result = runner.invoke(app, [*map(str, command), "-q"])
        assert result.exit_code == 2 and "Traceback" not in result.output, (command, result.output)
        assert f"{tmp_path / 'm' / 'summary.json'}: cannot read the corpus root" in " ".join(result.output.split()), \
            result.output


@pytest.mark.parametrize("key,value,said", [("manifest", 5, "must be a path (text)"), ("manifest", {"a": 1}, "must be a path (text)"),
                                           ("root", 5, "must be a path (text)"), ("frame_rate", "x", "must be a positive number"),
                                           ("dim", 0, "must be a positive integer")])
def test_a_features_json_whose_paths_are_not_text_is_one_line(librispeech_root, tmp_path, key, value, said):
    """features.json (an edited one) whose manifest was a number stopped quantize with "expected str, bytes or
    os.PathLike object, not int"; a frame rate "x" went on into units.json and the published dataset's vocabulary.
    Each reader of it (cluster, quantize) now says which key of which file."""
    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import MFCC

    shard_corpus("librispeech", librispeech_root, tmp_path / "m")
    extract(tmp_path / "m", tmp_path / "f", MFCC())
    assert runner.invoke(app, ["cluster", str(tmp_path / "f"), str(tmp_path / "km"), "--k", "4", "-q"]).exit_code == 0
    spec = json.loads((tmp_path / "f" / "features.json").read_text())
    (tmp_path / "f" / "features.json").write_text(json.dumps({**spec, key: value}))
    for command in (["cluster", tmp_path / "f", tmp_path / "km2", "--k", "4"], ["quantize", tmp_path / "f", tmp_path / "km", tmp_path / "u"]):
        result = runner.invoke(app, [*map(str, command), "-q"])
        assert result.exit_code == 2 and "Traceback" not in result.output, (command, result.output)
        assert f"{tmp_path / 'f' / 'features.json'}: '{key}' {said}" in " ".join(result.output.split()), result.output


def test_stage_files_of_another_kind_are_named_with_what_they_lack(librispeech_root, tmp_path):
    """A readable Parquet file under a stage file's name that is not one (another tool's, a hand edit that dropped
    columns): every stage that reads it says which file lacks which columns of its kind, in one line. It was
    "error: split" (compose pretrain), "error: units" (dedup), "error: path" (score), or worse, a summary of
    nothing: compose cross-modal counted the file's row as "no transcript" and wrote 0 records."""
    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import MFCC

    shard_corpus("librispeech", librispeech_root, tmp_path / "m")
    extract(tmp_path / "m", tmp_path / "f", MFCC())
    runner.invoke(app, ["cluster", str(tmp_path / "f"), str(tmp_path / "km"), "--k", "4", "-q"])
    assert runner.invoke(app, ["quantize", str(tmp_path / "f"), str(tmp_path / "km"), str(tmp_path / "u"), "-q"]).exit_code == 0
    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), tmp_path / "u" / "units-00000.parquet")
    for command in (["compose", "cross-modal", tmp_path / "u", tmp_path / "cm"], ["compose", "pretrain", tmp_path / "u", tmp_path / "pt"],
                    ["compose", "interleaved", tmp_path / "u", tmp_path / "il"], ["dedup", tmp_path / "u", tmp_path / "dd"],
                    ["score", tmp_path / "u", tmp_path / "sc", "--dnsmos"]):
        result = runner.invoke(app, [*map(str, command), "-q"])
        assert result.exit_code == 2 and "Traceback" not in result.output, (command, result.output)
        assert "units-00000.parquet: not a units file (no path, offset, duration" in result.stderr, (command, result.stderr)
    assert runner.invoke(app, ["quantize", str(tmp_path / "f"), str(tmp_path / "km"), str(tmp_path / "u2"), "-q"]).exit_code == 0
    result = runner.invoke(app, ["dedup", str(tmp_path / "u2"), str(tmp_path / "dd2"), "--eval", str(tmp_path / "u"), "-q"])
    assert result.exit_code == 2 and "units-00000.parquet: not a units file (no path" in result.stderr, result.output
    pq.write_table(pa.table({"id": ["a"], "path": ["x.flac"]}), tmp_path / "m" / "manifest-00000.parquet")
    result = runner.invoke(app, ["dedup", str(tmp_path / "u2"), str(tmp_path / "dd3"), "--eval", str(tmp_path / "m"), "-q"])
    assert result.exit_code == 2 and "manifest-00000.parquet: not a manifest file (no offset" in result.stderr, result.output
    for command in (["extract", tmp_path / "m", tmp_path / "f2"], ["score", tmp_path / "m", tmp_path / "sc2", "--dnsmos"]):
        result = runner.invoke(app, [*map(str, command), "-q"])
        assert result.exit_code == 2 and "manifest-00000.parquet: not a manifest file (no offset, duration" in result.stderr, \
            (command, result.stderr)


def test_an_unforeseen_missing_key_or_file_is_still_a_sentence(tmp_path, capsys):
    """The last line of defence: a KeyError nobody turned into a message printed its key alone ("error: split"),
    and pyarrow's FileNotFoundError its path alone ("error: /data/manifest"); each says what it is now."""
    import typer

    from speechinstruct.cli import expected_failures

    with pytest.raises(typer.Exit), expected_failures():
        {}["split"]
    assert capsys.readouterr().err == "error: no 'split' where one was expected (an input written by another tool or version?)\n"
    with pytest.raises(typer.Exit), expected_failures():
        pq.read_table(tmp_path / "nowhere.parquet")
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere.parquet'}: no such file or folder\n"
    with pytest.raises(typer.Exit), expected_failures():  # messages already sentences stay as they are
        raise KeyError("unknown record kind 'x'; known: manifest")
    assert capsys.readouterr().err == "error: unknown record kind 'x'; known: manifest\n"


def test_a_path_that_is_not_utf8_is_one_line_and_a_lone_surrogate_is_written_as_json_escapes(units_dir, tmp_path):
    """A folder named with bytes that are not UTF-8 (Python passes them on as lone surrogates) stopped compose with
    "error: 'utf-8' codec can't encode character '\\udcff'", naming nothing: Arrow cannot open such a path. It is one
    line naming the argument now. write_json, which wrote no file at all for a string holding a lone surrogate,
    writes it as a JSON escape, read back the same."""
    import os

    from speechinstruct.io import read_json, write_json

    bad = os.fsdecode(bytes(tmp_path / "units") + b"\xff")
    shutil.copytree(units_dir, bad)
    for args in (["compose", "cross-modal", bad, str(tmp_path / "out")], ["compose", "pretrain", str(units_dir), bad + "out"],
                 ["shard", "librispeech", bad, str(tmp_path / "m")]):
        result = runner.invoke(app, args + ["-q"], env={"COLUMNS": "500"})  # typer's box: one line, not wrapped
        said = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2 and "the path is not UTF-8" in said and "\\xff" in said, result.output
    write_json(tmp_path / "s.json", {"units": bad, "text": "é"})
    assert read_json(tmp_path / "s.json") == {"units": bad, "text": "é"}


NOT_UTF8 = b"\xff\xfe\x00corpora: []\n"


@pytest.mark.parametrize("case", ["recipe", "recipe nested", "train config", "train config nested", "prefix file",
                                  "chat prefix file", "api key file", "librilight json nested"])
def test_the_users_own_files_not_utf8_or_nested_too_deeply_are_one_line_naming_them(case, units_dir, tmp_path):
    """A recipe, a training settings file, a system prompt file or an API key file holding bytes that are not UTF-8
    stopped with Python's bare "'utf-8' codec can't decode byte 0xff in position 0", naming no file; a recipe (or
    settings file) nested too deeply (JSON is YAML) stopped with PyYAML's RecursionError traceback, and a
    LibriLight voice-activity JSON nested too deeply with json's. Each names its file now."""
    from speechinstruct.llm import api_key

    bad = tmp_path / "bad.txt"
    nested = "[" * 5000 + "]" * 5000
    bad.write_bytes(nested.encode() if "nested" in case else NOT_UTF8)
    if case == "api key file":
        with pytest.raises(ValueError, match=f"^{bad}: "):
            api_key("SPEECHINSTRUCT_NO_SUCH_VARIABLE", bad)
        return
    if case == "librilight json nested":
        root = tmp_path / "librilight" / "small" / "100" / "book"
        root.mkdir(parents=True)
        sf.write(root / "a.flac", speechlike(1.0), 16000)
        (root / "a.json").write_text('{"voice_activity": ' + nested + "}")
        sf.write(root / "b.flac", speechlike(1.0), 16000)  # read beside it
        (root / "b.json").write_text('{"voice_activity": [[0.1, 0.9]]}')
        result = shard_cli("librilight", tmp_path / "librilight", tmp_path / "m")
        assert result.exit_code == 0, result.output
        skipped = json.loads((tmp_path / "m" / "summary.json").read_text())["skipped_examples"]
        assert [(s["path"], s["reason"]) for s in skipped] == [("small/100/book/a.json", "malformed voice-activity json")]
        return
    args = {"recipe": ["run", bad], "train config": ["train", "--stage", "1", "--base-model", tmp_path / "base", "--data",
                                                      tmp_path / "data", "--out", tmp_path / "out", "--config", bad],
            "prefix file": ["compose", "cross-modal", units_dir, tmp_path / "out", "--prefix-file", bad],
            "chat prefix file": ["chat", "--model", tmp_path / "model", "--text", "hi", "--prefix-file", bad]
            }[case.removesuffix(" nested")]
    result = runner.invoke(app, [*map(str, args), "-q"] if case != "recipe" else list(map(str, args)))
    said = result.output.strip()
    assert result.exit_code == 2 and said.startswith(f"error: {bad}: ") and len(said.splitlines()) == 1, result.output
    assert ("nested too deeply" if "nested" in case else "not UTF-8") in said, said


@pytest.mark.parametrize("command", [["compose", "interleaved"], ["resynth"]])
@pytest.mark.parametrize("where", ["missing", "empty"])
def test_an_input_folder_missing_or_empty_is_said_to_be_so(command, where, tmp_path):
    """`compose interleaved` of a folder that is not there said "its units.json records no frame rate: extract or
    quantize it again", and `resynth` "give --vocoder: its units are neither a codec's …": each said what a units
    folder lacks, of a folder that holds nothing. They say it holds no units now, as every other command does."""
    folder = tmp_path / "units"
    if where == "empty":
        folder.mkdir()
    result = runner.invoke(app, [*command, str(folder), str(tmp_path / "out"), "-q"])
    said = result.output.strip()
    assert result.exit_code == 2 and len(said.splitlines()) == 1, result.output
    assert said.startswith(f"error: {folder}: no unit") and "frame rate" not in said and "vocoder" not in said, said
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("subset", [None, "XS"])
def test_gigaspeech_entries_whose_segments_are_not_a_list_of_objects_are_counted_skips(subset, tmp_path):
    """An audio entry of GigaSpeech.json whose `segments` is a number stopped the shard with "TypeError: 'int'
    object is not iterable"; a string or an object was taken apart as one. Each is a counted skip naming the entry,
    a segment that is not an object one naming its audio, and the good entries are read."""
    from conftest import write_gigaspeech

    root = write_gigaspeech(tmp_path / "gs")
    meta = json.loads((root / "GigaSpeech.json").read_text())
    good = next(a for a in meta["audios"] if a["aid"] == "POD0000000001")  # its audio is there
    meta["audios"][1:1] = [{**good, "segments": 5}, {**good, "segments": "{XS}"}, {**good, "segments": {"sid": "x"}},
                           {**good, "aid": "late", "segments": ["{XS}", 7, *good["segments"]]}]
    meta["audios"][4]["segments"][2:] = [{**s, "sid": s["sid"] + "-again"} for s in good["segments"]]
    (root / "GigaSpeech.json").write_text(json.dumps(meta))
    result = shard_cli("gigaspeech", root, tmp_path / "m", *(["--subset", subset] if subset else []))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    entries = [e["path"] for e in summary["skipped_examples"] if e["reason"] == "malformed audio entry"]
    assert entries == ["GigaSpeech.json:audios[1]", "GigaSpeech.json:audios[2]", "GigaSpeech.json:audios[3]"]
    assert summary["skipped"].get("malformed segment", 0) == (2 if subset is None else 0)
    ids = {r["id"] for r in manifest_rows(tmp_path / "m")}
    assert "gigaspeech/POD0000000001_S0000000-again" in ids and "gigaspeech/POD0000000001_S0000000" in ids


def test_librilight_files_without_a_usable_voice_activity_span_are_counted_not_lost(tmp_path):
    """A LibriLight file whose voice-activity spans all end before they start, lie before the audio or have no
    length gave no row and no skip: the file was lost without a word. One whose span lasts a nanosecond gave a row
    of 0.0 s. Each is a counted skip now; the usable spans of a file are read."""
    root = tmp_path / "ll" / "small" / "100" / "book"
    root.mkdir(parents=True)
    spans = {"reversed": [[2, 1]], "before": [[-5, -1]], "empty": [[0.5, 0.5]], "nano": [[0, 1e-9]], "none": [],
             "mixed": [[2, 1], [0.5, 1.5]]}
    for name, va in spans.items():
        sf.write(root / f"{name}.flac", speechlike(3.0), 16000)
        (root / f"{name}.json").write_text(json.dumps({"voice_activity": va}))
    result = shard_cli("librilight", tmp_path / "ll", tmp_path / "m")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    rows = manifest_rows(tmp_path / "m")
    assert [(r["id"], r["offset"], r["duration"]) for r in rows] == [("librilight/small/100/book/mixed/00000", 0.5, 1.0)]
    assert sorted(e["path"] for e in summary["skipped_examples"] if e["reason"] == "no voice activity") == [
        f"small/100/book/{name}.flac" for name in sorted(("reversed", "before", "empty", "nano", "none"))]


def test_a_segment_too_short_for_the_manifests_precision_is_a_counted_skip_from_any_reader(tmp_path):
    """A GigaSpeech segment of a nanosecond (begin 1.0, end 1.000000001) passed every check of its reader and became
    a row of 0.0 s, counted in the hours and utterances until extract failed it (a Kaldi segment alike, unrounded).
    `shard` skips any reader's row shorter than one sample, counted."""
    from conftest import write_gigaspeech

    root = write_gigaspeech(tmp_path / "gs")
    meta = json.loads((root / "GigaSpeech.json").read_text())
    good = next(a for a in meta["audios"] if a["aid"] == "POD0000000001")
    good["segments"].append({**good["segments"][0], "sid": "nano", "begin_time": 1.0, "end_time": 1.000000001})
    (root / "GigaSpeech.json").write_text(json.dumps(meta))
    summary = shard_corpus("gigaspeech", root, tmp_path / "m")
    assert "gigaspeech/nano" not in {r["id"] for r in manifest_rows(tmp_path / "m")}
    assert [e["detail"] for e in summary["skipped_examples"] if e["reason"] == "no audio in its span"] == [
        "gigaspeech/nano: 0.0 s"]

    from test_sources import kaldi_dir  # a Kaldi segment of a nanosecond: 1e-09 s, less than one sample

    data, _ = kaldi_dir(tmp_path / "kaldi")
    with open(data / "train" / "segments", "a") as segments:
        segments.write("spkA-rec0-nano rec0 1.0 1.000000001\n")
    summary = shard_corpus("kaldi", data, tmp_path / "k")
    assert [e["detail"] for e in summary["skipped_examples"] if e["reason"] == "no audio in its span"] == [
        f"kaldi/train/spkA-rec0-nano: {1.000000001 - 1.0} s"]


@pytest.mark.parametrize("case", ["nested", "array", "templates a number", "templates strings", "a template without text",
                                  "a template whose text is a number"])
def test_a_template_file_of_the_wrong_shape_is_one_line_naming_it(case, units_dir, tmp_path):
    """A template file (`--asr-templates`) nested too deeply stopped compose with a RecursionError traceback, a JSON
    array or templates that are not a list of {id, text} objects with an AttributeError or a TypeError. Each is one
    line naming the file now, before anything is written."""
    from speechinstruct.compose.templates import FORMAT

    head = {"format": FORMAT, "task": "asr"}
    content = {"nested": "[" * 5000 + "]" * 5000, "array": "[1, 2]",
               "templates a number": json.dumps({**head, "templates": 5}),
               "templates strings": json.dumps({**head, "templates": ["say it"]}),
               "a template without text": json.dumps({**head, "templates": [{"id": "t1"}]}),
               "a template whose text is a number": json.dumps({**head, "templates": [{"id": "t1", "text": 5}]})}[case]
    bad = tmp_path / "templates.json"
    bad.write_text(content)
    result = runner.invoke(app, ["compose", "cross-modal", str(units_dir), str(tmp_path / "out"), "--asr-templates",
                                 str(bad), "-q"])
    said = result.output.strip()
    assert result.exit_code == 2 and said.startswith(f"error: {bad}: ") and len(said.splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()

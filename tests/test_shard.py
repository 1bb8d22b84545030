import json
import os
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from speechinstruct import recipe as sections
from speechinstruct.cli import app
from speechinstruct.sources.corpora import gigaspeech, librilight
from speechinstruct.sources.shard import shard_corpus


def rows(out):
    return datasets.load_dataset("parquet", data_files=f"{out}/*.parquet", split="train").to_list()


def test_librispeech(librispeech_root, tmp_path):
    summary = shard_corpus("librispeech", librispeech_root, tmp_path / "m")
    got = {r["id"]: r for r in rows(tmp_path / "m")}
    assert sorted(got) == [f"librispeech/1272-128104-000{i}" for i in range(3)] + ["librispeech/1462-170138-0000"]
    r = got["librispeech/1272-128104-0001"]
    assert r["text"] == "NOR IS MISTER QUILTER'S MANNER"
    assert r["path"] == "train-clean-100/1272/128104/1272-128104-0001.flac"
    assert (r["split"], r["corpus_split"]) == ("train", "train-clean-100")
    assert r["speaker"] == "1272" and r["sample_rate"] == 16000 and r["license"] == "CC-BY-4.0"
    assert r["duration"] == pytest.approx(1.5)
    assert summary["skipped"] == {"missing audio file": 1, "unreadable audio": 1}
    bad = [s for s in summary["skipped_examples"] if s["reason"] == "unreadable audio"][0]
    assert bad["path"].endswith("1462-170138-0002.flac")
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["utterances"] == 4


def test_shards_by_hours_and_rerun_is_identical(librispeech_root, tmp_path):
    out = tmp_path / "m"
    shard_corpus("librispeech", librispeech_root, out, sections.Shard(shard_hours=2.5 / 3600))
    files = sorted(p.name for p in out.glob("*.parquet"))
    assert files == ["manifest-00000.parquet", "manifest-00001.parquet"]
    first = {f: (out / f).read_bytes() for f in files}
    shard_corpus("librispeech", librispeech_root, out, sections.Shard(shard_hours=2.5 / 3600))
    assert {f: (out / f).read_bytes() for f in files} == first
    shard_corpus("librispeech", librispeech_root, out, sections.Shard(shard_hours=10))  # fewer shards: stale ones go
    assert sorted(p.name for p in out.glob("*.parquet")) == ["manifest-00000.parquet"]
    assert len(rows(out)) == 4


def test_librilight_segments_follow_vad(librilight_root, tmp_path):
    summary = shard_corpus("librilight", librilight_root, tmp_path / "m", max_seconds=5.0)
    got = rows(tmp_path / "m")
    windows = [x for r in got for x in (r["offset"], r["offset"] + r["duration"])]
    # [0.2,2.0]+[2.5,4.0] fit in 5 s; [4.4,9.6] is 5.2 s alone and is cut in two; [10.0,11.8] alone.
    assert windows == pytest.approx([0.2, 4.0, 4.4, 7.0, 7.0, 9.6, 10.0, 11.8])
    assert all(r["text"] is None and r["speaker"] == "100" for r in got)
    assert len({r["id"] for r in got}) == 4
    assert summary["skipped"] == {"malformed voice-activity json": 1, "missing voice-activity json": 1}


def test_librilight_segment_never_exceeds_max():
    spans = [(0, 1), (1.5, 3), (3.1, 20), (21, 22)]
    for start, end in librilight.segment(spans, 4.0):
        assert end - start <= 4.0 + 1e-9


def test_gigaspeech(gigaspeech_root, tmp_path):
    summary = shard_corpus("gigaspeech", gigaspeech_root, tmp_path / "m")
    got = {r["id"]: r for r in rows(tmp_path / "m")}
    assert got["gigaspeech/POD0000000001_S0000000"]["text"] == "AS THEY'RE LEAVING, CAN KASH PULL ZAHRA ASIDE?"
    assert got["gigaspeech/POD0000000001_S0000002"]["offset"] == 3.0
    assert got["gigaspeech/POD0000000001_S0000002"]["duration"] == pytest.approx(2.5)
    assert summary["skipped"] == {"garbage segment": 3, "missing audio file": 1}  # the eval files' <SIL> too
    small = shard_corpus("gigaspeech", gigaspeech_root, tmp_path / "s", subset="S")
    assert small["utterances"] == 1
    with pytest.raises(ValueError, match="unknown GigaSpeech subset 'XXL'; choose one of XS, S, M, L, XL, DEV, TEST"):
        shard_corpus("gigaspeech", gigaspeech_root, tmp_path / "x", subset="XXL")


def test_gigaspeech_dev_and_test_subsets_are_marked_and_selectable(gigaspeech_root, tmp_path):
    shard_corpus("gigaspeech", gigaspeech_root, tmp_path / "m")
    got = {r["id"]: (r["split"], r["corpus_split"]) for r in rows(tmp_path / "m")}
    assert got == {"gigaspeech/YOU1000000038_S0000001": ("validation", "{DEV}"),
                   "gigaspeech/YOU1000000019_S0000001": ("test", "{TEST}"),
                   "gigaspeech/POD0000000001_S0000000": ("train", "{XS}"),
                   "gigaspeech/POD0000000001_S0000002": ("train", "{L}")}
    dev = shard_corpus("gigaspeech", gigaspeech_root, tmp_path / "dev", subset="DEV")
    assert dev["utterances"] == 1 and dev["splits"]["validation"]["corpus_splits"] == {"{DEV}": 1}
    xl = shard_corpus("gigaspeech", gigaspeech_root, tmp_path / "xl", subset="xl")
    assert set(xl["splits"]) == {"train"} and xl["utterances"] == 2  # XL never holds DEV/TEST segments


def test_librispeech_release_keeps_dev_and_test_apart(librispeech_release, tmp_path):
    summary = shard_corpus("librispeech", librispeech_release, tmp_path / "m")
    got = {r["id"]: (r["split"], r["corpus_split"]) for r in rows(tmp_path / "m")}
    assert got["librispeech/2277-149896-0000"] == ("validation", "dev-clean")
    assert got["librispeech/1089-134686-0001"] == ("test", "test-clean")
    assert got["librispeech/1272-128104-0000"] == ("train", "train-clean-100")
    assert {k: v["utterances"] for k, v in summary["splits"].items()} == {"validation": 2, "test": 2, "train": 4}
    # ROOT may be one split folder; its name is the split
    one = shard_corpus("librispeech", librispeech_release / "test-clean", tmp_path / "t")
    assert set(one["splits"]) == {"test"}
    # --splits keeps some and counts the rest
    only = shard_corpus("librispeech", librispeech_release, tmp_path / "o", splits="train,dev")
    assert only["utterances"] == 6 and only["left_out_by_split"] == {"test": 2}
    assert {r["split"] for r in rows(tmp_path / "o")} == {"train", "validation"}  # dev: validation, as 0.2 named it
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['valid'\]"):
        shard_corpus("librispeech", librispeech_release, tmp_path / "x", splits="train,valid")


def test_librilight_is_train_with_its_size_folder(librilight_root, tmp_path):
    shard_corpus("librilight", librilight_root, tmp_path / "m")
    assert {(r["split"], r["corpus_split"]) for r in rows(tmp_path / "m")} == {("train", "small")}


def test_gigaspeech_normalize():
    assert gigaspeech.normalize("<SIL>") == ""
    assert gigaspeech.normalize("YES <COMMA> WE CAN <EXCLAMATIONPOINT>") == "YES, WE CAN!"


def test_commonvoice_unquoted(commonvoice_root, tmp_path):
    summary = shard_corpus("commonvoice", commonvoice_root, tmp_path / "m")
    got = {r["id"]: r for r in rows(tmp_path / "m")}
    assert got["commonvoice/en/common_voice_en_0"]["text"] == '"Quoted," she said, "twice."'
    assert got["commonvoice/en/common_voice_en_4"]["text"] == '"""Good-bye,"" said the dev clip.'  # raw, unquoted
    assert got["commonvoice/en/common_voice_en_1"]["sample_rate"] == 48000
    assert got["commonvoice/en/common_voice_en_1"]["speaker"] == "bbb"
    assert summary["skipped"] == {"empty transcript": 1, "malformed tsv row": 1, "missing audio file": 1}
    where = {s["reason"]: s["path"] for s in summary["skipped_examples"]}
    assert where["malformed tsv row"] == "validated.tsv:6"


def test_commonvoice_clips_of_dev_and_test_tsvs_stay_out_of_train(commonvoice_root, tmp_path):
    """validated.tsv also lists the dev and test clips: they are dev/test whichever TSV they are read from."""
    shard_corpus("commonvoice", commonvoice_root, tmp_path / "v")
    got = {r["id"].rsplit("/", 1)[1]: (r["split"], r["corpus_split"]) for r in rows(tmp_path / "v")}
    assert got == {"common_voice_en_0": ("train", "validated.tsv"), "common_voice_en_1": ("train", "validated.tsv"),
                   "common_voice_en_4": ("validation", "dev.tsv"), "common_voice_en_5": ("test", "test.tsv")}
    for tsv, split in (("train.tsv", "train"), ("dev.tsv", "validation"), ("test.tsv", "test")):
        shard_corpus("commonvoice", commonvoice_root, tmp_path / tsv, tsv=tsv)
        assert {r["split"] for r in rows(tmp_path / tsv)} == {split}
    # clip_durations.tsv lies beside the split TSVs; it is no clip list
    with pytest.raises(ValueError, match=r"clip_durations.tsv: header lacks columns \['client_id', 'path', 'sentence'\]"):
        shard_corpus("commonvoice", commonvoice_root, tmp_path / "d", tsv="clip_durations.tsv")
    # without dev.tsv and test.tsv, validated.tsv cannot be split safely: refused with the way out
    (commonvoice_root / "dev.tsv").unlink(), (commonvoice_root / "test.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"neither dev.tsv nor test.tsv is here.*--tsv train.tsv"):
        shard_corpus("commonvoice", commonvoice_root, tmp_path / "x")


def test_commonvoice_folder_with_only_validated_tsv(commonvoice_root, tmp_path):
    """A user's subset: validated.tsv alone. The default refuses it and names the way that exists (not a
    train.tsv that is not there); naming it with --tsv reads every clip as train and says so."""
    for name in ("dev.tsv", "test.tsv", "train.tsv"):
        (commonvoice_root / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"neither dev.tsv nor test.tsv.*--tsv validated.tsv") as refused:
        shard_corpus("commonvoice", commonvoice_root, tmp_path / "x")
    assert "train.tsv" not in str(refused.value)
    summary = shard_corpus("commonvoice", commonvoice_root, tmp_path / "m", tsv="validated.tsv")
    assert {r["split"] for r in rows(tmp_path / "m")} == {"train"} and summary["utterances"] == 4
    assert len(summary["notes"]) == 1 and "neither dev.tsv nor test.tsv" in summary["notes"][0]
    result = CliRunner().invoke(app, ["shard", "commonvoice", str(commonvoice_root), str(tmp_path / "c"), "-q"])
    assert result.exit_code == 2 and "--tsv validated.tsv" in result.stderr and "train.tsv" not in result.stderr
    result = CliRunner().invoke(app, ["shard", "commonvoice", str(commonvoice_root), str(tmp_path / "c"), "-q",
                                      "--tsv", "validated.tsv"])
    assert result.exit_code == 0, result.output
    # a named TSV whose dev/test lists are present still keeps their clips out of train
    (commonvoice_root / "dev.tsv").write_text((commonvoice_root / "validated.tsv").read_text().splitlines()[0]
                                              + "\n" + "fff\tcommon_voice_en_4.mp3\ts5\tx\t\t2\t0\t\t\t\t\ten\t\n")
    summary = shard_corpus("commonvoice", commonvoice_root, tmp_path / "d", tsv="validated.tsv")
    assert {r["id"].rsplit("/", 1)[1]: r["split"] for r in rows(tmp_path / "d")}["common_voice_en_4"] == "validation"
    assert "notes" not in summary
    with pytest.raises(FileNotFoundError, match=r"nope.tsv: missing.*TSVs here: .*validated.tsv"):
        shard_corpus("commonvoice", commonvoice_root, tmp_path / "n", tsv="nope.tsv")


@pytest.mark.parametrize("name, split", [
    ("validation.clean", "validation"), ("validation.other", "validation"), ("valid_clean", "validation"), ("val-clean", "validation"),
    ("dev-clean", "validation"), ("dev93", "validation"), ("{DEV}", "validation"), ("dev.tsv", "validation"), ("train_dev", "validation"),
    ("eval", "test"), ("eval2000", "test"), ("test-other", "test"), ("test_clean", "test"), ("{TEST}", "test"),
    ("train-clean-100", "train"), ("validated.tsv", "train"), ("{XL}", "train"), ("train", "train"),
    ("somethingelse", "train"),
])
def test_split_words_are_matched_as_words_of_the_name(name, split):
    from speechinstruct.sources.corpora import split_of, split_word

    assert split_of(name) == split
    assert split_word("somethingelse") is None and split_of("heldout_a", {"heldout_a": "test"}) == "test"


def test_hub_librispeech_file_names_keep_validation_out_of_train(tmp_path):
    """The Hub's librispeech_asr names its files validation.clean-…, test.other-…: never train."""
    import io as _io

    import pyarrow as pa
    import soundfile as sf
    from conftest import speechlike

    root = tmp_path / "ds" / "data"
    root.mkdir(parents=True)
    for split in ("train.clean.100", "validation.clean", "test.other", "heldout_a", "mystery"):
        buf = _io.BytesIO()
        sf.write(buf, speechlike(0.5, seed=len(split)), 16000, format="FLAC")
        table = pa.table({"audio": [{"bytes": buf.getvalue(), "path": "a.flac"}], "text": ["hello"]})
        pq.write_table(table, root / f"{split}-00000-of-00001.parquet")
    summary = shard_corpus("hf", tmp_path / "ds", tmp_path / "m", split_map=["heldout_a=test"])
    got = {r["corpus_split"]: r["split"] for r in rows(tmp_path / "m")}
    assert got == {"train.clean.100": "train", "validation.clean": "validation", "test.other": "test",
                   "heldout_a": "test", "mystery": "train"}
    assert summary["unrecognised_split_names"] == ["mystery"]
    assert summary["options"]["split_map"] == {"heldout_a": "test"}
    result = CliRunner().invoke(app, ["shard", "hf", str(tmp_path / "ds"), str(tmp_path / "c"), "-q",
                                      "--split-map", "mystery=dev", "--split-map", "heldout_a=test"])
    assert result.exit_code == 0, result.output
    assert {r["corpus_split"]: r["split"] for r in rows(tmp_path / "c")}["mystery"] == "validation"
    result = CliRunner().invoke(app, ["shard", "hf", str(tmp_path / "ds"), str(tmp_path / "e"), "--split-map", "mystery"])
    assert result.exit_code == 2 and "--split-map 'mystery': write NAME=SPLIT" in result.stderr


def test_commonvoice_quoted_tsv(commonvoice_root, tmp_path):
    shard_corpus("commonvoice", commonvoice_root, tmp_path / "m", tsv="resaved.tsv")
    (row,) = rows(tmp_path / "m")
    assert row["text"] == 'Tab here and newline "too"'


def test_symlink_out_of_root_is_refused(librispeech_root, tmp_path):
    outside = tmp_path / "secret.flac"
    chapter = librispeech_root / "train-clean-100" / "1272" / "128104"
    os.replace(chapter / "1272-128104-0000.flac", outside)
    os.symlink(outside, chapter / "1272-128104-0000.flac")
    summary = shard_corpus("librispeech", librispeech_root, tmp_path / "m")
    assert summary["skipped"]["a link out of the corpus root (--follow-links reads it)"] == 1


def test_parts_linked_in_from_elsewhere_are_counted_skips_or_read_with_follow_links(tmp_path):
    """LibriSpeech put together from parts that lie elsewhere (`ln -s /data/LibriSpeech/train-clean-100 .`): the
    reader did not look inside linked folders, so such a part was left out without a word, or the whole root was
    "not a LibriSpeech folder". Each file there is a counted skip now, naming --follow-links; with it, the rows
    are those of the tree itself, and extract reads them."""
    import shutil

    from conftest import write_librispeech_release

    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import MFCC

    real = write_librispeech_release(tmp_path / "downloads" / "LibriSpeech")
    mine = tmp_path / "mine" / "LibriSpeech"
    mine.mkdir(parents=True)
    for part in ("train-clean-100", "dev-clean"):
        (mine / part).symlink_to(real / part)
    shutil.copytree(real / "test-clean", mine / "test-clean")  # one part of its own
    summary = shard_corpus("librispeech", mine, tmp_path / "m")
    assert summary["utterances"] == 2 and summary["skipped"] == {"a link out of the corpus root (--follow-links reads it)": 8}
    example = summary["skipped_examples"][0]
    assert example["path"].startswith(("train-clean-100/", "dev-clean/")) and "--follow-links" in example["detail"]

    result = CliRunner().invoke(app, ["shard", "librispeech", str(mine), str(tmp_path / "linked"), "--follow-links", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["options"]["follow_links"] is True
    shard_corpus("librispeech", real, tmp_path / "whole")
    assert rows(tmp_path / "linked") == rows(tmp_path / "whole")
    stats = extract(tmp_path / "linked", tmp_path / "f", MFCC())
    assert stats["utterances"] == 8 and stats["errors"] == 0


def test_cli_shard_and_clear_errors(librispeech_root, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["shard", "librispeech", str(librispeech_root), str(tmp_path / "m"), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["utterances"] == 4
    result = runner.invoke(app, ["shard", "librispeech", str(tmp_path / "nowhere"), str(tmp_path / "m2")])
    assert result.exit_code == 2 and "nowhere: corpus root is not a folder" in result.stderr
    result = runner.invoke(app, ["shard", "gigaspeech", str(librispeech_root), str(tmp_path / "m3")])
    assert result.exit_code == 2 and "GigaSpeech.json: missing" in result.stderr
    assert pq.read_table(tmp_path / "m" / "manifest-00000.parquet").num_rows == 4


def test_shard_never_deletes_or_overwrites_files_it_did_not_write(librispeech_root, tmp_path):
    """OUT holding a user's manifest-00003.parquet and summary.json (another run's copy, their own notes) lost both
    without a word: shard deletes the manifest shards it did not write this time. One line now, before anything
    is written; its own folder (or one an earlier version wrote: its summary) it rewrites as before."""
    runner = CliRunner()
    out = tmp_path / "m"
    out.mkdir()
    mine = {"manifest-00003.parquet": b"theirs", "summary.json": b"{}", "notes.txt": b"mine"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    result = runner.invoke(app, ["shard", "librispeech", str(librispeech_root), str(out), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "manifest-00003.parquet: already there and not written by shard" in result.stderr.replace("\n", "")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == mine
    (out / "manifest-00003.parquet").unlink()
    (out / "summary.json").write_text("[" * 100_000 + "]" * 100_000)  # nested too deeply for Python's json: not shard's
    result = runner.invoke(app, ["shard", "librispeech", str(librispeech_root), str(out), "-q"])
    assert result.exit_code == 2 and "summary.json: already there and not written by shard" in result.stderr.replace("\n", "")
    (out / "summary.json").unlink()
    for _ in range(2):
        assert runner.invoke(app, ["shard", "librispeech", str(librispeech_root), str(out), "-q"]).exit_code == 0
    (out / ".speechinstruct-shard.json").unlink()  # as an earlier version left it
    assert runner.invoke(app, ["shard", "librispeech", str(librispeech_root), str(out), "-q"]).exit_code == 0
    assert (out / "notes.txt").read_bytes() == b"mine" and len(rows(out)) == 4


def test_gigaspeech_malformed_metadata_is_clear(gigaspeech_root, tmp_path):
    (gigaspeech_root / "GigaSpeech.json").write_text('{"audios": [{"aid": "x", "path": "a.opus", "segments": [')
    with pytest.raises(ValueError, match="GigaSpeech.json: not valid GigaSpeech metadata"):
        shard_corpus("gigaspeech", gigaspeech_root, tmp_path / "m")


def test_the_corpus_registry_is_what_the_cli_the_recipe_and_the_card_offer():
    """corpora.SOURCES is the one list: every entry's reader loads, and the CLI's choices, the recipe's names
    (less the generated demo corpus), the default licenses and the card's split rules are the registry's."""
    import typing

    from speechinstruct import cli, recipe
    from speechinstruct.release import publish
    from speechinstruct.sources.corpora import DEFAULT_LICENSES, SOURCES, readers

    assert all(callable(r) for r in readers().values()) and set(readers()) == set(SOURCES)
    assert {c.value for c in cli.Corpus} == set(SOURCES)
    assert set(typing.get_args(recipe.Corpus.model_fields["name"].annotation)) == {
        n for n, s in SOURCES.items() if not s.generated} == {"librispeech", "librilight", "gigaspeech", "commonvoice",
                                                               "audio", "webdataset", "hf", "lhotse", "kaldi"}
    assert DEFAULT_LICENSES["librispeech"] == "CC-BY-4.0" and "hf" not in DEFAULT_LICENSES
    assert publish.SPLIT_RULES["gigaspeech"] == SOURCES["gigaspeech"].split_rule
    assert [n for n, s in SOURCES.items() if not s.transcripts] == ["librilight", "audio"]  # run's cross-modal default skips them
    assert "audio" not in DEFAULT_LICENSES and "webdataset" not in DEFAULT_LICENSES  # the user says the license
    from speechinstruct.sources.corpora import with_known_license  # the one place a known license fills an unset one
    assert with_known_license("gigaspeech", {"license": None})["license"] == SOURCES["gigaspeech"].license
    assert with_known_license("gigaspeech", {"license": "mine"}) == {"license": "mine"}
    assert with_known_license("audio", {"license": None}) == {"license": None}
    readers_source = "".join((Path(__file__).parents[1] / "speechinstruct/sources/corpora" / f"{s.module}.py").read_text()
                             for s in SOURCES.values())
    assert "DEFAULT_LICENSES" not in readers_source  # no reader fills it in again


def test_an_option_a_source_does_not_take_is_one_line_everywhere(librispeech_root, tmp_path):
    """Each source declares the options its reader takes (corpora.SOURCES): an option of another source (a Common
    Voice TSV for LibriSpeech) is one line naming it, in a recipe, on the command line and in a library call; it
    had been accepted by the recipe and then stopped `run` with a TypeError traceback."""
    import inspect

    import yaml
    from typer.testing import CliRunner

    from speechinstruct.cli import app
    from speechinstruct.recipe import RecipeError, load_recipe
    from speechinstruct.sources.corpora import SOURCES

    for name, source in SOURCES.items():  # the registry says what each reader really takes
        taken = set(inspect.signature(source.reader()).parameters) - {"root"}
        assert set(source.options) <= taken, name
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "demo_corpus": None, "corpora": [
        {"name": "librispeech", "root": str(librispeech_root), "options": {"tsv": "validated.tsv", "splits": "train"}}]}))
    with pytest.raises(RecipeError, match=r"corpora\[0\]\.options\.tsv: not an option of librispeech") as said:
        load_recipe(recipe)
    assert "Traceback" not in str(said.value) and "Value error" not in str(said.value)
    done = CliRunner().invoke(app, ["shard", "librispeech", str(librispeech_root), str(tmp_path / "m"), "--tsv", "x.tsv"])
    assert done.exit_code == 2 and "--tsv is for `shard commonvoice`" in done.stderr, done.output
    same = CliRunner().invoke(app, ["shard", "librispeech", str(librispeech_root), str(tmp_path / "m"), "--max-seconds",
                                    "30"])  # given, even at its default value: the command line says where it came from
    assert same.exit_code == 2 and "--max-seconds is for `shard audio/librilight`" in same.stderr, same.output
    with pytest.raises(ValueError, match="tsv: not an option of librispeech"):
        shard_corpus("librispeech", librispeech_root, tmp_path / "m2", tsv="x.tsv")
    assert not (tmp_path / "m2").exists()
    ranged = CliRunner().invoke(app, ["shard", "audio", str(librispeech_root), str(tmp_path / "m4"), "--license", "x",
                                      "--speakers", "--speaker-threshold", "5"])  # checked as the recipe's (0, 2)
    assert ranged.exit_code == 2 and "--speaker-threshold 5.0: Input should be less than 2" in ranged.stderr, ranged.output
    kept = CliRunner().invoke(app, ["shard", "commonvoice", str(tmp_path / "nowhere"), str(tmp_path / "m3"), "--tsv", "x.tsv"])
    assert "is for `shard" not in kept.output  # commonvoice takes it (and then finds no folder)


def test_corpus_state_follows_what_a_reader_may_read(tmp_path):
    """The state `run` stamps a corpus with: any file added, removed or written again under the root (a linked
    folder's too, a loop followed once; a name that is not UTF-8 counted like any other), the tar files a pattern
    names, a local audio_root; never a hidden file, where the root is, or a bucket (not listed at each run)."""
    from speechinstruct.sources.shard import corpus_state

    root, audio, elsewhere = tmp_path / "corpus", tmp_path / "audio", tmp_path / "elsewhere"
    for folder in (root / "a", audio, elsewhere):
        folder.mkdir(parents=True)
    (root / "a" / "1.txt").write_text("one")
    (elsewhere / "2.flac").write_bytes(b"x")
    (root / "linked").symlink_to(elsewhere)
    (root / "a" / "up").symlink_to("..")  # a loop
    (root / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name")  # a lone surrogate in Python
    state = corpus_state("librispeech", root)
    assert len(state) == 64 and corpus_state("librispeech", root) == state

    (root / ".DS_Store").write_bytes(b"\0")
    (root / ".cache").mkdir()
    (root / ".cache" / "x").write_bytes(b"\0")
    assert corpus_state("librispeech", root) == state
    (elsewhere / "3.flac").write_bytes(b"y")  # in a linked folder
    assert corpus_state("librispeech", root) != state
    state = corpus_state("librispeech", root)
    os.utime(root / "a" / "1.txt", ns=(0, 1))  # written again, same size
    assert corpus_state("librispeech", root) != state

    state, moved = corpus_state("librispeech", root), tmp_path / "moved"
    root.rename(moved)
    assert corpus_state("librispeech", moved) == state  # where it is is no part of it
    with_audio = corpus_state("kaldi", moved, {"audio_root": str(audio)})
    (audio / "u.wav").write_bytes(b"z")
    assert corpus_state("kaldi", moved, {"audio_root": str(audio)}) != with_audio

    tars = tmp_path / "tars"
    tars.mkdir()
    (tars / "shard-000.tar").write_bytes(b"t")
    pattern = str(tars / "shard-{000..001}.tar")
    one = corpus_state("webdataset", pattern)
    (tars / "shard-001.tar").write_bytes(b"t")
    (tars / "other.tar").write_bytes(b"t")
    assert corpus_state("webdataset", pattern) != one
    two = corpus_state("webdataset", pattern)
    (tars / "shard-002.tar").write_bytes(b"t")  # not named by the pattern
    assert corpus_state("webdataset", pattern) == two
    assert corpus_state("librispeech", "s3://bucket/LibriSpeech") == ""


def test_a_corpus_that_gives_no_utterance_is_one_line_not_a_later_stages_riddle(tmp_path):
    """A LibriSpeech folder whose every FLAC is damaged sharded to nothing with exit code 0, and the next stage said
    "no manifest-*.parquet files (run `speechinstruct shard` first)", of a folder shard had just written; `run` said
    the same of its own shard stage. shard ends with one line naming ROOT and the skips now (its summary printed and
    written as before), and so does `run`, at its shard stage. A shard whose rows all fall in splits left out by
    --splits says that instead."""
    root = tmp_path / "ls" / "train-clean-5" / "19" / "198"
    root.mkdir(parents=True)
    (root / "19-198.trans.txt").write_text("19-198-0000 HELLO\n19-198-0001 THERE\n")
    for n in range(2):
        (root / f"19-198-000{n}.flac").write_bytes(b"fLaC but damaged")
    runner = CliRunner()
    result = runner.invoke(app, ["shard", "librispeech", str(tmp_path / "ls"), str(tmp_path / "m"), "-q"])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert last == (f"error: {tmp_path / 'ls'}: no utterance read: every one was skipped (unreadable audio: 2); "
                    f"{tmp_path / 'm' / 'summary.json'} names each"), last
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["skipped"] == {"unreadable audio": 2}
    assert json.loads(result.stdout.split("error:")[0])["utterances"] == 0

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"corpora:\n  - name: librispeech\n    root: {tmp_path / 'ls'}\nworkdir: {tmp_path / 'work'}\n")
    ran = runner.invoke(app, ["run", str(recipe), "-q"])
    assert ran.exit_code == 2 and "no utterance read: every one was skipped (unreadable audio: 2)" in ran.output, ran.output
    assert "run `speechinstruct shard` first" not in ran.output

    from conftest import write_librispeech

    write_librispeech(tmp_path / "good")
    left = runner.invoke(app, ["shard", "librispeech", str(tmp_path / "good"), str(tmp_path / "t"), "--splits", "test", "-q"])
    assert left.exit_code == 2 and left.output.strip().splitlines()[-1].startswith(  # its missing and corrupt FLAC
        f"error: {tmp_path / 'good'}: no utterance read: every one was skipped (missing audio file: 1, unreadable audio: "
        "1) or is in a split --splits leaves out (train: 4)"), left.output
    # a recipe has no --splits: its corpus's option is named
    recipe.write_text(f"corpora:\n  - name: librispeech\n    root: {tmp_path / 'good'}\n    options: {{splits: test}}\n"
                      f"workdir: {tmp_path / 'work2'}\n")
    ran = runner.invoke(app, ["run", str(recipe), "-q"])
    assert ran.exit_code == 2 and "or is in a split the recipe's `splits` option leaves out (train: 4)" in ran.output, \
        ran.output

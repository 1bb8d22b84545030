"""lhotse's Shar format (tar shards of cuts and their audio, as lhotse's `CutSet.to_shar` writes them): read in
place, each cut's audio a member of a tar, and compared with lhotse's own reader (`CutSet.from_shar`)."""

import gzip
import json
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import speechlike
from typer.testing import CliRunner

from speechinstruct.cli import app
from speechinstruct.shardfiles import corpus_root
from speechinstruct.sources.shard import shard_corpus
from speechinstruct.units.extract import decode_row

runner = CliRunner()


def write_shar(tmp_path):
    """Two parts written by lhotse's own ``to_shar``: train-clean (cuts at offsets into two recordings, one of
    them a two-channel call with a cut on each side and one of both sides, two cuts to a shard, flac) and dev-clean (one shard, no
    sharding, ``original`` format: members named ``ID.original``, and a cut without a recording: ``.nodata``)."""
    from lhotse import CutSet, MonoCut, MultiCut, Recording, SupervisionSegment

    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "book.flac", speechlike(9.0, seed=1), 16000)
    sf.write(audio / "call.wav", np.stack([speechlike(6.0, seed=2), 0.5 * speechlike(6.0, seed=3)], axis=1), 16000)
    book, call = Recording.from_file(audio / "book.flac"), Recording.from_file(audio / "call.wav")

    def cut(id, recording, start, duration, channel, text, speaker):
        sup = SupervisionSegment(id=f"{id}-s", recording_id=recording.id, start=0.0, duration=duration,
                                 channel=channel, text=text, speaker=speaker)
        return MonoCut(id=id, start=start, duration=duration, channel=channel, recording=recording, supervisions=[sup])

    shar = tmp_path / "shar"
    (shar / "train-clean").mkdir(parents=True)
    (shar / "dev-clean").mkdir()
    CutSet.from_cuts([
        cut("1089-0001", book, 0.0, 3.0, 0, "he hoped there would be stew", "1089"),
        cut("1089-0002", book, 3.5, 4.25, 0, "stuff it into you", "1089"),
        cut("call-A-0001", call, 1.0, 2.0, 0, "hello", "A"),
        cut("call-B-0001", call, 2.5, 3.0, 1, "good morning", "B"),
        cut("with.dots/and-a-folder", book, 8.0, 1.0, 0, "  spaced   out  ", None),
        MultiCut(id="call-both", start=4.0, duration=1.5, channel=[0, 1], recording=call, supervisions=[]),
    ]).to_shar(shar / "train-clean", fields={"recording": "flac"}, shard_size=2)
    nothing = MonoCut(id="no-audio", start=0.0, duration=1.0, channel=0, supervisions=[])
    CutSet.from_cuts([cut("2277-0001", book, 2.0, 2.5, 0, "dev speech", "2277"), nothing]).to_shar(
        shar / "dev-clean", fields={"recording": "original"}, shard_size=None)
    return shar


def rows_of(out):
    return {r["id"]: r for f in sorted(out.glob("manifest-*.parquet")) for r in pq.read_table(f).to_pylist()}


def test_shar_cuts_read_in_place_equal_lhotses_own_reading(tmp_path):
    from lhotse import CutSet

    shar = write_shar(tmp_path)
    assert sorted(p.name for p in (shar / "train-clean").iterdir()) == [
        "cuts.000000.jsonl.gz", "cuts.000001.jsonl.gz", "cuts.000002.jsonl.gz",
        "recording.000000.tar", "recording.000001.tar", "recording.000002.tar"]
    with tarfile.open(shar / "dev-clean" / "recording.tar") as tar:
        assert tar.getnames() == ["2277-0001.original", "2277-0001.json", "no-audio.nodata", "no-audio.nometa"]
    result = runner.invoke(app, ["shard", "lhotse", str(shar), str(tmp_path / "m"), "--license", "CC-BY-4.0", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["skipped"] == {"cut without a recording": 1}
    rows = rows_of(tmp_path / "m")
    root = corpus_root(tmp_path / "m")
    assert root == shar
    expected = {f"lhotse/{part}/{c.id}": (part, c) for part in ("train-clean", "dev-clean")
                for c in CutSet.from_shar(in_dir=shar / part) if c.has_recording}
    assert sorted(rows) == sorted(expected) and len(rows) == 7
    for id, (part, c) in expected.items():  # each row reads what lhotse's reader loads for the cut
        row = rows[id]
        assert row["path"].startswith(f"{part}/recording.") and row["tar_offset"] > 0 and row["tar_size"] > 0
        assert row["split"] == ("validation" if part == "dev-clean" else "train") and row["corpus_split"] == part
        assert row["text"] == (" ".join(" ".join(s.text for s in c.supervisions).split()) or None)
        assert row["speaker"] == next((s.speaker for s in c.supervisions if s.speaker), "unknown") and row["license"] == "CC-BY-4.0"
        assert row["duration"] == pytest.approx(c.duration) and row["offset"] == 0.0
        np.testing.assert_allclose(decode_row(row, root), c.load_audio().mean(axis=0), atol=1e-7)  # channels mixed
    side = rows["lhotse/train-clean/call-B-0001"]  # one side of the call, as lhotse stored it: a one-channel file
    assert side["channel"] is None and side["speaker"] == "B"
    with tarfile.open(shar / "train-clean" / "recording.000002.tar") as tar:  # both sides: a two-channel member
        assert sf.info(tar.extractfile("call-both.flac")).channels == 2
    assert rows["lhotse/train-clean/with.dots/and-a-folder"]["text"] == "spaced out"


def test_shar_damage_is_counted_and_the_rest_read(tmp_path):
    """A shard's tar missing (lhotse's reader stops: the field counts differ), a tar cut short, a member whose
    id is not its cut's (lhotse: "Mismatched IDs"), a cut file line that is not a cut: each a counted skip, and
    every other cut read."""
    shar = write_shar(tmp_path)
    part = shar / "train-clean"
    (part / "recording.000002.tar").unlink()  # the last shard's two cuts
    data = (part / "recording.000001.tar").read_bytes()
    (part / "recording.000001.tar").write_bytes(data[: len(data) // 3])  # call-A-0001's member cut short
    lines = gzip.open(part / "cuts.000000.jsonl.gz", "rt").read().splitlines()
    first = json.loads(lines[0])
    first["id"] = "renamed"  # its member is still 1089-0001.flac
    with gzip.open(part / "cuts.000000.jsonl.gz", "wt") as f:
        f.write("\n".join([json.dumps(first), lines[1], "[1, 2]"]) + "\n")
    summary = shard_corpus("lhotse", shar, tmp_path / "m", license="x")
    assert set(rows_of(tmp_path / "m")) == {"lhotse/train-clean/1089-0002", "lhotse/dev-clean/2277-0001"}
    assert summary["skipped"] == {"cut without a recording": 1, "no audio member for the cut": 1,
                                  "malformed manifest record": 1, "missing tar": 2, "truncated or damaged tar": 2}
    details = json.dumps(summary["skipped_examples"])
    assert "recording.000002.tar" in details and "cuts.000000.jsonl.gz:3" in details


def test_a_shar_folder_is_a_root_itself_and_says_what_it_leaves_out(tmp_path):
    """ROOT may be one Shar folder (its part is the folder's name); fields other than the audio (features, custom
    arrays) are named in a note; a Shar folder without audio is one line. As in lhotse's reader, a cut's
    recording is the tar's manifest member: here the cut file lists the call's recording as it was before
    to_shar (both channels, as cuts kept beside a Shar written with include_cuts=False do)."""
    shar = write_shar(tmp_path)
    (shar / "train-clean" / "features.000000.tar").write_bytes(b"")
    cuts = shar / "train-clean" / "cuts.000001.jsonl.gz"
    lines = [json.loads(line) for line in gzip.open(cuts, "rt")]
    assert lines[1]["id"] == "call-B-0001" and lines[1]["recording"]["channel_ids"] == [1]
    lines[1]["recording"]["channel_ids"] = lines[1]["recording"]["sources"][0]["channels"] = [0, 1]
    with gzip.open(cuts, "wt") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    summary = shard_corpus("lhotse", shar / "train-clean", tmp_path / "m", license="x")
    assert summary["utterances"] == 6 and all(id.startswith("lhotse/train-clean/") for id in rows_of(tmp_path / "m"))
    assert any("features" in note and "not read" in note for note in summary["notes"]), summary["notes"]
    linked = tmp_path / "linked"  # a tar that is a link out of ROOT: its cuts are counted skips, as any such file
    shutil.copytree(shar / "train-clean", linked)
    (linked / "recording.000000.tar").unlink()
    (linked / "recording.000000.tar").symlink_to(shar / "train-clean" / "recording.000000.tar")
    summary = shard_corpus("lhotse", linked, tmp_path / "l", license="x")
    assert summary["utterances"] == 4 and summary["skipped"] == {"a link out of the corpus root (--follow-links reads it)": 2}
    summary = shard_corpus("lhotse", linked, tmp_path / "f", license="x", follow_links=True)
    followed = rows_of(tmp_path / "f")
    assert summary["utterances"] == 6 and followed["lhotse/linked/1089-0001"]["path"] == "recording.000000.tar"
    assert decode_row(followed["lhotse/linked/1089-0001"], corpus_root(tmp_path / "f")).size == 3 * 16000
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(shar / "dev-clean" / "cuts.jsonl.gz", bare / "cuts.000000.jsonl.gz")  # the cuts, not their audio
    result = runner.invoke(app, ["shard", "lhotse", str(bare), str(tmp_path / "x"), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    # with no tar beside them, numbered cuts files are read as the chunks of a cuts manifest (split_lazy's), whose
    # cuts here have no recording
    assert ("no utterance read: every one was skipped (audio source is not one file (not read): 1, cut without a "
            "recording: 1)") in " ".join(result.output.split()), result.output
    examples = json.loads((tmp_path / "x" / "summary.json").read_text())["skipped_examples"]
    assert all(e["path"].startswith("cuts.000000.jsonl.gz: cut ") for e in examples), examples
    assert [("recording tar" in e["detail"]) for e in examples] == [True, True], examples
    deep = tmp_path / "corpus" / "a" / "b" / "c"  # three folders down: not looked for (nor the audio tree beside)
    shutil.copytree(shar / "dev-clean", deep)
    result = runner.invoke(app, ["shard", "lhotse", str(tmp_path / "corpus"), str(tmp_path / "y"), "-q"])
    assert result.exit_code == 2 and "no Shar folders" in result.output and "up to 2 folders down" in result.output
    assert shard_corpus("lhotse", deep.parent.parent, tmp_path / "z", license="x")["utterances"] == 1  # two down


@pytest.mark.parametrize("fmt", ["opus", "mp3", "wav"])
def test_shar_in_each_audio_format_lhotse_writes_reads_as_lhotse_reads_it(fmt, tmp_path):
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

    sf.write(tmp_path / "a.flac", speechlike(4.0, seed=4), 16000)
    rec = Recording.from_file(tmp_path / "a.flac")
    (tmp_path / fmt).mkdir()
    CutSet.from_cuts([MonoCut(id=f"c{i}", start=1.5 * i, duration=1.25, channel=0, recording=rec, supervisions=[
        SupervisionSegment(id=f"s{i}", recording_id=rec.id, start=0.0, duration=1.25, text="words")]) for i in range(2)]
    ).to_shar(tmp_path / fmt, fields={"recording": fmt}, shard_size=None)
    summary = shard_corpus("lhotse", tmp_path / fmt, tmp_path / "m", license="x")
    rows = rows_of(tmp_path / "m")
    assert summary["utterances"] == 2 and sorted(rows) == [f"lhotse/{fmt}/c0", f"lhotse/{fmt}/c1"]
    for c in CutSet.from_shar(in_dir=tmp_path / fmt):
        np.testing.assert_array_equal(decode_row(rows[f"lhotse/{fmt}/{c.id}"], corpus_root(tmp_path / "m")),
                                      c.load_audio()[0])

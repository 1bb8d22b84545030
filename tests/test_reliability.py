"""Crash safety, bad input and secrets, proven end to end."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import yaml

from conftest import fixed_dnsmos, speechlike
from openai_server import FakeOpenAI
from speechinstruct import recipe as sections
from speechinstruct.shardfiles import read_features
from speechinstruct.units.extract import extract
from speechinstruct.units.features import MFCC
from speechinstruct.pipeline import run
from speechinstruct.sources.shard import shard_corpus


def tiny_recipe(path, workdir, **over):
    data = {"name": "crash", "workdir": str(workdir), "demo_corpus": {"sentences": 30, "seed": 3},
            "shard": {"shard_hours": 0.003}, "kmeans": {"k": 16, "max_frames": 30000},
            "compose": {"pretrain": {"dev_fraction": 0.1}, "chain_of_modality": {"max_pairs": 4}},
            # the report without resynthesised samples (test_listen tests those): 16 s of each run's 21 s
            "output": {"vocoder": "none"}}
    data.update(over)
    path.write_text(yaml.safe_dump(data))
    return path


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    assert run(tiny_recipe(tmp / "r.yaml", tmp / "work"))["valid"]
    return tmp / "work"


@pytest.mark.parametrize("trigger", [
    "demo-corpus/train/1002",                       # while the demo corpus is being spoken
    "speechinstruct-demo/features/features-00002.arrow",        # mid-extraction, some shards done
    "speechinstruct-demo/units/units-00001.parquet",            # mid-quantization
    "composed/cross_modal/summary-speechinstruct-demo.json",    # during composition
])
def test_sigkill_anywhere_then_rerun_gives_the_clean_result(clean_run, tmp_path, trigger):
    recipe = tiny_recipe(tmp_path / "r.yaml", tmp_path / "work")
    cmd = [sys.executable, "-m", "speechinstruct.cli", "run", str(recipe), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "work" / trigger).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, f"the run finished before {trigger} appeared"
    assert not (tmp_path / "work" / "dataset" / "speechinstruct.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert snapshot(tmp_path / "work" / "dataset") == snapshot(clean_run / "dataset")
    for part in ("speechinstruct-demo/units", "composed"):
        # working folders: their summary/spec JSON files name this run's absolute paths, so compare the data
        got = {k: v for k, v in snapshot(tmp_path / "work" / part).items() if k.endswith(".parquet")}
        want = {k: v for k, v in snapshot(clean_run / part).items() if k.endswith(".parquet")}
        assert got.keys() == want.keys(), part
        assert all(got[k] == want[k] for k in got), [k for k in got if got[k] != want[k]]


def test_a_run_whose_storage_failed_for_a_while_is_finished_by_the_rerun(clean_run, tmp_path, monkeypatch):
    """The audio of one speaker gives an I/O error (a network mount failing for a while): `run` goes through
    every shard, then stops with one line before stamping extract, and the rerun once the storage is back gives
    the clean run's dataset byte for byte (extract's stamp was not written, so its unfinished shards are redone)."""
    import errno

    from speechinstruct.shardfiles import Unfinished
    from speechinstruct.sources import decoding

    whole = decoding._load_file

    def failing(path, row, sample_rate):
        if "/1002/" in f"/{row['path']}":
            raise OSError(errno.EIO, "Input/output error")
        return whole(path, row, sample_rate)

    recipe = tiny_recipe(tmp_path / "r.yaml", tmp_path / "work")
    monkeypatch.setattr(decoding, "_load_file", failing)
    with pytest.raises(Unfinished, match="could not be read for a reason that may pass"):
        run(recipe)
    assert not (tmp_path / "work" / "speechinstruct-demo" / "features" / ".stage.json").exists()
    monkeypatch.setattr(decoding, "_load_file", whole)
    assert run(recipe)["valid"]
    assert snapshot(tmp_path / "work" / "dataset") == snapshot(clean_run / "dataset")


def test_bad_inputs_are_skipped_with_reasons(tmp_path):
    """One utterance per fault, in a LibriSpeech layout; the good ones come through."""
    root = tmp_path / "corpus"
    chapter = root / "dev-clean" / "7" / "1"
    chapter.mkdir(parents=True)
    cases = {}

    def utt(name, text, write=None, expect=None):
        uid = f"7-1-{len(cases):04d}"
        cases[uid] = (name, text, expect)
        if write:
            write(chapter / f"{uid}.flac")

    good = lambda p: sf.write(p, speechlike(1.0, seed=1), 16000)  # noqa: E731
    utt("good", "A GOOD ONE", good)
    utt("48 kHz stereo", "STEREO", lambda p: sf.write(p, np.stack([speechlike(1.0, 48000, 2)] * 2, 1), 48000))
    utt("8 kHz", "LOW RATE", lambda p: sf.write(p, speechlike(1.0, 8000, 3), 8000))
    utt("missing file", "NOT THERE", None, "missing audio file")
    utt("corrupt", "CORRUPT", lambda p: p.write_bytes(b"fLaC\x00\x00\x00\x22" + os.urandom(200)), "unreadable audio")
    # libsndfile reads by content: a zero-frame WAV (a zero-frame FLAC is unreadable, covered by "corrupt")
    utt("zero length", "EMPTY", lambda p: sf.write(p, np.zeros(0, np.float32), 16000, format="WAV"), "empty audio")
    utt("all silent", "SILENT", lambda p: sf.write(p, np.zeros(16000, np.float32), 16000), "all-silent")
    nan = speechlike(1.0, seed=4)
    nan[10:20] = np.nan
    utt("NaN samples", "NAN", lambda p: sf.write(p, nan, 16000, format="WAV", subtype="FLOAT"), "NaN or Inf")
    utt("too short", "SHORT", lambda p: sf.write(p, speechlike(0.01, seed=5), 16000), "too short")

    def truncated(p):
        sf.write(p, speechlike(3.0, seed=6), 16000)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 3])
    utt("truncated", "TRUNCATED", truncated, "truncated|decoder lost sync")
    outside = tmp_path / "outside.flac"
    good(outside)
    utt("symlink out of root", "ESCAPE", lambda p: os.symlink(outside, p), r"a link out of the corpus root \(--follow-links")
    utt("empty transcript", "", good, "empty transcript")
    lines = [f"{uid} {text}" for uid, (_, text, _) in cases.items()]
    (chapter / "7-1.trans.txt").write_text("\n".join(lines) + "\n")
    other = root / "dev-clean" / "8" / "1"
    other.mkdir(parents=True)
    good(other / "8-1-0000.flac")
    (other / "8-1.trans.txt").write_bytes(b"8-1-0000 CAF\xe9 LATIN-1\n")  # not UTF-8

    summary = shard_corpus("librispeech", root, tmp_path / "m")
    stats = extract(tmp_path / "m", tmp_path / "f", MFCC())
    import json
    errors = {json.loads(l)["id"].split("/")[1]: json.loads(l)["reason"]
              for f in (tmp_path / "f").glob("errors-*.jsonl") for l in f.read_text().splitlines()}
    skipped = {s["path"]: s["reason"] + " " + s["detail"] for s in summary["skipped_examples"]}
    assert summary["skipped"]["transcript file is not UTF-8"] == 1
    for uid, (name, _, expect) in cases.items():
        where = " ".join([errors.get(uid, "")] + [v for k, v in skipped.items() if uid in k or uid in v])
        if expect is None:
            assert not where.strip(), f"{name} should pass: {where}"
        else:
            assert re.search(expect, where), f"{name}: expected {expect!r}, got {where!r}"
    assert stats["utterances"] == 3  # good, 48 kHz stereo, 8 kHz


def test_an_io_error_of_the_storage_is_a_skip_that_may_pass(tmp_path):
    """libsndfile says only "System error" (or reads short) when the storage fails under it; decode_row then reads
    the file's bytes itself, so that a real I/O error (the kernel's EIO: /proc/self/mem, where no page backs
    address 0) is a skip that may pass, done again by the rerun, and a corrupt file stays one that does not."""
    from speechinstruct.sources.decoding import MayPass, decode_row

    eio = decode_row({"id": "x", "path": "mem", "offset": 0.0, "duration": 1.0}, "/proc/self")
    assert isinstance(eio, MayPass) and eio == "mem: [Errno 5] Input/output error", eio
    (tmp_path / "bad.flac").write_bytes(b"fLaC not a flac stream")
    bad = decode_row({"id": "y", "path": "bad.flac", "offset": 0.0, "duration": 1.0}, tmp_path)
    assert "unreadable audio" in bad and not isinstance(bad, MayPass), bad


BAD_ROWS = {"path": None, "duration": None, "offset": float("nan")}, {"duration": -1.0}, \
    {"duration": float("inf")}, {"offset": float("nan")}, {"id": ""}, {"path": "a\x00b.flac"}


def test_an_id_twice_in_a_manifest_shard_is_extracted_once(librispeech_root, tmp_path):
    """A hand-merged manifest with one id on two rows was extracted twice: a feature file with one id twice,
    which quantize refuses only after the extraction's hours. The repeat is a counted skip now."""
    import json

    import pyarrow.parquet as pq

    shard_corpus("librispeech", librispeech_root, tmp_path / "m")
    first = sorted((tmp_path / "m").glob("manifest-*.parquet"))[0]
    table = pq.read_table(first)
    pq.write_table(table.take([0, 1, 0]) if table.num_rows > 1 else table.take([0, 0]), first)
    stats = extract(tmp_path / "m", tmp_path / "out", MFCC())
    ids = [i for f in sorted((tmp_path / "out").glob("features-*.arrow")) for i in read_features(f)[0]]
    assert len(ids) == len(set(ids)) == stats["utterances"]
    errors = [json.loads(x) for x in (tmp_path / "out" / f"errors-{first.stem.split('-')[1]}.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in errors] == ["id repeated in this shard (an earlier row has it)"]


@pytest.mark.parametrize("engine", ["local", "ray blocks", "score"])
def test_an_id_in_two_manifest_shards_is_extracted_once(librispeech_root, tmp_path, engine, monkeypatch):
    """A manifest shard copied beside itself (or two shard folders merged by hand) put every utterance in two
    feature files, then two units rows and two records each, refused only at publish ("compose them again", which
    changed nothing). The later shard's repeated rows are now counted skips naming the shard that has them first,
    before their audio is read, its other rows extracted in order; the first shard is untouched, on both engines
    and in any job-array part."""
    import json

    import pyarrow.parquet as pq

    shard_corpus("librispeech", librispeech_root, tmp_path / "m")
    first = sorted((tmp_path / "m").glob("manifest-*.parquet"))[0]
    table = pq.read_table(first)
    ids = table.column("id").to_pylist()
    copy = tmp_path / "m" / "manifest-00099.parquet"  # a merge: new rows between the repeated ones
    fresh = lambda name: {**table.to_pylist()[0], "id": f"librispeech/{name}"}  # noqa: E731
    pq.write_table(table.from_pylist([fresh("new-a"), *table.to_pylist(), fresh("new-b")], table.schema), copy)
    reason = f"id repeated: {first.name} has it first"
    if engine == "ray blocks":
        from speechinstruct.shardfiles import manifest_files, repeated_elsewhere
        from speechinstruct.units.engine_ray import blocks

        cut = list(blocks([first, copy], 2.0, repeated_elsewhere(manifest_files(tmp_path / "m"))))
        assert [r["id"] for b in cut if b.shard == first.name for r in b.rows] == ids
        assert [r["id"] for b in cut if b.shard == copy.name for r in b.rows] == ["librispeech/new-a", "librispeech/new-b"]
        return
    if engine == "score":  # the DNSMOS gate, the costliest stage per hour, scores each utterance once too
        from speechinstruct.curate.score import score
        from speechinstruct.judges.dnsmos import DNSMOS
        from speechinstruct.judges.judge import Judge

        fixed_dnsmos(monkeypatch)
        summary = score(tmp_path / "m", tmp_path / "out", Judge(DNSMOS()))
        assert pq.read_table(tmp_path / "out" / "scores-00099.parquet")["id"].to_pylist() == \
            ["librispeech/new-a", "librispeech/new-b"], summary
        errors = [json.loads(x) for x in (tmp_path / "out" / "errors-00099.jsonl").read_text().splitlines()]
        assert [(e["id"], e["reason"]) for e in errors] == [(i, reason) for i in ids]
        return
    whole = extract(tmp_path / "m", tmp_path / "out", MFCC())
    assert read_features(tmp_path / "out" / f"features-{first.stem.split('-')[1]}.arrow")[0] == ids
    assert read_features(tmp_path / "out" / "features-00099.arrow")[0] == ["librispeech/new-a", "librispeech/new-b"]
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors-00099.jsonl").read_text().splitlines()]
    assert [(e["id"], e["reason"]) for e in errors] == [(i, reason) for i in ids]
    assert whole["skip_reasons"] == {reason: len(ids)} and whole["errors"] == len(ids)  # the summary says why
    part = extract(tmp_path / "m", tmp_path / "part", MFCC(), num_shards=2, shard_index=1)  # the copy's worker alone
    assert part["utterances"] == 2 and part["skip_reasons"] == {reason: len(ids)}


def test_shard_files_without_the_stages_spec_are_not_taken_for_finished_shards(librispeech_root, tmp_path):
    """A feature or scores file copied into an empty output folder (or another tool's) was taken for a finished
    shard: extract wrote features.json beside it and skipped the shard, so that quantize later read frames of
    another extractor, or none of this corpus. Every stage writes its spec file before any shard, so shard files
    without it are one line now, and nothing is written."""
    import shutil

    from speechinstruct.curate.score import score
    from speechinstruct.judges.dnsmos import DNSMOS
    from speechinstruct.judges.judge import Judge

    shard_corpus("librispeech", librispeech_root, tmp_path / "m")
    extract(tmp_path / "m", tmp_path / "f", MFCC())
    suffix = sorted((tmp_path / "m").glob("manifest-*.parquet"))[0].stem.split("-")[1]
    for stage, made in (("extract", f"features-{suffix}.arrow"), ("score", f"errors-{suffix}.jsonl")):
        out = tmp_path / f"copied-{stage}"
        out.mkdir()
        shutil.copy(tmp_path / "f" / made, out / made)
        with pytest.raises(ValueError, match=rf"{made}: already there, but .*copied-{stage} has no "):
            extract(tmp_path / "m", out, MFCC()) if stage == "extract" else score(tmp_path / "m", out, Judge(DNSMOS()))
        assert [p.name for p in out.iterdir()] == [made]
    assert extract(tmp_path / "m", tmp_path / "f", MFCC())["shards_skipped"] >= 1  # its own folder: resumed


def test_ids_whose_hashes_collide_are_not_repeats(tmp_path, monkeypatch):
    """repeated_elsewhere keeps hashes of ids, not the ids: every hash equal (a collision on each pair) still
    finds only the id that is really in two files, and the file that has it first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from speechinstruct import shardfiles

    files = [tmp_path / f"manifest-{i:05d}.parquet" for i in range(3)]
    for f, ids in zip(files, (["a", "b"], ["c", "b", None], ["d", "b", "a"])):
        pq.write_table(pa.table({"id": pa.array(ids, pa.string())}), f)
    expected = {"manifest-00001.parquet": {"b": "manifest-00000.parquet"},
                "manifest-00002.parquet": {"b": "manifest-00000.parquet", "a": "manifest-00000.parquet"}}
    assert shardfiles.repeated_elsewhere(files) == expected
    monkeypatch.setattr(shardfiles, "hash", lambda _: 7, raising=False)
    assert shardfiles.repeated_elsewhere(files) == expected
    monkeypatch.undo()
    pq.write_table(pa.table({"id": pa.array([b"\xff\xfe", b"b"], pa.binary())}), files[1])  # another tool's file
    with pytest.raises(ValueError, match=r"manifest-00001.parquet: its id column holds binary, not text"):
        shardfiles.repeated_elsewhere(files)  # Arrow said "unreadable parquet file, truncated or not one"


@pytest.mark.parametrize("stage", ["extract", "score", "ray blocks"])
def test_hand_edited_manifest_rows_are_skips_with_their_reason(librispeech_root, tmp_path, stage, monkeypatch):
    """A manifest another tool wrote with nullable columns, or a hand edit: a row without a path or a duration,
    with a negative, NaN or infinite time, an empty id or a NUL in its path was a traceback (TypeError) or, with a
    negative duration, the whole file counted as negative hours; each is now a counted skip naming what is wrong."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from speechinstruct.curate.score import score
    from speechinstruct.judges.dnsmos import DNSMOS
    from speechinstruct.judges.judge import Judge

    shard_corpus("librispeech", librispeech_root, tmp_path / "m")
    first = sorted((tmp_path / "m").glob("manifest-*.parquet"))[0]
    table = pq.read_table(first)
    good = table.to_pylist()
    rows = good + [{**good[0], **bad, **({"id": f"bad-{i}"} if "id" not in bad else {})} for i, bad in enumerate(BAD_ROWS)]
    pq.write_table(pa.Table.from_pylist(rows, pa.schema([f.with_nullable(True) for f in table.schema])), first)
    if stage == "ray blocks":
        from speechinstruct.units.engine_ray import blocks

        cut = list(blocks([first], 2.0))  # a bad row weighs nothing (decode_row makes it a skip)
        assert [r["id"] for b in cut for r in b.rows] == [r["id"] for r in rows]
        return
    if stage == "extract":
        stats = extract(tmp_path / "m", tmp_path / "out", MFCC())
    else:
        fixed_dnsmos(monkeypatch)
        stats = score(tmp_path / "m", tmp_path / "out", Judge(DNSMOS()))
    errors = [json.loads(line) for line in (tmp_path / "out" / f"errors-{first.stem.split('-')[1]}.jsonl").read_text().splitlines()]
    reasons = [e["reason"] for e in errors[-len(BAD_ROWS):]]
    assert all(r.startswith("not a manifest row") for r in reasons), reasons
    assert "path" in reasons[0] and "duration" in reasons[1] and "duration" in reasons[2] and "offset" in reasons[3] \
        and "id" in reasons[4] and "NUL" in reasons[5], reasons
    assert stats["utterances"] == 4  # the good ones


def test_gigaspeech_paths_that_escape_the_root_are_refused(tmp_path):
    import json
    root = tmp_path / "giga"
    root.mkdir()
    sf.write(tmp_path / "outside.opus", speechlike(2.0), 16000, format="OGG", subtype="OPUS")
    seg = lambda sid: [{"sid": sid, "begin_time": 0, "end_time": 1, "text_tn": "HI", "subsets": ["{XL}"]}]  # noqa: E731
    (root / "GigaSpeech.json").write_text(json.dumps({"audios": [
        {"aid": "a", "path": "../outside.opus", "segments": seg("a0")},
        {"aid": "b", "path": str(tmp_path / "outside.opus"), "segments": seg("b0")},
    ]}))
    summary = shard_corpus("gigaspeech", root, tmp_path / "m")
    assert summary["utterances"] == 0 and summary["skipped"] == {"path escapes the corpus root": 2}


def test_api_key_never_reaches_any_output(tmp_path, monkeypatch):
    key = "sk-live-DO-NOT-LEAK-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    import json

    def answer(request):
        pair = json.loads(request["messages"][-1]["content"])
        return json.dumps({"fit": True, "instruction": pair["instruction"], "response": pair["response"]})

    with FakeOpenAI(default=answer) as server:
        recipe = tiny_recipe(tmp_path / "r.yaml", tmp_path / "work", demo_corpus={"sentences": 12, "seed": 1},
                             llm={"base_url": server.url, "model": "local", "max_requests": 50},
                             compose={"chain_of_modality": {"max_pairs": 4, "rewrite": True}})
        assert run(recipe)["valid"]
        assert len(server.requests) == 4
    assert key not in recipe.read_text()
    for f in (tmp_path / "work").rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f


def test_files_respect_the_umask(tmp_path):
    """Written files get 0666 less the umask (0644 by default), not mkstemp's 0600."""
    import stat
    import pyarrow as pa
    from speechinstruct import io
    io.write_json(tmp_path / "a.json", {"x": 1})
    io.write_parquet(tmp_path / "b.parquet", pa.table({"x": [1]}))
    for name in ("a.json", "b.parquet"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == io.FILE_MODE == 0o666 & ~io._UMASK
    code = ("import os, stat, sys; from speechinstruct import io; io.write_text(sys.argv[1], 'x'); "
            "print(oct(stat.S_IMODE(os.stat(sys.argv[1]).st_mode)))")
    for umask, mode in ((0o022, "0o644"), (0o077, "0o600"), (0o002, "0o664")):
        out = subprocess.run(["bash", "-c", f"umask {umask:03o}; exec \"$0\" -c \"$1\" \"$2\"", sys.executable, code,
                              str(tmp_path / f"m{umask:o}.txt")], capture_output=True, text=True, check=True).stdout
        assert out.strip() == mode


def test_a_symlink_loop_in_a_corpus_is_skipped(librispeech_root, tmp_path):
    chapter = librispeech_root / "train-clean-100" / "1272" / "128104"
    (chapter / "1272-128104-0000.flac").unlink()
    os.symlink(chapter / "1272-128104-0000.flac", chapter / "1272-128104-0000.flac")  # points at itself
    summary = shard_corpus("librispeech", librispeech_root, tmp_path / "m")
    assert summary["skipped"]["path escapes the corpus root"] == 1 and summary["utterances"] == 3
    example = next(s for s in summary["skipped_examples"] if s["reason"] == "path escapes the corpus root")
    assert "symlink loop" in example["detail"]


def test_stale_temp_files_of_a_killed_job_are_removed(librispeech_root, tmp_path):
    shard_corpus("librispeech", librispeech_root, tmp_path / "m", sections.Shard(shard_hours=2.5 / 3600))
    out = tmp_path / "f"
    out.mkdir()
    stale = [out / ".features-00000.arrow.tmp-abc123", out / ".errors-00000.jsonl.tmp-x"]
    other_task = out / ".features-00001.arrow.tmp-def456"  # a shard another job-array task owns
    for f in stale + [other_task]:
        f.write_bytes(b"half written")
    extract(tmp_path / "m", out, MFCC(), num_shards=2, shard_index=0)
    assert not any(f.exists() for f in stale) and other_task.exists()
    assert (out / "features-00000.arrow").is_file()


def test_a_second_extract_never_deletes_a_live_runs_temporary_files(librispeech_root, tmp_path):
    """Two extract runs on one shard: the second one's clean-up leaves the first's live temporary file (its
    writer's host and pid are in the name, and that process runs), and removes a dead writer's."""
    import socket

    from speechinstruct.io import atomic_path

    shard_corpus("librispeech", librispeech_root, tmp_path / "m")
    out = tmp_path / "f"
    out.mkdir()
    with atomic_path(out / "probe.txt") as tmp:
        host = re.search(r"\.tmp-(.+)-(\d+)-", tmp.name).group(1)
        assert int(re.search(r"\.tmp-(.+)-(\d+)-", tmp.name).group(2)) == os.getpid()
        assert host == re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        first = out / f".features-00000.arrow.tmp-{host}-{live.pid}-k2j4x9ab"  # the first run, still writing
        gone = out / f".features-00000.arrow.tmp-{host}-{dead.pid}-q8w7e6rt"  # a killed run's
        remote = out / f".features-00000.arrow.tmp-otherhost-{dead.pid}-z1x2c3v4"  # a live run elsewhere, maybe
        for f in (first, gone, remote):
            f.write_bytes(b"half written")
        extract(tmp_path / "m", out, MFCC())
        assert first.read_bytes() == b"half written" and remote.exists() and not gone.exists()
        assert (out / "features-00000.arrow").is_file()
    finally:
        live.kill()
        live.wait()


def test_two_extract_processes_on_one_shard_both_finish(librispeech_root, tmp_path):
    shard_corpus("librispeech", librispeech_root, tmp_path / "m")
    cmd = [sys.executable, "-m", "speechinstruct.cli", "extract", str(tmp_path / "m"), str(tmp_path / "f"), "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert (tmp_path / "f" / "features-00000.arrow").is_file()
    assert not list((tmp_path / "f").glob(".*.tmp-*"))


@pytest.mark.parametrize("threads,expected", [(None, "1 1 PASSIVE"), (2, "2 2 PASSIVE")])
def test_thread_counts_follow_the_cpus_we_may_use(threads, expected):
    """Pinned to one CPU (as taskset or SLURM would), FAISS's OpenMP and torch use one thread, and OpenMP
    waits passively; --threads overrides."""
    code = (f"import os; os.sched_setaffinity(0, {{0}}); from speechinstruct import threads; "
            f"threads.configure({threads}); import torch, faiss; "
            "print(torch.get_num_threads(), faiss.omp_get_max_threads(), os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                            "OPENBLAS_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[-2] == expected


def test_the_user_environment_wins():
    code = "from speechinstruct import threads; import os; print(threads.configure(), os.environ['OMP_WAIT_POLICY'])"
    env = {**os.environ, "OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "3 ACTIVE"


def test_run_keeps_the_users_files_in_an_existing_dataset_folder(tmp_path):
    """`output.dataset` pointed at a folder of the user's: their files survive the first publish and a later
    one that the recipe's change forces (the stage clears only its own files, publish deletes only its own)."""
    mine = tmp_path / "shared-dataset"
    (mine / "data" / "mine").mkdir(parents=True)
    (mine / "data" / "mine" / "important.parquet").write_bytes(b"user data")
    (mine / "notes.md").write_text("mine\n")
    recipe = tiny_recipe(tmp_path / "r.yaml", tmp_path / "work", output={"dataset": str(mine), "vocoder": "none"})
    assert run(recipe)["valid"]
    tiny_recipe(tmp_path / "r.yaml", tmp_path / "work", name="renamed", output={"dataset": str(mine), "vocoder": "none"})
    assert run(recipe)["valid"]
    assert (mine / "data" / "mine" / "important.parquet").read_bytes() == b"user data"
    assert (mine / "notes.md").read_text() == "mine\n" and "# renamed" in (mine / "README.md").read_text()


def _gone(pid: int, seconds: float = 20.0) -> bool:
    """Whether process ``pid`` has ended (or become a zombie) within ``seconds``."""
    import psutil

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _child_ends_with_its_parent(script, pid_file) -> bool:
    """Run ``script PID_FILE`` (which forks a child that writes its pid there), SIGKILL it once the child is
    up, and say whether the child then ends (it is killed here either way)."""
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not pid_file.exists() and parent.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    try:
        return _gone(child)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_killed_run_leaves_no_espeak_process_behind(tmp_path):
    """The forked process EspeakTTS speaks each utterance in dies with its parent: left running, it held the
    workdir lock it inherited, and the rerun was refused (seen once in the sigkill test above)."""
    script = tmp_path / "speak.py"
    script.write_text(
        "import os, sys, time\n"
        "from speechinstruct.sources.tts import EspeakTTS\n"
        "def hold(path):\n"
        "    open(path + '.tmp', 'w').write(str(os.getpid())); os.replace(path + '.tmp', path); time.sleep(120)\n"
        "EspeakTTS()._fresh(hold, sys.argv[1])\n")
    assert _child_ends_with_its_parent(script, tmp_path / "child.pid"), \
        "the espeak-ng process outlived the run that started it"


def test_an_espeak_process_whose_parent_died_does_not_block_on_its_answer(tmp_path):
    """Without the death signal (another OS), the process still ends: it had inherited the pipe's reading end
    too, so writing a large answer to a parent that had died blocked forever (seen: an orphan of a killed run
    asleep 35 minutes later)."""
    script = tmp_path / "answer.py"
    script.write_text(
        "import os, sys, time\n"
        "import speechinstruct.sources.tts as tts\n"
        "tts._die_with = lambda parent: None\n"
        "def answer(path):\n"
        "    parent = os.getppid(); open(path + '.tmp', 'w').write(str(os.getpid())); os.replace(path + '.tmp', path)\n"
        "    while os.getppid() == parent: time.sleep(0.05)\n"
        "    return b'x' * 1_000_000\n"
        "tts.EspeakTTS()._fresh(answer, sys.argv[1])\n")
    assert _child_ends_with_its_parent(script, tmp_path / "child.pid"), \
        "the espeak-ng process blocked writing its answer to a dead parent"


def test_a_lock_left_by_a_killed_runs_children_is_waited_for(tmp_path):
    """A child process of a killed run still holds the workdir lock it inherited: the next run waits for it
    to end (a few seconds here) instead of refusing to start."""
    from speechinstruct.pipeline import workdir_lock

    script = tmp_path / "hold.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "from speechinstruct.pipeline import workdir_lock\n"
        "with workdir_lock(Path(sys.argv[1])):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(3); os._exit(0)\n"
        "    Path(sys.argv[1], 'forked').write_text('')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, str(script), str(tmp_path / "work")], timeout=60)
    assert (tmp_path / "work" / "forked").exists()
    with workdir_lock(tmp_path / "work"):
        pass

"""Sources and stage inputs in object storage (speechinstruct.sources.storage), against a real S3 API on loopback: moto's
server, started as its own process, checking signatures against the IAM user it holds (as S3 does), so that a
wrong secret is refused as S3 refuses it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import fixed_dnsmos, write_librispeech
from speechinstruct.sources import storage
from speechinstruct.cli import app
from speechinstruct.sources.shard import shard_corpus
from speechinstruct.shardfiles import manifest_files, read_features
from test_webdataset import write_shards

pytest.importorskip("s3fs")
runner = CliRunner()
ALL = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback that checks every request's signature against its one IAM user's key."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        admin = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "admin",
                 "aws_secret_access_key": "admin"}
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="all", PolicyDocument=ALL)
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket="corpus")
        # from here on moto authenticates every request (its documented INITIAL_NO_AUTH_ACTION_COUNT switch)
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"}))
        env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
               "AWS_ENDPOINT_URL_S3": endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1",
               "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
               "AWS_EC2_METADATA_DISABLED": "true"}
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        yield {"env": env, "client": client, "endpoint": endpoint}
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def bucket(s3, monkeypatch, tmp_path):
    """The server's credentials in this test's environment only, a fresh cache, and no filesystem objects left
    from another test's credentials (fsspec keeps one per set of arguments, whatever the environment)."""
    import s3fs

    for name, value in s3["env"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3
    s3fs.S3FileSystem.clear_instance_cache()


def upload(client, folder, prefix):
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(Bucket="corpus", Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())


def rows_of(folder):
    return sorted((r for f in manifest_files(folder) for r in pq.read_table(f).to_pylist()), key=lambda r: r["id"])


def test_a_corpus_in_a_bucket_shards_as_its_local_copy_does(bucket, tmp_path):
    local = write_librispeech(tmp_path / "LibriSpeech")
    upload(bucket["client"], local, "ls-shard/LibriSpeech")
    summary = shard_corpus("librispeech", "s3://corpus/ls-shard/LibriSpeech", tmp_path / "remote")
    expected = shard_corpus("librispeech", local, tmp_path / "local")
    assert summary["remote"] == "s3://corpus/ls-shard/LibriSpeech"
    assert summary["root"] == str(tmp_path / "cache" / "s3" / "corpus" / "ls-shard" / "LibriSpeech")
    assert summary["utterances"] == expected["utterances"] == 4
    assert summary["skipped"] == expected["skipped"]  # the corrupt flac is skipped there as here
    assert [{k: v for k, v in r.items()} for r in rows_of(tmp_path / "remote")] == rows_of(tmp_path / "local")


def test_a_rerun_downloads_nothing_and_follows_what_changed_in_the_bucket(bucket, tmp_path):
    client = bucket["client"]
    for name, body in {"a.txt": b"first", "sub/b.txt": b"second", "sub/c.txt": b"third"}.items():
        client.put_object(Bucket="corpus", Key=f"rerun/{name}", Body=body)
    first = storage.mirror("s3://corpus/rerun")
    assert (first.files, first.downloaded, first.removed) == (3, 3, 0)
    stamps = {p: p.stat().st_mtime_ns for p in first.path.rglob("*.txt")}
    again = storage.mirror("s3://corpus/rerun")
    assert (again.downloaded, again.downloaded_bytes) == (0, 0)
    assert {p: p.stat().st_mtime_ns for p in first.path.rglob("*.txt")} == stamps  # not one file rewritten

    client.put_object(Bucket="corpus", Key="rerun/a.txt", Body=b"FIRST")  # same size, new content: a new ETag
    client.delete_object(Bucket="corpus", Key="rerun/sub/c.txt")
    client.put_object(Bucket="corpus", Key="rerun/d.txt", Body=b"fourth")
    (first.path / "sub" / "b.txt").write_bytes(b"sec")  # a copy cut short (a disk full, a hand edit)
    changed = storage.mirror("s3://corpus/rerun")
    assert (changed.files, changed.downloaded, changed.removed) == (3, 3, 1)
    assert {p.relative_to(first.path).as_posix(): p.read_bytes() for p in first.path.rglob("*.txt")} == {
        "a.txt": b"FIRST", "sub/b.txt": b"second", "d.txt": b"fourth"}  # c.txt, gone from the bucket, is gone here


def test_tar_shards_in_a_bucket_are_read_by_their_pattern(bucket, tmp_path):
    folder, _ = write_shards(tmp_path)
    upload(bucket["client"], folder, "wds")
    bucket["client"].put_object(Bucket="corpus", Key="wds/train-000009.tar", Body=b"not named by the pattern")
    pattern = "s3://corpus/wds/train-{000000..000001}.tar"
    summary = shard_corpus("webdataset", pattern, tmp_path / "remote", license="CC-BY-4.0")
    expected = shard_corpus("webdataset", str(folder / "train-{000000..000001}.tar"), tmp_path / "local",
                            license="CC-BY-4.0")
    assert summary["remote"] == pattern and summary["utterances"] == expected["utterances"] == 4
    assert [r["tar_offset"] for r in rows_of(tmp_path / "remote")] == [r["tar_offset"] for r in rows_of(tmp_path / "local")]
    copied = sorted(p.name for p in (tmp_path / "cache" / "s3" / "corpus" / "wds").glob("*.tar"))
    assert copied == ["train-000000.tar", "train-000001.tar"]  # only what the pattern names
    result = runner.invoke(app, ["extract", str(tmp_path / "remote"), str(tmp_path / "features"), "-q"])
    assert result.exit_code == 0, result.output  # the members are read in place, in the cache's copy
    assert len(list((tmp_path / "features").glob("features-*.arrow"))) == 1
    bucket["client"].delete_object(Bucket="corpus", Key="wds/train-000001.tar")  # its copy is in the cache
    again = shard_corpus("webdataset", pattern, tmp_path / "again", license="CC-BY-4.0")
    assert again["utterances"] == 3 and {r["path"] for r in rows_of(tmp_path / "again")} == {"train-000000.tar"}


def test_a_folder_of_tar_shards_in_a_bucket_is_read_as_its_local_copy(bucket, tmp_path):
    """`shard webdataset s3://corpus/hub-layout/` (the Hub's split-folder layout in a bucket): the folder is copied and
    read as the local folder is, each tar's split from its folder."""
    from test_webdataset import split_folders

    root, _ = split_folders(tmp_path)
    upload(bucket["client"], root, "hub-layout")  # the bucket is the module's: a prefix no other test writes
    summary = shard_corpus("webdataset", "s3://corpus/hub-layout/", tmp_path / "remote", license="CC-BY-4.0")
    expected = shard_corpus("webdataset", root, tmp_path / "local", license="CC-BY-4.0")
    assert summary["splits"] == expected["splits"] and set(summary["splits"]) == {"train", "validation"}
    columns = ("id", "path", "tar_offset", "tar_size", "split", "text")
    assert [tuple(r[c] for c in columns) for r in rows_of(tmp_path / "remote")] == \
        [tuple(r[c] for c in columns) for r in rows_of(tmp_path / "local")]

    # a bucket folder that gives no utterance: the line names the URL the user gave, not the cache's copy
    bucket["client"].put_object(Bucket="corpus", Key="damaged/train/000000.tar", Body=b"not a tar")
    nothing = runner.invoke(app, ["shard", "webdataset", "s3://corpus/damaged/", str(tmp_path / "d"), "--license", "x",
                                  "-q"])
    assert nothing.exit_code == 2 and nothing.output.strip().splitlines()[-1].startswith(
        "error: s3://corpus/damaged/: no utterance read: every one was skipped (truncated or damaged tar: 1)"), \
        nothing.output


def test_a_stage_input_may_be_a_url(bucket, tmp_path, librispeech_root):
    shard_corpus("librispeech", librispeech_root, tmp_path / "manifest")
    upload(bucket["client"], tmp_path / "manifest", "stage/manifest")
    result = runner.invoke(app, ["extract", "s3://corpus/stage/manifest", str(tmp_path / "features"), "-q"])
    assert result.exit_code == 0, result.output
    ids, _ = read_features(tmp_path / "features" / "features-00000.arrow")
    assert sorted(ids) == sorted(r["id"] for r in rows_of(tmp_path / "manifest"))


def _cli_error(args, **env):
    """Run the CLI in its own process (as a user does) with ``env`` over the server's; its exit code and stderr."""
    done = subprocess.run([sys.executable, "-m", "speechinstruct.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    return done.returncode, " ".join(re.sub("[│╭╮╰╯─]", " ", done.stderr).split())  # typer's box, unwrapped


def test_bad_buckets_and_credentials_are_one_line_and_no_secret_reaches_the_disk(bucket, tmp_path):
    bucket["client"].put_object(Bucket="corpus", Key="bad/a.txt", Body=b"x")
    out = tmp_path / "out"
    cases = {
        "access refused": (["validate", "s3://corpus/bad"], {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}),
        "no such bucket": (["validate", "s3://no-such-bucket/x"], {}),
        "no such file or folder": (["validate", "s3://corpus/nothing-here"], {}),
        "cannot reach the storage": (["validate", "s3://corpus/bad"], {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}),
        "no credentials found": (["validate", "s3://corpus/bad"], {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}),
        "credentials in a URL are refused": (["shard", "librispeech", "s3://key:hunter2@corpus/bad", str(out)], {}),
        "needs gcsfs": (["shard", "librispeech", "gs://corpus/bad", str(out)], {}),
    }
    for expected, (args, env) in cases.items():
        code, stderr = _cli_error(args, **env)
        assert code == 2 and expected in stderr and "Traceback" not in stderr, (expected, stderr)
    secrets = [bucket["env"]["AWS_SECRET_ACCESS_KEY"], "hunter2"]
    for path in [*tmp_path.rglob("*")]:
        if path.is_file():
            data = path.read_bytes()
            assert not any(s.encode() in data for s in secrets), path


def test_a_download_cut_off_leaves_no_half_file_and_the_rerun_fetches_only_the_rest(bucket, tmp_path, monkeypatch):
    import fsspec

    for name in ("a.bin", "b.bin", "c.bin"):
        bucket["client"].put_object(Bucket="corpus", Key=f"cut/{name}", Body=name.encode() * 1000)
    fs, _ = fsspec.core.url_to_fs("s3://corpus")  # the instance storage gets too (fsspec caches it)
    whole = fs.get_file

    def cut_off(rpath, lpath, **kwargs):
        if rpath.endswith("b.bin"):
            with open(lpath, "wb") as f:
                f.write(b"half")
            raise ConnectionResetError("connection reset by peer")
        return whole(rpath, lpath, **kwargs)

    monkeypatch.setattr(fs, "get_file", cut_off)
    with pytest.raises(storage.StorageError, match="s3://corpus/cut/b.bin: cannot reach the storage"):
        storage.mirror("s3://corpus/cut")
    copy = tmp_path / "cache" / "s3" / "corpus" / "cut"
    assert sorted(p.name for p in copy.iterdir()) == ["a.bin", "c.bin"]  # no b.bin, whole or half
    monkeypatch.setattr(fs, "get_file", whole)
    rerun = storage.mirror("s3://corpus/cut")
    assert rerun.downloaded == 1 and (copy / "b.bin").read_bytes() == b"b.bin" * 1000


def test_a_recipe_may_name_a_bucket_as_a_corpus_root(tmp_path):
    from speechinstruct.recipe import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("corpora: [{name: librispeech, root: 's3://corpus/LibriSpeech'}]\n")
    assert load_recipe(recipe)["corpora"][0]["root"] == "s3://corpus/LibriSpeech"  # checked when copied
    recipe.write_text(f"corpora: [{{name: librispeech, root: '{tmp_path}/s3:/corpus'}}]\n")
    with pytest.raises(RecipeError, match="is not a folder"):
        load_recipe(recipe)


def test_a_single_file_in_a_bucket_is_an_input_as_a_folder_is(bucket, tmp_path):
    """Every input URL that named one file (a k-means .npy, a templates file, a fairseq checkpoint) stopped with
    a traceback (`UnboundLocalError: … 'refused'`) since names climbing out with `..` were refused in folders."""
    import numpy as np

    from speechinstruct.units.cluster import cluster
    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import MFCC
    from speechinstruct import recipe as sections

    shard_corpus("librispeech", write_librispeech(tmp_path / "LibriSpeech"), tmp_path / "m")
    extract(tmp_path / "m", tmp_path / "f", MFCC())
    cluster(tmp_path / "f", tmp_path / "km", sections.KMeans(k=4))
    bucket["client"].put_object(Bucket="corpus", Key="km/c.npy", Body=(tmp_path / "km" / "centroids.npy").read_bytes())
    np.save(tmp_path / "c.npy", np.load(tmp_path / "km" / "centroids.npy"))
    for kmeans, out in (("s3://corpus/km/c.npy", "remote"), (str(tmp_path / "c.npy"), "local")):
        result = runner.invoke(app, ["quantize", str(tmp_path / "f"), kmeans, str(tmp_path / out), "-q"])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "remote" / "units-00000.parquet").read_bytes() == (tmp_path / "local" / "units-00000.parquet").read_bytes()


def test_a_recipe_may_name_models_and_files_in_a_bucket(bucket, tmp_path):
    """The commands took a URL for every input, a recipe for its corpora's roots only: `features.checkpoint:
    s3://…` was "does not exist". The recipe's file and folder keys are copied when it is loaded now, and it
    reads the copies; what cannot be copied is one line naming the key."""
    import yaml

    from asr_fixture import write_tiny_ctc
    from speechinstruct.recipe import RecipeError, load_recipe

    upload(bucket["client"], write_tiny_ctc(tmp_path / "ctc"), "models/ctc")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "asr.txt").write_text("Transcribe this: {speech}\n")
    upload(bucket["client"], tmp_path / "t", "templates")
    bucket["client"].put_object(Bucket="corpus", Key="km/km.bin", Body=b"not read when loading")
    data = {"demo_corpus": {"sentences": 4}, "kmeans": {"path": "s3://corpus/km/km.bin"},
            "templates": {"asr": "s3://corpus/templates/asr.txt"},
            "quality": {"asr": "s3://corpus/models/ctc", "max_wer": 0.5}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    cache = tmp_path / "cache" / "s3" / "corpus"
    assert recipe["kmeans"]["path"] == str(cache / "km" / "km.bin") and (cache / "km" / "km.bin").is_file()
    assert Path(recipe["templates"]["asr"]).read_text() == "Transcribe this: {speech}\n"
    assert recipe["quality"]["asr"] == str(cache / "models" / "ctc") and (cache / "models" / "ctc" / "config.json").is_file()

    data["features"] = {"kind": "hubert", "checkpoint": "s3://corpus/models/missing.pt", "layer": 6}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as refused:
        load_recipe(path)
    assert str(refused.value).splitlines() == [f"{path}: features.checkpoint: s3://corpus/models/missing.pt: no such "
                                               "file or folder (nothing is stored under this name)"]


def test_a_dataset_on_the_hub_is_read_through_hf_urls(tmp_path, monkeypatch):
    """hf:// through huggingface_hub's own HfFileSystem, against the loopback Hub (tests/hub_server.py), which
    answers its tree, paths-info and /resolve/ requests as the Hub does."""
    from hub_server import Hub

    hub = Hub()
    try:
        hub.serve_huggingface_hub(monkeypatch)
        monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
        local = write_librispeech(tmp_path / "LibriSpeech")
        hub.add_repo("user/corpus", local, under="LibriSpeech/")
        summary = shard_corpus("librispeech", "hf://datasets/user/corpus/LibriSpeech", tmp_path / "m")
        expected = shard_corpus("librispeech", local, tmp_path / "local")
        assert summary["remote"] == "hf://datasets/user/corpus/LibriSpeech" and summary["utterances"] == 4
        assert rows_of(tmp_path / "m") == rows_of(tmp_path / "local") and summary["skipped"] == expected["skipped"]
        fetched = [c for c in hub.calls if "/resolve/" in c[1] and c[0] == "GET"]
        again = storage.mirror("hf://datasets/user/corpus/LibriSpeech")
        assert again.downloaded == 0 and [c for c in hub.calls if "/resolve/" in c[1] and c[0] == "GET"] == fetched
        with pytest.raises(storage.StorageError, match="hf://datasets/user/nothing: no such bucket, file or folder"):
            storage.mirror("hf://datasets/user/nothing")
    finally:
        hub.close()


def test_tasks_copying_one_url_at_once_download_each_file_once(bucket, monkeypatch):
    """Job-array tasks all given one input URL: one copies it while the others wait, then find it there."""
    import threading

    import fsspec

    for i in range(12):
        bucket["client"].put_object(Bucket="corpus", Key=f"together/{i:02d}.bin", Body=bytes([i]) * 100)
    fs, _ = fsspec.core.url_to_fs("s3://corpus")
    whole = fs.get_file

    def slow(rpath, lpath, **kwargs):  # downloads that take a while, so that the tasks overlap
        time.sleep(0.05)
        return whole(rpath, lpath, **kwargs)

    monkeypatch.setattr(fs, "get_file", slow)
    copies = []
    tasks = [threading.Thread(target=lambda: copies.append(storage.mirror("s3://corpus/together")))
             for _ in range(3)]
    for task in tasks:
        task.start()
    for task in tasks:
        task.join()
    assert sorted(c.downloaded for c in copies) == [0, 0, 12]
    assert sorted(p.name for p in copies[0].path.iterdir()) == [f"{i:02d}.bin" for i in range(12)]  # nothing else


def test_lhotse_recordings_in_a_bucket_are_copied_once_and_read(bucket, tmp_path):
    """lhotse manifests (written by lhotse) whose recordings are ``url`` sources in S3, one of them gone from
    the bucket: the others shard as their local files do, the gone one is a counted skip."""
    import soundfile as sf
    from lhotse import Recording, RecordingSet, SupervisionSegment, SupervisionSet
    from lhotse.audio import AudioSource

    from conftest import speechlike

    local = tmp_path / "audio"
    local.mkdir()
    remote, here, sups = [], [], []
    for i in range(3):
        sf.write(local / f"r{i}.flac", speechlike(2.0, seed=i), 16000)
        if i < 2:
            bucket["client"].put_object(Bucket="corpus", Key=f"lh/audio/r{i}.flac", Body=(local / f"r{i}.flac").read_bytes())
        here.append(Recording.from_file(local / f"r{i}.flac", recording_id=f"r{i}"))
        remote.append(Recording(id=f"r{i}", sampling_rate=16000, num_samples=32000, duration=2.0,
                                sources=[AudioSource(type="url", channels=[0], source=f"s3://corpus/lh/audio/r{i}.flac")]))
        sups.append(SupervisionSegment(id=f"r{i}-0", recording_id=f"r{i}", start=0.2, duration=1.5, channel=0,
                                       text=f"utterance {i}", speaker="s0"))
    for name, recordings in (("remote", remote), ("local", here)):
        (tmp_path / name).mkdir()
        RecordingSet.from_recordings(recordings).to_file(tmp_path / name / "x_recordings_train.jsonl.gz")
        SupervisionSet.from_segments(sups).to_file(tmp_path / name / "x_supervisions_train.jsonl.gz")
    summary = shard_corpus("lhotse", tmp_path / "remote", tmp_path / "m-remote", license="CC0-1.0")
    expected = shard_corpus("lhotse", tmp_path / "local", tmp_path / "m-local", license="CC0-1.0")
    assert summary["root"] == str(tmp_path / "cache" / "s3" / "corpus" / "lh" / "audio")
    assert summary["skipped"] == {"missing audio file": 1} and summary["utterances"] == 2
    assert rows_of(tmp_path / "m-remote") == [r for r in rows_of(tmp_path / "m-local") if r["id"] != "lhotse/train/r2-0"]
    assert expected["utterances"] == 3
    copies = sorted((tmp_path / "cache" / "s3" / "corpus" / "lh" / "audio").iterdir())
    stamps = [p.stat().st_mtime_ns for p in copies]
    again = shard_corpus("lhotse", tmp_path / "remote", tmp_path / "m-again", license="CC0-1.0")
    assert again["utterances"] == 2 and [p.stat().st_mtime_ns for p in copies] == stamps  # nothing fetched twice
    bucket["client"].delete_object(Bucket="corpus", Key="lh/audio/r1.flac")  # its old copy stays in the cache
    gone = shard_corpus("lhotse", tmp_path / "remote", tmp_path / "m-gone", license="CC0-1.0")
    assert gone["skipped"] == {"missing audio file": 2} and [r["id"] for r in rows_of(tmp_path / "m-gone")] == ["lhotse/train/r0-0"]


def test_a_node_without_the_copy_fetches_the_files_its_rows_read(bucket, tmp_path):
    """extract on a machine that did not make the copy (a Ray node without shared storage; here, the copy
    deleted): each row's file is fetched from the bucket into this machine's cache, once, and nothing else."""
    import shutil

    local = write_librispeech(tmp_path / "LibriSpeech")
    upload(bucket["client"], local, "node/LibriSpeech")
    shard_corpus("librispeech", "s3://corpus/node/LibriSpeech", tmp_path / "manifest")
    expected = extract_features(tmp_path / "manifest", tmp_path / "here")
    shutil.rmtree(tmp_path / "cache")
    assert len(expected) == 4 and extract_features(tmp_path / "manifest", tmp_path / "there") == expected
    fetched = sorted(p.name for p in (tmp_path / "cache" / "s3").rglob("*") if p.is_file())
    assert fetched == sorted(r["path"].rsplit("/", 1)[1] for r in rows_of(tmp_path / "manifest"))  # the rows' audio only


def test_a_judge_actor_on_a_node_without_the_copy_fetches_the_asr_model(bucket, tmp_path, monkeypatch):
    """`score --asr s3://… --engine ray`: the CLI copies the model into the driver's cache and the actors get that
    path; an actor on another node found no folder there and could not load the judges. It copies the model from
    its URL now, as decode tasks fetch the corpus files they read (here, the copy deleted; the actor's constructor
    is what Ray runs on the node)."""
    import shutil

    from asr_fixture import write_tiny_ctc
    from speechinstruct.curate.score import JudgeActor

    upload(bucket["client"], write_tiny_ctc(tmp_path / "ctc"), "models/ctc")
    copy = storage.local("s3://corpus/models/ctc")
    shutil.rmtree(tmp_path / "cache")
    # the actor's node name asks Ray, which would start a Ray runtime in this test process (and a `ray stop` in
    # another test would then end the process): a name of our own here
    monkeypatch.setattr("speechinstruct.units.engine_ray.node_name", lambda: "here")
    actor = JudgeActor({"asr": str(copy), "batch_size": 2}, "cpu", 1, None, os.getcwd())  # (it changes to that folder)
    assert actor.judge.asr is not None and (copy / "config.json").is_file()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    shutil.rmtree(tmp_path / "cache")  # a name outside a copy, or a hub id, is left as given
    assert storage.fetch_copy_of(str(tmp_path / "ctc")) == str(tmp_path / "ctc") and not (tmp_path / "cache").exists()
    assert storage.fetch_copy_of("org/model") == "org/model"


def extract_features(manifest, out):
    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import MFCC

    extract(manifest, out, MFCC())
    return {i: frames.tobytes() for f in sorted(out.glob("features-*.arrow")) for i, frames in zip(*read_features(f))}


U = "s3://key:not-a-secret@corpus/x"  # refused before anything is fetched: shows the argument goes through storage
INPUTS = [
    ["shard", "librispeech", U, "o"], ["shard", "lhotse", "m", "o", "--audio-root", U],
    ["shard", "audio", "r", "o", "--license", "L", "--asr", U],
    ["extract", U, "o"], ["extract", "m", "o", "--kmeans", U], ["extract", "m", "o", "--root", U],
    ["extract", "m", "o", "--checkpoint", U],
    ["cluster", U, "o"], ["quantize", U, "k", "o"], ["quantize", "f", U, "o"],
    ["compose", "cross-modal", U, "o"], ["compose", "cross-modal", "u", "o", "--asr-templates", U],
    ["compose", "cross-modal", "u", "o", "--tts-templates", U], ["compose", "cross-modal", "u", "o", "--prefix-file", U],
    ["compose", "pretrain", U, "o"], ["compose", "interleaved", U, "o"],
    *[[*cmd, *opt] for cmd in (["compose", "chain-of-modality"], ["compose", "dialogue"])
      for opt in ([U, "o"], ["builtin", "o", "--kmeans", U], ["builtin", "o", "--checkpoint", U],
                  ["builtin", "o", "--tts-model", U])],
    ["align", U, "o", "--model", "m"], ["align", "m", "o", "--model", U],
    ["publish", U, "o"], ["score", U, "o"], ["score", "s", "o", "--root", U], ["score", "s", "o", "--asr", U],
    ["validate", U], ["report", U, "o"], *[["report", "d", "o", f"--{o}", U] for o in ("units", "vocoder", "work", "asr")],
    ["run", U],
    *[["train", "--stage", "1", *a] for a in (["--base-model", U, "--data", "d", "--out", "o"],
                                             ["--base-model", "b", "--data", U, "--out", "o"],
                                             ["--base-model", "b", "--data", "d", "--out", "o", "--config", U])],
    *[["chat", "--model", "m", f"--{o}", U] for o in ("lora", "audio", "kmeans", "checkpoint", "prefix-file", "vocoder",
                                                      "history")], ["chat", "--model", U],
    ["resynth", U, "o"], ["resynth", "s", "o", "--vocoder", U],
]


@pytest.mark.parametrize("argv", INPUTS, ids=" ".join)
def test_every_input_argument_may_be_a_url(argv):
    result = runner.invoke(app, argv)
    output = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())
    assert result.exit_code == 2 and "credentials in a URL are refused" in output, output
    assert "not-a-secret" not in output


def test_bucket_keys_that_climb_out_of_the_copy_are_skipped_and_counted(bucket, tmp_path):
    """An S3 key may hold '..' parts: written as listed, `ls/LibriSpeech/../../../../victim.txt` would land
    outside the cache (with the default cache, on ~/.bashrc). Such keys are never written; shard counts them."""
    local = write_librispeech(tmp_path / "LibriSpeech")
    upload(bucket["client"], local, "esc/LibriSpeech")
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    depth = len((tmp_path / "cache" / "s3" / "corpus" / "esc" / "LibriSpeech").relative_to(tmp_path).parts)
    evil = "esc/LibriSpeech/" + "../" * depth + "victim.txt"
    bucket["client"].put_object(Bucket="corpus", Key=evil, Body=b"overwritten")
    bucket["client"].put_object(Bucket="corpus", Key="esc/LibriSpeech/./dot.txt", Body=b"x")
    summary = shard_corpus("librispeech", "s3://corpus/esc/LibriSpeech", tmp_path / "out")
    assert victim.read_text() == "mine"
    assert not any(p.name == "victim.txt" for p in (tmp_path / "cache").rglob("*"))
    assert summary["skipped"]["unsafe name in the bucket"] == 2
    assert summary["utterances"] == 4  # the corpus itself is read as before
    copy = storage.mirror("s3://corpus/esc/LibriSpeech")
    assert sorted(copy.refused) == ["../" * depth + "victim.txt", "./dot.txt"]


@pytest.mark.parametrize("stage", ["extract", "score"])
def test_storage_that_fails_for_a_while_then_recovers_is_finished_by_the_rerun(bucket, tmp_path, monkeypatch, stage):
    """A node without the copy reads its rows' files from a bucket that is down (its endpoint refuses
    connections): each such utterance is an error that may pass, the stage still ends every shard but says it
    is not finished (one line, exit 2), and the rerun once the bucket is back does those shards again: every
    utterance is there. The corrupt flac is then a skip that does not pass, and a third run does nothing."""
    import json
    import shutil

    import s3fs

    local = write_librispeech(tmp_path / "LibriSpeech")
    upload(bucket["client"], local, "down/LibriSpeech")
    shard_corpus("librispeech", "s3://corpus/down/LibriSpeech", tmp_path / "manifest")
    fixed_dnsmos(monkeypatch)  # the audio is read from the bucket all the same
    argv = ([stage, str(tmp_path / "manifest"), str(tmp_path / "out")] +
            (["--dnsmos"] if stage == "score" else []))
    whole = runner.invoke(app, [*argv[:2], str(tmp_path / "whole"), *argv[3:]])
    assert whole.exit_code == 0, whole.output
    outputs = "features-*.arrow" if stage == "extract" else "scores-*.parquet"
    shutil.rmtree(tmp_path / "cache")
    with socket.socket() as closed:  # a port nobody listens on: the bucket is down
        closed.bind(("127.0.0.1", 0))
        down = closed.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{down}")
    s3fs.S3FileSystem.clear_instance_cache()
    failed = runner.invoke(app, argv)
    assert failed.exit_code == 2, failed.output
    line = failed.output.strip().splitlines()[-1]
    assert "may pass" in line and "run it again" in line and str(tmp_path / "out") in line, line
    summary = json.loads(failed.stdout[failed.stdout.index("{"):])  # the summary still comes, on stdout
    assert summary["utterances"] == 0 and summary["shards_done"] == 1, summary
    errors = [json.loads(x) for f in sorted((tmp_path / "out").glob("errors-*.jsonl")) for x in f.read_text().splitlines()]
    assert len(errors) == 4 and all(e["may_pass"] for e in errors), errors  # the corrupt flac too: never fetched
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", bucket["endpoint"])
    s3fs.S3FileSystem.clear_instance_cache()
    rerun = runner.invoke(app, argv)
    assert rerun.exit_code == 0, rerun.output

    def rows(folder):
        return sorted(r for f in sorted(folder.glob(outputs)) for r in
                      (zip(*read_features(f)) if stage == "extract" else pq.read_table(f).column("id").to_pylist()))

    if stage == "extract":
        assert {i: x.tobytes() for i, x in rows(tmp_path / "out")} == {i: x.tobytes() for i, x in rows(tmp_path / "whole")}
    else:
        assert rows(tmp_path / "out") == rows(tmp_path / "whole") and len(rows(tmp_path / "out")) == 4
    again = runner.invoke(app, argv)  # finished: nothing is done again
    assert again.exit_code == 0 and '"shards_done": 0' in again.output, again.output


def test_lhotse_shar_in_a_bucket_shards_and_reads_back_as_its_local_copy(bucket, tmp_path):
    """A Shar folder in a bucket is copied and read as the local folder is; a machine without the copy fetches
    the tars its rows read, and their members decode to the same samples."""
    import shutil

    import numpy as np
    from test_lhotse_shar import write_shar
    from speechinstruct.shardfiles import corpus_root
    from speechinstruct.units.extract import decode_row

    (tmp_path / "made").mkdir()
    local = write_shar(tmp_path / "made")
    upload(bucket["client"], local, "lhotse/shar")
    remote = shard_corpus("lhotse", "s3://corpus/lhotse/shar", tmp_path / "remote", license="x")
    here = shard_corpus("lhotse", local, tmp_path / "local", license="x")
    assert remote["utterances"] == here["utterances"] == 7 and remote["skipped"] == here["skipped"]
    assert rows_of(tmp_path / "remote") == rows_of(tmp_path / "local")
    shutil.rmtree(tmp_path / "cache")
    for row, same in zip(rows_of(tmp_path / "remote"), rows_of(tmp_path / "local")):
        np.testing.assert_array_equal(decode_row(row, corpus_root(tmp_path / "remote")),
                                      decode_row(same, corpus_root(tmp_path / "local")))
    fetched = sorted(p.name for p in (tmp_path / "cache" / "s3").rglob("*") if p.is_file())
    assert fetched == sorted({r["path"].rsplit("/", 1)[1] for r in rows_of(tmp_path / "remote")})  # the tars only

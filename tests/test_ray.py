"""The Ray engine: the same files as the local engine, model work on every node of a real multi-node
cluster, finished shards kept when a block keeps failing, and a cluster joined by Ray client and by `auto`."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from speechinstruct.cli import app
from speechinstruct import recipe as sections
from speechinstruct.units.extract import extract
from speechinstruct.units.features import MFCC
from speechinstruct.sources.shard import shard_corpus
from speechinstruct.shardfiles import read_features
from test_recordings import sentences  # noqa: F401  (a fixture: espeak-ng sentences at 16 kHz)

ray = pytest.importorskip("ray")
runner = CliRunner()
SMALL_STORE = 80 * 2**20  # object store per node: the test audio is tiny


@pytest.fixture(autouse=True)
def ray_off():
    yield
    ray.shutdown()


@pytest.fixture
def manifest(librispeech_root, tmp_path):
    shard_corpus("librispeech", librispeech_root, tmp_path / "m", sections.Shard(shard_hours=2.5 / 3600))
    return tmp_path / "m"


def our_lines(output: str) -> list[str]:
    """The command's own lines: without what Ray's driver thread prints when it will (a task's retry after its actor
    was killed, `(raylet) Task JudgeActor.run failed…`, seen once after the command's last line)."""
    plain = (re.sub(r"\x1b\[[0-9;]*m", "", line) for line in output.strip().splitlines())
    return [line for line in plain if not re.match(r"\((raylet|\w+ pid=\d+)", line)]


def same_files(a: Path, b: Path, skip=("units.json", "features.json")):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name not in skip:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_ray_engine_writes_the_same_files_as_the_local_engine(manifest, tmp_path):
    from speechinstruct.units.cluster import cluster
    from speechinstruct.units.engine_ray import extract_ray

    extract(manifest, tmp_path / "f", MFCC())
    cluster(tmp_path / "f", tmp_path / "km", sections.KMeans(k=8))
    local = runner.invoke(app, ["extract", str(manifest), str(tmp_path / "local"), "--kmeans", str(tmp_path / "km"), "-q"])
    assert local.exit_code == 0, local.output
    # one-second blocks: every utterance its own block, so results come back from many tasks
    result = runner.invoke(app, ["extract", str(manifest), str(tmp_path / "ray"), "--kmeans", str(tmp_path / "km"),
                                 "--engine", "ray", "--actors", "1", "--block-seconds", "1", "-q"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout[result.stdout.index("{"):])
    assert stats["utterances"] == 4 and sum(stats["nodes"].values()) == 4
    same_files(tmp_path / "local", tmp_path / "ray")

    # features too, and one engine resumes the other's folder: a missing shard, and one whose errors may pass
    # (its audio read while storage failed for a while) are done again
    (tmp_path / "f" / "features-00001.arrow").unlink()
    (tmp_path / "f" / "errors-00000.jsonl").write_text(json.dumps(
        {"id": "x", "path": "p", "reason": "[Errno 5] Input/output error", "may_pass": True}) + "\n")
    stats = extract_ray(manifest, tmp_path / "f", MFCC(), actors=1)
    assert stats["shards_done"] == 2 and stats["shards_skipped"] == 0
    fresh = tmp_path / "f2"
    extract(manifest, fresh, MFCC())
    same_files(tmp_path / "f", fresh)


def test_ray_engine_runs_hubert_from_a_fairseq_checkpoint(manifest, tmp_path):
    from fairseq_fixture import model_cfg, random_state, save_checkpoint

    from speechinstruct.units.engine_ray import extract_ray
    from speechinstruct.units.features import load_hubert

    cfg = model_cfg()
    save_checkpoint(tmp_path / "hubert.pt", cfg, random_state(cfg))
    hubert = load_hubert(tmp_path / "hubert.pt", layer=2)
    extract(manifest, tmp_path / "local", hubert)
    stats = extract_ray(manifest, tmp_path / "ray", hubert, actors=1, block_seconds=1.0)
    assert stats["utterances"] == 4
    # other batches (one utterance per block) and thread counts than the local run: equal frames, not bytes
    for shard in ("features-00000.arrow", "features-00001.arrow"):
        ids, frames = read_features(tmp_path / "local" / shard)
        ray_ids, ray_frames = read_features(tmp_path / "ray" / shard)
        assert ids == ray_ids
        for a, b in zip(frames, ray_frames):
            np.testing.assert_allclose(b, a, atol=1e-5)


def test_blocks_follow_manifest_order_and_audio_seconds(manifest):
    from speechinstruct.units.engine_ray import blocks
    from speechinstruct.shardfiles import manifest_files

    shards = manifest_files(manifest)
    one = list(blocks(shards, block_seconds=1.0))       # each utterance is longer than 1 s: one row per block
    assert [(b.shard, b.first, len(b.rows)) for b in one] == [("manifest-00000.parquet", 0, 1),
                                                              ("manifest-00000.parquet", 1, 1),
                                                              ("manifest-00001.parquet", 0, 1),
                                                              ("manifest-00001.parquet", 1, 1)]
    whole = list(blocks(shards, block_seconds=1000.0))  # a block never spans two shards
    assert [(b.shard, b.first, len(b.rows)) for b in whole] == [("manifest-00000.parquet", 0, 2),
                                                                ("manifest-00001.parquet", 0, 2)]


def every_node_schedulable(nodes):
    """Wait until the driver's scheduler can place work on every node. ``wait_for_nodes`` returns once the GCS has
    registered a node; the scheduler's own view of its free resources can come later, and SPREAD (best effort)
    then places every actor on the nodes it already knows: seen once in CI on a loaded machine."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def where():
        return ray.get_runtime_context().get_node_id()

    pinned = [where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
              for n in nodes]
    assert ray.get(pinned, timeout=180) == [n["NodeID"] for n in nodes]
    deadline = time.monotonic() + 180  # a readiness wait, as wait_for_nodes's: nothing is asserted on time
    while ray.available_resources().get("CPU", 0) < sum(n["Resources"].get("CPU", 0) for n in nodes):
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.1)


def test_model_work_runs_on_both_nodes_of_a_two_node_cluster(manifest, tmp_path):
    from ray.cluster_utils import Cluster

    from speechinstruct.units.engine_ray import extract_ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": SMALL_STORE})
    try:
        cluster.add_node(num_cpus=2, object_store_memory=SMALL_STORE)  # a second raylet: a node of its own
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)  # extract_ray joins it
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 2
        every_node_schedulable(alive)
        stats = extract_ray(manifest, tmp_path / "ray", MFCC(), actors=2, block_seconds=1.0, address=cluster.address)
        assert stats["actors"] == 2, stats
        # SPREAD put one model actor on each node, and each did part of the work
        assert len(stats["nodes"]) == 2 and all(n >= 1 for n in stats["nodes"].values()), stats
        assert {k.split("/")[1] for k in stats["nodes"]} == {n["NodeID"][:8] for n in alive}
        assert sum(stats["nodes"].values()) == 4
    finally:
        ray.shutdown()
        cluster.shutdown()
    extract(manifest, tmp_path / "local", MFCC())
    same_files(tmp_path / "local", tmp_path / "ray")


def every_cpu_free() -> bool:
    """Whether every CPU of the Ray runtime is free again, within a minute (killing an actor is asynchronous)."""
    for _ in range(600):
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources().get("CPU"):
            return True
        time.sleep(0.1)
    return False


def test_a_block_that_keeps_failing_stops_the_job_with_finished_shards_kept(manifest, tmp_path):
    from speechinstruct.units.engine_ray import RayJobError, extract_ray

    class DiesOnLongAudio(MFCC):  # defined here, so Ray ships it by value to the actor process
        def features_batch(self, wavs):
            if any(w.size > 24_000 for w in wavs):  # the 2 s utterance, first of the second shard
                os._exit(1)  # the actor's process dies, as on a segfault or the OOM killer
            return super().features_batch(wavs)

    class BugOnLongAudio(MFCC):  # a bug: extract makes a ValueError or RuntimeError a row's skip, not this
        def features_batch(self, wavs):
            if any(w.size > 24_000 for w in wavs):
                raise TypeError("no room for 2 s")
            return super().features_batch(wavs)

    with pytest.raises(RayJobError, match=r"manifest-00001\.parquet rows 0-0 failed after 1 retries: The actor is dead"):
        extract_ray(manifest, tmp_path / "f", DiesOnLongAudio(), actors=1, block_seconds=1.0, max_retries=1)
    # an error the code raises is not retried by Ray (it would raise again): the line does not claim retries
    with pytest.raises(RayJobError, match=r"^ray engine: manifest-00001\.parquet rows 0-0 failed: no room for 2 s "):
        extract_ray(manifest, tmp_path / "g", BugOnLongAudio(), actors=1, block_seconds=1.0, max_retries=1)
    assert every_cpu_free()  # the stopped job's actor is gone: a rerun in this process does not wait for its CPU
    assert (tmp_path / "f" / "features-00000.arrow").is_file()   # the shard finished before it was written
    assert not (tmp_path / "f" / "features-00001.arrow").exists()
    ray.shutdown()
    stats = extract_ray(manifest, tmp_path / "f", MFCC(), actors=1)  # the rerun does only what is missing
    assert stats["shards_done"] == 1 and stats["shards_skipped"] == 1
    extract(manifest, tmp_path / "local", MFCC())
    same_files(tmp_path / "local", tmp_path / "f")


def test_the_ray_engine_halves_what_runs_out_of_memory_once_and_counts_it(manifest, tmp_path):
    """An actor whose device fits one utterance at a time (torch.cuda.OutOfMemoryError's name): the first
    batch of two is halved, the actor's later batches are no larger than what fitted (no second halving), the
    summary counts it as the local engine's does, and the files equal the local engine's."""
    from speechinstruct.units.engine_ray import extract_ray

    class OneAtATime(MFCC):  # defined here, so Ray ships it by value to the actor process
        def features_batch(self, wavs):
            if len(wavs) > 1:
                OutOfMemoryError = type("OutOfMemoryError", (RuntimeError,), {})
                raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().features_batch(wavs)

    stats = extract_ray(manifest, tmp_path / "ray", OneAtATime(), actors=1, block_seconds=1000.0)
    assert stats["batches_halved"] == 1 and stats["errors"] == 0, stats  # 2 → 1 + 1 in the first shard only
    extract(manifest, tmp_path / "local", MFCC())
    same_files(tmp_path / "local", tmp_path / "ray")


def test_the_ray_engines_summary_gives_the_model_flop_rate_and_mfu(manifest, tmp_path, monkeypatch):
    """As the local engine's summary: the model's FLOPs (every actor's, summed) over the stage's seconds, and MFU
    over the actors' devices' summed peaks where each is known (on the CPU: only SPEECHINSTRUCT_PEAK_TFLOPS). A
    bad peak is one line before any work."""
    from fairseq_fixture import model_cfg, random_state, save_checkpoint

    from speechinstruct.io import read_table
    from speechinstruct.units.engine_ray import extract_ray
    from speechinstruct.units.features import load_hubert

    cfg = model_cfg()
    save_checkpoint(tmp_path / "hubert.pt", cfg, random_state(cfg))
    hubert = load_hubert(tmp_path / "hubert.pt", layer=2)
    monkeypatch.setenv("SPEECHINSTRUCT_PEAK_TFLOPS", "nan")
    with pytest.raises(ValueError, match="SPEECHINSTRUCT_PEAK_TFLOPS='nan': not a positive number"):
        extract_ray(manifest, tmp_path / "bad", hubert, actors=1)
    assert not (tmp_path / "bad").exists()
    monkeypatch.setenv("SPEECHINSTRUCT_PEAK_TFLOPS", "0.5")
    stats = extract_ray(manifest, tmp_path / "ray", hubert, actors=1)
    rows = [r for p in sorted(manifest.glob("manifest-*.parquet")) for r in read_table(p).to_pylist()]
    rate = sum(hubert.flops(round(r["duration"] * 16000)) for r in rows) / stats["seconds"] / 1e12
    assert stats["errors"] == 0 and stats["model_tflop_per_s"] == float(f"{rate:.4g}") > 0
    assert stats["mfu"] == float(f"{rate / 0.5:.4g}") and "SPEECHINSTRUCT_PEAK_TFLOPS" in stats["mfu_of"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_joins_a_token_auth_cluster_by_ray_client_and_by_auto(manifest, tmp_path, monkeypatch):
    """A cluster started by `ray start --head`, with token authentication on (as Ray >= 2.59 does by default),
    joined from the CLI in another process through the Ray client (`ray://`) and through `auto`."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "speechinstruct-test-" + "0" * 24,
           "RAY_USAGE_STATS_ENABLED": "0"}
    gcs, client = _free_port(), _free_port()
    start = subprocess.run([str(bin_dir / "ray"), "start", "--head", "--num-cpus", "3", "--port", str(gcs),
                            "--ray-client-server-port", str(client), "--include-dashboard", "false",
                            "--object-store-memory", str(SMALL_STORE)],
                           env=env, capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        extract(manifest, tmp_path / "local", MFCC())
        for name, address in (("client", f"ray://127.0.0.1:{client}"), ("auto", "auto")):
            # from another working folder than the cluster's, the corpus root relative to it
            done = subprocess.run([str(bin_dir / "speechinstruct"), "extract", str(manifest), str(tmp_path / name),
                                   "--engine", "ray", "--ray-address", address, "--actors", "2", "-q",
                                   "--root", "LibriSpeech"],
                                  env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
            assert done.returncode == 0, done.stderr[-3000:]
            stats = json.loads(done.stdout[done.stdout.index("{"):])
            assert stats["utterances"] == 4 and sum(stats["nodes"].values()) == 4, stats
            same_files(tmp_path / "local", tmp_path / name)
        # score, from another working folder than the cluster's, with relative paths (the corpus root and the
        # speaker references): the decode tasks and judge actors read them as the driver means them
        row = pq.read_table(manifest / "manifest-00000.parquet").to_pylist()[0]
        (tmp_path / "refs").mkdir()
        shutil.copy(tmp_path / "LibriSpeech" / row["path"], tmp_path / "refs" / f"{row['speaker']}.flac")
        assert Path.cwd() != tmp_path
        relative = ["--root", "LibriSpeech", "--speaker-references", "refs", "--language", "-q"]
        done = subprocess.run([str(bin_dir / "speechinstruct"), "score", str(manifest), "scored", *relative,
                               "--engine", "ray", "--ray-address", "auto", "--actors", "1"],
                              env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        stats = json.loads(done.stdout[done.stdout.index("{"):])
        assert stats["utterances"] == 4 and sum(stats["nodes"].values()) == 4, stats
        monkeypatch.chdir(tmp_path)  # the local engine's files for the same command, run here (a process less)
        local = runner.invoke(app, ["score", str(manifest), "scored-here", *relative])
        assert local.exit_code == 0, local.output[-3000:]
        _score_files_equal(tmp_path / "scored-here", tmp_path / "scored")
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=60)
    shutil.rmtree(tmp_path / "client", ignore_errors=True)


def test_ray_engine_reads_audio_inside_a_hugging_face_dataset(tmp_path):
    """Manifest rows that point into Parquet rows (shard hf): Ray's decode tasks read the same bytes."""
    from test_sources import hub_dataset

    from speechinstruct.units.engine_ray import extract_ray

    shard_corpus("hf", hub_dataset(tmp_path / "tiny-asr"), tmp_path / "m")
    extract(tmp_path / "m", tmp_path / "local", MFCC())
    ray.init(num_cpus=2, object_store_memory=SMALL_STORE, include_dashboard=False, log_to_driver=False)
    stats = extract_ray(tmp_path / "m", tmp_path / "ray", MFCC(), actors=1, block_seconds=2.0)
    assert stats["utterances"] == 6 and stats["errors"] == 1  # the cut-short flac, as locally
    same_files(tmp_path / "local", tmp_path / "ray")


def test_ray_engine_extracts_codec_units_as_the_local_engine(manifest, tmp_path):
    """A codec (tiny random Mimi) shipped to the actors: audio decoded at 24 kHz by the decode tasks, units from the
    codec, the same files and vocabulary as the local engine."""
    from test_codecs import tiny

    tiny("mimi").save_pretrained(tmp_path / "mimi")
    args = ["--features", "mimi", "--checkpoint", str(tmp_path / "mimi"), "--codebooks", "2", "-q"]
    local = runner.invoke(app, ["extract", str(manifest), str(tmp_path / "local"), *args])
    assert local.exit_code == 0, local.output
    result = runner.invoke(app, ["extract", str(manifest), str(tmp_path / "ray"), *args,
                                 "--engine", "ray", "--actors", "1", "--block-seconds", "1"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout[result.stdout.index("{"):])
    assert stats["utterances"] == 4 and sum(stats["nodes"].values()) == 4
    same_files(tmp_path / "local", tmp_path / "ray")
    spec = lambda folder: json.loads((folder / "units.json").read_text())["vocabulary"]  # noqa: E731
    assert spec(tmp_path / "ray") == spec(tmp_path / "local") and spec(tmp_path / "ray")["size"] == 128


def test_extract_reads_webdataset_tar_members_on_the_ray_engine_as_locally(tmp_path):
    """Rows that point into WebDataset tars (tar_offset/tar_size) reach the decode tasks whole. Here, with the other
    Ray tests in one test worker: in test_webdataset.py its ray.init hung once in _init_gcs_client while this
    file's tests (one of which starts a cluster with `ray start`) ran in the other worker."""
    from test_webdataset import write_shards

    from speechinstruct.units.engine_ray import extract_ray

    folder, _ = write_shards(tmp_path)
    shard_corpus("webdataset", f"{folder}/train-{{000000..000001}}.tar", tmp_path / "m", license="x")
    local = extract(tmp_path / "m", tmp_path / "local", MFCC())
    remote = extract_ray(tmp_path / "m", tmp_path / "ray", MFCC(), actors=1)
    assert (local["utterances"], local["errors"]) == (remote["utterances"], remote["errors"]) == (4, 0), (local, remote)
    for f in sorted((tmp_path / "local").glob("features-*.arrow")):
        assert f.read_bytes() == (tmp_path / "ray" / f.name).read_bytes()
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["corpus"] == "webdataset"


def _score_files_equal(a: Path, b: Path):
    """The local engine's score files and Ray's: the same files, errors and rows, each value equal, a DNSMOS score
    or an embedding within 1e-6. Their float sums depend on the batch's other windows and the thread count on some
    CPUs (an AMD EPYC with AVX2: DNSMOS 8e-8 apart with other clips in the batch, GE2E 4e-8 with 1 or 2 threads),
    not on the earlier development machine, where these files were byte-identical. Texts, ids and counts are equal."""
    floats = [p.name for p in a.iterdir() if p.name.startswith(("scores-", "embeddings-"))]
    same_files(a, b, skip=("summary.json", *floats))  # the summaries differ in seconds and the engine's keys
    for name in floats:
        if name.endswith(".npy"):
            np.testing.assert_allclose(np.load(b / name), np.load(a / name), rtol=0, atol=1e-6, err_msg=name)
            continue
        here, there = pq.read_table(a / name), pq.read_table(b / name)
        assert here.schema == there.schema and here.num_rows == there.num_rows, name
        for column in here.column_names:
            mine, theirs = here.column(column).to_pylist(), there.column(column).to_pylist()
            if pa.types.is_floating(here.schema.field(column).type):  # DNSMOS, a speaker similarity
                np.testing.assert_allclose(np.array(theirs, float), np.array(mine, float), rtol=0, atol=1e-6,
                                           err_msg=f"{name} {column}")
            else:
                assert mine == theirs, (name, column)


def test_score_on_a_two_node_cluster_writes_the_local_engines_files(manifest, tmp_path):
    """`score --engine ray`: DNSMOS, speaker embeddings and language ID judged by actors on both nodes of a
    two-raylet cluster; the scores, errors (an unreadable file among them) and embeddings equal the local engine's."""
    from ray.cluster_utils import Cluster

    from speechinstruct.curate.score import score, score_ray
    from speechinstruct.io import read_table
    from speechinstruct.judges.judge import Judge

    rows = read_table(manifest / "manifest-00001.parquet").to_pylist()
    root = json.loads((manifest / "summary.json").read_text())["root"]
    (Path(root) / rows[1]["path"]).write_bytes(b"not audio at all")
    options = {"dnsmos": True, "speaker": "resemblyzer", "language": True}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": SMALL_STORE})
    try:
        cluster.add_node(num_cpus=2, object_store_memory=SMALL_STORE)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        alive = [n for n in ray.nodes() if n["Alive"]]
        every_node_schedulable(alive)
        stats = score_ray(manifest, tmp_path / "ray", options, actors=2, block_seconds=1.0, address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert stats["engine"] == "ray" and stats["actors"] == 2 and stats["shards_done"] == 2, stats
    assert len(stats["nodes"]) == 2 and sum(stats["nodes"].values()) == 4, stats  # each node judged a part
    assert stats["utterances"] == 3 and stats["skipped"] == 1, stats
    local = score(manifest, tmp_path / "local", Judge.load(**options))
    assert local["utterances"] == 3
    _score_files_equal(tmp_path / "local", tmp_path / "ray")


def test_cli_score_on_ray_resumes_refuses_other_judges_and_says_when_an_actor_cannot_load_them(manifest, tmp_path):
    """Language ID alone (langid, on the transcripts: DNSMOS took 10-15 s of each of five runs on 2 cores; the
    two-node test above holds DNSMOS's scores on Ray to the local engine's)."""
    ray_args = ["--engine", "ray", "--actors", "1", "--block-seconds", "1", "-q"]
    result = runner.invoke(app, ["score", str(manifest), str(tmp_path / "s"), "--language", *ray_args])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["shards_done"] == 2 and summary["utterances"] == 4 and sum(summary["nodes"].values()) == 4
    local = runner.invoke(app, ["score", str(manifest), str(tmp_path / "local"), "--language", "-q"])
    assert local.exit_code == 0, local.output
    _score_files_equal(tmp_path / "local", tmp_path / "s")

    # each engine resumes the other's folder: a shard to do again in each
    (tmp_path / "s" / "scores-00001.parquet").unlink()
    (tmp_path / "local" / "scores-00000.parquet").unlink()
    for folder, engine in (("s", []), ("local", ray_args)):
        result = runner.invoke(app, ["score", str(manifest), str(tmp_path / folder), "--language", "-q",
                                     *engine])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout[result.stdout.index("{"):])
        assert (summary["shards_done"], summary["shards_skipped"], summary["utterances"]) == (1, 1, 4), summary
    _score_files_equal(tmp_path / "local", tmp_path / "s")

    # every shard done, other judges: refused as on the local engine (the spec comes from an actor)
    result = runner.invoke(app, ["score", str(manifest), str(tmp_path / "s"), "--dnsmos", *ray_args])
    assert result.exit_code == 2 and "score.json" in result.output and "other settings" in result.output, result.output

    (tmp_path / "not-a-model").mkdir()
    result = runner.invoke(app, ["score", str(manifest), str(tmp_path / "t"), "--asr", str(tmp_path / "not-a-model"),
                                 *ray_args, "--max-retries", "0"])
    assert result.exit_code == 2, result.output
    line = our_lines(result.output)[-1]
    assert line.startswith(f"error: ray engine: the judges could not be loaded on an actor: {tmp_path / 'not-a-model'}: "), \
        result.output
    assert len(our_lines(result.output)) == 1, result.output


def test_a_pool_that_cannot_be_is_one_line_before_ray_starts(manifest, tmp_path):
    """`--actors 0` stopped extract with a traceback (`generator raised StopIteration`: no actor took a block) and
    score with `not enough values to unpack`; a negative resource with Ray's own words. Each is refused first now."""
    from speechinstruct.curate.score import score_ray
    from speechinstruct.units.engine_ray import extract_ray

    for command in (["extract", str(manifest), str(tmp_path / "e")], ["score", str(manifest), str(tmp_path / "s"), "--dnsmos"]):
        for option, value in (("--actors", "0"), ("--cpus-per-actor", "-1"), ("--num-gpus-per-actor", "-1")):
            result = runner.invoke(app, [*command, "--engine", "ray", option, value, "-q"])
            assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output
    with pytest.raises(ValueError, match=r"^actors: 0: give at least one model actor$"):
        extract_ray(manifest, tmp_path / "e", MFCC(), actors=0)
    with pytest.raises(ValueError, match=r"^num_gpus_per_actor: -1: cannot be negative$"):
        score_ray(manifest, tmp_path / "s", {"dnsmos": True}, num_gpus_per_actor=-1)
    # a GPU no actor can have: Ray shows an actor only its own GPUs, as cuda:0 onwards, and none to one given none
    for device, gpus, message in (("cuda", 0, r"^--device cuda: an actor given no GPU \(--num-gpus-per-actor 0\) sees none"),
                                  ("cuda:1", 1, r"^--device cuda:1: each actor sees only the GPU\(s\) Ray gives it, as "
                                                r"cuda:0..cuda:0; give --device cuda or auto$"),
                                  ("cuda:2", 0.5, r"cuda:0..cuda:0;"), ("gpu", 1, r"^--device 'gpu': not a device")):
        with pytest.raises(ValueError, match=message):
            extract_ray(manifest, tmp_path / "e", MFCC(), cfg=sections.Features(device=device), num_gpus_per_actor=gpus)
        with pytest.raises(ValueError, match=message):
            score_ray(manifest, tmp_path / "s", {"dnsmos": True}, device=device, num_gpus_per_actor=gpus)
    from speechinstruct.devices import actor_device

    assert actor_device("cuda:1", 2) == "cuda:1" and actor_device("auto", 0.5) == "cuda"  # two GPUs: cuda:1 its second
    assert actor_device("auto", 0) == "cpu" and actor_device("cpu", 1) == "cpu"
    # an endpoint whose URL carries credentials: refused here, not after the URL went to the actors through Ray
    from speechinstruct.llm import LLMError

    with pytest.raises(LLMError, match="the URL carries credentials") as refused:
        score_ray(manifest, tmp_path / "s", {"asr": "whisper-1", "base_url": "http://u:s3cret@127.0.0.1:9/v1"})
    assert "s3cret" not in str(refused.value)
    assert not ray.is_initialized() and not (tmp_path / "e").exists() and not (tmp_path / "s").exists()


def test_gpu_actors_are_as_many_as_the_nodes_gpus_hold(manifest, tmp_path):
    """`--num-gpus-per-actor 1` on a cluster without GPUs waited for ever (Ray's actors pending, the job silent);
    more actors than the GPUs hold waited for GPUs the same way once the ones that fit had started."""
    from speechinstruct.units.engine_ray import extract_ray

    cpu = sections.Features(device="cpu")  # the GPUs Ray counts here are not real: the model stays on the CPU
    ray.init(num_cpus=3, num_gpus=0, object_store_memory=SMALL_STORE, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ValueError, match=r"^1 GPU\(s\) per actor \(--num-gpus-per-actor; a recipe's ray.num_gpus_per_actor\): "
                                             r"no node of the cluster has that many GPUs "
                                             r"\(GPUs per node: 0\); give fewer, or 0 for CPU actors"):
            extract_ray(manifest, tmp_path / "none", MFCC(), cfg=cpu, num_gpus_per_actor=1)
    finally:
        ray.shutdown()
    ray.init(num_cpus=3, num_gpus=1, object_store_memory=SMALL_STORE, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ValueError, match=r"^2 GPU\(s\) per actor .*: no node .* \(GPUs per node: 1\)"):
            extract_ray(manifest, tmp_path / "two", MFCC(), cfg=cpu, num_gpus_per_actor=2)
        stats = extract_ray(manifest, tmp_path / "half", MFCC(), cfg=cpu, actors=3, num_gpus_per_actor=0.5,
                            block_seconds=1.0)
        assert stats["actors"] == 2 and stats["utterances"] == 4, stats  # two halves of the one GPU
    finally:
        ray.shutdown()
    extract(manifest, tmp_path / "local", MFCC())
    same_files(tmp_path / "local", tmp_path / "half")


def test_a_shard_another_task_finishes_meanwhile_does_not_derail_the_ray_engine(manifest, tmp_path, monkeypatch):
    """The Ray engines chose their shards to do once, before Ray started; extract's shared loop asked again
    whether each was finished, so a shard a job-array task beside it finished in between was skipped there while its
    blocks still came back: `expected manifest-00001.parquet row 0, got manifest-00000.parquet row 0`. The loop
    now takes the engine's choice (the shard is written again, atomically, with the same rows)."""
    import speechinstruct.units.extract as extract_module
    from speechinstruct.units.engine_ray import extract_ray

    extract(manifest, tmp_path / "local", MFCC())
    # the first shard finished by the other task now
    monkeypatch.setattr(extract_module, "finished", lambda target, *inputs: target.name == "features-00000.arrow")
    stats = extract_ray(manifest, tmp_path / "ray", MFCC(), actors=1)
    assert stats["shards_done"] == 2, stats
    same_files(tmp_path / "local", tmp_path / "ray")


def test_a_node_without_the_corpus_root_is_an_error_not_a_skip_per_row(manifest, tmp_path):
    """A decode task on a node where the corpus is not mounted made every row of its block a skip (`no such
    file`), and the shard was written as done; it is an error of the task now, which the engine turns into one
    line naming the shard and rows (`test_a_block_that_keeps_failing…`)."""
    import socket

    from speechinstruct.io import read_table
    from speechinstruct.units.engine_ray import decode_block

    rows = read_table(manifest / "manifest-00000.parquet").to_pylist()
    root = json.loads((manifest / "summary.json").read_text())["root"]
    assert [uid for uid, wav in decode_block(rows, root)] == [r["id"] for r in rows]
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path}/elsewhere: the corpus root is not on node "
                                                f"{socket.gethostname()}: mount it at the same path on every node$"):
        decode_block(rows, str(tmp_path / "elsewhere"))
    # through Ray, the reason the job's one line gives (the window adds the shard and rows: tested above)
    from speechinstruct.units.engine_ray import reason_of

    ray.init(num_cpus=1, object_store_memory=SMALL_STORE, include_dashboard=False, log_to_driver=False)
    with pytest.raises(ray.exceptions.RayError) as failed:
        ray.get(ray.remote(decode_block).options(max_retries=0).remote(rows, str(tmp_path / "elsewhere")))
    assert reason_of(failed.value) == (f"{tmp_path}/elsewhere: the corpus root is not on node {socket.gethostname()}: "
                                       "mount it at the same path on every node")


def test_a_recipe_with_a_ray_section_runs_extract_and_score_on_ray(sentences, tmp_path):
    """`run` had no Ray engine: a recipe ran every stage in one process. With a `ray` section its extract and
    score stages run on the cluster's actors (here a local Ray), and the dataset is the local run's, byte for
    byte; the engine is not part of a stage's stamp, so the same recipe without the section finds all done."""
    import soundfile as sf
    import yaml

    from speechinstruct.pipeline import run

    recordings = tmp_path / "recordings"  # and raw recordings, cut by Ray tasks
    recordings.mkdir()
    silence = np.zeros(16000, np.float32)
    for n, wav in enumerate(sentences[:2]):
        sf.write(recordings / f"talk{n}.wav", np.concatenate([silence, wav, silence]), 16000)

    def recipe(name, **over):
        data = {"name": "tiny", "workdir": str(tmp_path / name), "demo_corpus": {"sentences": 8, "seed": 1},
                "corpora": [{"name": "audio", "root": str(recordings), "options": {"license": "x"}}],
                "features": {"kind": "mfcc"}, "kmeans": {"k": 8, "max_frames": 20000},
                "compose": {"pretrain": {"dev_fraction": 0.2}, "chain_of_modality": {"max_pairs": 2}},
                # a language gate: langid on the transcripts (a DNSMOS gate judged each utterance and each synthesised
                # one, 53 s of the test alone on 2 cores; the two-node test holds DNSMOS on Ray to the local engine)
                "quality": {"languages": ["en"]}, "output": {"vocoder": "none"}, **over}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    on_ray = run(recipe("ray", ray={"actors": 1, "block_seconds": 3.0}))
    stages = {s["stage"]: s for s in json.loads((tmp_path / "ray" / "run-summary.json").read_text())["stages"]}
    for name in ("score speechinstruct-demo", "extract speechinstruct-demo (mfcc)"):
        assert stages[name]["result"]["engine"] == "ray" and stages[name]["result"]["actors"] == 1, stages[name]
    assert stages["score speechinstruct-demo"]["result"]["utterances"] == 8
    assert stages["extract audio (mfcc)"]["result"]["engine"] == "ray"
    assert "VAD on Ray: 2 recordings (or channels) on 1 node" in json.dumps(stages["shard audio"]["result"])
    ray.shutdown()
    local = run(recipe("local"))
    assert on_ray["valid"] and local["valid"] and on_ray["records"] == local["records"]
    dataset = {p.relative_to(tmp_path / "local" / "dataset"): p.read_bytes()
               for p in (tmp_path / "local" / "dataset").rglob("*.parquet")}
    assert dataset and dataset == {p.relative_to(tmp_path / "ray" / "dataset"): p.read_bytes()
                                   for p in (tmp_path / "ray" / "dataset").rglob("*.parquet")}
    assert run(recipe("ray"))["stages_skipped"] == len(stages)  # the engine is not in the stamps: nothing to redo


def test_an_address_where_nothing_listens_is_one_line_at_once(manifest, tmp_path):
    """A cluster address where nothing listens: Ray retried a GCS address for minutes (a recipe's `ray.address`
    hung past 5 minutes), and gave up on a Ray-client one after 30 s with a hint about tokens. An address given
    without `--engine ray` was ignored: the job ran on this machine; it means Ray now (said)."""
    closed = _free_port()
    for address in (f"ray://127.0.0.1:{closed}", f"127.0.0.1:{closed}"):
        result = runner.invoke(app, ["extract", str(manifest), str(tmp_path / "f"), "--engine", "ray",
                                     "--ray-address", address, "-q"])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [
            f"error: ray address {address}: cannot connect: nothing answers at 127.0.0.1:{closed} (Connection refused); "
            "is the cluster up (`ray status` on its head node)?"], result.output
        assert not ray.is_initialized()
    # an address without --engine means Ray (it was ignored: the job ran here), said; with --engine local: one line
    for command in (["extract", str(manifest), str(tmp_path / "f")], ["score", str(manifest), str(tmp_path / "s"), "--dnsmos"]):
        result = runner.invoke(app, [*command, "--ray-address", f"127.0.0.1:{closed}", "-q"])
        assert result.exit_code == 2 and result.output.strip().splitlines() == [
            "warning: inferred --engine ray (--ray-address is given)",
            f"error: ray address 127.0.0.1:{closed}: cannot connect: nothing answers at 127.0.0.1:{closed} (Connection "
            "refused); is the cluster up (`ray status` on its head node)?"], result.output
        result = runner.invoke(app, [*command, "--engine", "local", "--ray-address", f"127.0.0.1:{closed}", "-q"])
        assert result.exit_code == 2 and result.output.strip().splitlines() == [
            "error: --ray-address: the Ray engine's, and --engine local runs here: give --engine ray, or leave it "
            "out"], result.output
        result = runner.invoke(app, [*command, "--engine", "local", "--actors", "4", "--max-retries", "0", "-q"])
        assert result.exit_code == 2 and result.output.strip().splitlines() == [
            "error: --actors, --max-retries: the Ray engine's, and --engine local runs here: give --engine ray, or "
            "leave them out"], result.output
        assert not (tmp_path / "f").exists() and not (tmp_path / "s").exists() and not ray.is_initialized()
    # a recipe's ray.address: one line before any stage runs (not after the corpus was sharded)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"demo_corpus: {{sentences: 2}}\nworkdir: {tmp_path / 'work'}\nray: {{address: '127.0.0.1:{closed}'}}\n")
    result = runner.invoke(app, ["run", str(recipe), "-q"])
    assert result.exit_code == 2 and f"nothing answers at 127.0.0.1:{closed}" in result.output, result.output
    assert not (tmp_path / "work" / "demo-corpus").exists()
    from speechinstruct.units.engine_ray import _answers

    with pytest.raises(ValueError, match=f"^ray address :{closed}: cannot connect: nothing answers at :{closed} \\("):
        _answers(f":{closed}")  # no host: the port is still the one given


def test_a_server_down_for_a_while_stops_score_on_ray_and_a_rerun_in_the_same_process_finishes(manifest, tmp_path):
    """`score --engine ray --base-url …` with the server down: one line, no shard written; the rerun after it is
    back finished nothing and waited for ever, in the same process (a notebook, `run`): the stopped job's judge
    actor still held a CPU, and the new actor took the last one, leaving none for the decode tasks."""
    import threading

    from transcribe_server import TranscriptionServer

    state, lock = {"down": True}, threading.Lock()

    def answer(samples, request):
        with lock:
            if state["down"]:
                return 503, {"retry-after-ms": "5"}
        return "the quick brown fox"

    ray.init(num_cpus=2, object_store_memory=SMALL_STORE, include_dashboard=False, log_to_driver=False)
    with TranscriptionServer(answer) as server:
        args = ["score", str(manifest), str(tmp_path / "s"), "--asr", "whisper-1", "--base-url", server.url, "-q",
                "--engine", "ray", "--actors", "1", "--block-seconds", "1"]
        down = runner.invoke(app, args)
        assert down.exit_code == 2, down.output
        assert "transcription server still answering HTTP 503 after 6 retries" in our_lines(down.output)[-1], down.output
        assert not list((tmp_path / "s").glob("scores-*.parquet"))
        assert every_cpu_free()
        state["down"] = False
        back = runner.invoke(app, args)
        assert back.exit_code == 0, back.output
        assert json.loads(back.stdout[back.stdout.index("{"):])["utterances"] == 4


def test_espeak_spawns_its_process_where_this_one_is_connected_to_ray():
    """A recipe on Ray: espeak-ng's process, forked per utterance, died once (exit code -11) in a driver connected
    to Ray (its gRPC threads make a forked child unsafe). Such a driver spawns it instead: the same audio."""
    from speechinstruct.sources import tts as tts_module

    tts = tts_module.EspeakTTS()
    forked = tts.synthesize_words("my neighbour opened a wooden boat", "en-us", 165)
    assert not tts_module._fork_unsafe()
    ray.init(num_cpus=1, object_store_memory=SMALL_STORE, include_dashboard=False, log_to_driver=False)
    assert tts_module._fork_unsafe()
    spawned = tts.synthesize_words("my neighbour opened a wooden boat", "en-us", 165)
    assert np.array_equal(forked[0], spawned[0]) and forked[1:] == spawned[1:]


def test_shard_audio_cuts_recordings_on_ray_as_locally(sentences, tmp_path, monkeypatch):
    """`shard audio --engine ray`: each recording (each channel with --channels each) is a Ray task that runs the VAD
    where Ray puts it; the manifest is the local engine's byte for byte, the skips (a file with no speech, one that is
    not audio) the same, in the same order. `--ray-address` means the Ray engine (said); another corpus refuses it."""
    import soundfile as sf
    from test_recordings import _call, recording

    root = tmp_path / "rec"
    root.mkdir()
    _call(sentences, root)
    for n, rate in enumerate((16000, 44100)):
        sf.write(root / f"talk{n}.flac", recording(sentences, rate, gaps=(1.0 + n, 3.0, 0.3, 1.0))[0], rate)
    sf.write(root / "quiet.wav", np.zeros(16000 * 2, np.float32), 16000)
    (root / "broken.wav").write_bytes(b"RIFF not really a wav")
    common = ["shard", "audio", str(root), "--license", "x", "-q", "--channels", "each"]
    ray.init(num_cpus=2, object_store_memory=SMALL_STORE, include_dashboard=False, log_to_driver=False)
    local = runner.invoke(app, [*common[:3], str(tmp_path / "local"), *common[3:], "--workers", "1"])
    assert local.exit_code == 0, local.output
    monkeypatch.chdir(tmp_path)  # the recordings named relative to this process's working folder, not a Ray worker's
    on_ray = runner.invoke(app, ["shard", "audio", "rec", str(tmp_path / "ray"), *common[3:], "--engine", "ray"])
    assert on_ray.exit_code == 0, on_ray.output
    assert (tmp_path / "local" / "manifest-00000.parquet").read_bytes() == \
        (tmp_path / "ray" / "manifest-00000.parquet").read_bytes()
    here, there = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("local", "ray"))
    assert here["utterances"] == 6 and here["skipped"] == {"no speech found": 1, "unreadable audio": 1}
    # (the same skips, in the same order: the one named by a relative root, as the command was given it)
    assert json.dumps(there["skipped_examples"]) == json.dumps(here["skipped_examples"]).replace(str(root), "rec")
    ran = [note for note in there["notes"] if note.startswith("VAD on Ray: ")]  # the files, each channel of the call
    assert len(ran) == 1 and ran[0].startswith("VAD on Ray: 5 recordings (or channels) on 1 node ("), there["notes"]
    assert not any(note.startswith("VAD on Ray") for note in here.get("notes", []))
    # the cluster's address alone means the Ray engine (this process is connected: the address is not dialled)
    inferred = runner.invoke(app, [*common[:3], str(tmp_path / "auto"), *common[3:], "--ray-address", "auto"])
    assert inferred.exit_code == 0, inferred.output
    assert "inferred --engine ray (--ray-address is given)" in inferred.stderr
    other = runner.invoke(app, ["shard", "librispeech", str(root), str(tmp_path / "x"), "--engine", "ray"])
    assert other.exit_code == 2 and "--engine is for `shard audio`" in other.stderr, other.output
    both = runner.invoke(app, [*common[:3], str(tmp_path / "y"), *common[3:], "--engine", "ray", "--workers", "2"])
    assert both.exit_code == 2 and "error: --workers: the local engine's VAD threads" in both.stderr, both.output
    # an error the VAD task raises (not an unreadable file's skip) is one line naming the file
    from speechinstruct.sources.corpora.recordings import vad_spans_ray

    with pytest.raises(ValueError, match=r"talk0.flac: ray engine: the VAD task failed: index 7 is out of bounds"):
        list(vad_spans_ray([(root / "talk0.flac", 7)]))

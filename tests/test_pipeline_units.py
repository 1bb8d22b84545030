import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner
from conftest import fixed_dnsmos

from speechinstruct import recipe as sections
from speechinstruct import units
from speechinstruct.cli import app
from speechinstruct.units.features import MFCC
from speechinstruct.sources.shard import shard_corpus
from speechinstruct.shardfiles import read_features

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def manifest(librispeech_root, tmp_path):
    shard_corpus("librispeech", librispeech_root, tmp_path / "manifest", sections.Shard(shard_hours=2.5 / 3600))
    return tmp_path / "manifest"


@pytest.mark.filterwarnings("error:The given NumPy array is not writable")  # quantize on torch: no warning to users
def test_extract_cluster_quantize(manifest, tmp_path, librispeech_root):
    stats = cli("extract", manifest, tmp_path / "feats", "-q")
    assert stats["utterances"] == 4 and stats["shards_done"] == 2
    ids, feats = read_features(tmp_path / "feats" / "features-00000.arrow")
    assert ids == ["librispeech/1272-128104-0000", "librispeech/1272-128104-0001"]
    assert [f.shape for f in feats] == [(98, 39), (148, 39)]
    # stored frames equal a direct computation
    from speechinstruct import audio
    wav = audio.load(librispeech_root / "train-clean-100/1272/128104/1272-128104-0001.flac")
    np.testing.assert_allclose(feats[1], MFCC().features(wav), atol=1e-5)

    meta = cli("cluster", tmp_path / "feats", tmp_path / "km", "--k", "8", "-q")
    assert meta["k"] == 8 and meta["dim"] == 39 and meta["sample_frames"] > 400
    # where the seconds went (reading the sample, fitting), in the summary and in kmeans.json
    assert 0 < meta["seconds_reading"] and 0 < meta["seconds_fitting"]
    assert meta["seconds_reading"] + meta["seconds_fitting"] <= meta["seconds"] + 0.002
    assert json.loads((tmp_path / "km" / "kmeans.json").read_text())["seconds_fitting"] == meta["seconds_fitting"]

    # a centroids.npy cluster did not write (the user's own k-means) is never overwritten: one line
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "centroids.npy").write_bytes(b"mine")
    result = runner.invoke(app, ["cluster", str(tmp_path / "feats"), str(tmp_path / "theirs"), "--k", "8", "-q"])
    assert result.exit_code == 2 and "centroids.npy: already there and not written by cluster" in result.stderr.replace("\n", "")
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == ["centroids.npy"]
    assert (tmp_path / "theirs" / "centroids.npy").read_bytes() == b"mine"
    (tmp_path / "km" / ".speechinstruct-cluster.json").unlink()  # as an earlier version left its folder: its own
    assert cli("cluster", tmp_path / "feats", tmp_path / "km", "--k", "8", "-q")["sha256"] == meta["sha256"]

    qstats = cli("quantize", tmp_path / "feats", tmp_path / "km", tmp_path / "units", "-q")
    assert qstats["utterances"] == 4
    rows = [r for f in sorted((tmp_path / "units").glob("units-*.parquet")) for r in pq.read_table(f).to_pylist()]
    km = units.load_kmeans(tmp_path / "km")
    row = next(r for r in rows if r["id"] == "librispeech/1272-128104-0001")
    expect, durations = units.dedup(km.assign(feats[1]))
    assert row["units"] == expect.tolist() and row["durations"] == durations.tolist()
    assert sum(row["durations"]) == row["n_frames"] == 148
    assert row["unit_text"] == units.to_text(expect) and row["text"] == "NOR IS MISTER QUILTER'S MANNER"
    stats = json.loads((tmp_path / "units" / "stats.json").read_text())
    assert len(stats["histogram"]) == 8 and sum(stats["histogram"]) == sum(len(r["units"]) for r in rows)
    assert stats["frames_per_second"] == pytest.approx(100, rel=0.05)

    # quantize --device: a GPU assigns with torch's matrix products ("torch" takes that path on the CPU): the same units
    from speechinstruct.units.quantize import quantize

    on_torch = quantize(tmp_path / "feats", units.load_kmeans(tmp_path / "km").to("torch"), tmp_path / "units-torch")
    assert on_torch["utterances"] == 4
    again = [r for f in sorted((tmp_path / "units-torch").glob("units-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert again == rows
    bogus = runner.invoke(app, ["quantize", str(tmp_path / "feats"), str(tmp_path / "km"), str(tmp_path / "u-bad"),
                                "--device", "gpu9", "-q"])
    assert bogus.exit_code == 2 and "--device 'gpu9': not a device" in bogus.output
    if not torch.cuda.is_available():  # a GPU asked for where there is none: one line, not torch's AssertionError
        for command in (["quantize", str(tmp_path / "feats"), str(tmp_path / "km"), str(tmp_path / "u-gpu")],
                        ["score", str(manifest), str(tmp_path / "s-gpu"), "--dnsmos"]):
            gpu = runner.invoke(app, [*command, "--device", "cuda", "-q"])
            assert gpu.exit_code == 2 and "torch sees no GPU on this machine" in gpu.output, gpu.output

    # fused extract --kmeans writes the same units without storing features
    cli("extract", manifest, tmp_path / "fused", "--kmeans", tmp_path / "km", "-q")
    fused = [r for f in sorted((tmp_path / "fused").glob("units-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert fused == rows
    assert not list((tmp_path / "fused").glob("*.arrow"))


def test_extract_resumes_and_shard_index_partitions(manifest, tmp_path):
    cli("extract", manifest, tmp_path / "a", "--num-shards", 2, "--shard-index", 1, "-q")
    assert [p.name for p in sorted((tmp_path / "a").glob("*.arrow"))] == ["features-00001.arrow"]
    before = (tmp_path / "a" / "features-00001.arrow").stat().st_mtime_ns
    stats = cli("extract", manifest, tmp_path / "a", "-q")
    assert stats == {**stats, "shards_done": 1, "shards_skipped": 1}
    assert (tmp_path / "a" / "features-00001.arrow").stat().st_mtime_ns == before


def test_broken_audio_is_skipped_with_reason(manifest, tmp_path, librispeech_root):
    (librispeech_root / "train-clean-100/1272/128104/1272-128104-0002.flac").write_bytes(b"broken since sharding")
    stats = cli("extract", manifest, tmp_path / "f", "-q")
    assert stats["errors"] == 1 and stats["utterances"] == 3
    errors = [json.loads(l) for f in sorted((tmp_path / "f").glob("errors-*.jsonl")) for l in f.read_text().splitlines()]
    assert errors[0]["id"] == "librispeech/1272-128104-0002" and "unreadable audio" in errors[0]["reason"]


def test_settings_change_refused(manifest, tmp_path):
    cli("extract", manifest, tmp_path / "f", "-q")
    result = runner.invoke(app, ["extract", str(manifest), str(tmp_path / "f"), "--float16", "-q"])
    assert result.exit_code == 2 and "other settings" in result.stderr
    # a spec file cut short or edited into something else: one line naming it, not "Expecting value" or a traceback
    cli("cluster", tmp_path / "f", tmp_path / "km", "--k", "4", "-q")
    (tmp_path / "km" / "kmeans.json").write_text("[1]")
    for text, says in (('{"name": ', "features.json: not valid JSON"), ("[1]", "features.json: must be a JSON object")):
        (tmp_path / "f" / "features.json").write_text(text)
        for args in (["extract", manifest, tmp_path / "f"], ["cluster", tmp_path / "f", tmp_path / "km2", "--k", "4"],
                     ["quantize", tmp_path / "f", tmp_path / "km" / "centroids.npy", tmp_path / "u"]):
            result = runner.invoke(app, [str(a) for a in args] + ["-q"])
            assert result.exit_code == 2 and says in result.stderr and "Traceback" not in result.output, result.output
    result = runner.invoke(app, ["quantize", str(tmp_path / "f"), str(tmp_path / "km"), str(tmp_path / "u"), "-q"])
    assert result.exit_code == 2 and "kmeans.json: must be a JSON object" in result.stderr, result.output


def test_kmeans_dimension_mismatch_fails_fast(manifest, tmp_path):
    cli("extract", manifest, tmp_path / "f", "-q")
    np.save(tmp_path / "km.npy", np.zeros((4, 12), np.float32))
    result = runner.invoke(app, ["quantize", str(tmp_path / "f"), str(tmp_path / "km.npy"), str(tmp_path / "u"), "-q"])
    assert result.exit_code == 2 and "km.npy: k-means is 12-dim" in result.stderr
    # fused extract --kmeans: before any audio is decoded, not utterance by utterance
    fused = runner.invoke(app, ["extract", str(manifest), str(tmp_path / "fu"), "--kmeans", str(tmp_path / "km.npy"), "-q"])
    assert fused.exit_code == 2 and "km.npy: k-means is 12-dim but mfcc makes 39-dim features" in fused.stderr
    assert not (tmp_path / "fu").exists() or not list((tmp_path / "fu").iterdir())


def test_shard_index_runs_cover_every_utterance_exactly_once(librispeech_root, tmp_path):
    shard_corpus("librispeech", librispeech_root, tmp_path / "m", sections.Shard(shard_hours=1.2 / 3600))
    n_shards = len(list((tmp_path / "m").glob("manifest-*.parquet")))
    assert n_shards >= 3
    for i in range(3):  # three job-array tasks writing into one folder
        cli("extract", tmp_path / "m", tmp_path / "f", "--num-shards", 3, "--shard-index", i, "-q")
    ids = [i for f in sorted((tmp_path / "f").glob("features-*.arrow")) for i in read_features(f)[0]]
    manifest_ids = [r["id"] for f in sorted((tmp_path / "m").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(ids) == sorted(manifest_ids) and len(set(ids)) == len(ids)
    result = runner.invoke(app, ["extract", str(tmp_path / "m"), str(tmp_path / "g"), "--num-shards", "2", "--shard-index", "2"])
    assert result.exit_code == 2 and "--shard-index must be in [0, 2)" in result.stderr


def test_quantize_holds_one_utterance_at_a_time(tmp_path):
    """Peak numpy memory of quantize stays at about one utterance, not a float32 copy of the shard
    (measured with tracemalloc, which numpy reports to: no timing involved)."""
    import json
    import tracemalloc

    import numpy as np
    import pyarrow as pa

    from speechinstruct import records
    from speechinstruct.shardfiles import feature_schema, features_array
    from speechinstruct.io import write_json, write_parquet
    from speechinstruct.units.quantize import quantize
    from speechinstruct.units import KMeans

    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(10, 39)).astype(np.float32)
    n_utt, frames = 200, 1000
    feats = [np.repeat(centroids[rng.permutation(10)], frames // 10, axis=0) for _ in range(n_utt)]  # 31 MB as float32
    (tmp_path / "f").mkdir()
    schema = feature_schema(39, True)
    with pa.OSFile(str(tmp_path / "f" / "features-00000.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as ipc:
        for start in range(0, n_utt, 50):
            part = feats[start:start + 50]
            ipc.write_batch(pa.record_batch([pa.array([f"u{i}" for i in range(start, start + len(part))]),
                                             features_array(part, 39, True)], schema=schema))
    rows = [{"id": f"u{i}", "path": f"a/{i}.flac", "offset": 0.0, "duration": 20.0, "sample_rate": 16000, "text": "HI",
             "speaker": "s", "corpus": "c", "license": "l", "split": "train", "corpus_split": "train"} for i in range(n_utt)]
    write_parquet(tmp_path / "m" / "manifest-00000.parquet", records.to_table("manifest", rows))
    write_json(tmp_path / "f" / "features.json", {"features": "mfcc", "dim": 39, "frame_rate": 50.0,
                                                  "manifest": str(tmp_path / "m"), "root": str(tmp_path)})
    del feats
    tracemalloc.start()
    quantize(tmp_path / "f", KMeans(centroids), tmp_path / "u")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8e6, f"peak {peak / 1e6:.1f} MB"  # the whole shard as float32 would be 31 MB
    stats = json.loads((tmp_path / "u" / "stats.json").read_text())
    assert stats["utterances"] == n_utt and stats["units_used"] == 10


def test_decoding_threads_default_to_every_cpu_when_the_model_is_on_a_gpu(manifest, tmp_path, monkeypatch):
    """Two threads decode 48 kHz MP3 at 3,900x real time here, short of a GPU's 5,000x target, so with no --workers
    extract and score decode with every usable CPU when their model runs on a GPU, and with 2 on the CPU, whose
    cores compute the model. --workers wins."""
    from speechinstruct import threads
    from speechinstruct.curate import score as score_stage
    from speechinstruct.judges.dnsmos import DNSMOS
    from speechinstruct.judges.judge import Judge
    from speechinstruct.sources import decoding
    from speechinstruct.units import extract as extract_stage

    monkeypatch.setattr(threads, "available_cpus", lambda: 96)
    assert threads.decode_workers("cuda") == 16  # a large node: 16, not 96 threads with 4 clips in flight each
    monkeypatch.setattr(threads, "available_cpus", lambda: 12)
    seen = []

    def decode_rows(rows, root, workers=2, *args):
        seen.append(workers)
        return original(rows, root, workers, *args)

    original = decoding.decode_rows
    monkeypatch.setattr(extract_stage, "decode_rows", decode_rows)
    monkeypatch.setattr(decoding, "decode_rows", decode_rows)
    on_gpu = MFCC()
    on_gpu.device = "cuda:1"  # where its model would run: MFCC runs anywhere, the threads follow the device
    for extractor, cfg, out, want in ((MFCC(), None, "cpu", 2), (on_gpu, None, "gpu", 12),
                                      (on_gpu, sections.Features(workers=3), "asked", 3)):
        seen.clear()
        extract_stage.extract(manifest, tmp_path / out, extractor, cfg)
        assert seen and set(seen) == {want}, (out, seen)
    fixed_dnsmos(monkeypatch)  # the networks' scores are beside the point here (29 of the test's 32 s on 2 cores)
    judge = Judge(dnsmos=DNSMOS())
    for device, workers, want in (("cpu", None, 2), ("cuda", None, 12), ("cuda", 5, 5)):
        seen.clear()
        judge.dnsmos.device = device  # the onnxruntime engine scores on the CPU whatever this says
        score_stage.score(manifest, tmp_path / f"scores-{device}-{workers}", judge, workers=workers)
        assert seen and set(seen) == {want}, (device, seen)


def test_quantize_names_a_feature_file_of_other_dimensions(manifest, tmp_path):
    """A feature file of another extractor among the folder's (16-dim frames where the k-means is 39-dim) is one
    line naming it; the shards before it are written, and none for it."""
    import pyarrow as pa

    from speechinstruct.shardfiles import feature_schema, features_array

    cli("extract", manifest, tmp_path / "feats", "-q")
    cli("cluster", tmp_path / "feats", tmp_path / "km", "--k", "8", "-q")
    ids, _ = read_features(tmp_path / "feats" / "features-00001.arrow")
    schema = feature_schema(16, False)
    with pa.OSFile(str(tmp_path / "feats" / "features-00001.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        w.write_batch(pa.record_batch([pa.array(ids), features_array([np.ones((50, 16), np.float32)] * len(ids), 16, False)],
                                      schema=schema))
    result = runner.invoke(app, ["quantize", str(tmp_path / "feats"), str(tmp_path / "km"), str(tmp_path / "units"), "-q"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "features-00001.arrow: 16-dim frames, but the k-means" in result.output, result.output
    assert (tmp_path / "units" / "units-00000.parquet").exists() and not (tmp_path / "units" / "units-00001.parquet").exists()


def test_quantize_names_an_utterance_whose_frames_are_not_finite(manifest, tmp_path):
    """Features written before extract refused them (or by another tool) with NaN frames: quantize names the file
    and the utterance, in one line (FAISS's -1 went on to the unit histogram: "'list' argument must have no
    negative elements")."""
    import pyarrow as pa

    from speechinstruct.shardfiles import feature_schema, features_array

    cli("extract", manifest, tmp_path / "feats", "-q")
    cli("cluster", tmp_path / "feats", tmp_path / "km", "--k", "8", "-q")
    ids, feats = read_features(tmp_path / "feats" / "features-00001.arrow")
    feats = [f.copy() for f in feats]
    feats[1][5, 3] = np.nan
    schema = feature_schema(39, False)
    with pa.OSFile(str(tmp_path / "feats" / "features-00001.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        w.write_batch(pa.record_batch([pa.array(ids), features_array(feats, 39, False)], schema=schema))
    result = runner.invoke(app, ["quantize", str(tmp_path / "feats"), str(tmp_path / "km"), str(tmp_path / "units"), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"features-00001.arrow: {ids[1]}: frames hold NaN or infinite values" in result.stderr, result.output
    assert not (tmp_path / "units" / "units-00001.parquet").exists()


@pytest.mark.parametrize("fault, says", [("no frames", "has no frames"), ("null frames", "has no frames"),
                                         ("unknown id", "is not in its manifest shard"),
                                         ("twice", "appears twice"), ("null id", "an utterance without an id")])
def test_quantize_names_a_feature_row_it_cannot_turn_into_units(manifest, tmp_path, fault, says):
    """A feature file another tool wrote, or spliced by hand: an utterance with no frames (or null ones) became a
    units row the units schema refuses (no units, n_frames 0, `<sosp><eosp>`); one listed twice, two rows with one
    id; an id the manifest lacks or a null one, "no None where one was expected". Each is one line naming the
    file and the utterance, and the shard is not written."""
    import pyarrow as pa

    cli("extract", manifest, tmp_path / "feats", "-q")
    cli("cluster", tmp_path / "feats", tmp_path / "km", "--k", "8", "-q")
    path = tmp_path / "feats" / "features-00001.arrow"
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    ids, feats = table.column("id").to_pylist(), table.column("features").to_pylist()
    if fault in ("no frames", "null frames"):
        feats[1] = [] if fault == "no frames" else None
    else:
        ids[1] = {"unknown id": "elsewhere/x", "twice": ids[0], "null id": None}[fault]
    schema = pa.schema([f.with_nullable(True) for f in table.schema])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        w.write_table(pa.table([pa.array(ids, pa.string()), pa.array(feats, schema.field("features").type)], schema=schema))
    result = runner.invoke(app, ["quantize", str(tmp_path / "feats"), str(tmp_path / "km"), str(tmp_path / "units"), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "features-00001.arrow: " in result.stderr and says in result.stderr, result.output
    assert not (tmp_path / "units" / "units-00001.parquet").exists()


def test_quiet_means_no_progress_bars_from_the_libraries_either(manifest, tmp_path):
    """``-q`` promises no progress bars: transformers' "Loading weights" bar (and datasets' and the Hub's) printed
    anyway. Run as a user runs it, in its own process (the libraries read the setting when they load)."""
    import subprocess
    import sys

    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    HubertModel(HubertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             conv_dim=(16,) * 7, num_conv_pos_embeddings=16)).save_pretrained(tmp_path / "hub")
    result = subprocess.run([sys.executable, "-m", "speechinstruct.cli", "extract", str(manifest), str(tmp_path / "f"),
                             "--features", "hubert", "--checkpoint", str(tmp_path / "hub"), "--layer", "1", "-q"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_quantize_says_when_the_manifest_its_features_came_from_is_gone(manifest, tmp_path):
    """features.json names the manifest the frames came from (quantize joins its rows to the units): moved or
    deleted, it is one line saying so; it was "error: PATH", the path alone."""
    import shutil

    cli("extract", manifest, tmp_path / "feats", "-q")
    cli("cluster", tmp_path / "feats", tmp_path / "km", "--k", "8", "-q")
    shutil.move(manifest, tmp_path / "moved")
    result = runner.invoke(app, ["quantize", str(tmp_path / "feats"), str(tmp_path / "km"), str(tmp_path / "units"), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"features.json: the manifest these features came from, {manifest}, is not there" in result.stderr, result.stderr
    assert not (tmp_path / "units").exists()  # said before any output


def test_a_corpus_root_that_is_not_there_stops_before_any_shard_is_written(manifest, tmp_path, librispeech_root):
    """The manifest's corpus root gone (a storage mount missing for a while, a moved corpus): every utterance was a
    counted "unreadable audio" skip and each shard was written, empty, as done, so the rerun after the mount came
    back skipped them all. Now one line before any output; with --root where the audio is, it runs."""
    summary = json.loads((manifest / "summary.json").read_text())
    (manifest / "summary.json").write_text(json.dumps({**summary, "root": str(tmp_path / "unmounted")}))
    for command in (["extract", manifest, tmp_path / "feats"], ["score", manifest, tmp_path / "scores", "--dnsmos"]):
        result = runner.invoke(app, [*map(str, command), "-q"])
        assert result.exit_code == 2 and f"{tmp_path / 'unmounted'}: the corpus root is not there" in result.stderr, \
            result.output
        assert not list(command[2].glob("*-00000.*")) if command[2].exists() else True
    stats = cli("extract", manifest, tmp_path / "feats", "--root", librispeech_root, "-q")
    assert stats["utterances"] == 4 and stats["errors"] == 0


def test_a_shard_made_from_an_input_that_changed_since_is_not_taken_for_done(manifest, librispeech_root, tmp_path):
    """The corpus sharded again into the same folder (another --shard-hours): extract into the folder of the first
    sharding took every features file for done, though features-00000 held other rows than manifest-00000 did
    now, and quantize likewise its units. Each output shard keeps what its input shards were (size and footer
    digest, in its own metadata); one that changed since is one line."""
    import shutil

    cli("extract", manifest, tmp_path / "feats", "-q")
    cli("cluster", tmp_path / "feats", tmp_path / "km", "--k", "4", "-q")
    cli("quantize", tmp_path / "feats", tmp_path / "km", tmp_path / "units", "-q")
    cli("extract", manifest, tmp_path / "fused", "--kmeans", tmp_path / "km", "-q")
    # the same inputs: done, as before (a copy of an input is the same input)
    shutil.copytree(manifest, tmp_path / "copy")
    shutil.rmtree(manifest)
    shutil.copytree(tmp_path / "copy", manifest)
    assert cli("extract", manifest, tmp_path / "feats", "-q")["shards_skipped"] == 2
    assert cli("quantize", tmp_path / "feats", tmp_path / "km", tmp_path / "units", "-q")["shards_skipped"] == 2
    shard_corpus("librispeech", librispeech_root, manifest, sections.Shard(shard_hours=1.0))  # one shard of all rows
    for args, output in ((["extract", manifest, tmp_path / "feats"], "features-00000.arrow"),
                         (["extract", manifest, tmp_path / "fused", "--kmeans", tmp_path / "km"], "units-00000.parquet"),
                         # the features it reads are of the first sharding: said before its own output is read
                         (["quantize", tmp_path / "feats", tmp_path / "km", tmp_path / "units"], "features-00000.arrow")):
        result = runner.invoke(app, [str(a) for a in [*args, "-q"]])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert (f"{output}: made from manifest-00000.parquet as it was before it was written again"
                in result.stderr.replace("\n", "")), result.stderr
    # cluster never samples features of rows the manifest no longer holds as they were: one line, nothing written
    result = runner.invoke(app, ["cluster", str(tmp_path / "feats"), str(tmp_path / "km2"), "--k", "4", "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert ("features-00000.arrow: made from manifest-00000.parquet as it was before it was written again"
            in result.stderr.replace("\n", "")) and not list((tmp_path / "km2").glob("[ck]*")), result.stderr
    # the shard the line names removed, as it advises, and extracted again: features-00001 is of a manifest shard
    # that is gone (the corpus is in one shard now), its rows features-00000's again; cluster and quantize say so
    (tmp_path / "feats" / "features-00000.arrow").unlink()
    assert cli("extract", manifest, tmp_path / "feats", "-q")["shards_done"] == 1
    for args in (["cluster", tmp_path / "feats", tmp_path / "km2", "--k", "4"],
                 ["quantize", tmp_path / "feats", tmp_path / "km", tmp_path / "units2"]):
        result = runner.invoke(app, [str(a) for a in [*args, "-q"]])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert ("features-00001.arrow: made from manifest-00001.parquet, which is not there now"
                in result.stderr.replace("\n", "")), result.stderr
    (tmp_path / "feats" / "features-00001.arrow").unlink()
    assert cli("cluster", tmp_path / "feats", tmp_path / "km2", "--k", "4", "-q")["k"] == 4
    # an output file of an earlier version (no such metadata) is taken for done, as it was; an input that is gone
    # (manifest-00001, the corpus now in one shard) is one line too
    import pyarrow.parquet as pq
    table = pq.read_table(tmp_path / "units" / "units-00000.parquet")
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "units" / "units-00000.parquet")
    result = runner.invoke(app, ["quantize", str(tmp_path / "feats"), str(tmp_path / "km"), str(tmp_path / "units"), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "units-00001.parquet: made from manifest-00001.parquet, which is not there now" in result.stderr.replace("\n", "")
    # a record edited by hand into something else (nested too deeply for json): one line, not a RecursionError
    from speechinstruct.shardfiles import MADE_FROM
    pq.write_table(table.replace_schema_metadata({MADE_FROM: b"[" * 100_000}), tmp_path / "units" / "units-00000.parquet")
    result = runner.invoke(app, ["quantize", str(tmp_path / "feats"), str(tmp_path / "km"), str(tmp_path / "units"), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "units-00000.parquet: its record of the shards it was made from does not name" in result.stderr.replace("\n", "")

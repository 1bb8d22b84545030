import json

import pytest
from typer.testing import CliRunner

from speechinstruct.cli import app
from speechinstruct.shard import shard_corpus

ray = pytest.importorskip("ray")
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def ray_runtime():
    yield
    ray.shutdown()


def test_ray_engine_writes_the_same_files_as_the_local_engine(librispeech_root, tmp_path):
    from speechinstruct.cluster import cluster
    from speechinstruct.extract import extract
    from speechinstruct.features import MFCC

    shard_corpus("librispeech", librispeech_root, tmp_path / "m", shard_hours=2.5 / 3600, quiet=True)
    extract(tmp_path / "m", tmp_path / "f", MFCC(), quiet=True)
    cluster(tmp_path / "f", tmp_path / "km", k=8, quiet=True)
    local = runner.invoke(app, ["extract", str(tmp_path / "m"), str(tmp_path / "local"), "--kmeans", str(tmp_path / "km"), "-q"])
    assert local.exit_code == 0, local.output
    result = runner.invoke(app, ["extract", str(tmp_path / "m"), str(tmp_path / "ray"), "--kmeans", str(tmp_path / "km"),
                                 "--engine", "ray", "--actors", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["utterances"] == 4
    files = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "ray").iterdir())
    for name in files:
        if name != "units.json":
            assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name

    # features too, and one engine resumes the other's folder
    (tmp_path / "f" / "features-00001.arrow").unlink()
    from speechinstruct.engine_ray import extract_ray
    stats = extract_ray(tmp_path / "m", tmp_path / "f", "mfcc", actors=1)
    assert stats["shards_done"] == 1 and stats["shards_skipped"] == 1
    fresh = tmp_path / "f2"
    extract(tmp_path / "m", fresh, MFCC(), quiet=True)
    assert (tmp_path / "f" / "features-00001.arrow").read_bytes() == (fresh / "features-00001.arrow").read_bytes()

import datetime
import decimal
import json
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import make_units, write_librispeech

from speechinstruct import recipe as sections
from speechinstruct import records
from speechinstruct.compose.chain_of_modality import chain_of_modality
from speechinstruct.compose.cross_modal import cross_modal
from speechinstruct.compose.pretrain import pretrain
from speechinstruct.speechgpt import FORMATS
from speechinstruct.cli import app
from speechinstruct.units.features import MFCC
from speechinstruct.release.publish import publish
from speechinstruct.release.report import report
from speechinstruct.sources.tts import CachedTTS, EspeakTTS
from speechinstruct.units import SpeechEncoder, load_kmeans
from speechinstruct.release.validate import validate

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A mini corpus, its units, the three record kinds composed from them and their published dataset, made once
    for this file (a second each, 40 times over, was a third of the quick subset's time); each test gets a copy."""
    folder = tmp_path_factory.mktemp("built")
    units_dir = make_units(write_librispeech(folder / "LibriSpeech"), folder)
    out = folder / "composed"
    cross_modal(units_dir, out / "cross_modal")
    pretrain(units_dir, out / "pretrain", sections.Pretrain(dev_fraction=0.3))
    chain_of_modality("builtin", out / "chain_of_modality", SpeechEncoder(load_kmeans(units_dir.parent / "kmeans"), MFCC()),
                      CachedTTS(EspeakTTS(), folder / "tts"), sections.ChainOfModality(max_pairs=8))
    publish(out, folder / "dataset")
    return folder


def _copy(built, tmp_path, *names):
    """``names`` copied from ``built`` into ``tmp_path`` as if made there: the folders the stage files name (a
    compose folder its units folder, a units folder its manifest) are the copies', as ``run`` relocates a workdir
    moved since its last run (:func:`speechinstruct.pipeline.relocate`)."""
    from speechinstruct.pipeline import relocate

    for name in names:
        shutil.copytree(built / name, tmp_path / name, symlinks=True)
    (tmp_path / ".workdir.json").write_text(json.dumps({"path": str(built)}))
    relocate(tmp_path)


@pytest.fixture
def units_dir(built, tmp_path):
    _copy(built, tmp_path, "LibriSpeech", "manifest", "features", "kmeans", "units")
    return tmp_path / "units"


@pytest.fixture
def composed(units_dir, built, tmp_path):
    _copy(built, tmp_path, "composed", "tts")
    return tmp_path / "composed"


@pytest.fixture
def dataset(composed, built, tmp_path):
    _copy(built, tmp_path, "dataset")
    return tmp_path / "dataset"


def test_round_trip_load_dataset_and_validate(dataset, composed):
    cm = datasets.load_dataset(str(dataset), "cross_modal", split="train")
    assert len(cm) == 8 and set(cm.column_names) == set(records.arrow_schema("cross_modal").names)
    com = datasets.load_dataset(str(dataset), "chain_of_modality", split="train")
    assert len(com) == 8  # the first 8 shipped pairs are all speakable; one format each
    assert set(com["format"]) <= set(FORMATS)
    pt = datasets.load_dataset(str(dataset), "pretrain")
    assert set(pt) == {"train", "validation"} and len(pt["train"]) + len(pt["validation"]) == 4
    meta = json.loads((dataset / "speechinstruct.json").read_text())
    assert meta["k"] == 8 and meta["extractor"]["features"] == "mfcc" and meta["hours"]["librispeech"] > 0
    assert meta["templates"] == {"asr": "builtin-1", "tts": "builtin-1"}
    card = (dataset / "README.md").read_text()
    assert card.startswith("---\n") and "config_name: cross_modal" in card and "CC-BY-4.0" in card and "K = 8" in card
    report_ = validate(dataset)
    assert report_.ok, report_.as_dict()
    assert report_.records["cross_modal"] == 8


def test_the_unit_vocabulary_travels_from_the_units_folder_to_the_dataset(units_dir, dataset, tmp_path):
    """quantize writes the vocabulary record into units.json, publish carries it into speechinstruct.json and the
    card, and both folders read back as the same record; a units folder written before the record existed reads
    as the vocabulary its K says, and quantizing into it again is not refused as made with other settings."""
    from speechinstruct.units.quantize import quantize
    from speechinstruct.shardfiles import Vocabulary, folder_k, folder_vocabulary

    expected = Vocabulary("kmeans", 8, frame_rate=100.0, sample_rate=16000, features="mfcc",
                          sha256=json.loads((units_dir / "units.json").read_text())["kmeans"]["sha256"])
    assert json.loads((units_dir / "units.json").read_text())["vocabulary"] == {**expected.to_json(), "codebooks": 1,
                                                                                  "codebook_size": 8}
    assert folder_vocabulary(units_dir) == folder_vocabulary(dataset) == expected and folder_k(dataset) == 8
    assert json.loads((dataset / "speechinstruct.json").read_text())["vocabulary"]["size"] == 8
    assert "- vocabulary: tokenizer `kmeans`, 8 unit tokens `<0>`…`<7>` (1 codebook of 8)" in (dataset / "README.md").read_text()

    spec = json.loads((units_dir / "units.json").read_text())
    del spec["vocabulary"]
    (units_dir / "units.json").write_text(json.dumps(spec))  # as 0.2.0 wrote it
    assert folder_vocabulary(units_dir) == expected
    quantize(units_dir.parent / "features", load_kmeans(units_dir.parent / "kmeans"), units_dir)
    assert json.loads((units_dir / "units.json").read_text())["vocabulary"]["size"] == 8
    other = load_kmeans(units_dir.parent / "kmeans")
    other.k = 9  # another k-means still is refused
    with pytest.raises(ValueError, match="made with other settings"):
        quantize(units_dir.parent / "features", other, units_dir)


def test_same_named_datasets_do_not_share_the_datasets_cache(composed, tmp_path):
    publish(composed, tmp_path / "one" / "dataset")
    smaller = tmp_path / "smaller"
    (smaller / "cross_modal").mkdir(parents=True)
    table = pq.read_table(sorted((composed / "cross_modal").glob("train-*.parquet"))[0]).slice(0, 3)
    pq.write_table(table, smaller / "cross_modal" / "train-00000.parquet")
    publish(smaller, tmp_path / "two" / "dataset")
    assert len(datasets.load_dataset(str(tmp_path / "one" / "dataset"), "cross_modal", split="train")) == 8
    assert len(datasets.load_dataset(str(tmp_path / "two" / "dataset"), "cross_modal", split="train")) == 3


def test_save_to_disk_for_load_from_disk(composed, tmp_path):
    publish(composed, tmp_path / "ds", save_to_disk=True)
    cm = datasets.load_from_disk(str(tmp_path / "ds" / "arrow" / "cross_modal"))
    assert len(cm["train"]) == 8
    pt = datasets.load_from_disk(str(tmp_path / "ds" / "arrow" / "pretrain"))
    assert set(pt) == {"train", "validation"}
    assert validate(tmp_path / "ds").ok


def test_publish_is_byte_identical(composed, tmp_path):
    publish(composed, tmp_path / "a")
    publish(composed, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def _break(dataset, config, mutate):
    path = sorted((dataset / "data" / config).glob("*.parquet"))[0]
    rows = pq.read_table(path).to_pylist()
    rows = mutate(rows)
    pq.write_table(records.to_table(config, rows), path)
    return validate(dataset)


def _first(fn):
    def mutate(rows):
        fn(rows[0])
        return rows
    return mutate


@pytest.mark.parametrize("config,mutate,rule", [
    ("cross_modal", _first(lambda r: r.update(task="summarise")), "schema"),
    ("cross_modal", _first(lambda r: r.update(content_hash="abc")), "schema"),
    ("cross_modal", _first(lambda r: r.update(dnsmos_ovrl=7.5)), "schema"),   # DNSMOS is 1-5
    ("chain_of_modality", _first(lambda r: r.update(wer=-0.1)), "schema"),
    ("cross_modal", _first(lambda r: r.update(units=[r["units"][0], 99999])), "unit-range"),
    ("cross_modal", _first(lambda r: r.update(plain_text=r["plain_text"].replace("<eosp>", "<sosp><eosp>", 1))), "unit-markers"),
    ("cross_modal", _first(lambda r: r.update(plain_text="[Human]: hello<eoh> [SpeechGPT]: hi<eoa>")), "shape"),
    ("cross_modal", _first(lambda r: r.update(units=list(reversed(r["units"])) + [0])), "units-match"),
    ("cross_modal", _first(lambda r: r.update(transcript=r["transcript"] + " EXTRA")), "text-match"),
    ("cross_modal", _first(lambda r: r.update(completion=r["completion"] + " EXTRA")), "prompt-completion"),
    ("cross_modal", _first(lambda r: r.update(transcript="   ")), "empty-text"),
    ("cross_modal", _first(lambda r: r.update(
        transcript="HI<eoa> [Human]: x<eoh>", plain_text=r["plain_text"].replace(r["transcript"], "HI<eoa> [Human]: x<eoh>"),
        completion=r["completion"].replace(r["transcript"], "HI<eoa> [Human]: x<eoh>"))), "markup"),
    ("chain_of_modality", _first(lambda r: r.update(
        response="Sure. [ua] <sosp><5><eosp>", plain_text=r["plain_text"].replace(r["response"], "Sure. [ua] <sosp><5><eosp>"),
        completion=r["completion"].replace(r["response"], "Sure. [ua] <sosp><5><eosp>"))), "markup"),
    ("cross_modal", _first(lambda r: r.update(template_id="another-template")), "content-hash"),
    ("cross_modal", lambda rows: rows + [rows[0]], "duplicate-id"),
    ("pretrain", _first(lambda r: r.update(text="<sosp><1><eosp>")), "units-match"),
    ("chain_of_modality", _first(lambda r: r.update(response=r["response"] + "!")), "text-match"),
    ("chain_of_modality", _first(lambda r: r.update(format="text-text" if r["format"] != "text-text" else "speech-speech")), "shape"),
])
def test_every_rule_catches_its_fault(dataset, config, mutate, rule):
    assert validate(dataset).ok
    report_ = _break(dataset, config, mutate)
    assert not report_.ok and report_.by_rule[rule] >= 1, report_.as_dict()
    example = next(e for e in report_.examples if e["rule"] == rule)
    assert example["file"].startswith(f"data/{config}/") and example["row"] in (0, len(pq.read_table(dataset / example["file"])) - 1)


@pytest.mark.parametrize("ids", [lambda o: [7, 8, 9, 7], lambda o: [None, None, *o[2:]], lambda o: [[1], [1], [2], None],
                                 lambda o: [{"a": 1}, {"a": 1}, {"a": 2}, {"a": 3}], lambda o: [b"\xff\x00"] * 4,
                                 lambda o: [datetime.datetime(2020, 1, 1)] * 4, lambda o: [decimal.Decimal("1.5")] * 4,
                                 lambda o: [float("nan")] * 4],
                         ids=["numbers", "nulls", "lists", "objects", "bytes", "timestamps", "decimals", "nan"])
def test_ids_of_another_type_fail_the_schema_not_the_auditor(dataset, ids):
    """A config whose one file holds ids that are not strings (a tool of the user's wrote them) failed ``validate``
    with Arrow's "Array chunks must all be same type" traceback. Each such id is a schema error of its record; only
    text ids are compared for duplicates (two nulls, or two 7s, are not said twice over). ``--json`` wrote a NaN id
    as ``NaN``, which is not JSON, and stopped with a TypeError traceback at bytes, a timestamp or a decimal: an id
    that is not text is given as Python spells it."""
    path = sorted((dataset / "data" / "cross_modal").glob("*.parquet"))[0]
    table = pq.read_table(path)
    ids = ids(table.column("id").to_pylist())
    assert table.num_rows == len(ids)
    pq.write_table(table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids)), path)
    result = runner.invoke(app, ["validate", str(dataset), "--json"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    out = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert all(isinstance(e["id"], str) or e["id"] is None for e in out["errors"])
    not_text = sum(not isinstance(i, str) for i in ids)
    assert out["errors_by_rule"] == {"schema": not_text} and out["failed_records"]["cross_modal"] == not_text, out
    assert all(e["file"] == f"data/cross_modal/{path.name}" and e["message"].startswith("id: ") for e in out["errors"])


def test_units_durations_rule(units_dir, tmp_path):
    path = sorted(units_dir.glob("units-*.parquet"))[0]
    assert validate(units_dir).ok
    rows = pq.read_table(path).to_pylist()
    rows[0]["durations"] = rows[0]["durations"][:-1]
    pq.write_table(records.to_table("units", rows), path)
    assert validate(units_dir).by_rule["durations"] == 1


def test_cli_validate_exit_codes(dataset):
    result = runner.invoke(app, ["validate", str(dataset)])
    assert result.exit_code == 0 and "PASS" in result.stdout
    _break(dataset, "cross_modal", _first(lambda r: r.update(units=[123456])))
    result = runner.invoke(app, ["validate", str(dataset), "--json"])
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["ok"] is False and out["errors_by_rule"]["unit-range"] == 1


def test_report_renders_its_plots(dataset, tmp_path):
    result = report(dataset, tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert set(result["plots"]) == {"hours_per_corpus.png", "durations.png", "units_per_second.png", "unit_usage.png",
                                    "records.png", "text_lengths.png"}
    for png in result["plots"]:
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"src='{png}'" in page
    assert result["utterances"] == 4 and result["frames_per_second"] == pytest.approx(100, rel=0.05)
    report(dataset, tmp_path / "report")  # again, into its own folder
    # the user's page or plot where the report writes: one line, nothing written (it was overwritten in silence)
    for name in ("index.html", "records.png", "audio/worst-0.wav"):
        mine = tmp_path / "mine" / name
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.write_text("the user's")
        (tmp_path / "mine" / "notes.txt").write_text("kept")
        with pytest.raises(FileExistsError, match=rf"mine/{name}: already there and not written by report"):
            report(dataset, tmp_path / "mine")
        assert sorted(p.relative_to(tmp_path / "mine").as_posix() for p in (tmp_path / "mine").rglob("*")
                      if p.is_file()) == sorted({name, "notes.txt"})
        mine.unlink()


def test_speechgpt_training_files(composed, tmp_path):
    """publish --format hf,speechgpt: the files SpeechGPT's scripts read, with their names and keys."""
    import re
    result = runner.invoke(app, ["publish", str(composed), str(tmp_path / "ds"), "--format", "hf,speechgpt"])
    assert result.exit_code == 0, result.output
    root = tmp_path / "ds" / "speechgpt"
    for config, name in (("cross_modal", "stage2/SpeechInstruct_cross_modal.jsonl"),
                         ("chain_of_modality", "stage3/SpeechInstruct_chain_of_modality.jsonl")):
        published = datasets.load_dataset(str(tmp_path / "ds"), config, split="train")
        as_speechgpt_reads_it = datasets.load_dataset("json", data_files=str(root / name), split="train")  # cm_sft.py
        assert as_speechgpt_reads_it.column_names == ["prefix", "plain_text"]
        assert as_speechgpt_reads_it["plain_text"] == published["plain_text"]
        assert as_speechgpt_reads_it["prefix"] == published["prefix"]
    pretrain = datasets.load_dataset(str(tmp_path / "ds"), "pretrain")
    for split, name in (("train", "train.txt"), ("validation", "dev.txt")):
        lines = (root / "stage1" / name).read_text().splitlines()
        assert lines == pretrain[split]["text"] and all(re.fullmatch(r"<sosp>(<\d+>)*<eosp>", line) for line in lines)
    assert json.loads(result.stdout)["speechgpt_files"]["stage2/SpeechInstruct_cross_modal.jsonl"] == 8
    result = runner.invoke(app, ["publish", str(composed), str(tmp_path / "ds")])  # hf only: stale exports go
    assert result.exit_code == 0 and not (root / "stage1" / "train.txt").exists()
    result = runner.invoke(app, ["publish", str(composed), str(tmp_path / "ds"), "--format", "fairseq"])
    assert result.exit_code == 2 and "choose hf or hf,speechgpt" in result.stderr


def test_card_follows_the_hub_card_specification(dataset):
    """Read back with huggingface_hub's own card classes: every field the Hub's dataset-card spec asks for."""
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(dataset / "README.md")
    data = card.data.to_dict()
    # two sources under different licenses: "other", with the required license_link to a file that exists
    assert data["license"] == "other" and data["license_name"] == "speechinstruct-sources"
    assert data["license_link"] == "LICENSE.md" and "CC-BY-4.0" in (dataset / "LICENSE.md").read_text()
    assert data["annotations_creators"] == ["machine-generated"] and data["language"] == ["en"]
    assert data["size_categories"] == ["n<1K"] and data["source_datasets"] == ["extended|librispeech", "original"]
    infos = {c["config_name"]: c for c in data["dataset_info"]}
    assert set(infos) == {"cross_modal", "chain_of_modality", "pretrain"}
    for config, info in infos.items():
        assert [f["name"] for f in info["features"]] == records.arrow_schema(config).names
        assert sum(s["num_examples"] for s in info["splits"]) == sum(
            pq.read_metadata(f).num_rows for f in (dataset / "data" / config).glob("*.parquet"))
    assert {"dtype": "string", "name": "transcript"} in infos["cross_modal"]["features"]
    assert {"list": "int32", "name": "units"} in infos["cross_modal"]["features"]
    for section in ("## Sources and provenance", "## Fields", "## Intended uses", "## Limitations", "## Citation"):
        assert section in card.text, section
    assert "arXiv:2305.11000" in card.text and "| `content_hash` | string |" in card.text
    # the card's config table is what `datasets` reads: the dataset_info features load as declared
    builder = datasets.load_dataset_builder(str(dataset), "cross_modal")
    assert list(builder.info.features) == records.arrow_schema("cross_modal").names


def test_a_single_known_license_is_the_cards_license(units_dir, tmp_path):
    from huggingface_hub import DatasetCard

    cross_modal(units_dir, tmp_path / "c" / "cross_modal")
    publish(tmp_path / "c", tmp_path / "d")
    data = DatasetCard.load(tmp_path / "d" / "README.md").data.to_dict()
    assert data["license"] == "cc-by-4.0" and "license_link" not in data and not (tmp_path / "d" / "LICENSE.md").exists()


def test_push_to_hub_validates_creates_and_uploads_only_the_dataset(composed, tmp_path, monkeypatch):
    """Against a loopback stand-in for the Hub API: the card is validated, the repo created (once: a second
    push finds it), and the commit holds the dataset files and nothing else (no stage stamps, no arrow copy)."""
    from hub_server import Hub
    from huggingface_hub import HfApi

    from speechinstruct.release.publish import push

    hub = Hub()
    try:
        hub.serve_huggingface_hub(monkeypatch)
        out = tmp_path / "ds"
        publish(composed, out, save_to_disk=True)
        (out / ".stage.json").write_text("{}")  # what `run` leaves in the folder
        api = HfApi(endpoint=hub.url, token="hf_loopback")
        pushed = push(out, "user/tiny", api=api)
        assert pushed["repo"] == f"{hub.url}/datasets/user/tiny"
        assert hub.validated[0]["repoType"] == "dataset" and hub.validated[0]["content"] == (out / "README.md").read_text()
        uploaded = hub.files["user/tiny"]
        expected = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
                    and (p.suffix == ".parquet" and p.parts[len(out.parts)] in ("data", "stats")
                         or p.name in ("README.md", "LICENSE.md", "speechinstruct.json"))}
        assert set(uploaded) == expected and "data/cross_modal" in " ".join(uploaded)
        assert uploaded["README.md"] == (out / "README.md").read_bytes()
        assert not any(name.startswith(("arrow/", ".")) for name in uploaded)
        push(out, "user/tiny", api=api)  # the repo exists now: no error, a second commit
        assert [c for c in hub.calls if c[1] == "/api/repos/create"] == [("POST", "/api/repos/create")] * 2
    finally:
        hub.close()


def test_report_says_pass_or_fail_first_and_shows_a_record_of_every_kind(dataset, tmp_path):
    passed = report(dataset, tmp_path / "ok")
    page = (tmp_path / "ok" / "index.html").read_text()
    assert passed["valid"] and page.index("PASS: all") < page.index("<h2>")  # the verdict comes first
    for kind in ("cross_modal: asr", "cross_modal: tts", "pretrain", "chain_of_modality: "):
        assert f"<td>{kind}" in page, kind
    assert "units …&lt;eosp&gt;" in page  # unit runs are shortened for reading, and escaped as all text is
    assert "<sosp>" not in page and "&lt;sosp&gt;" in page
    assert passed["units_by_kind"]["chain-of-modality speech (TTS)"] > 0
    assert passed["units_by_kind"]["corpus utterances (cross-modal, pretrain)"] > 0

    _break(dataset, "cross_modal", _first(lambda r: r.update(units=[123456])))
    failed = runner.invoke(app, ["report", str(dataset), str(tmp_path / "bad")])
    assert failed.exit_code == 0, failed.output
    page = (tmp_path / "bad" / "index.html").read_text()
    assert "FAIL: content-hash ×1, shape ×1, unit-range ×1, units-match ×1" in page and "<td>unit-range</td>" in page
    assert json.loads((tmp_path / "bad" / "report.json").read_text())["valid"] is False


@pytest.mark.parametrize("column,values", [
    ("plain_text", lambda n: [{"a": 1}] * n), ("transcript", lambda n: [datetime.datetime(2020, 1, 1)] * n),
    ("transcript", lambda n: [float("nan")] * n), ("units", lambda n: ["1 2 3"] * n), ("units", lambda n: [[2**62]] * n),
    ("units", lambda n: [[-5, 3]] * n), ("task", lambda n: [["tts"]] * n), ("id", lambda n: [b"\xff"] * n),
], ids=["object-text", "timestamp-transcript", "nan-transcript", "text-units", "huge-unit", "negative-unit",
        "list-task", "bytes-id"])
def test_report_of_records_another_tool_wrote_says_fail_and_draws_the_rest(dataset, tmp_path, column, values):
    """An auditor's report of a dataset whose one file holds values of the wrong type stopped with a traceback (a
    transcript that is a timestamp: "has no len()"; plain_text an object: "expected string"), "object of too small
    depth" for text units, and a unit id of 2**62 tried to count 2**62 units ("array is too big"; a unit of 10**9
    would have asked for 8 GB). The verdict says FAIL and names them; the plots and samples leave out the records
    the schema refuses, and units outside [0, K)."""
    path = sorted((dataset / "data" / "cross_modal").glob("*.parquet"))[0]
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values(table.num_rows))), path)
    result = runner.invoke(app, ["report", str(dataset), str(tmp_path / "report"), "-q"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    assert numbers["valid"] is False and "FAIL: " in (tmp_path / "report" / "index.html").read_text()
    assert numbers["units_used"] <= 8 and numbers["units_by_kind"]["chain-of-modality speech (TTS)"] > 0


@pytest.mark.parametrize("change,said", [
    (lambda t: t.set_column(t.schema.get_field_index("duration"), "duration", pa.array(["x"] * t.num_rows)),
     "its duration column holds string, not numbers"),
    (lambda t: t.drop(["n_units"]), "no n_units column"),
    (lambda t: b"garbage", "unreadable parquet file"),
    (lambda t: t.set_column(t.schema.get_field_index("duration"), "duration", pa.array([float("nan")] * t.num_rows)), None),
    (lambda t: t.slice(0, 0), None),
], ids=["text", "missing", "garbage", "nan", "empty"])
def test_report_of_utterance_stats_another_tool_wrote_is_one_line_naming_the_file(dataset, tmp_path, change, said):
    """``stats/utterances.parquet`` (publish writes it: each utterance's duration, frames and units) holding text
    durations stopped the report with "could not convert string to float: 'x'", a missing column with a line naming
    no file, NaN durations with matplotlib's "autodetected range of [nan, nan] is not finite", and no rows wrote NaN
    means into report.json, which is not JSON. A file that is not publish's is one line naming it; durations that
    are not positive numbers are left out of the plots."""
    path = dataset / "stats" / "utterances.parquet"
    changed = change(pq.read_table(path))
    path.write_bytes(changed) if isinstance(changed, bytes) else pq.write_table(changed, path)
    result = runner.invoke(app, ["report", str(dataset), str(tmp_path / "report"), "-q"])
    assert "Traceback" not in result.output, result.output
    if said:
        line = " ".join(result.output.split())
        assert result.exit_code == 2 and f"error: {path}: " in line and said in line, result.output
        return
    assert result.exit_code == 0, result.output
    numbers = json.loads((tmp_path / "report" / "report.json").read_text(),
                         parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert not (tmp_path / "report" / "durations.png").exists() and "utterances" not in numbers and numbers["records"]


def test_publish_never_deletes_or_overwrites_files_it_did_not_write(composed, tmp_path):
    """The user's own files in OUT stay byte for byte; one standing where publish writes is refused by name;
    what an earlier publish wrote and this one does not is deleted (and only that)."""
    out = tmp_path / "ds"
    (out / "data" / "mine").mkdir(parents=True)
    (out / "data" / "mine" / "important.parquet").write_bytes(b"user data")
    (out / "speechgpt" / "stage1").mkdir(parents=True)
    (out / "speechgpt" / "stage1" / "train.txt").write_text("the user's own stage-1 file\n")
    (out / "notes.md").write_text("mine\n")
    publish(composed, out)  # hf only: SpeechGPT's file names are not written, so the user's stays
    assert (out / "data" / "mine" / "important.parquet").read_bytes() == b"user data"
    assert (out / "speechgpt" / "stage1" / "train.txt").read_text() == "the user's own stage-1 file\n"
    assert (out / "notes.md").read_text() == "mine\n"
    with pytest.raises(FileExistsError, match=r"stage1/train.txt: already there and not written by publish"):
        publish(composed, out, speechgpt_files=True)
    assert (out / "speechgpt" / "stage1" / "train.txt").read_text() == "the user's own stage-1 file\n"
    # the user's LICENSE.md: refused, untouched, whether publish would write one (mixed licenses) or not
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "LICENSE.md").write_text("the user's license\n")
    with pytest.raises(FileExistsError, match=r"LICENSE.md: already there and not written by publish"):
        publish(composed, fresh)
    assert (fresh / "LICENSE.md").read_text() == "the user's license\n" and not (fresh / "README.md").exists()
    result = runner.invoke(app, ["publish", str(composed), str(fresh), "-q"])
    assert result.exit_code == 2 and "LICENSE.md: already there and not written by publish" in result.stderr
    # publish's own files are replaced and its stale ones removed: a smaller republish leaves no old shard
    (out / "speechgpt" / "stage1" / "train.txt").unlink()
    publish(composed, out, speechgpt_files=True, save_to_disk=True)
    ours = set(json.loads((out / ".speechinstruct-publish.json").read_text())["files"])
    assert "speechgpt/stage1/train.txt" in ours and "LICENSE.md" in ours and "data/mine/important.parquet" not in ours
    assert any(f.startswith("arrow/cross_modal/") for f in ours)
    publish(composed, out, sections.Output(eval_splits=False))  # no export, no arrow copy, no validation/test files this time
    assert not (out / "speechgpt" / "stage1" / "train.txt").exists() and not (out / "arrow").exists()
    assert not list((out / "data").rglob("validation-*.parquet"))
    assert (out / "data" / "mine" / "important.parquet").read_bytes() == b"user data"
    assert validate(out).ok


def test_a_single_license_republish_removes_only_its_own_license_file(units_dir, composed, tmp_path):
    out = tmp_path / "d"
    publish(composed, out)  # two sources: LICENSE.md written
    assert (out / "LICENSE.md").is_file()
    cross_modal(units_dir, tmp_path / "c" / "cross_modal")
    publish(tmp_path / "c", out)  # one Hub license: publish's LICENSE.md goes
    assert not (out / "LICENSE.md").exists()


def test_a_folder_published_before_the_list_existed_is_still_publishs(composed, tmp_path):
    out = tmp_path / "old"
    publish(composed, out, speechgpt_files=True)
    (out / ".speechinstruct-publish.json").unlink()  # as an earlier release left it
    publish(composed, out)
    assert not (out / "speechgpt" / "stage1" / "train.txt").exists() and validate(out).ok


def test_markup_from_sources_is_escaped_in_the_card_and_license_file(composed, tmp_path):
    from speechinstruct.release.publish import cell, licenses_file

    assert cell("<script>alert(1)</script> | x") == "&lt;script&gt;alert(1)&lt;/script&gt; \\| x"
    meta = {"sources": [{"corpus": "evil<img src=x onerror=alert(1)>", "license": "<b>mine</b>", "records": {"cross_modal": 1}}]}
    text = licenses_file(meta)
    assert "<img" not in text and "<b>" not in text and "&lt;b&gt;mine&lt;/b&gt;" in text
    publish(composed, tmp_path / "d", name="<script>x</script>")
    body = (tmp_path / "d" / "README.md").read_text().split("\n---\n", 1)[1]  # the Markdown the Hub renders
    assert "<script>" not in body and "# &lt;script&gt;x&lt;/script&gt;" in body


def test_push_to_an_unreachable_hub_is_one_line(composed, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "s" * 30)
    result = runner.invoke(app, ["publish", str(composed), str(tmp_path / "ds"), "--push-to-hub", "user/x", "-q"])
    assert result.exit_code == 2, result.output
    assert "could not push" in result.stderr and "127.0.0.1:9" in result.stderr and "Traceback" not in result.output
    assert "s" * 30 not in result.output and (tmp_path / "ds" / "README.md").is_file()


def test_an_edited_speechinstruct_json_is_one_line_in_report_and_validate(dataset, tmp_path):
    meta = json.loads((dataset / "speechinstruct.json").read_text())
    for edit, message in ((lambda m: {**m, "counts": [1, 2]}, "'counts' must be a JSON object, got list"),
                          (lambda m: {**m, "k": "eight"}, "'k' must be a positive integer"),
                          (lambda m: [m], "must be a JSON object, got list"),
                          (lambda m: {k: v for k, v in m.items() if k != "hours"}, "no 'hours'"),
                          (lambda m: {**m, "vocabulary": {**m["vocabulary"], "size": 9, "codebook_size": 9}},
                           "'k' is 8 but the vocabulary has 9 units"),
                          (lambda m: {**m, "vocabulary": {"tokenizer": "kmeans"}}, "'vocabulary' must be an object"),
                          (lambda m: {**m, "vocabulary": {**m["vocabulary"], "codebooks": 3}},
                           "vocabulary size 8 is not codebooks 3 x codebook_size 8"),
                          # the report stopped at these with "Unknown format code 'f' for object of type 'str'", a
                          # TypeError traceback (unhashable type: 'dict'), a line naming no file, or NaN in report.json
                          (lambda m: {**m, "hours": {"librispeech": "a"}}, "hours must map corpora to hours"),
                          (lambda m: {**m, "hours": {"librispeech": float("nan")}}, "hours must map corpora to hours"),
                          (lambda m: {**m, "hours": {"librispeech": 10**400}}, "hours must map corpora to hours"),
                          (lambda m: {**m, "k": 10**400}, "'k' must be a positive integer"),
                          (lambda m: {**m, "by_kind": {"cross_modal": {"asr": {"a": 1}}}},
                           "by_kind['cross_modal'] must map kinds to record counts"),
                          (lambda m: {**m, "sources": [{"corpus": 5}]}, "sources[0] must be an object with corpus"),
                          (lambda m: {**m, "vocabulary": {**m["vocabulary"], "frame_rate": "x"}},
                           "vocabulary frame_rate must be a positive number"),
                          (lambda m: {**m, "vocabulary": {**m["vocabulary"], "features": 5}},
                           "vocabulary features must be text")):
        (dataset / "speechinstruct.json").write_text(json.dumps(edit(meta)))
        for cmd in (["report", str(dataset), str(tmp_path / "r")], ["validate", str(dataset)]):
            result = runner.invoke(app, cmd)
            assert result.exit_code == 2, (cmd, result.output)
            assert "speechinstruct.json" in result.stderr and message in result.stderr, result.stderr
    (dataset / "speechinstruct.json").write_text("{not json")
    result = runner.invoke(app, ["validate", str(dataset)])
    assert result.exit_code == 2 and "speechinstruct.json: not valid JSON" in result.stderr


@pytest.mark.parametrize("key,value", [("root", 5), ("manifest", ["m"]), ("root", {"a": 1})])
def test_a_units_json_whose_paths_are_not_text_is_one_line_naming_it(units_dir, dataset, tmp_path, key, value):
    """``units.json``'s corpus root or manifest folder of another JSON type (an edited file) stopped ``report
    --units`` and ``score`` of the units with "expected str, bytes or os.PathLike object, not int" tracebacks."""
    spec = json.loads((units_dir / "units.json").read_text())
    (units_dir / "units.json").write_text(json.dumps({**spec, key: value}))
    for cmd in (["report", str(dataset), str(tmp_path / "r"), "--units", str(units_dir), "-q"],
                ["score", str(units_dir), str(tmp_path / "s"), "--dnsmos", "-q"], ["validate", str(units_dir)]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 2 and "Traceback" not in result.output, (cmd, result.output)
        assert f"{units_dir / 'units.json'}: '{key}' must be a path (text)" in " ".join(result.output.split()), result.output


def test_a_dataset_whose_files_were_filtered_still_loads_for_training(dataset, caplog, tmp_path, monkeypatch):
    """A user drops rows from a Parquet file: the card's dataset_info sizes no longer match. Training loads it
    without the size check and says which split, instead of datasets' NonMatchingSplitsSizesError."""
    from speechinstruct.model.train import load_split

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # not another test's cached copy
    files = sorted((dataset / "data" / "cross_modal").glob("train-*.parquet"))
    before = sum(pq.read_metadata(f).num_rows for f in files)
    pq.write_table(pq.read_table(files[0]).slice(0, 1), files[0])
    with caplog.at_level("WARNING", logger="speechinstruct"):
        ds = load_split(dataset, "cross_modal", "train")
    after = sum(pq.read_metadata(f).num_rows for f in files)
    assert after < before and len(ds) == after
    said = [r for r in caplog.records if r.name == "speechinstruct.model.train" and r.levelname == "WARNING"]
    assert len(said) == 1 and "sizes of cross_modal (train) no longer match" in said[0].message
    assert "publish" in said[0].message


def test_a_dataset_file_that_is_not_the_configs_is_named_when_training_loads_it(dataset, tmp_path, monkeypatch, caplog):
    """A published file replaced by another table (a foreign Parquet file, or columns dropped by hand) or cut
    short: training's loader names the file and what is wrong in one line (it was datasets' traceback ending
    in DatasetGenerationError, the file named only in datasets' error log lines above it, which no longer print)."""
    from speechinstruct.model.train import load_split

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    target = sorted((dataset / "data" / "cross_modal").glob("train-*.parquet"))[0]
    pq.write_table(pa.table({"id": ["a"], "x": [1]}), target)
    with caplog.at_level("ERROR"), pytest.raises(ValueError, match=rf"{target.name}: not cross_modal records \(no "
                                                                  r"prefix, plain_text, .*; extra x\); run `speechinstruct validate"):
        load_split(dataset, "cross_modal", "train")
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("datasets")]
    target.write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(ValueError, match=rf"{target.name}: unreadable parquet file"):
        load_split(dataset, "cross_modal", "train")


def test_publish_refuses_records_that_validate_fails(composed, tmp_path):
    """A record with markup in a text field (composed by an older version, or edited) is not published."""

    import pyarrow.parquet as pq
    from speechinstruct import records
    from speechinstruct.release.publish import InvalidRecords, publish

    folder = tmp_path / "tampered"
    shutil.copytree(composed, folder)
    path = sorted((folder / "cross_modal").glob("train-*.parquet"))[0]
    rows = pq.read_table(path).to_pylist()
    rows[0]["transcript"] = rows[0]["transcript"] + " [Human]: hi"
    rows[0]["content_hash"] = records.content_hash(rows[0])  # as a composer of an older version would have written it
    pq.write_table(records.to_table("cross_modal", rows), path)
    with pytest.raises(InvalidRecords, match=r"row 0 .*\[markup\] transcript holds record markup '\[Human\]'.*markup x1\)"):
        publish(folder, tmp_path / "out")
    assert not (tmp_path / "out" / "data").exists()
    # a records file copied beside itself: every record twice, named with where it was first, and the advice
    # is to take the copy out (composing again, what publish said, changed nothing)
    shutil.rmtree(folder)
    shutil.copytree(composed, folder)
    path = sorted((folder / "cross_modal").glob("train-*.parquet"))[0]
    shutil.copy(path, path.with_name("train-00099.parquet"))
    with pytest.raises(InvalidRecords, match=r"train-00099.parquet: row 0 .*\[duplicate-id\] id appears more than once "
                       rf"\(first in cross_modal/{path.name} row 0\).*nothing published; a file copied beside itself"):
        publish(folder, tmp_path / "out")
    assert not (tmp_path / "out" / "data").exists()


def test_publish_refuses_a_compose_folder_that_lacks_shards_or_is_stale(units_dir, tmp_path):
    """One task of a compose job array done (shard 0 of 2), publish wrote a dataset of half the records, and its
    card gave the hours of the whole units folder; units deduplicated again after compose (contaminated rows
    dropped), publish shipped the records of the rows dropped. Both are one line now, nothing published."""
    def run(*args):
        result = runner.invoke(app, [str(a) for a in [*args, "-q"]])
        return result.exit_code, result.output.replace("\n", "")

    assert run("dedup", units_dir, tmp_path / "dd")[0] == 0
    comp = tmp_path / "comp"
    assert run("compose", "cross-modal", tmp_path / "dd", comp / "cross_modal", "--num-shards", 2, "--shard-index", 0)[0] == 0
    code, output = run("publish", comp, tmp_path / "ds")
    assert code == 2 and "Traceback" not in output, output
    assert (f"{comp / 'cross_modal' / 'train-00001.parquet'}: missing (and 2 more): cross_modal/ holds records of part "
            f"of {tmp_path / 'dd'}") in output, output
    assert not (tmp_path / "ds").exists()
    assert run("compose", "cross-modal", tmp_path / "dd", comp / "cross_modal", "--num-shards", 2, "--shard-index", 1)[0] == 0
    assert run("publish", comp, tmp_path / "ds")[0] == 0
    (tmp_path / "bench.txt").write_text("Mister Quilter is the apostle.\n")
    assert run("dedup", units_dir, tmp_path / "dd", "--eval", tmp_path / "bench.txt")[0] == 0
    code, output = run("publish", comp, tmp_path / "ds2")
    assert code == 2 and "train-00000.parquet: made from units-00000.parquet as it was before it was written again" in output, output
    assert not (tmp_path / "ds2").exists()


def test_a_compose_folder_whose_units_folder_is_gone_is_one_line_not_a_dataset_without_its_vocabulary(units_dir, tmp_path):
    """A compose folder moved or copied without the units folder its records came from (or that folder moved):
    publish wrote a dataset with `k: null`, no vocabulary and no hours, which validate passed and train could not
    use. One line naming the summary and the folder; nothing written."""

    cross_modal(units_dir, tmp_path / "c" / "cross_modal")
    assert publish(tmp_path / "c", tmp_path / "ds")["k"] == 8
    shutil.move(units_dir, tmp_path / "elsewhere")
    result = runner.invoke(app, ["publish", str(tmp_path / "c"), str(tmp_path / "ds2"), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    summary = tmp_path / "c" / "cross_modal" / "summary.json"
    assert (f"{summary}: its records were made from {units_dir}, which is not there" in result.stderr.replace("\n", "")
            ), result.stderr
    assert not (tmp_path / "ds2").exists()

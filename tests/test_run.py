import json

import datasets
import pytest
import yaml
from typer.testing import CliRunner

from conftest import fixed_dnsmos
from speechinstruct.cli import app
from speechinstruct.pipeline import RecipeError, load_recipe, run

runner = CliRunner()


def recipe(tmp_path, **over):
    data = {"name": "tiny", "workdir": str(tmp_path / "work"), "demo_corpus": {"sentences": 24, "seed": 1},
            "features": {"kind": "mfcc"}, "kmeans": {"k": 16, "max_frames": 20000},
            "compose": {"pretrain": {"dev_fraction": 0.2}, "chain_of_modality": {"max_pairs": 6}},
            # these tests are about stages and stamps; the report's resynthesis has its own (tests/test_listen.py)
            "output": {"vocoder": "none"}}
    data.update(over, output={**data["output"], **over.get("output", {})})  # a test's output keys, without resynthesis
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_builds_a_valid_dataset_and_skips_when_up_to_date(tmp_path, caplog):
    summary = run(recipe(tmp_path))
    assert summary["valid"] and summary["k"] == 16
    assert summary["records"]["cross_modal"]["train"] == 48
    ds = datasets.load_dataset(str(tmp_path / "work" / "dataset"), "chain_of_modality", split="train")
    assert len(ds) == 6
    assert (tmp_path / "work" / "report" / "index.html").is_file()
    first = {p: p.read_bytes() for p in (tmp_path / "work" / "dataset").rglob("*.parquet")}

    with caplog.at_level("INFO", logger="speechinstruct"):
        again = run(recipe(tmp_path))
    assert "[1/11] demo corpus: up to date" in caplog.messages
    assert again["stages_skipped"] == 10
    # the command: stage lines on stderr (none with -q), the summary alone on stdout
    for flags, said in (([], True), (["-q"], False)):
        result = runner.invoke(app, ["run", str(recipe(tmp_path)), *flags])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["stages_skipped"] == 10
        assert ("[1/11] demo corpus: up to date" in result.stderr) is said, result.stderr
        assert ("validate: PASS" in result.stderr) is said

    # a changed k redoes clustering and everything after it, with the same result shape
    caplog.clear()
    with caplog.at_level("INFO", logger="speechinstruct"):
        changed = run(recipe(tmp_path, kmeans={"k": 12, "max_frames": 20000}))
    assert changed["k"] == 12 and changed["stages_skipped"] == 3  # demo, shard, extract
    said = [m for m in caplog.messages if " → " in m]
    assert said[0].startswith("[4/11] cluster (k=12") and said[0].endswith(" (again: its settings changed: k)")
    assert said[1].startswith("[5/11] quantize") and said[1].endswith(" (again: its input changed)")
    meta = json.loads((tmp_path / "work" / "dataset" / "speechinstruct.json").read_text())
    assert meta["k"] == 12
    # and going back gives byte-identical output to the first run
    run(recipe(tmp_path))
    assert {p: p.read_bytes() for p in (tmp_path / "work" / "dataset").rglob("*.parquet")} == first


def test_recipe_errors_are_clear(tmp_path, monkeypatch):
    for var in ("LIBRISPEECH_ROOT", "GIGASPEECH_ROOT", "COMMONVOICE_ROOT", "LIBRILIGHT_ROOT", "MHUBERT_CKPT", "MHUBERT_KMEANS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RecipeError, match=r"speechgpt.yaml: set the environment variable\(s\) \$COMMONVOICE_ROOT"):
        load_recipe("recipes/speechgpt.yaml")
    for var in ("LIBRISPEECH_ROOT", "GIGASPEECH_ROOT", "COMMONVOICE_ROOT", "LIBRILIGHT_ROOT", "MHUBERT_CKPT", "MHUBERT_KMEANS"):
        monkeypatch.setenv(var, str(tmp_path / "missing"))
    with pytest.raises(RecipeError) as e:
        load_recipe("recipes/speechgpt.yaml")
    lines = str(e.value).splitlines()
    assert lines[0].endswith("corpora[0].root: librispeech root '" + str(tmp_path / "missing") + "' is not a folder")
    assert any("features.checkpoint: " in line for line in lines) and len(lines) == 6
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpora: []\nfeaturs: {}\n")
    result = runner.invoke(app, ["run", str(bad)])
    assert result.exit_code == 2 and "bad.yaml: featurs: unknown key" in result.stderr


def test_shipped_mini_recipe_loads():
    r = load_recipe("recipes/mini.yaml")
    assert r["demo_corpus"]["sentences"] == 300 and r["features"]["kind"] == "mfcc" and r["kmeans"]["k"] == 100
    assert r["compose"]["dialogue"]["conversations"] == "builtin"


def test_recipe_with_an_existing_kmeans_file(tmp_path):
    import numpy as np
    km = tmp_path / "km.npy"
    np.save(km, np.random.default_rng(0).normal(size=(10, 39)).astype(np.float32))  # 39 = MFCC dims
    dialogues = {"pretrain": {"dev_fraction": 0.2}, "chain_of_modality": {"max_pairs": 6}, "dialogue": {"max_dialogues": 2},
                 "interleaved": {"max_words": 3}}
    summary = run(recipe(tmp_path, kmeans={"path": str(km)}, compose=dialogues))
    assert summary["valid"] and summary["k"] == 10
    assert not (tmp_path / "work" / "kmeans").exists()  # nothing was fitted
    talks = datasets.load_dataset(str(tmp_path / "work" / "dataset"), "dialogue", split="train")
    assert talks["source_id"] == ["dialogue-000", "dialogue-001"] and talks["turns"] == [2, 2]
    mixed = datasets.load_dataset(str(tmp_path / "work" / "dataset"), "interleaved", split="train")
    assert len(mixed) == 24  # every demo sentence has espeak-ng's word timings; the demo corpus is all train
    assert all(m[0] != m[1] for m in mixed["modalities"]) and mixed[0]["text"].startswith(("[TEXT]", "[SPEECH]"))
    np.save(km, np.random.default_rng(1).normal(size=(10, 39)).astype(np.float32))  # replaced in place
    again = run(recipe(tmp_path, kmeans={"path": str(km)}))  # and dialogues no longer asked for
    assert again["stages_skipped"] == 3  # demo, shard, extract; quantize onwards redone
    assert again["valid"] and "dialogue" not in again["records"] and "interleaved" not in again["records"]
    assert not (tmp_path / "work" / "composed" / "dialogue").exists()
    assert not (tmp_path / "work" / "composed" / "interleaved").exists()


def test_run_on_a_release_with_test_sets_publishes_no_test_audio_as_training_data(tmp_path, librispeech_release):
    """LIBRISPEECH_ROOT=/data/LibriSpeech, as the README shows: dev-clean and test-clean sit beside the training
    folders. Their records go to validation/test (or nowhere), never to train."""
    path = recipe(tmp_path, demo_corpus=None, corpora=[{"name": "librispeech", "root": str(librispeech_release)}],
                  kmeans={"k": 8, "max_frames": 20000})
    summary = run(path)
    assert summary["valid"]
    dataset = tmp_path / "work" / "dataset"
    eval_ids = {"2277-149896-0000", "2277-149896-0001", "1089-134686-0000", "1089-134686-0001"}
    for config in ("cross_modal", "pretrain"):
        splits = datasets.load_dataset(str(dataset), config)
        train_sources = {s.rsplit("/", 1)[1] for s in splits["train"]["source_id"]}
        assert train_sources and not train_sources & eval_ids, config
        assert {s.rsplit("/", 1)[1] for s in splits["test"]["source_id"]} == {"1089-134686-0000", "1089-134686-0001"}
        assert set(splits) == {"train", "validation", "test"}
    card = (dataset / "README.md").read_text()
    assert "No dev or test audio is in `train`" in card and "`validation` and `test` hold" in card

    path = recipe(tmp_path, demo_corpus=None, corpora=[{"name": "librispeech", "root": str(librispeech_release)}],
                  kmeans={"k": 8, "max_frames": 20000}, output={"eval_splits": False})
    assert run(path)["valid"]
    assert set(datasets.load_dataset(str(dataset), "cross_modal")) == {"train"}
    assert "were left out of this dataset" in (dataset / "README.md").read_text()


def test_demo_corpus_is_published_as_what_it_is(tmp_path):
    run(recipe(tmp_path))
    dataset = tmp_path / "work" / "dataset"
    cm = datasets.load_dataset(str(dataset), "cross_modal", split="train")
    assert set(cm["corpus"]) == {"speechinstruct-demo"} and all("espeak-ng" in x for x in cm["license"])
    card = (dataset / "README.md").read_text()
    assert "librispeech" not in card.lower() and "CC-BY" not in card
    meta = json.loads((dataset / "speechinstruct.json").read_text())
    assert set(meta["hours"]) == {"speechinstruct-demo"}


@pytest.mark.parametrize("text,lines", [
    ("demo_corpus: {sentences: 5}\nkmeans: {max_frams: 10}\ncompose: {cross_modal: {mdoe: both}}\n",
     ["kmeans.max_frams: unknown key", "compose.cross_modal.mdoe: unknown key"]),
    ("demo_corpus: [1, 2]\n", ["demo_corpus: Input should be a valid dictionary or instance of DemoCorpus"]),
    ("demo_corpus: {sentences: five}\n",
     ["demo_corpus.sentences: Input should be a valid integer, unable to parse string as an integer"]),
    ("demo_corpus: {}\nkmeans: {k: 1}\nfeatures: {kind: wav2vec}\ncompose: {pretrain: {dev_fraction: 1.5}}\n",
     ["features.kind: Input should be 'mfcc', 'hubert', 'wav2vec2', 'wavlm', 'data2vec-audio', 'mimi', 'encodec', 'dac', 'xcodec' or 'xcodec2'", "kmeans.k: Input should be greater than or equal to 2",
      "compose.pretrain.dev_fraction: Input should be less than 1"]),
    ("demo_corpus: {}\ncompose: {cross_modal: {corpora: [gigaspeech]}}\n",
     ["compose.cross_modal.corpora: 'gigaspeech' is none of this recipe's corpora ['speechinstruct-demo']"]),
    ("demo_corpus: {}\nray: {actors: 0, num_gpus: 1}\n",
     ["ray.actors: Input should be greater than or equal to 1", "ray.num_gpus: unknown key"]),
    ("demo_corpus: {}\nfeatures: {device: cuda}\nray: {actors: 4}\n",
     ["features.device cuda: an actor given no GPU (ray.num_gpus_per_actor 0) sees none; give "
      "ray.num_gpus_per_actor 1 (or a fraction, 0.5: two actors a GPU) or features.device auto"]),
    ("demo_corpus: {}\ncompose: {chain_of_modality: {rewrite: true}}\n",
     ["compose.chain_of_modality: rewrite / tts openai need an llm section (base_url, model)"]),
])
def test_every_recipe_problem_is_one_line_with_its_key_path(tmp_path, text, lines):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).splitlines() == [f"{path}: {line}" for line in lines]
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output and not (tmp_path / "work").exists()


def test_secrets_are_refused_in_recipes_and_never_echoed(tmp_path, monkeypatch):
    key = "sk-proj-abcdefghijklmnop0123"
    path = tmp_path / "r.yaml"
    path.write_text(f"demo_corpus: {{}}\nllm: {{base_url: http://127.0.0.1:9, api_key: {key}}}\n")
    with pytest.raises(RecipeError, match=r"r.yaml: llm.api_key: looks like a secret") as e:
        load_recipe(path)
    assert key not in str(e.value)
    path.write_text(f"demo_corpus: {{}}\nllm: {{base_url: http://127.0.0.1:9, model: {key}}}\n")
    with pytest.raises(RecipeError, match=r"r.yaml: llm.model: holds what looks like an API key") as e:
        load_recipe(path)
    assert key not in str(e.value)
    monkeypatch.setenv("MY_MODEL", key)  # brought in through ${VAR}
    path.write_text("demo_corpus: {}\nllm: {base_url: http://127.0.0.1:9, model: '${MY_MODEL}'}\n")
    with pytest.raises(RecipeError, match=r"llm.model: holds what looks like an API key"):
        load_recipe(path)
    path.write_text("demo_corpus: {}\nquality: {asr: whisper-1, base_url: 'http://me:hunter2@127.0.0.1:9/v1'}\n")
    with pytest.raises(RecipeError, match=r"quality.base_url: a URL that carries credentials") as e:
        load_recipe(path)
    assert "hunter2" not in str(e.value)


def test_workdir_moves_the_outputs_and_a_second_run_is_refused(tmp_path):
    from speechinstruct.pipeline import workdir_lock
    path = recipe(tmp_path, output={"dataset": "ds", "report": "rep"})
    run(path, workdir=tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "ds" / "README.md").is_file() and (tmp_path / "elsewhere" / "rep" / "index.html").is_file()
    assert not (tmp_path / "work").exists()
    with workdir_lock(tmp_path / "elsewhere"):  # as if another run held it
        result = runner.invoke(app, ["run", str(path), "--workdir", str(tmp_path / "elsewhere")])
    assert result.exit_code == 2 and "another `speechinstruct run` is using this workdir (pid " in result.stderr


def test_a_workdir_moved_or_copied_is_up_to_date_where_it_lands_and_reads_its_own_files(tmp_path, monkeypatch):
    """A workdir moved (cluster scratch to project storage) or copied: every stage is up to date there, and a stage
    redone there reads the files beside it, never the old place's. A file of the user's is left as it was."""
    import shutil

    old, moved, copy = tmp_path / "scratch" / "work", tmp_path / "project" / "work", tmp_path / "copy"
    (old / "my-report").mkdir(parents=True)
    notes = json.dumps({"written in": str(old / "my-report")})  # the user's own file, naming the old place
    (old / "my-report" / "notes.json").write_text(notes)
    fixed_dnsmos(monkeypatch)  # a score stage whose files move too; its networks' scores are beside the point
    small = {"demo_corpus": {"sentences": 8, "seed": 1},  # few: four runs
             "compose": {"pretrain": {"dev_fraction": 0.2}, "chain_of_modality": {"max_pairs": 2}}}
    path = recipe(tmp_path, output={"vocoder": "none", "report": "my-report"}, quality={"dnsmos": True, "min_dnsmos": 1.0},
                  **small)
    run(path, workdir=old)
    published = {p.relative_to(old): p.read_bytes() for p in (old / "dataset").rglob("*") if p.is_file()}

    moved.parent.mkdir()
    shutil.move(old, moved)
    again = run(path, workdir=moved)
    assert again["valid"] and again["stages_skipped"] == 11  # every stage but validate, which runs every time
    assert {p.relative_to(moved): p.read_bytes() for p in (moved / "dataset").rglob("*") if p.is_file()} == published
    ours = [p for p in moved.rglob("*.json") if p.name != "notes.json"]
    assert ours and not [p for p in ours if str(old) in p.read_text()]
    assert (moved / "my-report" / "notes.json").read_text() == notes

    # stages redone there read the moved manifest, features, scores and units (another k: cluster onwards)
    other_k = recipe(tmp_path, output={"vocoder": "none", "report": "my-report"}, kmeans={"k": 12, "max_frames": 20000},
                     quality={"dnsmos": True, "min_dnsmos": 1.0}, **small)
    changed = run(other_k, workdir=moved)
    assert changed["valid"] and changed["k"] == 12 and changed["stages_skipped"] == 4  # demo, shard, score, extract

    # a copy beside the original reads its own files, not the original's
    shutil.copytree(moved, copy, symlinks=True)
    assert run(other_k, workdir=copy)["stages_skipped"] == 11
    assert not [p for p in copy.rglob("*.json") if p.name != "notes.json" and str(moved) in p.read_text()]


def test_relocate_rewrites_only_our_paths_under_the_old_place(tmp_path):
    from speechinstruct.pipeline import relocate

    work, was = tmp_path / "new", "/old/wörk"
    (work / "stage").mkdir(parents=True)
    (work / ".workdir.json").write_text(json.dumps({"path": was}))
    ours = {"root": f"{was}/demo-corpus", "next door": f"{was}2/x", "elsewhere": "/data/LibriSpeech", "n": 1,
            "list": [was, {f"{was}/key": "/old"}]}
    (work / "stage" / "summary.json").write_text(json.dumps(ours, ensure_ascii=False))
    (work / "stage" / ".stage.json").write_text(json.dumps({"hash": "h", "foreign": ["notes.json"]}))
    untouched = {"notes.json": json.dumps({"root": was}),  # the user's, in a stage folder
                 "broken.json": '{"root": "' + was,  # not JSON: the stage that reads it says so
                 "link.json": None}  # a link to a file elsewhere, which did not move
    (tmp_path / "elsewhere.json").write_text(json.dumps({"root": was}))
    (work / "stage" / "link.json").symlink_to(tmp_path / "elsewhere.json")
    for name, text in untouched.items():
        if text is not None:
            (work / "stage" / name).write_text(text)
    before = {name: (work / "stage" / name).read_bytes() for name in untouched}

    assert relocate(work) == [work / "stage" / "summary.json"]
    here = str(work.resolve())
    assert json.loads((work / "stage" / "summary.json").read_text()) == {
        "root": f"{here}/demo-corpus", "next door": f"{was}2/x", "elsewhere": "/data/LibriSpeech", "n": 1,
        "list": [here, {f"{here}/key": "/old"}]}
    assert {name: (work / "stage" / name).read_bytes() for name in untouched} == before
    assert json.loads((work / ".workdir.json").read_text()) == {"path": here} and relocate(work) == []


def test_force_deletes_only_what_the_stage_wrote(tmp_path):
    mine = tmp_path / "work" / "my-report"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's own file")
    path = recipe(tmp_path, output={"report": "my-report"})
    run(path)
    assert (mine / "index.html").is_file()
    run(path, force=True)
    assert (mine / "notes.txt").read_text() == "the user's own file" and (mine / "index.html").is_file()


LEAN = ("import sys\n"
        "for name in ('peft', 'accelerate', 'trl', 'ray'):  # as if the data-only install had left them out\n"
        "    sys.modules[name] = None\n"
        "from speechinstruct.cli import main\n"
        "sys.argv = ['speechinstruct', *sys.argv[1:]]\n"
        "main()\n")


def test_the_data_path_runs_without_the_training_extras(tmp_path):
    """shard … publish, validate and report with peft, accelerate, TRL and Ray unimportable; `train` then
    says in one line which extra to install."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", LEAN, "run", str(recipe(tmp_path)), "-q"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout[done.stdout.index("{"):])["valid"]
    checked = subprocess.run([sys.executable, "-c", LEAN, "validate", str(tmp_path / "work" / "dataset")], env=env,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and "PASS" in checked.stdout
    refused = subprocess.run([sys.executable, "-c", LEAN, "train", "--stage", "2", "--base-model", str(tmp_path),
                              "--data", str(tmp_path / "work" / "dataset"), "--out", str(tmp_path / "run")],
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pip install 'speechinstruct[train]'" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_each_setting_has_one_default_the_recipes_and_every_command_and_function_share_it():
    """The CLI's options and the stage functions' keyword defaults are the recipe sections' own (recipe.default),
    and the CLI validates its values as the recipe does."""
    import inspect

    import typer.main

    from speechinstruct.units import cluster, extract
    from speechinstruct import recipe as settings
    from speechinstruct.compose.cross_modal import cross_modal
    from speechinstruct.compose.pretrain import pretrain
    from speechinstruct.compose import dialogue
    from speechinstruct.sources import shard

    cli = typer.main.get_command(app)
    commands = {("shard",): [settings.Shard], ("extract",): [settings.Features, settings.Ray],
                ("score",): [settings.Ray], ("cluster",): [settings.KMeans],
                ("compose", "cross-modal"): [settings.CrossModal, settings.Compose],
                ("compose", "pretrain"): [settings.Pretrain, settings.Compose],
                ("compose", "chain-of-modality"): [settings.ChainOfModality, settings.Compose],
                ("compose", "dialogue"): [settings.Dialogue, settings.Compose],
                ("compose", "interleaved"): [settings.Compose]}
    compared = 0
    for path, sections in commands.items():
        command = cli
        for name in path:
            command = command.commands[name]
        for param in command.params:
            section = next((s for s in sections if param.name in s.model_fields), None)
            if section is not None and param.param_type_name == "option":
                assert param.default == settings.default(section, param.name), (path, param.name)
                compared += 1
    from speechinstruct.curate.score import score_ray
    from speechinstruct.units.engine_ray import extract_ray

    functions = {cluster.cluster: [settings.KMeans], extract.extract: [settings.Features], shard.shard_corpus: [settings.Shard],
                 extract_ray: [settings.Ray], score_ray: [settings.Ray],
                 cross_modal: [settings.CrossModal, settings.Compose], pretrain: [settings.Pretrain, settings.Compose],
                 dialogue.dialogue: [settings.Dialogue, settings.Compose]}
    for fn, sections in functions.items():
        for name, param in inspect.signature(fn).parameters.items():
            section = next((s for s in sections if name in s.model_fields), None)
            if section is not None and param.default is not inspect.Parameter.empty:
                assert param.default == settings.default(section, name), (fn.__name__, name)
                compared += 1
    assert compared >= 36, compared
    assert settings.default(settings.KMeans, "k") == 1000  # SpeechGPT's K

    for args, message in ((["cluster", "f", "o", "--k", "1"], "--k 1: Input should be greater than or equal to 2"),
                          (["compose", "pretrain", "u", "o", "--dev-fraction", "1"], "--dev-fraction 1.0: Input should be less than 1"),
                          (["compose", "cross-modal", "u", "o", "--mode", "all"], "--mode 'all': Input should be 'both', 'random'")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output, result.output


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    path = recipe(tmp_path)
    (tmp_path / "afile").write_text("mine")
    result = runner.invoke(app, ["run", str(path), "--workdir", str(tmp_path / "afile")])
    assert result.exit_code == 2 and "the workdir is a file, not a folder" in result.output, result.output
    assert (tmp_path / "afile").read_text() == "mine"


def test_help_lists_the_commands_in_pipeline_order_and_says_what_each_reads():
    listed = runner.invoke(app, ["--help"], env={"COLUMNS": "240"}).output
    import re

    order = ("shard", "score", "align", "extract", "cluster", "quantize", "dedup", "templates", "compose", "publish",
             "validate", "report", "resynth", "run", "train", "chat")
    at = {n: re.search(rf"│ {n}\s", listed).start() for n in order}  # where each command's row starts
    assert sorted(order, key=at.get) == list(order)
    shard_help = runner.invoke(app, ["shard", "--help"], env={"COLUMNS": "240"}).output
    assert "WebDataset" in shard_help and "silero-vad" in shard_help and "required for audio and webdataset" in shard_help
    assert "(score)" in runner.invoke(app, ["run", "--help"], env={"COLUMNS": "240"}).output
    out = runner.invoke(app, ["extract", "manifest", "s3://bucket/features"], env={"COLUMNS": "240"})
    assert out.exit_code == 2 and "outputs are written to a local folder" in out.output


def test_every_command_takes_quiet():
    """A script that passes `-q` to each step got "No such option: -q" from validate, report and chat."""
    import typer

    def leaves(command, path=()):
        if hasattr(command, "commands"):  # a group (typer's own click, whichever it ships)
            for name, sub in command.commands.items():
                yield from leaves(sub, (*path, name))
        else:
            yield path, command

    found = list(leaves(typer.main.get_command(app)))
    assert len(found) > 20
    lacking = [" ".join(path) for path, command in found
               if not any("-q" in p.opts and "--quiet" in p.opts for p in command.params)]
    assert lacking == []


def test_a_corpus_that_changed_is_sharded_again_and_one_that_did_not_is_up_to_date(tmp_path, librispeech_release, caplog):
    """Files added to a corpus (another chapter downloaded) or a transcript corrected in place (same size): the
    next run shards it again and the dataset holds the change; a hidden file (`.DS_Store`) is no change."""
    import soundfile as sf

    from conftest import speechlike

    path = recipe(tmp_path, demo_corpus=None, corpora=[{"name": "librispeech", "root": str(librispeech_release)}],
                  kmeans={"k": 8, "max_frames": 20000}, output={"eval_splits": False, "vocoder": "none"})

    def texts():  # source utterance → its transcript in the cross-modal records
        ds = datasets.load_dataset(str(tmp_path / "work" / "dataset"), "cross_modal", split="train")
        return {source.rsplit("/", 1)[1]: text for source, text in zip(ds["source_id"], ds["transcript"])}

    first = run(path)
    assert first["valid"] and "1272-128105-0000" not in texts() and texts()["1272-128104-0002"] == "HE HAS GRAVE DOUBTS"
    (librispeech_release / "train-clean-100" / ".DS_Store").write_bytes(b"\0")
    assert run(path)["stages_skipped"] == 9  # every stage but validate, which runs every time

    chapter = librispeech_release / "train-clean-100" / "1272" / "128105"
    chapter.mkdir()
    sf.write(chapter / "1272-128105-0000.flac", speechlike(1.5, seed=77), 16000)
    (chapter / "1272-128105.trans.txt").write_text("1272-128105-0000 A CHAPTER DOWNLOADED LATER\n")
    with caplog.at_level("INFO", logger="speechinstruct"):
        added = run(path)
    assert added["valid"] and added["stages_skipped"] == 0
    assert any(m.startswith("[1/10] shard librispeech → ") and m.endswith(" (again: its input changed)")
               for m in caplog.messages), caplog.messages
    assert "1272-128105-0000" in texts()
    stages = json.loads((tmp_path / "work" / "run-summary.json").read_text())["stages"]
    assert stages[0]["stage"] == "shard librispeech" and stages[0]["again"] == "its input changed"
    assert " s (again: its input changed)" in (tmp_path / "work" / "report" / "index.html").read_text()

    trans = librispeech_release / "train-clean-100" / "1272" / "128104" / "1272-128104.trans.txt"
    before = trans.stat().st_size
    trans.write_text(trans.read_text().replace("HE HAS GRAVE DOUBTS", "HE HAD GRAVE DOUBTS"))
    assert trans.stat().st_size == before
    assert run(path)["stages_skipped"] == 0
    assert texts()["1272-128104-0002"] == "HE HAD GRAVE DOUBTS"


def test_an_input_file_edited_since_redoes_the_stages_that_read_it(tmp_path, caplog):
    """An instruction file (or an evaluation set, a conversations file, a model folder) named by the recipe and
    edited since: the stages that read it are done again, not passed over as up to date by its path."""
    instructions = tmp_path / "instructions.jsonl"
    pairs = [json.dumps({"id": f"mine-{i}", "instruction": f"Name a colour number {i}.",
                         "response": f"Colour number {i} is blue."}) for i in range(4)]
    instructions.write_text("\n".join(pairs[:3]) + "\n")
    path = recipe(tmp_path, compose={"pretrain": {"dev_fraction": 0.2},
                                     "chain_of_modality": {"max_pairs": 6, "instructions": str(instructions)}})

    def published():
        splits = datasets.load_dataset(str(tmp_path / "work" / "dataset"), "chain_of_modality")
        return sum(len(ds) for ds in splits.values())

    assert run(path)["valid"] and published() == 3
    assert run(path)["stages_skipped"] == 10
    instructions.write_text("\n".join(pairs) + "\n")  # a fourth pair
    with caplog.at_level("INFO", logger="speechinstruct"):
        again = run(path)
    assert again["stages_skipped"] == 7 and published() == 4, caplog.messages  # chain-of-modality, publish, report
    assert any(m.startswith("[8/11] compose chain-of-modality → ") and m.endswith("(again: its input changed)")
               for m in caplog.messages), caplog.messages


def test_a_model_folder_replaced_since_redoes_extraction(tmp_path, caplog):
    """features.checkpoint naming a transformers folder, saved again with other weights: extract and every stage
    after it are done again (a checkpoint file was counted by its size and time, a folder by its path alone)."""
    import torch
    from transformers import HubertConfig, HubertModel

    def save(seed):
        torch.manual_seed(seed)
        HubertModel(HubertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 conv_dim=(16,) * 7, num_conv_pos_embeddings=16)).save_pretrained(tmp_path / "hub")

    save(0)
    path = recipe(tmp_path, features={"kind": "hubert", "checkpoint": str(tmp_path / "hub"), "layer": 1})
    assert run(path)["valid"] and run(path)["stages_skipped"] == 10
    save(1)
    with caplog.at_level("INFO", logger="speechinstruct"):
        assert run(path)["stages_skipped"] == 2  # demo, shard
    assert any(m.startswith("[3/11] extract speechinstruct-demo (hubert) → ")
               and m.endswith("(again: its settings changed: checkpoint_files)") for m in caplog.messages), caplog.messages


def test_a_workdir_inside_a_corpus_root_is_one_line(tmp_path, librispeech_release):
    """The workdir inside a corpus's root: its outputs (the report's audio, the manifests) would be read as the
    corpus at the next run, and every file the run writes would change the corpus it shards. One line, before
    any stage, naming the key; nothing written."""
    path = recipe(tmp_path, demo_corpus=None, corpora=[{"name": "librispeech", "root": str(librispeech_release)}],
                  workdir=str(librispeech_release / "work"))
    before = sorted(librispeech_release.rglob("*"))
    for workdir in (None, librispeech_release / "train-clean-100" / "w"):
        result = runner.invoke(app, ["run", str(path), "-q", *(["--workdir", str(workdir)] if workdir else [])])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert (f"corpora[0].root: {librispeech_release} holds the workdir {workdir or librispeech_release / 'work'}"
                in result.stderr.replace("\n", "")), result.stderr
    assert sorted(librispeech_release.rglob("*")) == before
    # a Kaldi data folder whose audio_root holds the workdir: the same, naming that key
    (tmp_path / "data").mkdir()
    (tmp_path / "audio").mkdir()
    kaldi = recipe(tmp_path, demo_corpus=None, workdir=str(tmp_path / "audio" / "work"),
                   corpora=[{"name": "kaldi", "root": str(tmp_path / "data"), "options": {"audio_root": str(tmp_path / "audio")}}])
    result = runner.invoke(app, ["run", str(kaldi), "-q"])
    assert result.exit_code == 2 and (f"corpora[0].options.audio_root: {tmp_path / 'audio'} holds the workdir "
                                      in result.stderr.replace("\n", "")), result.output
    assert not list((tmp_path / "audio").iterdir())


def test_a_judge_model_folder_replaced_since_redoes_the_scores(tmp_path, caplog):
    """quality.asr naming a local CTC folder, saved again with other weights: the score stage (and what reads its
    scores) is done again; the same folder as it was leaves every stage up to date."""
    from asr_fixture import write_tiny_ctc

    write_tiny_ctc(tmp_path / "ctc", seed=0)
    path = recipe(tmp_path, quality={"asr": str(tmp_path / "ctc")})
    assert run(path)["valid"] and run(path)["stages_skipped"] == 11
    write_tiny_ctc(tmp_path / "ctc", seed=1)
    with caplog.at_level("INFO", logger="speechinstruct"):
        assert run(path)["stages_skipped"] < 11
    assert any(m.startswith("[3/12] score speechinstruct-demo → ") and m.endswith("(again: its input changed)")
               for m in caplog.messages), caplog.messages

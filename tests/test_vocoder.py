"""The unit vocoder: fairseq's CodeHiFiGAN checkpoints, loaded without fairseq, give fairseq's waveform."""

import json

import numpy as np
import pytest
import torch

from fairseq_vocoder_fixture import random_generator_state, reference_waveform, save_vocoder, vocoder_config
from speechinstruct.units.vocoder import load_vocoder

UNITS = [3, 17, 17, 5, 0, 23, 9, 9, 9, 12]


@pytest.mark.parametrize("dur_prediction", [True, False])
def test_vocoder_matches_fairseq_forward(tmp_path, dur_prediction):
    cfg = vocoder_config(dur_prediction)
    state = random_generator_state(cfg, seed=1)
    save_vocoder(tmp_path / "voc", cfg, state)
    vocoder = load_vocoder(tmp_path / "voc")  # the folder, as released
    assert vocoder.dur_prediction is dur_prediction and vocoder.sample_rate == 16000 and vocoder.k == 24
    wav = vocoder.synthesize(UNITS)
    want = reference_waveform(state, cfg, UNITS, dur_prediction).numpy()
    assert wav.dtype == np.float32 and wav.shape == want.shape
    if dur_prediction:  # durations predicted: more than one frame per unit, not a fixed count
        assert wav.size > len(UNITS) * vocoder.hop
    else:
        assert wav.size == len(UNITS) * vocoder.hop
    np.testing.assert_allclose(wav, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    assert np.abs(wav).max() > 1e-3  # not silence
    # the checkpoint file itself loads the same
    np.testing.assert_array_equal(load_vocoder(tmp_path / "voc" / "g_00500000").synthesize(UNITS), wav)


def test_weight_norm_saved_as_parametrizations_loads_the_same(tmp_path):
    cfg = vocoder_config(True)
    state = random_generator_state(cfg, seed=2)
    renamed = type(state)()
    for key, value in state.items():  # how torch.nn.utils.parametrizations.weight_norm names them
        key = key.replace(".weight_g", ".parametrizations.weight.original0").replace(".weight_v", ".parametrizations.weight.original1")
        renamed[key] = value
    save_vocoder(tmp_path / "a", cfg, state)
    save_vocoder(tmp_path / "b", cfg, renamed)
    np.testing.assert_allclose(load_vocoder(tmp_path / "b").synthesize(UNITS), load_vocoder(tmp_path / "a").synthesize(UNITS),
                               atol=1e-6)


@pytest.mark.parametrize("units,message", [
    ([3, 24, 5], r"unit 24 is outside this vocoder's vocabulary 0\.\.23"),
    ([], "no units"),
    ([-1, 2], "unit -1 is outside"),
])
def test_bad_units_are_one_clear_line(tmp_path, units, message):
    cfg = vocoder_config(True)
    save_vocoder(tmp_path / "voc", cfg, random_generator_state(cfg))
    with pytest.raises(ValueError, match=message):
        load_vocoder(tmp_path / "voc").synthesize(units)


def test_checkpoints_of_other_models_are_one_clear_line(tmp_path):
    from fairseq_fixture import model_cfg, random_state, save_checkpoint

    cfg = vocoder_config(True)
    save_vocoder(tmp_path / "voc", cfg, random_generator_state(cfg))
    # a HuBERT checkpoint where the generator should be
    (tmp_path / "hubert").mkdir()
    save_checkpoint(tmp_path / "hubert" / "g_00500000", model_cfg(), random_state(model_cfg()))
    (tmp_path / "hubert" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no 'generator' weights"):
        load_vocoder(tmp_path / "hubert")
    # a config for a larger model than the weights
    bigger = {**cfg, "upsample_initial_channel": 64}
    (tmp_path / "voc" / "config.json").write_text(json.dumps(bigger))
    with pytest.raises(ValueError, match="has shape"):
        load_vocoder(tmp_path / "voc")
    (tmp_path / "voc" / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a unit HiFi-GAN config"):
        load_vocoder(tmp_path / "voc")
    (tmp_path / "voc" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vocoder(tmp_path / "voc")
    with pytest.raises(FileNotFoundError, match="no such vocoder"):
        load_vocoder(tmp_path / "missing")
    torch.save({"generator": {"dict.weight": "not a tensor"}}, tmp_path / "voc" / "g_00500000")
    (tmp_path / "voc" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not all tensors"):
        load_vocoder(tmp_path / "voc")


def test_resynth_speaks_every_record_kind_of_a_published_dataset(tmp_path):
    import soundfile as sf
    import yaml
    from typer.testing import CliRunner

    from speechinstruct.cli import app
    from speechinstruct.pipeline import run

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"workdir": str(tmp_path / "work"), "demo_corpus": {"sentences": 12, "seed": 1},
                                      "kmeans": {"k": 16, "max_frames": 20000},
                                      "compose": {"chain_of_modality": {"max_pairs": 4}}}))
    run(recipe)
    cfg = vocoder_config(True, k=16)
    save_vocoder(tmp_path / "voc", cfg, random_generator_state(cfg))
    runner = CliRunner()
    result = runner.invoke(app, ["resynth", str(tmp_path / "work" / "dataset"), str(tmp_path / "wavs"),
                                 "--vocoder", str(tmp_path / "voc")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    entries = [json.loads(line) for line in (tmp_path / "wavs" / "manifest.jsonl").read_text().splitlines()]
    assert summary["wavs"] == len(entries) > 0
    kinds = {e["kind"] for e in entries}
    assert {"cross_modal asr", "cross_modal tts", "chain_of_modality [ua] answer", "pretrain"} <= kinds, kinds
    for e in entries[:5]:
        wav, sr = sf.read(tmp_path / "wavs" / e["file"])
        assert sr == 16000 and wav.ndim == 1 and wav.size / sr == pytest.approx(e["seconds"], abs=1e-3)
    limited = runner.invoke(app, ["resynth", str(tmp_path / "work" / "dataset"), str(tmp_path / "three"),
                                  "--vocoder", str(tmp_path / "voc"), "--limit", "3", "-q"])
    assert limited.exit_code == 0 and len(list((tmp_path / "three").glob("*.wav"))) == 3

    # a vocoder without a duration predictor needs frame-rate units: a units folder has them, records do not
    plain = vocoder_config(False, k=16)
    save_vocoder(tmp_path / "plain", plain, random_generator_state(plain))
    units = tmp_path / "work" / "speechinstruct-demo" / "units"
    done = runner.invoke(app, ["resynth", str(units), str(tmp_path / "frames"), "--vocoder", str(tmp_path / "plain"),
                               "--limit", "2"])
    assert done.exit_code == 0, done.output
    import pyarrow.parquet as pq

    first = pq.read_table(sorted(units.glob("units-*.parquet"))[0]).to_pylist()[0]
    wav, _ = sf.read(tmp_path / "frames" / "00000.wav")
    assert wav.size == sum(first["durations"]) * 40  # one unit per frame, repeats restored; hop 40 here
    refused = runner.invoke(app, ["resynth", str(tmp_path / "work" / "dataset"), str(tmp_path / "no"),
                                  "--vocoder", str(tmp_path / "plain")])
    assert refused.exit_code == 2 and "needs one unit per frame" in refused.output
    assert "Traceback" not in refused.output
    # units the vocoder cannot say: one line naming the file and record
    small = vocoder_config(True, k=4)
    save_vocoder(tmp_path / "small", small, random_generator_state(small))
    bad = runner.invoke(app, ["resynth", str(units), str(tmp_path / "bad"), "--vocoder", str(tmp_path / "small")])
    assert bad.exit_code == 2 and "outside this vocoder's vocabulary 0..3" in bad.output and "units-" in bad.output


def test_chat_speaks_the_unit_answer(tmp_path, monkeypatch):
    import soundfile as sf
    from typer.testing import CliRunner

    from speechinstruct.model import chat
    from speechinstruct.cli import app

    class Scripted:  # the language model's side is tested in test_train; here, what chat does with its answer
        def __init__(self, *args, **kwargs):
            pass

        def reply(self, user_input, max_new_tokens=256, history=(), sampling=None):
            return chat.parse_answer("what is up; [ta] the sky; [ua] <sosp><3><7><7><1><eosp><eoa>")

    monkeypatch.setattr(chat, "Chat", Scripted)
    cfg = vocoder_config(True)
    state = random_generator_state(cfg)
    save_vocoder(tmp_path / "voc", cfg, state)
    result = CliRunner().invoke(app, ["chat", "--model", str(tmp_path), "--text", "hi", "--vocoder", str(tmp_path / "voc"),
                                      "--speak", str(tmp_path / "answer.wav")])
    assert result.exit_code == 0, result.output
    wav, sr = sf.read(tmp_path / "answer.wav", dtype="float32")
    want = reference_waveform(state, cfg, [3, 7, 7, 1], True).numpy()
    assert sr == 16000 and wav.shape == want.shape
    np.testing.assert_allclose(wav, np.clip(want, -1, 1), atol=1 / 16000)  # 16-bit PCM
    alone = CliRunner().invoke(app, ["chat", "--model", str(tmp_path), "--text", "hi", "--vocoder", str(tmp_path / "voc")])
    assert alone.exit_code == 2 and "--vocoder and --speak go together" in alone.output


def test_resynth_never_writes_over_files_it_did_not_write(units_dir, tmp_path):
    """resynth wrote NNNNN.wav and manifest.jsonl into OUT over whatever stood there (a user's own 00000.wav and
    manifest.jsonl were lost without a word), and a rerun with fewer records left the last run's extra wavs that no
    manifest named. A file it did not write now stops it with one line, before anything is written; its own
    files from an earlier run are replaced, and those this run does not write again go."""
    from speechinstruct.units.vocoder import resynthesize

    preview = load_vocoder(units_dir.parent / "kmeans")
    out = tmp_path / "wavs"
    out.mkdir()
    (out / "00000.wav").write_bytes(b"my recording")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"wavs/00000.wav: already there and not written by resynth"):
        resynthesize(units_dir, out, preview, limit=3)
    assert (out / "00000.wav").read_bytes() == b"my recording" and sorted(p.name for p in out.iterdir()) == \
        ["00000.wav", "notes.txt"]
    (out / "00000.wav").unlink()
    (out / "manifest.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(FileExistsError, match=r"wavs/manifest.jsonl: already there and not written by resynth"):
        resynthesize(units_dir, out, preview, limit=3)
    (out / "manifest.jsonl").unlink()
    assert resynthesize(units_dir, out, preview, limit=3)["wavs"] == 3
    assert resynthesize(units_dir, out, preview, limit=2)["wavs"] == 2  # a rerun into its own folder
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["00000.wav", "00001.wav", "manifest.jsonl", "notes.txt"]
    assert [json.loads(line)["file"] for line in (out / "manifest.jsonl").read_text().splitlines()] == \
        ["00000.wav", "00001.wav"]
    (out / ".speechinstruct-resynth.json").unlink()  # a folder an earlier version wrote: its manifest's lines say so
    assert resynthesize(units_dir, out, preview, limit=1)["wavs"] == 1 and not (out / "00001.wav").exists()


def test_resynth_of_mfcc_units_voices_them_with_the_preview_of_their_own_kmeans(units_dir, tmp_path):
    """`resynth UNITS OUT` of MFCC k-means units said "give --vocoder", though the one vocoder that voices them is
    the preview of the k-means their units.json names, with its digest: it is taken now (for a units folder and a
    compose folder), and the summary says so. A k-means that is not the one recorded (clustered again since) is
    not, nor one a published dataset names (by file name only): the line as before."""
    import shutil

    from typer.testing import CliRunner

    from speechinstruct.cli import app
    from speechinstruct.compose.cross_modal import cross_modal
    from speechinstruct.release.publish import publish

    runner = CliRunner()
    cross_modal(units_dir, tmp_path / "composed" / "cross_modal")
    publish(tmp_path / "composed", tmp_path / "dataset")
    for i, source in enumerate((units_dir, tmp_path / "composed")):
        result = runner.invoke(app, ["resynth", str(source), str(tmp_path / f"wavs{i}"), "--limit", "1", "-q"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["wavs"] == 1 and summary["vocoder"].startswith("preview (MFCC centroids"), summary
    result = runner.invoke(app, ["resynth", str(tmp_path / "dataset"), str(tmp_path / "ds"), "--limit", "1", "-q"])
    assert result.exit_code == 2 and "give --vocoder" in result.output, result.output
    shutil.rmtree(units_dir.parent / "kmeans")
    from speechinstruct import recipe as sections
    from speechinstruct.units.cluster import cluster
    cluster(units_dir.parent / "features", units_dir.parent / "kmeans", sections.KMeans(k=6))
    result = runner.invoke(app, ["resynth", str(units_dir), str(tmp_path / "other"), "--limit", "1", "-q"])
    assert result.exit_code == 2 and "give --vocoder" in result.output and "Traceback" not in result.output, result.output

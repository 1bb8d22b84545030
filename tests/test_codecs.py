"""Codecs as speech tokenizers (speechinstruct.codecs): tiny random Mimi, EnCodec and DAC models built from configs
and saved with save_pretrained, their codes held to each model's own encode/decode on each utterance alone."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from speechinstruct import audio
from speechinstruct.cli import app
from speechinstruct.codecs import load_codec

torch.set_num_threads(2)
runner = CliRunner()


def tiny(kind: str):
    from transformers import DacConfig, DacModel, EncodecConfig, EncodecModel, MimiConfig, MimiModel

    torch.manual_seed(0)
    if kind == "mimi":
        model = MimiModel(MimiConfig(hidden_size=32, num_filters=8, num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4],
                                     codebook_size=64, codebook_dim=16, num_quantizers=4, num_semantic_quantizers=1,
                                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                     intermediate_size=64, sliding_window=50, vector_quantization_hidden_dimension=16,
                                     upsample_groups=32))
        with torch.no_grad():  # transformers initialises Mimi's codebooks to zero: every code would be 0
            for module in model.modules():
                if hasattr(module, "embed_sum"):
                    module.embed_sum.normal_()
                    module._embed = None
    elif kind == "encodec":
        model = EncodecModel(EncodecConfig(num_filters=4, hidden_size=16, num_residual_layers=1, upsampling_ratios=[8, 5, 4, 2],
                                           codebook_size=64, codebook_dim=16, num_lstm_layers=1, target_bandwidths=[1.5, 3.0]))
        with torch.no_grad():  # zeros too: centroids drawn from the encoder's own frames (codebook 0) and their
            # spread around the mean (the residual codebooks), as a k-means initialisation would
            signals = torch.from_numpy(np.concatenate([speech(1.0, 24000, i) * (i + 1) for i in range(4)]))[None, None]
            frames = model.encoder(signals)[0].T
            spread = frames - frames.mean(0)
            generator = torch.Generator().manual_seed(0)
            for q, layer in enumerate(model.quantizer.layers):
                pick = torch.randint(0, frames.shape[0], (64,), generator=generator)
                layer.codebook.embed.copy_(frames[pick] if q == 0 else spread[pick] * 0.5 ** q)
                layer.codebook.embed_avg.copy_(layer.codebook.embed)
    else:
        model = DacModel(DacConfig(encoder_hidden_size=8, downsampling_ratios=[2, 4, 5, 8], decoder_hidden_size=32,
                                   n_codebooks=4, codebook_size=64, codebook_dim=8, hidden_size=64))
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for kind in ("mimi", "encodec", "dac"):
        out[kind] = tmp_path_factory.mktemp(kind)
        tiny(kind).save_pretrained(out[kind])
    return out


def speech(seconds: float, sr: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * (150 + 80 * np.sin(3 * t)) * t) * (1 + np.sin(5 * t)) / 2
            + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def model_codes(kind, model, wav, n):
    """The model's own encode of one utterance alone, written with transformers' calls only."""
    x = torch.from_numpy(wav)[None, None]
    with torch.no_grad():
        if kind == "mimi":
            return model.encode(x, num_quantizers=n).audio_codes[0].numpy()
        if kind == "encodec":
            return model.encode(x, bandwidth=3.0).audio_codes[0, 0, :n].numpy()
        return model.encode(x, n_quantizers=n).audio_codes[0, :n].numpy()


@pytest.mark.parametrize("kind", ["mimi", "encodec", "dac"])
def test_units_are_the_models_own_codes_frame_major_with_codebook_offsets(kind, folders):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folders[kind]).eval()
    codec = load_codec(kind, str(folders[kind]), codebooks=3)
    assert (codec.codebooks, codec.codebook_size, codec.k) == (3, 64, 192)
    assert codec.sample_rate == (16000 if kind == "dac" else 24000)
    wavs = [speech(s, codec.sample_rate, i) for i, s in enumerate((0.7, 1.3, 2.0))]
    for wav, units in zip(wavs, codec.units_batch(wavs)):
        codes = model_codes(kind, model, wav, 3)
        expected = [q * 64 + int(codes[q, t]) for t in range(codes.shape[1]) for q in range(3)]
        assert units.tolist() == expected
        assert len(set(codes[0].tolist())) > 1  # the codebooks were randomised: codes vary
        wav_back = codec.speech(units)
        with torch.no_grad():
            c = torch.from_numpy(codes)[None]
            ref = (model.decode(c[None], [None]) if kind == "encodec" else
                   model.decode(c) if kind == "mimi" else model.decode(audio_codes=c)).audio_values.reshape(-1).numpy()
        assert wav_back.size == min(ref.size, codes.shape[1] * codec.hop)  # the decoder's output, cut to the frames
        assert np.allclose(wav_back, ref[: wav_back.size], atol=1e-5)
    voc = codec.vocabulary()
    assert (voc.tokenizer, voc.size, voc.codebooks, voc.codebook_size, voc.sample_rate) == (kind, 192, 3, 64, codec.sample_rate)
    assert voc.frame_rate == codec.sample_rate / codec.hop and len(voc.sha256) == 64


def test_bad_codec_inputs_are_one_line(folders, tmp_path):
    with pytest.raises(ValueError, match=r"--codebooks 9: this mimi model has 4 codebooks"):
        load_codec("mimi", str(folders["mimi"]), codebooks=9)
    with pytest.raises(ValueError, match=r"holds a 'mimi' model, not 'encodec'; pass --features mimi"):
        load_codec("encodec", str(folders["mimi"]))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "hubert"}))
    with pytest.raises(ValueError, match=r"holds a 'hubert' model, not a dac codec"):
        load_codec("dac", str(tmp_path))
    codec = load_codec("dac", str(folders["dac"]))
    with pytest.raises(ValueError, match=r"shorter than one dac frame \(320 samples at 16000 Hz\)"):
        codec.units(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match=r"not whole dac frames of 4 codebooks"):
        codec.speech([1, 2, 3])
    with pytest.raises(ValueError, match=r"do not follow this codec's layout"):
        codec.speech([70, 64, 128, 192])  # codebook 0 holds 0..63


def test_extract_with_mimi_writes_units_a_dataset_validates_on(folders, librispeech_root, tmp_path):
    """shard → extract --features mimi (audio decoded straight to 24 kHz, no k-means, repeats kept) → compose →
    publish → validate; the vocabulary record travels to the dataset and K is codebooks × codebook size."""
    from speechinstruct import compose
    from speechinstruct.extract import decode_row
    from speechinstruct.publish import publish
    from speechinstruct.shard import shard_corpus
    from speechinstruct.shardfiles import folder_vocabulary
    from speechinstruct.validate import validate

    # one utterance at 44.1 kHz and one too short for a Mimi frame (1920 samples at 24 kHz)
    chapter = next(p for p in librispeech_root.rglob("*.trans.txt")).parent
    first = sorted(chapter.glob("*.flac"))[0]
    sf.write(first, speech(1.1, 44100, 7), 44100)
    short = sorted(chapter.glob("*.flac"))[1]
    sf.write(short, speech(0.05, 16000, 8), 16000)
    shard_corpus("librispeech", librispeech_root, tmp_path / "manifest", quiet=True)
    result = runner.invoke(app, ["extract", str(tmp_path / "manifest"), str(tmp_path / "units"), "--features", "mimi",
                                 "--checkpoint", str(folders["mimi"]), "--codebooks", "2", "-q"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    n_rows = sum(pq.read_metadata(f).num_rows for f in (tmp_path / "manifest").glob("manifest-*.parquet"))
    assert stats["errors"] == 1 and stats["utterances"] == n_rows - 1 >= 3
    error = json.loads((tmp_path / "units" / "errors-00000.jsonl").read_text().splitlines()[0])
    assert "shorter than one mimi frame" in error["reason"] and error["id"].endswith(short.stem)
    assert not list((tmp_path / "units").glob("features-*"))

    spec = json.loads((tmp_path / "units" / "units.json").read_text())
    assert spec["vocabulary"] == {"tokenizer": "mimi", "size": 128, "codebooks": 2, "codebook_size": 64,
                                  "frame_rate": 12.5, "sample_rate": 24000, "features": "mimi",
                                  "sha256": spec["vocabulary"]["sha256"]}
    codec = load_codec("mimi", str(folders["mimi"]), codebooks=2)
    rows = {r["id"]: r for f in sorted((tmp_path / "units").glob("units-*.parquet")) for r in pq.read_table(f).to_pylist()}
    row = next(r for r in rows.values() if r["id"].endswith(first.stem))
    direct = audio.load(first, row["offset"], row["duration"], target_sr=24000)  # 44.1 kHz → 24 kHz, once
    assert np.array_equal(decode_row(row, librispeech_root, 24000), direct)
    assert row["units"] == codec.units(direct).tolist() and set(row["durations"]) == {1}  # not deduplicated
    assert row["unit_text"] == "<sosp>" + "".join(f"<{u}>" for u in row["units"]) + "<eosp>"

    compose.cross_modal(tmp_path / "units", tmp_path / "composed" / "cross_modal", quiet=True)
    compose.pretrain(tmp_path / "units", tmp_path / "composed" / "pretrain", quiet=True)
    publish(tmp_path / "composed", tmp_path / "dataset", quiet=True)
    assert folder_vocabulary(tmp_path / "dataset") == codec.vocabulary()
    meta = json.loads((tmp_path / "dataset" / "speechinstruct.json").read_text())
    assert meta["k"] == 128 and meta["vocabulary"]["tokenizer"] == "mimi"
    assert validate(tmp_path / "dataset").ok

    again = runner.invoke(app, ["extract", str(tmp_path / "manifest"), str(tmp_path / "units"), "--features", "mimi",
                                "--checkpoint", str(folders["mimi"]), "--codebooks", "3", "-q"])
    assert again.exit_code == 2 and "made with other settings" in again.stderr  # another tokenizer: a new folder
    refused = runner.invoke(app, ["extract", str(tmp_path / "manifest"), str(tmp_path / "u2"), "--features", "dac",
                                  "--checkpoint", str(folders["mimi"]), "-q"])
    assert refused.exit_code == 2 and "holds a 'mimi' model, not 'dac'" in refused.stderr


def test_run_refuses_a_codec_recipe_with_the_way_out(tmp_path):
    import yaml

    recipe = tmp_path / "codec.yaml"
    recipe.write_text(yaml.safe_dump({"name": "c", "workdir": str(tmp_path / "w"), "demo_corpus": {"sentences": 2},
                                      "features": {"kind": "mimi", "checkpoint": str(tmp_path)}}))
    result = runner.invoke(app, ["run", str(recipe), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "features.kind: mimi: `run` builds k-means units only so far" in result.stderr
    assert "extract --features mimi" in result.stderr and not (tmp_path / "w" / "demo-corpus").exists()

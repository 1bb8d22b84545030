"""Codecs as speech tokenizers (speechinstruct.units.codecs): tiny random Mimi, EnCodec and DAC models built from configs
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
from speechinstruct.units.codecs import load_codec
from test_train import base_model  # noqa: F401, E402  (the tiny LLaMA and tokenizer fixture)

torch.set_num_threads(2)
runner = CliRunner()


def tiny(kind: str, semantic: str = "HubertConfig"):
    """A tiny random ``kind`` codec; ``semantic``: X-Codec's semantic model's config class."""
    import transformers
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
        with torch.no_grad():  # zeros too
            signals = torch.from_numpy(np.concatenate([speech(1.0, 24000, i) * (i + 1) for i in range(4)]))[None, None]
            seed_codebooks(model.quantizer.layers, model.encoder(signals)[0].T)
    elif kind == "xcodec":
        from transformers import XcodecConfig, XcodecModel

        model = XcodecModel(XcodecConfig(
            acoustic_model_config=DacConfig(encoder_hidden_size=8, downsampling_ratios=[2, 4, 5, 8], decoder_hidden_size=32,
                                            hidden_size=32, codebook_size=64, codebook_dim=8, n_codebooks=2),
            semantic_model_config=getattr(transformers, semantic)(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                               conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
            codebook_size=64, codebook_dim=64, target_bandwidths=[0.5, 1.2]))
        with torch.no_grad():  # zeros too
            signals = torch.from_numpy(np.concatenate([speech(1.0, 16000, i) * (i + 1) for i in range(4)]))[None, None]
            seed_codebooks(model.quantizer.quantizers, _xcodec_embeddings(model, signals))
    elif kind == "xcodec2":
        from transformers import Wav2Vec2BertConfig, Xcodec2Config, Xcodec2Model

        model = Xcodec2Model(Xcodec2Config(  # hop 320 (2·2·4·4·5), as the mel frames (160 samples) stacked in pairs
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            head_dim=16, encoder_hidden_size=4, quantization_dim=64, quantization_levels=[4, 4, 4],
            semantic_model_config=Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64, feature_projection_input_dim=160,
                                                     output_hidden_size=32)))
        with torch.no_grad():  # a random projection leaves every frame in one FSQ cell: centre and scale it on the
            # model's own frames (a test signal's), so that they spread over the cells
            from speechinstruct.units.codecs import xcodec2_inputs

            seen = []
            hook = model.quantizer.project_in.register_forward_hook(lambda m, args, out: seen.append(out[0]))
            model.encode(**xcodec2_inputs(np.concatenate([speech(1.0, 16000, i) * (i + 1) for i in range(4)]), 320, 16000))
            hook.remove()
            layer, out = model.quantizer.project_in, seen[0]
            layer.weight.div_(out.std(0)[:, None] / 1.5)
            layer.bias.copy_((layer.bias - out.mean(0)) / (out.std(0) / 1.5))
    else:
        model = DacModel(DacConfig(encoder_hidden_size=8, downsampling_ratios=[2, 4, 5, 8], decoder_hidden_size=32,
                                   n_codebooks=4, codebook_size=64, codebook_dim=8, hidden_size=64))
    return model.eval()


def seed_codebooks(layers, frames: torch.Tensor) -> None:
    """Centroids of an EMA codebook stack (EnCodec's, X-Codec's; transformers starts them at zero) drawn from the
    model's own pre-quantizer frames (codebook 0) and their spread around the mean (the residual codebooks), as
    a k-means initialisation would."""
    spread = frames - frames.mean(0)
    generator = torch.Generator().manual_seed(0)
    for q, layer in enumerate(layers):
        pick = torch.randint(0, frames.shape[0], (layer.codebook.embed.shape[0],), generator=generator)
        layer.codebook.embed.copy_(frames[pick] if q == 0 else spread[pick] * 0.5 ** q)
        layer.codebook.embed_avg.copy_(layer.codebook.embed)


def _xcodec_embeddings(model, x):
    """X-Codec's embeddings just before its quantizer (frames, dim), by running encode with the quantizer's
    encode captured."""
    seen = []
    original = model.quantizer.encode
    model.quantizer.encode = lambda embeddings, bandwidth=None: seen.append(embeddings) or original(embeddings, bandwidth)
    try:
        model.encode(x)
    finally:
        model.quantizer.encode = original
    return seen[0][0].T


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for kind in ("mimi", "encodec", "dac", "xcodec", "xcodec2"):
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
        if kind == "xcodec":
            return model.encode(x, bandwidth=1.2).audio_codes[0, :n].numpy()
        return model.encode(x, n_quantizers=n).audio_codes[0, :n].numpy()


@pytest.mark.parametrize("kind", ["mimi", "encodec", "dac", "xcodec"])
def test_units_are_the_models_own_codes_frame_major_with_codebook_offsets(kind, folders):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folders[kind]).eval()
    codec = load_codec(kind, str(folders[kind]), codebooks=3)
    assert (codec.codebooks, codec.codebook_size, codec.k) == (3, 64, 192)
    assert codec.sample_rate == (16000 if kind in ("dac", "xcodec") else 24000)
    assert codec.causal == (kind in ("mimi", "encodec"))  # the tiny EnCodec is the 24 kHz one: causal
    for i, seconds in enumerate((0.7, 1.3, 2.0)):
        wav = speech(seconds, codec.sample_rate, i)
        units = codec.units(wav)
        # a causal codec's utterance is padded with zeros to whole frames (codecs.py); the frame count is unchanged
        padded = np.pad(wav, (0, -wav.size % codec.hop)) if codec.causal else wav
        codes = model_codes(kind, model, padded, 3)
        if codec.causal:
            assert codes.shape[1] == model_codes(kind, model, wav, 3).shape[1] == padded.size // codec.hop
        expected = [q * 64 + int(codes[q, t]) for t in range(codes.shape[1]) for q in range(3)]
        assert units.tolist() == expected
        assert len(set(codes[0].tolist())) > 1  # the codebooks were randomised: codes vary
        wav_back = codec.speech(units)
        with torch.no_grad():
            c = torch.from_numpy(codes)[None]
            ref = (model.decode(c[None], [None]) if kind == "encodec" else
                   model.decode(c) if kind in ("mimi", "xcodec") else model.decode(audio_codes=c)).audio_values.reshape(-1).numpy()
        assert wav_back.size == min(ref.size, codes.shape[1] * codec.hop)  # the decoder's output, cut to the frames
        assert np.allclose(wav_back, ref[: wav_back.size], atol=1e-5)
    voc = codec.vocabulary()
    assert (voc.tokenizer, voc.size, voc.codebooks, voc.codebook_size, voc.sample_rate) == (kind, 192, 3, 64, codec.sample_rate)
    assert voc.frame_rate == codec.sample_rate / codec.hop and len(voc.sha256) == 64


@pytest.mark.parametrize("kind", ["mimi", "encodec", "dac"])
def test_a_codec_encodes_a_batch_in_one_call_with_each_utterances_own_codes(kind, folders):
    """Mimi and EnCodec-24k read only the past: utterances padded to whole frames, batched with zeros after them,
    get the codes each gets alone. DAC reads the future: its batch zeroes what lies past each utterance's own
    length before every convolution. Mimi's and DAC's codes all equal; the tiny EnCodec's codes are near ties in
    places (scaling its input by 1 + 1e-6 flips about 1 % of them alone), so float rounding in a batch flips a
    few, never a last frame."""
    codec = load_codec(kind, str(folders[kind]))
    rng = np.random.default_rng(1)
    wavs = [speech(float(s), codec.sample_rate, i) * (0.5 + i % 3) for i, s in enumerate(rng.uniform(0.4, 3.0, 10))]
    # and utterances of one and of three frames: shorter than EnCodec's reflect padding at its frame rate
    wavs += [np.full(codec.hop, 0.1, np.float32), speech(3 * codec.hop / codec.sample_rate, codec.sample_rate, 11)]
    alone = [codec.codes(w) for w in wavs]
    calls = []
    original = codec.model.encode
    codec.model.encode = lambda *a, **k: calls.append(a[0].shape) or original(*a, **k)
    assert codec.codes_batch(wavs[:2]) and len(calls) == 2  # on the CPU one at a time: a batch was slower there
    calls.clear()
    batched = codec.codes_batch(wavs, batched=True)  # as on a GPU
    assert len(calls) == 1 and calls[0][0] == 12  # one forward pass for the batch
    assert [b.shape for b in batched] == [a.shape for a in alone]
    equal = sum(int((a == b).sum()) for a, b in zip(alone, batched)) / sum(a.size for a in alone)
    assert equal == 1.0 if kind != "encodec" else equal >= 0.985
    assert all((a[:, -1] == b[:, -1]).all() for a, b in zip(alone, batched))  # the last frames: the padding's reach
    seen = []  # on a GPU, extract's units_batch is one batch (the batch stubbed: no GPU here)
    codec.device = "cuda"
    codec._encode = lambda batch: seen.append(len(batch)) or np.stack([np.pad(b, ((0, 0), (0, max(x.shape[1] for x in batched) - b.shape[1]))) for b in batched])
    codec._padding_batch = lambda wavs: seen.append(len(wavs)) or batched
    assert [u.size for u in codec.units_batch(wavs)] == [b.size for b in batched] and seen == [12]


def _before_the_quantizer(codec, run):
    """(what ``run()`` returned, the embeddings X-Codec's or XCodec2's quantizer was given in it, each (utterances,
    frames, dim))."""
    seen, quantizer = [], codec.model.quantizer
    if codec.kind == "xcodec":
        original = quantizer.encode
        quantizer.encode = lambda e, bandwidth=None: seen.append(e.transpose(1, 2)) or original(e, bandwidth)
        try:
            return run(), seen
        finally:
            quantizer.encode = original
    hook = quantizer.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        return run(), seen
    finally:
        hook.remove()


@pytest.mark.parametrize("kind", ["xcodec", "xcodec2"])
def test_codecs_that_attend_over_the_whole_clip_encode_a_batch_with_each_utterances_own_codes(kind, folders):
    """X-Codec (HuBERT beside DAC's encoder) and XCodec2 (Wav2Vec2-BERT beside convolutions and anti-aliased
    activations) attend over the whole clip and their encode takes no padding mask: a plain padded batch changes
    the frames. Their batch (one pass of the semantic model) gives every utterance the codes it gets alone from
    the model's own encode, and the embeddings before the quantizer within 2e-6 of alone's."""
    codec = load_codec(kind, str(folders[kind]))
    assert codec.batches and "padding" not in codec.spec
    rng = np.random.default_rng(1)
    wavs = [speech(float(s), codec.sample_rate, i) * (0.5 + i % 3) for i, s in enumerate(rng.uniform(0.4, 3.0, 12))]
    alone, alone_embeddings = _before_the_quantizer(codec, lambda: [codec.codes(w) for w in wavs])
    if kind == "xcodec":  # the model's own encode, as transformers writes it
        assert all((a == model_codes(kind, codec.model, w, codec.codebooks)).all() for a, w in zip(alone, wavs))
    semantic = codec.model.semantic_model if kind == "xcodec" else codec.model.semantic_encoder
    calls = []
    hook = semantic.encoder.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    batched, (embeddings,) = _before_the_quantizer(codec, lambda: codec.codes_batch(wavs, batched=True))
    hook.remove()
    assert calls == [12]  # one pass for the batch
    assert codec.codes_batch([], batched=True) == [] and calls == [12]
    assert [b.shape for b in batched] == [a.shape for a in alone]
    assert all((a == b).all() for a, b in zip(alone, batched))
    for i, (a,) in enumerate(alone_embeddings):
        assert (a - embeddings[i, : len(a)]).abs().max() <= 2e-6 * a.abs().max()
    if kind == "xcodec":  # the plain padded batch, for contrast
        from speechinstruct.units.codecs import _zero_padded

        _, (plain,) = _before_the_quantizer(codec, lambda: codec._encode(_zero_padded(wavs, max(w.size for w in wavs))))
        assert max(float((a - plain[i, : len(a)]).abs().max() / a.abs().max()) for i, (a,) in enumerate(alone_embeddings)) > 0.01


@pytest.mark.parametrize("semantic", ["WavLMConfig", "Data2VecAudioConfig"])
def test_an_xcodec_on_wavlm_batches_and_on_data2vec_audio_goes_one_at_a_time(semantic, tmp_path):
    """X-Codec's semantic model may be a WavLM (published X-Codecs are): batched exactly as a HuBERT. A
    data2vec-audio's positional convolutions carry the padding into a shorter utterance's frames (as extract
    found): that X-Codec encodes one utterance at a time."""
    tiny("xcodec", semantic).save_pretrained(tmp_path)
    codec = load_codec("xcodec", str(tmp_path))
    assert codec.batches == (semantic == "WavLMConfig")
    rng = np.random.default_rng(1)
    wavs = [speech(float(s), 16000, i) * (0.5 + i % 3) for i, s in enumerate(rng.uniform(0.4, 3.0, 6))]
    alone = [codec.codes(w) for w in wavs]
    assert all((a == b).all() for a, b in zip(alone, codec.codes_batch(wavs, batched=True)))


def test_xcodec2s_acoustic_encoder_reads_past_each_utterance_what_it_reads_alone():
    """XCodec2's anti-aliased activations pad by repeating the edge: in a batch each row's last value is repeated
    past its own length before them (the codes above barely feel it: the semantic half dominates the embeddings)."""
    from speechinstruct.units.codecs import each_row_alone

    encoder = tiny("xcodec2").acoustic_encoder
    wavs = [torch.from_numpy(np.pad(w, (0, -w.size % 320))) for w in (speech(s, 16000, i) for i, s in enumerate((0.5, 1.7, 1.1)))]
    batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)[:, None]
    with torch.no_grad():
        alone = [encoder(w[None, None])[0] for w in wavs]
        with each_row_alone(encoder, torch.tensor([w.numel() for w in wavs])) as own:
            out = encoder(batch)
        plain = encoder(batch)
    assert own(out.shape[-1]).tolist() == [a.shape[-1] for a in alone]
    for a, b, c in zip(alone, out, plain):
        assert (a - b[:, : a.shape[-1]]).abs().max() <= 2e-6 * a.abs().max()
    assert max(float((a - c[:, : a.shape[-1]]).abs().max() / a.abs().max()) for a, c in zip(alone, plain)) > 0.01


def xcodec2_feature_extractor():
    """transformers' own Xcodec2FeatureExtractor, its filterbanks computed by torchaudio's kaldi.fbank (read from
    the torchaudio wheel: tests/torchaudio_reference.py)."""
    import importlib
    import types

    from torchaudio_reference import kaldi

    module = importlib.import_module("transformers.models.xcodec2.feature_extraction_xcodec2")
    module.torchaudio = types.SimpleNamespace(compliance=types.SimpleNamespace(kaldi=kaldi()))
    return module.Xcodec2FeatureExtractor()


def test_xcodec2_units_are_the_models_own_codes_on_its_feature_extractors_inputs(folders):
    """XCodec2 reads the waveform and 80 log-mel filterbanks; ours come from kaldi-native-fbank, the feature
    extractor's from torchaudio: the inputs agree (waveform exactly, filterbanks within 1e-3 after normalising), the
    units are the model's own encode of ours exactly, and of the extractor's but for at most one code a clip: a value
    within the filterbanks' 1e-3 of a quantisation step may fall on either side (one code did once, in CI on
    2026-12-07 with the suite's files in another order; every code agreed in every run before)."""
    from transformers import Xcodec2Model

    from speechinstruct.units.codecs import xcodec2_inputs

    extractor = xcodec2_feature_extractor()
    model = Xcodec2Model.from_pretrained(folders["xcodec2"]).eval()
    codec = load_codec("xcodec2", str(folders["xcodec2"]))
    assert (codec.codebooks, codec.codebook_size, codec.k, codec.sample_rate, codec.frame_rate) == (1, 64, 64, 16000, 50.0)
    for seed, seconds in enumerate((0.7, 1.0, 1.37)):
        wav = speech(seconds, 16000, seed)
        ref = extractor(wav, sampling_rate=16000, return_tensors="pt")
        ours = xcodec2_inputs(wav, codec.hop, 16000)
        assert torch.equal(ours["input_values"], ref["input_values"])
        assert ours["input_features"].shape == ref["input_features"].shape
        assert torch.allclose(ours["input_features"], ref["input_features"], atol=1e-3)
        with torch.no_grad():
            codes = model.encode(ref["input_values"], ref["input_features"]).audio_codes[0].numpy()
            own = model.encode(ours["input_values"], ours["input_features"]).audio_codes[0].numpy()
        units = codec.units(wav)
        assert units.tolist() == own[0].tolist() and len(set(units.tolist())) > 3
        assert units.shape == codes[0].shape and (units != codes[0]).sum() <= 1, (units.tolist(), codes[0].tolist())
        with torch.no_grad():
            back = model.decode(audio_codes=torch.from_numpy(codes)[None]).audio_values.reshape(-1).numpy()
        assert np.allclose(codec.speech(units), back[: units.size * 320], atol=1e-5)
    with pytest.raises(ValueError, match=r"--codebooks 2: this xcodec2 model has 1 codebooks"):
        load_codec("xcodec2", str(folders["xcodec2"]), codebooks=2)


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
    from speechinstruct.compose.cross_modal import cross_modal
    from speechinstruct.compose.pretrain import pretrain
    from speechinstruct.units.extract import decode_row
    from speechinstruct.release.publish import publish
    from speechinstruct.sources.shard import shard_corpus
    from speechinstruct.shardfiles import folder_vocabulary
    from speechinstruct.release.validate import validate

    # one utterance at 44.1 kHz and one too short for a Mimi frame (1920 samples at 24 kHz)
    chapter = next(p for p in librispeech_root.rglob("*.trans.txt")).parent
    first = sorted(chapter.glob("*.flac"))[0]
    sf.write(first, speech(1.1, 44100, 7), 44100)
    short = sorted(chapter.glob("*.flac"))[1]
    sf.write(short, speech(0.05, 16000, 8), 16000)
    shard_corpus("librispeech", librispeech_root, tmp_path / "manifest")
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

    cross_modal(tmp_path / "units", tmp_path / "composed" / "cross_modal")
    pretrain(tmp_path / "units", tmp_path / "composed" / "pretrain")
    publish(tmp_path / "composed", tmp_path / "dataset")
    assert folder_vocabulary(tmp_path / "dataset") == codec.vocabulary()
    meta = json.loads((tmp_path / "dataset" / "speechinstruct.json").read_text())
    assert meta["k"] == 128 and meta["vocabulary"]["tokenizer"] == "mimi"
    assert validate(tmp_path / "dataset").ok

    # units back to speech with the codec itself: resynth and the report's listening table need no --vocoder
    done = runner.invoke(app, ["resynth", str(tmp_path / "units"), str(tmp_path / "wavs"), "--limit", "2", "-q"])
    assert done.exit_code == 0, done.output
    entries = [json.loads(line) for line in (tmp_path / "wavs" / "manifest.jsonl").read_text().splitlines()]
    wav, sr = sf.read(tmp_path / "wavs" / entries[0]["file"], dtype="float32")
    spoken = codec.speech(rows[entries[0]["id"]]["units"])
    assert sr == 24000 and wav.size == spoken.size  # a random codec's speech goes past ±1: wavs are clipped, 16-bit
    assert np.abs(wav - np.clip(spoken, -1, 1)).max() < 1e-4
    assert json.loads(done.stdout)["vocoder"] == codec.source
    refused = runner.invoke(app, ["resynth", str(tmp_path / "dataset"), str(tmp_path / "w2"), "-q"])
    assert refused.exit_code == 2 and "give --vocoder" in refused.stderr  # a dataset names no local checkpoint
    assert str(folders["mimi"]) not in (tmp_path / "dataset" / "speechinstruct.json").read_text()
    named = runner.invoke(app, ["resynth", str(tmp_path / "dataset"), str(tmp_path / "w3"), "--vocoder", str(folders["mimi"]),
                                "--limit", "1", "-q"])
    assert named.exit_code == 0, named.output
    shown = runner.invoke(app, ["report", str(tmp_path / "dataset"), str(tmp_path / "report"), "--units", str(tmp_path / "units")])
    assert shown.exit_code == 0, shown.output
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    assert numbers["vocoder"] == codec.source and numbers["resynthesis_mcd_db"] > 0
    assert sf.info(tmp_path / "report" / "audio" / "00-resynth.wav").samplerate == 24000
    assert sf.info(tmp_path / "report" / "audio" / "00-original.wav").samplerate == 24000

    wrong = runner.invoke(app, ["resynth", str(tmp_path / "dataset"), str(tmp_path / "w4"), "--vocoder", str(folders["dac"]), "-q"])
    assert wrong.exit_code == 2 and "a dac codec with codebooks of 64 cannot decode mimi units" in wrong.stderr

    # records from units of two tokenizers in one compose folder: publish refuses to mix them
    runner.invoke(app, ["extract", str(tmp_path / "manifest"), str(tmp_path / "units3"), "--features", "mimi",
                        "--checkpoint", str(folders["mimi"]), "--codebooks", "3", "-q"])
    pretrain(tmp_path / "units3", tmp_path / "composed" / "pretrain", part="other")
    with pytest.raises(ValueError, match=r"units of two vocabularies .*mimi 128.*mimi 192"):
        publish(tmp_path / "composed", tmp_path / "mixed")

    again = runner.invoke(app, ["extract", str(tmp_path / "manifest"), str(tmp_path / "units"), "--features", "mimi",
                                "--checkpoint", str(folders["mimi"]), "--codebooks", "3", "-q"])
    assert again.exit_code == 2 and "made with other settings" in again.stderr  # another tokenizer: a new folder
    spec = json.loads((tmp_path / "units3" / "units.json").read_text())  # units of 0.2.0: not padded to whole frames
    assert spec.pop("padding") == "whole frames"
    (tmp_path / "units3" / "units.json").write_text(json.dumps(spec))
    older = runner.invoke(app, ["extract", str(tmp_path / "manifest"), str(tmp_path / "units3"), "--features", "mimi",
                                "--checkpoint", str(folders["mimi"]), "--codebooks", "3", "-q"])
    assert older.exit_code == 2 and "made with other settings" in older.stderr and "padding" in older.stderr
    refused = runner.invoke(app, ["extract", str(tmp_path / "manifest"), str(tmp_path / "u2"), "--features", "dac",
                                  "--checkpoint", str(folders["mimi"]), "-q"])
    assert refused.exit_code == 2 and "holds a 'mimi' model, not 'dac'" in refused.stderr


def test_run_with_mimi_units_to_a_validated_dataset_trained_on_and_spoken_by_the_codec(folders, base_model, tmp_path):
    """A recipe with features.kind mimi: no cluster or quantize stage; chain-of-modality speech is tokenized by
    the codec too; the report speaks samples with the codec; train stage 2 adds exactly the 128 unit tokens."""
    import yaml

    from speechinstruct.model import train as T
    from speechinstruct.pipeline import run
    from speechinstruct.model.train import unit_vocabulary

    recipe = tmp_path / "mimi.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "mimi-units", "workdir": str(tmp_path / "w"), "demo_corpus": {"sentences": 10, "seed": 3},
        "features": {"kind": "mimi", "checkpoint": str(folders["mimi"]), "codebooks": 2},
        "compose": {"chain_of_modality": {"max_pairs": 3, "all_formats": True}}}))
    summary = run(recipe)
    assert summary["valid"] and summary["k"] == 128
    names = [st["stage"] for st in json.loads((tmp_path / "w" / "run-summary.json").read_text())["stages"]]
    assert not any(n.startswith(("cluster", "quantize")) for n in names) and not (tmp_path / "w" / "kmeans").exists()
    assert "extract speechinstruct-demo (mimi)" in " ".join(names)
    dataset = tmp_path / "w" / "dataset"
    com = [r for f in sorted((dataset / "data" / "chain_of_modality").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    spoken = [r["response_units"] for r in com if r["response_units"]]
    assert spoken and all(len(u) % 2 == 0 and max(u) < 128 for u in spoken)  # whole frames of 2 codebooks
    assert all(u[i] < 64 <= u[i + 1] for u in spoken for i in range(0, len(u), 2))  # frame-major, codebook 1 offset
    numbers = json.loads((tmp_path / "w" / "report" / "report.json").read_text())
    assert numbers["vocoder"].startswith("hf:") and numbers["samples"] > 0
    assert sf.info(tmp_path / "w" / "report" / "audio" / "00-resynth.wav").samplerate == 24000
    again = run(recipe)
    assert again["stages_skipped"] == len(names)

    s2 = T.train(2, base_model, dataset, tmp_path / "s2", T.TrainConfig(lr=3e-3, batch_size=2, max_steps=2, save_every=2,
                                                                         log_every=1, warmup_ratio=0.0))
    assert s2["steps"] == 2 and s2["tokens_added"] >= 128
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(tmp_path / "s2" / "model").get_vocab()
    assert all(t in vocab for t in unit_vocabulary(128)) and "<128>" not in vocab

    # chat hears a recording through the codec and can speak with it
    from speechinstruct.model.chat import audio_to_unit_text

    clip = tmp_path / "question.wav"
    sf.write(clip, speech(1.0, 44100, 11), 44100)
    codec = load_codec("mimi", str(folders["mimi"]), codebooks=2)
    assert audio_to_unit_text(clip, codec) == "<sosp>" + "".join(
        f"<{u}>" for u in codec.units(audio.load(clip, target_sr=24000))) + "<eosp>"
    said = runner.invoke(app, ["chat", "--model", str(tmp_path / "s2" / "model"), "--audio", str(clip), "--features", "mimi",
                               "--checkpoint", str(folders["mimi"]), "--codebooks", "2", "--vocoder", str(folders["mimi"]),
                               "--speak", str(tmp_path / "answer.wav"), "--max-new-tokens", "6", "--prompt", "cross_modal"])
    assert said.exit_code == 0, said.output
    assert {"answer", "units"} <= set(json.loads(said.stdout[said.stdout.index("{"):]))


def test_incomplete_or_malformed_codec_folders_are_refused_naming_what_is_wrong(folders, tmp_path):
    """Weights missing (they would start random: every utterance the same constant units), no tensor at all, a
    tensor of the wrong shape, unexpected weights, a garbage or pickled weights file, a config that is not an
    object or holds a zero sampling rate or no bandwidths: each one line naming the folder, never a codec."""
    import shutil

    from safetensors.torch import load_file, save_file

    def variant(name, kind="mimi", weights=None, config=None, files=None):
        folder = tmp_path / name
        shutil.copytree(folders[kind], folder)
        if weights is not None:
            state = load_file(folder / "model.safetensors")
            save_file(weights(state), folder / "model.safetensors")
        if config is not None:
            data = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps(config(data)))
        for file, body in (files or {}).items():
            (folder / file).write_bytes(body)
        return folder

    def drop_encoder(state):
        return {k: v for k, v in state.items() if not k.startswith("encoder.layers.0.")}

    def reshape_first(state):
        name = sorted(state)[0]
        return {**state, name: torch.zeros(3, 3)}

    import pickle

    cases = [
        (variant("missing", weights=drop_encoder), r"not a whole mimi codec: 2 weights missing \(encoder\.\S*layers\.0\."),
        (variant("none", weights=lambda s: {"nothing": torch.zeros(1)}), r"weights missing"),
        (variant("extra", weights=lambda s: {**s, "extra.weight": torch.zeros(2)}), r"1 weights unexpected \(extra.weight\)"),
        (variant("shape", weights=reshape_first), r"cannot load the mimi codec|of the wrong shape"),
        (variant("garbage", files={"model.safetensors": b"\x00garbage" * 10}), r"cannot load the mimi codec"),
        (variant("config-list", config=lambda c: []), r"config.json: must be a JSON object"),
        (variant("rate0", config=lambda c: {**c, "sampling_rate": 0}), r"not a usable mimi config \(sampling rate 0\)"),
        (variant("bands", "encodec", config=lambda c: {**c, "target_bandwidths": []}), r"no target_bandwidths"),
    ]
    pickled = variant("pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    cases.append((pickled, r"cannot load the mimi codec"))
    for folder, message in cases:
        kind = "encodec" if folder.name == "bands" else "mimi"
        with pytest.raises(ValueError, match=message):
            load_codec(kind, str(folder))
        result = runner.invoke(app, ["extract", str(tmp_path / "nowhere"), str(tmp_path / "out"), "--features", kind,
                                     "--checkpoint", str(folder)])
        assert result.exit_code == 2 and "Traceback" not in result.output, (folder.name, result.output)


def test_one_tokenizer_face_for_codecs_and_kmeans_units_built_by_one_loader(folders):
    """tokenizer.py: a codec and k-means units both encode, say their vocabulary, rates and codebooks; a codec
    decodes; the loader refuses --kmeans with a codec and features without --kmeans where units are needed."""
    from speechinstruct.units.features import MFCC
    from speechinstruct.units.tokenizer import dense_and_kmeans, is_tokenizer, load_tokenizer
    from speechinstruct.units import KMeans, SpeechEncoder

    km = KMeans(np.random.default_rng(0).normal(size=(16, 39)).astype(np.float32))
    mimi = load_tokenizer("mimi", str(folders["mimi"]), codebooks=2)
    units = load_tokenizer("mfcc", kmeans=km)
    assert isinstance(units, SpeechEncoder) and is_tokenizer(mimi) and is_tokenizer(units)
    assert not is_tokenizer(load_tokenizer("mfcc", features_only=True))  # a dense model: features, no units
    wav = speech(1.0, 16000, 3)
    for tokenizer in (mimi, units):
        encoded = tokenizer.encode(wav, 16000)
        frames = np.repeat(encoded.units, encoded.durations)
        assert frames.size == encoded.n_frames * tokenizer.codebooks
        assert abs(encoded.n_frames - tokenizer.frame_rate) <= 2  # a second of audio
        assert tokenizer.vocabulary().size == tokenizer.describe()["vocabulary"]["size"]
    assert np.array_equal(np.repeat(*units.encode(wav, 16000)[:2]), km.assign(MFCC().features(wav)))
    assert np.array_equal(mimi.encode(wav, 16000).units, mimi.units(wav, 16000))
    assert mimi.decode(mimi.encode(wav, 16000).units).size > 0 and not hasattr(units, "decode")
    assert units.describe()["kmeans"] is not None and mimi.describe()["kmeans"] is None
    assert dense_and_kmeans(units)[1] is km and dense_and_kmeans(mimi) == (mimi, None)
    with pytest.raises(ValueError, match="codec's codes are already units"):
        load_tokenizer("mimi", str(folders["mimi"]), kmeans=km)
    with pytest.raises(ValueError, match="--kmeans is needed"):
        load_tokenizer("mfcc")


def test_no_module_asks_which_kind_of_tokenizer_it_holds():
    """Only tokenizer.py (and the classes themselves) tell a codec from k-means units."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "speechinstruct"
    askers = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name == "is_codec" or (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance"
                                      and any(getattr(a, "id", None) in ("Codec", "SpeechEncoder") for a in ast.walk(node.args[1]))):
                askers.append(f"{path.name}:{node.lineno}")
    assert [a for a in askers if not a.startswith("tokenizer.py:")] == []


import numpy as np
import pytest
import torch

from fairseq_fixture import model_cfg, random_state, reference_features, save_checkpoint
from conftest import speechlike
from speechinstruct import audio, features
from speechinstruct.checkpoints import UnsafeCheckpointError


@pytest.mark.parametrize("mode,pre_ln,normalize,layer", [
    ("default", False, False, 2),      # HuBERT Base / mHuBERT layout
    ("default", False, True, 3),
    ("layer_norm", True, True, 3),     # HuBERT Large layout (pre-LN, layer-norm extractor), last layer
])
def test_fairseq_checkpoint_matches_fairseq_forward(tmp_path, mode, pre_ln, normalize, layer):
    cfg = model_cfg(mode, pre_ln, conv_bias=(mode == "layer_norm"))
    state = random_state(cfg, seed=1)
    save_checkpoint(tmp_path / "hubert.pt", cfg, state, normalize=normalize)
    hubert = features.load_hubert(tmp_path / "hubert.pt", layer=layer)
    assert hubert.normalize is normalize and hubert.dim == 32 and hubert.frame_rate == 800.0
    wav = speechlike(0.5, seed=2)
    got = hubert.features(wav)
    want = reference_features(state, cfg, torch.from_numpy(wav), layer, normalize).numpy()
    assert got.shape == want.shape == ((8000 - 30) // 20 + 1, 32)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_legacy_argparse_checkpoint(tmp_path):
    cfg = model_cfg()
    state = random_state(cfg, seed=3)
    save_checkpoint(tmp_path / "old.pt", cfg, state, normalize=True, legacy_args=True)
    hubert = features.load_hubert(tmp_path / "old.pt", layer=2)
    assert hubert.normalize is True
    wav = speechlike(0.3, seed=4)
    want = reference_features(state, cfg, torch.from_numpy(wav), 2, True).numpy()
    np.testing.assert_allclose(hubert.features(wav), want, atol=1e-4, rtol=1e-4)


def test_batched_frames_equal_one_at_a_time(tmp_path):
    cfg = model_cfg()
    save_checkpoint(tmp_path / "hubert.pt", cfg, random_state(cfg))
    hubert = features.load_hubert(tmp_path / "hubert.pt", layer=3)
    wavs = [speechlike(s, seed=i) for i, s in enumerate([0.3, 1.1, 0.7])]
    batched = hubert.features_batch(wavs)
    for wav, b in zip(wavs, batched):
        np.testing.assert_allclose(b, hubert.features(wav), atol=1e-5)


def test_long_audio_is_cut_into_chunks(tmp_path, monkeypatch):
    cfg = model_cfg()
    state = random_state(cfg)
    save_checkpoint(tmp_path / "hubert.pt", cfg, state)
    monkeypatch.setattr(features, "CHUNK_SAMPLES", 4000)
    hubert = features.load_hubert(tmp_path / "hubert.pt", layer=1)
    wav = speechlike(0.6, seed=3)  # 9600 samples: chunks 4000 + 4000 + 1600
    want = np.concatenate([reference_features(state, cfg, torch.from_numpy(wav[s:s + 4000]), 1, False).numpy()
                           for s in (0, 4000, 8000)])
    np.testing.assert_allclose(hubert.features(wav), want, atol=1e-4)


def test_hugging_face_folder_loads_the_same(tmp_path):
    cfg = model_cfg()
    save_checkpoint(tmp_path / "hubert.pt", cfg, random_state(cfg))
    model, _ = features.read_fairseq_hubert(tmp_path / "hubert.pt")
    model.save_pretrained(tmp_path / "hf")
    wav = speechlike(0.4, seed=5)
    a = features.load_hubert(tmp_path / "hubert.pt", layer=2).features(wav)
    b = features.load_hubert(tmp_path / "hf", layer=2).features(wav)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_resamples_input(tmp_path):
    cfg = model_cfg()
    save_checkpoint(tmp_path / "hubert.pt", cfg, random_state(cfg))
    hubert = features.load_hubert(tmp_path / "hubert.pt", layer=1)
    assert hubert.features(speechlike(0.5, sr=8000), sample_rate=8000).shape[0] == (8000 - 30) // 20 + 1


def test_bad_layer_and_missing_weights_are_clear(tmp_path):
    cfg = model_cfg()
    state = random_state(cfg)
    save_checkpoint(tmp_path / "hubert.pt", cfg, state)
    with pytest.raises(ValueError, match=r"hubert.pt: layer 7 out of range: the model has layers 1..3"):
        features.load_hubert(tmp_path / "hubert.pt", layer=7)
    del state["encoder.layers.2.fc1.weight"]
    save_checkpoint(tmp_path / "broken.pt", cfg, state)
    with pytest.raises(ValueError, match=r"broken.pt: weights do not match.*encoder.layers.2.feed_forward"):
        features.load_hubert(tmp_path / "broken.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt: no such checkpoint"):
        features.load_hubert(tmp_path / "nowhere.pt")


class Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned",))


def test_malicious_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "cfg": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"evil.pt: refused to load.*(posix|os)\.system"):
        features.load_hubert(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_mfcc_frames_and_shape():
    mfcc = features.MFCC()
    assert mfcc.features(speechlike(1.0)).shape == (98, 39)  # 1 + (16000 - 400) // 160
    assert mfcc.features(speechlike(0.5)).shape == (48, 39)
    assert mfcc.features(speechlike(1.0, sr=48000), sample_rate=48000).shape == (98, 39)
    with pytest.raises(audio.AudioError, match="too short"):
        mfcc.features(np.ones(100, np.float32))


def test_mfcc_deltas_are_regression_deltas():
    x = np.arange(10, dtype=np.float32)[:, None] ** 2
    d = features.deltas(x)
    # interior: sum_k k (x[t+k] - x[t-k]) / 10 = 2t for x = t^2
    np.testing.assert_allclose(d[2:-2, 0], 2 * np.arange(2, 8))


def test_cli_refuses_malicious_checkpoint_in_one_line(tmp_path, librispeech_root):
    from typer.testing import CliRunner
    from speechinstruct.cli import app
    from speechinstruct.shard import shard_corpus
    shard_corpus("librispeech", librispeech_root, tmp_path / "m", quiet=True)
    torch.save({"model": {}, "cfg": Exploit()}, tmp_path / "evil.pt")
    result = CliRunner().invoke(app, ["extract", str(tmp_path / "m"), str(tmp_path / "f"), "--features", "hubert",
                                      "--checkpoint", str(tmp_path / "evil.pt"), "-q"])
    assert result.exit_code == 2 and "evil.pt: refused to load" in result.stderr

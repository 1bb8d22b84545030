"""The unit vocoder: fairseq's CodeHiFiGAN checkpoints, loaded without fairseq, give fairseq's waveform."""

import json

import numpy as np
import pytest
import torch

from fairseq_vocoder_fixture import random_generator_state, reference_waveform, save_vocoder, vocoder_config
from speechinstruct.vocoder import load_vocoder

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
    save_checkpoint(tmp_path / "hubert" / "g_00500000", model_cfg(), random_state(model_cfg())) \
        if (tmp_path / "hubert").mkdir() is None else None
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

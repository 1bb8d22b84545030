"""Unit HiFi-GAN vocoders as fairseq / speech-resynthesis write them, and fairseq's forward pass, rewritten.

On disk (speech-resynthesis ``train.py`` saves ``{'generator': generator.state_dict()}`` as ``g_NNNNNNNN``;
fairseq's ``CodeHiFiGANVocoder`` loads ``state_dict["generator"]``): an ``OrderedDict`` with fairseq's
parameter names, every convolution of the generator weight-normed by ``torch.nn.utils.weight_norm``
(``weight_g`` of shape (out, 1, 1) — (in, 1, 1) for a transposed convolution — and ``weight_v``), the unit
table as ``dict.weight``, and the duration predictor as ``dur_predictor.conv1.0`` (Conv1d inside a
Sequential with a ReLU), ``ln1``, ``conv2.0``, ``ln2``, ``proj``. ``config.json`` beside it, with the keys
fairseq's released configs carry (training keys included).

``reference_waveform`` is fairseq's ``CodeGenerator.forward`` + ``Generator.forward`` (hifigan.py,
codehifigan.py, fastspeech2.py ``VariancePredictor``) written out with torch functionals from fairseq's own
parameter names, independently of the code under test: it checks the loader's renames and the choice of
transformers' modules, including fairseq's quirks (the duration predictor's second convolution is padded by
1 whatever its kernel; the final leaky ReLU uses slope 0.01, the others 0.1; ``exp(d) - 1``, rounded,
at least 1).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

LRELU = 0.1


def vocoder_config(dur_prediction: bool = True, k: int = 24) -> dict:
    config = {
        "resblock": "1", "batch_size": 16, "learning_rate": 0.0002, "adam_b1": 0.8, "adam_b2": 0.99,
        "lr_decay": 0.999, "seed": 1234,
        "upsample_rates": [5, 4, 2], "upsample_kernel_sizes": [11, 8, 4], "upsample_initial_channel": 32,
        "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
        "num_embeddings": k, "embedding_dim": 16, "model_in_dim": 16,
        "segment_size": 8960, "code_hop_size": 40, "f0": False, "num_mels": 80, "num_freq": 1025, "n_fft": 1024,
        "hop_size": 256, "win_size": 1024, "sampling_rate": 16000, "fmin": 0, "fmax": 8000, "fmax_for_loss": None,
        "num_workers": 4, "dist_config": {"dist_backend": "nccl", "dist_url": "env://", "world_size": 1},
    }
    if dur_prediction:
        config["dur_predictor_params"] = {"encoder_embed_dim": 16, "var_pred_hidden_dim": 16,
                                          "var_pred_kernel_size": 3, "var_pred_dropout": 0.5}
    return config


def _convs(cfg: dict):
    """(name, out, in, kernel, transposed) of every weight-normed convolution, in fairseq's naming."""
    c0 = cfg["upsample_initial_channel"]
    yield "conv_pre", c0, cfg.get("model_in_dim", 80), 7, False
    for i, (u, k) in enumerate(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"])):
        yield f"ups.{i}", c0 // 2 ** (i + 1), c0 // 2**i, k, True
    j = 0
    for i in range(len(cfg["upsample_rates"])):
        ch = c0 // 2 ** (i + 1)
        for k, dilations in zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"]):
            for part in ("convs1", "convs2"):
                for m in range(len(dilations)):
                    yield f"resblocks.{j}.{part}.{m}", ch, ch, k, False
            j += 1
    yield "conv_post", 1, c0 // 2 ** len(cfg["upsample_rates"]), 7, False


def random_generator_state(cfg: dict, seed: int = 0) -> OrderedDict:
    """Every parameter random and non-trivial: biases, weight-norm gains, layer norms."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    state = OrderedDict()
    state["dict.weight"] = r(cfg["num_embeddings"], cfg["embedding_dim"], scale=1.0)
    for name, out, inp, k, transposed in _convs(cfg):
        shape = (inp, out, k) if transposed else (out, inp, k)
        state[f"{name}.bias"] = r(out, scale=0.05)
        state[f"{name}.weight_g"] = 0.5 + torch.rand(shape[0], 1, 1, generator=g)
        state[f"{name}.weight_v"] = r(*shape)
    dur = cfg.get("dur_predictor_params")
    if dur:
        e, h, k = dur["encoder_embed_dim"], dur["var_pred_hidden_dim"], dur["var_pred_kernel_size"]
        state["dur_predictor.conv1.0.weight"] = r(h, e, k)
        state["dur_predictor.conv1.0.bias"] = r(h, scale=0.1)
        state["dur_predictor.ln1.weight"] = 1 + r(h, scale=0.1)
        state["dur_predictor.ln1.bias"] = r(h, scale=0.1)
        state["dur_predictor.conv2.0.weight"] = r(h, h, k)
        state["dur_predictor.conv2.0.bias"] = r(h, scale=0.1)
        state["dur_predictor.ln2.weight"] = 1 + r(h, scale=0.1)
        state["dur_predictor.ln2.bias"] = r(h, scale=0.1)
        state["dur_predictor.proj.weight"] = r(1, h)
        state["dur_predictor.proj.bias"] = torch.tensor([1.2])  # exp(≈1.2) - 1 ≈ 2-3 frames a unit
    return state


def save_vocoder(folder: Path, cfg: dict, state: OrderedDict, name: str = "g_00500000") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": state}, folder / name)
    (folder / "config.json").write_text(json.dumps(cfg, indent=4))
    return folder / name


def _w(state, name):
    v, g = state[f"{name}.weight_v"], state[f"{name}.weight_g"]
    return g * v / v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def reference_waveform(state: dict, cfg: dict, codes: list[int], dur_prediction: bool) -> torch.Tensor:
    with torch.no_grad():
        x = F.embedding(torch.tensor([codes]), state["dict.weight"]).transpose(1, 2)  # B x C x T
        dur = cfg.get("dur_predictor_params")
        if dur and dur_prediction:
            h = x.transpose(1, 2)
            k = dur["var_pred_kernel_size"]
            h = F.relu(F.conv1d(h.transpose(1, 2), state["dur_predictor.conv1.0.weight"], state["dur_predictor.conv1.0.bias"],
                                padding=(k - 1) // 2)).transpose(1, 2)
            h = F.layer_norm(h, h.shape[-1:], state["dur_predictor.ln1.weight"], state["dur_predictor.ln1.bias"])
            h = F.relu(F.conv1d(h.transpose(1, 2), state["dur_predictor.conv2.0.weight"], state["dur_predictor.conv2.0.bias"],
                                padding=1)).transpose(1, 2)
            h = F.layer_norm(h, h.shape[-1:], state["dur_predictor.ln2.weight"], state["dur_predictor.ln2.bias"])
            log_dur = F.linear(h, state["dur_predictor.proj.weight"], state["dur_predictor.proj.bias"]).squeeze(2)
            frames = torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)
            x = torch.repeat_interleave(x, frames.view(-1), dim=2)
        x = F.conv1d(x, _w(state, "conv_pre"), state["conv_pre.bias"], padding=3)
        kernels = len(cfg["resblock_kernel_sizes"])
        for i, (u, k) in enumerate(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"])):
            x = F.leaky_relu(x, LRELU)
            x = F.conv_transpose1d(x, _w(state, f"ups.{i}"), state[f"ups.{i}.bias"], stride=u, padding=(k - u) // 2)
            xs = None
            for j in range(kernels):
                n = i * kernels + j
                kk, dilations = cfg["resblock_kernel_sizes"][j], cfg["resblock_dilation_sizes"][j]
                y = x
                for m, d in enumerate(dilations):
                    t = F.leaky_relu(y, LRELU)
                    t = F.conv1d(t, _w(state, f"resblocks.{n}.convs1.{m}"), state[f"resblocks.{n}.convs1.{m}.bias"],
                                 dilation=d, padding=(kk * d - d) // 2)
                    t = F.leaky_relu(t, LRELU)
                    t = F.conv1d(t, _w(state, f"resblocks.{n}.convs2.{m}"), state[f"resblocks.{n}.convs2.{m}.bias"],
                                 padding=(kk - 1) // 2)
                    y = t + y
                xs = y if xs is None else xs + y
            x = xs / kernels
        x = F.leaky_relu(x)  # fairseq: default slope 0.01 here
        x = torch.tanh(F.conv1d(x, _w(state, "conv_post"), state["conv_post.bias"], padding=3))
        return x.squeeze()

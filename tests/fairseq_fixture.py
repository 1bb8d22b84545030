"""Tiny fairseq-layout HuBERT checkpoints, and an independent functional re-implementation of fairseq's
HuBERT forward pass (written from fairseq's parameter names and module order) to check the loader."""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

CONV = [(16, 10, 5), (16, 3, 2), (16, 2, 2)]  # 20x downsampling, receptive field 30 samples


def model_cfg(mode="default", layer_norm_first=False, conv_bias=False):
    return {"_name": "hubert", "extractor_mode": mode, "encoder_layers": 3, "encoder_embed_dim": 32,
            "encoder_ffn_embed_dim": 48, "encoder_attention_heads": 4, "activation_fn": "gelu",
            "layer_norm_first": layer_norm_first, "conv_feature_layers": repr(CONV), "conv_bias": conv_bias,
            "conv_pos": 8, "conv_pos_groups": 4, "final_dim": 8}


def random_state(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    def ln(n):
        return 1 + r(n, scale=0.1), r(n, scale=0.1)

    sd, cin = {}, 1
    for i, (c, k, _) in enumerate(CONV):
        sd[f"feature_extractor.conv_layers.{i}.0.weight"] = r(c, cin, k)
        if cfg["conv_bias"]:
            sd[f"feature_extractor.conv_layers.{i}.0.bias"] = r(c)
        if cfg["extractor_mode"] == "layer_norm":
            sd[f"feature_extractor.conv_layers.{i}.2.1.weight"], sd[f"feature_extractor.conv_layers.{i}.2.1.bias"] = ln(c)
        elif i == 0:
            sd["feature_extractor.conv_layers.0.2.weight"], sd["feature_extractor.conv_layers.0.2.bias"] = ln(c)
        cin = c
    e, f = cfg["encoder_embed_dim"], cfg["encoder_ffn_embed_dim"]
    sd["layer_norm.weight"], sd["layer_norm.bias"] = ln(cin)
    sd["post_extract_proj.weight"], sd["post_extract_proj.bias"] = r(e, cin), r(e)
    sd["encoder.pos_conv.0.weight_g"] = 1 + r(1, 1, cfg["conv_pos"], scale=0.1)
    sd["encoder.pos_conv.0.weight_v"] = r(e, e // cfg["conv_pos_groups"], cfg["conv_pos"])
    sd["encoder.pos_conv.0.bias"] = r(e)
    sd["encoder.layer_norm.weight"], sd["encoder.layer_norm.bias"] = ln(e)
    for i in range(cfg["encoder_layers"]):
        p = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"], sd[p + f"self_attn.{proj}.bias"] = r(e, e, scale=e**-0.5), r(e)
        sd[p + "self_attn_layer_norm.weight"], sd[p + "self_attn_layer_norm.bias"] = ln(e)
        sd[p + "fc1.weight"], sd[p + "fc1.bias"] = r(f, e, scale=e**-0.5), r(f)
        sd[p + "fc2.weight"], sd[p + "fc2.bias"] = r(e, f, scale=f**-0.5), r(e)
        sd[p + "final_layer_norm.weight"], sd[p + "final_layer_norm.bias"] = ln(e)
    sd["mask_emb"] = r(e)
    sd["final_proj.weight"], sd["final_proj.bias"] = r(cfg["final_dim"], e), r(cfg["final_dim"])
    sd["label_embs_concat"] = r(10, cfg["final_dim"])
    return sd


def save_checkpoint(path, cfg, state, normalize=False, legacy_args=False):
    """torch.save a checkpoint whose pickle names fairseq classes, as real fairseq checkpoints do."""
    fake = {name: types.ModuleType(name) for name in ("fairseq", "fairseq.data", "fairseq.data.dictionary")}

    class Dictionary:
        def __init__(self):
            self.symbols, self.count, self.indices = ["<s>", "<pad>", "0", "1"], [1, 1, 5, 5], {"0": 2, "1": 3}

    Dictionary.__module__, Dictionary.__qualname__ = "fairseq.data.dictionary", "Dictionary"
    fake["fairseq.data.dictionary"].Dictionary = Dictionary
    saved = {k: sys.modules.get(k) for k in fake}
    sys.modules.update(fake)
    try:
        if legacy_args:  # pre-hydra fairseq: one argparse Namespace for model and task, no cfg
            import argparse
            args = argparse.Namespace(**{k: v for k, v in cfg.items() if k != "_name"}, arch="hubert", normalize=normalize)
            torch.save({"args": args, "model": state, "task_state": {"dictionaries": [Dictionary()]}}, path)
            return
        torch.save({"cfg": {"model": cfg, "task": {"_name": "hubert_pretraining", "normalize": normalize,
                                                   "sample_rate": 16000, "label_rate": 50}},
                    "model": state, "task_state": {"dictionaries": [Dictionary()]}, "args": None}, path)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def reference_features(sd, cfg, wav: torch.Tensor, layer: int, normalize: bool) -> torch.Tensor:
    """fairseq HubertModel.extract_features(output_layer=layer) for one utterance, re-derived."""
    x = wav.float()
    if normalize:
        x = F.layer_norm(x, x.shape)
    x = x[None, None]
    for i, (c, _, s) in enumerate(CONV):
        x = F.conv1d(x, sd[f"feature_extractor.conv_layers.{i}.0.weight"], sd.get(f"feature_extractor.conv_layers.{i}.0.bias"), stride=s)
        if cfg["extractor_mode"] == "layer_norm":
            x = F.layer_norm(x.transpose(1, 2), (c,), sd[f"feature_extractor.conv_layers.{i}.2.1.weight"],
                             sd[f"feature_extractor.conv_layers.{i}.2.1.bias"]).transpose(1, 2)
        elif i == 0:
            x = F.group_norm(x, c, sd["feature_extractor.conv_layers.0.2.weight"], sd["feature_extractor.conv_layers.0.2.bias"])
        x = F.gelu(x)
    x = x.transpose(1, 2)
    x = F.layer_norm(x, (x.shape[-1],), sd["layer_norm.weight"], sd["layer_norm.bias"])
    x = F.linear(x, sd["post_extract_proj.weight"], sd["post_extract_proj.bias"])
    e, kpos = x.shape[-1], cfg["conv_pos"]
    v = sd["encoder.pos_conv.0.weight_v"]
    w = sd["encoder.pos_conv.0.weight_g"] * v / v.norm(dim=(0, 1), keepdim=True)
    pos = F.conv1d(x.transpose(1, 2), w, sd["encoder.pos_conv.0.bias"], padding=kpos // 2, groups=cfg["conv_pos_groups"])
    if kpos % 2 == 0:
        pos = pos[:, :, :-1]
    x = x + F.gelu(pos).transpose(1, 2)

    def lnorm(t, name):
        return F.layer_norm(t, (e,), sd[name + ".weight"], sd[name + ".bias"])

    if not cfg["layer_norm_first"]:
        x = lnorm(x, "encoder.layer_norm")
    heads = cfg["encoder_attention_heads"]
    for i in range(layer):
        p = f"encoder.layers.{i}."

        def attn(t):
            q, k, vv = (F.linear(t, sd[p + f"self_attn.{n}.weight"], sd[p + f"self_attn.{n}.bias"]) for n in ("q_proj", "k_proj", "v_proj"))
            split = lambda a: a.view(a.shape[0], a.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
            q, k, vv = split(q) * (e // heads) ** -0.5, split(k), split(vv)
            o = (q @ k.transpose(-1, -2)).softmax(-1) @ vv
            o = o.transpose(1, 2).reshape(t.shape)
            return F.linear(o, sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"])

        def ffn(t):
            return F.linear(F.gelu(F.linear(t, sd[p + "fc1.weight"], sd[p + "fc1.bias"])), sd[p + "fc2.weight"], sd[p + "fc2.bias"])

        if cfg["layer_norm_first"]:
            x = x + attn(lnorm(x, p + "self_attn_layer_norm"))
            x = x + ffn(lnorm(x, p + "final_layer_norm"))
        else:
            x = lnorm(x + attn(x), p + "self_attn_layer_norm")
            x = lnorm(x + ffn(x), p + "final_layer_norm")
    return x[0]

"""Tiny HuBERT checkpoints written the way fairseq writes them, and an independent functional
re-implementation of fairseq's HuBERT forward pass (written from fairseq's parameter names and module order)
to check the loader.

What the real files hold, and these do too (SPEC.md, "Artefacts as their makers write them"): the whole
``Trainer.state_dict`` (optimizer history, task state with pickled ``fairseq.data.dictionary.Dictionary``,
extra state, optimizer state); ``conv_feature_layers`` as a Python expression string; ChoiceEnum members
as config values; unresolved ``${task.label_rate}`` interpolations; ``cfg`` as a plain dict, as a pickled
omegaconf ``DictConfig`` (made by omegaconf itself), or absent with an argparse ``args`` Namespace."""

from __future__ import annotations

import collections
import enum
import sys
import types

import torch
import torch.nn.functional as F

TINY_CONV = "[(16, 10, 5)] + [(16, 3, 2)] + [(16, 2, 2)]"  # 20x downsampling, receptive field 30 samples
HUBERT_STRIDE_CONV = "[(8,10,5)] + [(8,3,2)] * 4 + [(8,2,2)] * 2"  # fairseq's default shape (320x), narrow


def conv_layers(cfg) -> list[tuple[int, int, int]]:
    """The reference side reads the spec as fairseq does (``eval``, on our own trusted fixture string)."""
    return list(eval(cfg["conv_feature_layers"]))  # noqa: S307 - our own fixture text, never user input


def model_cfg(mode="default", layer_norm_first=False, conv_bias=False, conv=TINY_CONV):
    """fairseq's ``HubertConfig`` as ``Trainer.state_dict`` saves it (``OmegaConf.to_container`` of the
    hydra config, unresolved): every field, ``conv_feature_layers`` an expression string, ``label_rate``
    an interpolation, ``latent_temp`` a tuple. Tiny sizes."""
    return {"_name": "hubert", "label_rate": "${task.label_rate}", "extractor_mode": mode, "encoder_layers": 3,
            "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 48, "encoder_attention_heads": 4,
            "activation_fn": "gelu", "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
            "encoder_layerdrop": 0.05, "dropout_input": 0.1, "dropout_features": 0.1, "final_dim": 8,
            "untie_final_proj": False, "layer_norm_first": layer_norm_first, "conv_feature_layers": conv,
            "conv_bias": conv_bias, "logit_temp": 0.1, "target_glu": False, "feature_grad_mult": 0.1,
            "mask_length": 10, "mask_prob": 0.8, "mask_selection": "static", "mask_other": 0.0,
            "no_mask_overlap": False, "mask_min_space": 1, "mask_channel_length": 10, "mask_channel_prob": 0.0,
            "mask_channel_selection": "static", "mask_channel_other": 0.0, "no_mask_channel_overlap": False,
            "mask_channel_min_space": 1, "conv_pos": 8, "conv_pos_groups": 4, "latent_temp": (2.0, 0.5, 0.999995),
            "skip_masked": False, "skip_nomask": False}


def task_cfg(normalize=False):
    return {"_name": "hubert_pretraining", "data": "/checkpoint/data/manifest", "fine_tuning": False,
            "labels": ["km"], "label_dir": "/checkpoint/data/labels", "label_rate": 50.0, "sample_rate": 16000,
            "normalize": normalize, "enable_padding": False, "max_keep_size": None, "max_sample_size": 250000,
            "min_sample_size": 32000, "single_target": False, "random_crop": True, "pad_audio": False}


def fairseq_cfg(model, task):
    """The whole FairseqConfig a hydra-era Trainer saves (most sections abridged to a few real keys)."""
    return {"_name": None,
            "common": {"_name": None, "no_progress_bar": False, "log_interval": 200, "log_format": "json",
                       "fp16": True, "seed": 1337, "empty_cache_freq": 0},
            "distributed_training": {"_name": None, "distributed_world_size": 32, "ddp_backend": "no_c10d"},
            "dataset": {"_name": None, "num_workers": 6, "max_tokens": 1400000, "train_subset": "train",
                        "valid_subset": "valid", "validate_interval": 5},
            "optimization": {"_name": None, "max_update": 400000, "clip_norm": 10.0, "lr": [0.0005], "update_freq": [1]},
            "checkpoint": {"_name": None, "save_dir": "checkpoints", "save_interval_updates": 25000,
                           "keep_interval_updates": 1, "no_save_optimizer_state": False, "best_checkpoint_metric": "loss"},
            "model": model, "task": task,
            "criterion": {"_name": "hubert", "pred_masked_weight": 1.0, "pred_nomask_weight": 0.0,
                          "loss_weights": [10.0], "log_keys": []},
            "optimizer": {"_name": "adam", "adam_betas": "(0.9,0.98)", "adam_eps": 1e-06, "weight_decay": 0.01,
                          "lr": [0.0005]},
            "lr_scheduler": {"_name": "polynomial_decay", "warmup_updates": 32000, "end_learning_rate": 0.0,
                             "power": 1.0, "total_num_update": 400000.0, "lr": [0.0005]},
            "scoring": None, "bpe": None, "tokenizer": None}


def random_state(cfg, seed=0):
    """Every parameter non-trivial (random weights, biases and norms), named as fairseq names them."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    def ln(n):
        return 1 + r(n, scale=0.1), r(n, scale=0.1)

    sd, cin = {}, 1
    for i, (c, k, _) in enumerate(conv_layers(cfg)):
        sd[f"feature_extractor.conv_layers.{i}.0.weight"] = r(c, cin, k, scale=0.5 / k ** 0.5)
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


class StrEnum(enum.Enum):
    """fairseq.dataclass.constants.StrEnum: ChoiceEnum's base."""

    def __str__(self):
        return self.value


# fairseq builds its choice enums with ChoiceEnum([...]) → StrEnum("Choices", ...); pickles name them
# fairseq.dataclass.constants.Choices. One enum holds every value the fixture needs.
Choices = StrEnum("Choices", {k: k for k in ("default", "layer_norm", "static", "uniform", "gelu", "relu")})
ENUM_FIELDS = ("extractor_mode", "mask_selection", "mask_channel_selection", "activation_fn")


class _FakeFairseq:
    """Registers stand-ins for the fairseq modules a checkpoint's pickle names, for the time of a save:
    the Dictionary of the task state, ChoiceEnum's enum, and (for DictConfig saves) the config dataclasses."""

    NAMES = ("fairseq", "fairseq.data", "fairseq.data.dictionary", "fairseq.dataclass", "fairseq.dataclass.constants",
             "fairseq.models", "fairseq.models.hubert", "fairseq.models.hubert.hubert", "fairseq.tasks",
             "fairseq.tasks.hubert_pretraining", "fairseq.dataclass.configs")

    def __enter__(self):
        fake = {name: types.ModuleType(name) for name in self.NAMES}

        class Dictionary:
            def __init__(self):
                self.bos_word, self.unk_word, self.pad_word, self.eos_word = "<s>", "<unk>", "<pad>", "</s>"
                self.symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in range(10)]
                self.count = [1, 1, 1, 1] + [100] * 10
                self.indices = {s: i for i, s in enumerate(self.symbols)}
                self.nspecial = 4

        Dictionary.__module__, Dictionary.__qualname__ = "fairseq.data.dictionary", "Dictionary"
        fake["fairseq.data.dictionary"].Dictionary = Dictionary
        Choices.__module__ = "fairseq.dataclass.constants"
        fake["fairseq.dataclass.constants"].Choices = Choices
        fake["fairseq.dataclass.constants"].StrEnum = StrEnum
        self.Dictionary = Dictionary
        self.saved = {k: sys.modules.get(k) for k in fake}
        sys.modules.update(fake)
        self.fake = fake
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _trainer_state(cfg, state, dictionary):
    """fairseq 0.12 ``Trainer.state_dict()`` around a config and model weights."""
    return {
        "args": None,
        "cfg": cfg,
        "model": state,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": 3.21}, "num_updates": 400000}],
        "task_state": {"dictionaries": [dictionary]},
        "extra_state": {"metrics": collections.OrderedDict([("default", collections.OrderedDict())]),
                        "previous_training_time": 123456.7, "epoch": 40,
                        "train_iterator": {"epoch": 40, "iterations_in_epoch": 0, "shuffle": True, "version": 2},
                        "val_loss": 3.21, "best": 3.21},
        "last_optimizer_state": {"state": {0: {"step": torch.tensor(400000.0), "exp_avg": torch.zeros(4)}},
                                 "param_groups": [{"lr": 0.0, "betas": (0.9, 0.98), "eps": 1e-6, "params": [0]}]},
    }


def _with_enums(cfg: dict) -> dict:
    return {k: Choices(v) if k in ENUM_FIELDS else v for k, v in cfg.items()}


def save_checkpoint(path, cfg, state, normalize=False, form="dict", legacy_args=False, zipfile=True):
    """Write ``path`` as fairseq writes a HuBERT checkpoint, in one of the saved forms:

    * ``dict``: fairseq >= 0.12 ``Trainer.state_dict``: ``cfg`` = ``OmegaConf.to_container`` of the whole
      config, unresolved (interpolation strings kept) and with ChoiceEnum members as values;
    * ``dictconfig``: older hydra-era saves that pickled the omegaconf ``DictConfig`` object itself (built
      from a structured config dataclass, so its pickle names the dataclass, omegaconf's nodes,
      ``builtins.dict``, ``typing.Any``…);
    * ``args``: pre-hydra fairseq, ``cfg`` absent and one argparse Namespace for model and task.
    """
    if legacy_args:
        form = "args"
    with _FakeFairseq() as fake:
        dictionary = fake.Dictionary()
        if form == "args":
            import argparse

            flat = {k: v for k, v in cfg.items() if k != "_name" and k != "label_rate"}
            args = argparse.Namespace(**flat, **{k: v for k, v in task_cfg(normalize).items() if k != "_name"},
                                      arch="hubert", task="hubert_pretraining", criterion="hubert")
            ckpt = {"args": args, "model": state, "optimizer_history": [], "extra_state": {"epoch": 10},
                    "task_state": {"dictionaries": [dictionary]}, "last_optimizer_state": None}
        elif form == "dict":
            ckpt = _trainer_state(fairseq_cfg(_with_enums(cfg), task_cfg(normalize)), state, dictionary)
        elif form == "dictconfig":
            ckpt = _trainer_state(_dictconfig(cfg, normalize, fake.fake), state, dictionary)
        else:
            raise ValueError(form)
        torch.save(ckpt, path, _use_new_zipfile_serialization=zipfile)


def _dictconfig(cfg: dict, normalize: bool, fake_modules: dict):
    """A real omegaconf DictConfig built from structured-config dataclasses, as hydra-era fairseq held it."""
    import dataclasses
    from typing import Any, Optional, Tuple

    from omegaconf import II, OmegaConf

    def dataclass_for(name: str, module: str, values: dict, interpolations: dict):
        fields = []
        for key, value in values.items():
            default = interpolations.get(key, Choices(value) if key in ENUM_FIELDS else value)
            annotation = Choices if key in ENUM_FIELDS else Tuple[float, float, float] if isinstance(value, tuple) \
                else Optional[Any] if value is None else type(value) if not isinstance(value, list) else Any
            fields.append((key, annotation, dataclasses.field(default_factory=lambda v=default: v)
                           if isinstance(default, (list, dict)) else dataclasses.field(default=default)))
        cls = dataclasses.make_dataclass(name, fields)
        cls.__module__ = module
        setattr(fake_modules[module], name, cls)
        return cls

    model = {k: v for k, v in cfg.items() if k != "_name"}
    model_cls = dataclass_for("HubertConfig", "fairseq.models.hubert.hubert", model,
                              {"label_rate": II("task.label_rate")})
    task = {k: v for k, v in task_cfg(normalize).items() if k != "_name"}
    task_cls = dataclass_for("HubertPretrainingConfig", "fairseq.tasks.hubert_pretraining", task, {})
    model_node = OmegaConf.structured(model_cls)
    task_node = OmegaConf.structured(task_cls)
    whole = fairseq_cfg({}, {})
    conf = OmegaConf.create({k: v for k, v in whole.items() if k not in ("model", "task")})
    conf.model, conf.task = model_node, task_node
    with __import__("omegaconf").open_dict(conf.model):
        conf.model._name = cfg["_name"]
    with __import__("omegaconf").open_dict(conf.task):
        conf.task._name = "hubert_pretraining"
    return conf


def reference_features(sd, cfg, wav: torch.Tensor, layer: int, normalize: bool) -> torch.Tensor:
    """fairseq HubertModel.extract_features(output_layer=layer) for one utterance, re-derived."""
    x = wav.float()
    if normalize:
        x = F.layer_norm(x, x.shape)
    x = x[None, None]
    for i, (c, _, s) in enumerate(conv_layers(cfg)):
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

"""Dense speech features: 39-dim MFCC (HuBERT's first-iteration features) and HuBERT layer activations.

An extractor has ``features(wav, sample_rate) -> (frames, dim) float32`` for one utterance and
``features_batch(wavs_16k)`` for many (same frames as one at a time), plus ``spec`` for provenance.

HuBERT loads from a fairseq checkpoint (``hubert_base_ls960.pt``, ``mhubert_base_vp_en_es_fr_it3.pt``,
HuBERT Large) without fairseq: its config is read and its weights renamed into ``transformers``'
``HubertModel``. Hugging Face folders (and hub ids, for users with internet) load directly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .. import audio
from ..checkpoints import fairseq_config, literal_arithmetic, load_pretrained, torch_load_restricted
from ..io import read_json, sha256_file
from ..sources.storage import is_hub_id
from ..tokenizers import SSL_MODELS

SAMPLE_RATE = audio.TARGET_SR
CHUNK_SAMPLES = 1_600_000  # SpeechGPT feeds long audio to HuBERT in chunks of at most 100 s
DTYPES = ("float32", "bfloat16")  # HuBERT compute precision (``--dtype``)


class Extractor(Protocol):
    dim: int
    frame_rate: float
    spec: dict

    def features(self, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray: ...

    def features_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]: ...


# ------------------------------------------------------------------------------------------------- MFCC
def deltas(x: np.ndarray, window: int = 2) -> np.ndarray:
    """Regression deltas over ±``window`` frames with edge replication (Kaldi's and torchaudio's formula)."""
    padded = np.pad(x, ((window, window), (0, 0)), mode="edge")
    n = x.shape[0]
    num = sum(k * (padded[window + k : window + k + n] - padded[window - k : window - k + n]) for k in range(1, window + 1))
    return (num / (2 * sum(k * k for k in range(1, window + 1)))).astype(np.float32)


class MFCC:
    """13 Kaldi MFCCs (25 ms window, 10 ms hop, no energy, no dither) + deltas + delta-deltas = 39 dims,
    as fairseq's ``dump_mfcc_feature.py`` computes them for HuBERT's first iteration. 100 frames/s;
    ``1 + (samples - 400) // 160`` frames (Kaldi's snip-edges framing)."""

    dim = 39
    frame_rate = 100.0

    def __init__(self):
        import kaldi_native_fbank as knf

        self._knf = knf
        opts = knf.MfccOptions()
        opts.frame_opts.samp_freq = SAMPLE_RATE
        opts.frame_opts.dither = 0.0
        opts.use_energy = False
        opts.num_ceps = 13
        self._opts = opts
        self.spec = {"features": "mfcc", "dim": self.dim, "frame_rate": self.frame_rate,
                     "options": "kaldi mfcc 13 ceps, 23 mel bins, 25ms/10ms, no energy, no dither, +d +dd"}

    def features(self, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        wav = _check_wav(wav, sample_rate, min_samples=400)
        mfcc = self._knf.OnlineMfcc(self._opts)
        mfcc.accept_waveform(SAMPLE_RATE, wav)
        mfcc.input_finished()
        ceps = np.array([mfcc.get_frame(i) for i in range(mfcc.num_frames_ready)], dtype=np.float32)
        d = deltas(ceps)
        return np.concatenate([ceps, d, deltas(d)], axis=1)

    def features_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        return [self.features(w) for w in wavs]

    def __reduce__(self):  # the Ray engine ships extractors to its actors; the Kaldi options rebuild there
        return (type(self), ())


def _check_wav(wav: np.ndarray, sample_rate: int, min_samples: int) -> np.ndarray:
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {wav.shape}")
    wav = audio.resample(wav, sample_rate)
    if wav.size < min_samples:
        raise audio.AudioError(f"audio too short: {wav.size} samples at 16 kHz, need at least {min_samples}")
    return wav


# ----------------------------------------------------------------------------------------------- HuBERT
# The self-supervised encoders read at a layer (then clustered, as HuBERT's units are), tokenizers.SSL_MODELS:
# transformers' classes, which share HuBERT's shape (convolutional front end, feature projection, encoder).


class HuBERT:
    """One layer of a ``transformers`` ``HubertModel`` (or ``Wav2Vec2Model``, ``WavLMModel``,
    ``Data2VecAudioModel``: :data:`SSL_MODELS`), truncated after that layer (later layers are never run).
    Batched frames are those of each utterance alone (fp32: within 1e-5 in tests). The convolutional front end
    runs as one padded batch on a GPU, with the group norm of HuBERT Base's first layer over each utterance's own
    frames (:func:`conv_features_batch`), and one utterance at a time on the CPU, where the padded batch was slower
    (HuBERT-Base layer 11, 16 utterances of 47 s in all, 2 threads: 6.1 s against 4.7 s in fp32, 3.1 s against
    1.7 s in bf16); on a GPU it saves a launch per layer per utterance, not measured yet. data2vec-audio is the
    exception: its positional convolutions (five layers with layer norms) carry the padding into the last frames
    of a shorter utterance (4.2 off in a test's tiny model), so it runs one utterance at a time."""

    def __init__(self, model, layer: int, normalize: bool, source: str, device: str = "cpu", dtype: str = "float32"):
        from torch import nn

        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: choose {' or '.join(DTYPES)}")

        total = len(model.encoder.layers)
        if not 1 <= layer <= total:
            raise ValueError(f"{source}: layer {layer} out of range: the model has layers 1..{total}")
        model.encoder.layers = model.encoder.layers[:layer]
        if getattr(model.config, "do_stable_layer_norm", False):  # data2vec-audio has no such option
            # Pre-LN models apply encoder.layer_norm after the last layer only; fairseq's layer-L output
            # (and SpeechGPT's units) come before it.
            model.encoder.layer_norm = nn.Identity()
        self.model = model.eval().to(device)
        self.device = device
        self.layer, self.normalize, self.dtype = layer, normalize, dtype
        self.dim = model.config.hidden_size
        self.frame_rate = SAMPLE_RATE / int(np.prod(model.config.conv_stride))
        self._receptive = _receptive_field(model.config)
        kind = model.config.model_type
        self.batched = kind != "data2vec-audio"
        self.batched_front_end: bool | None = None  # None: on a GPU (True or False to choose)
        self.spec = {"features": kind if kind in SSL_MODELS else "hubert", "source": source, "layer": layer,
                     "normalize": normalize, "dim": self.dim, "frame_rate": self.frame_rate}
        if dtype != "float32":  # float32 folders keep the spec they always had
            self.spec["dtype"] = dtype

    def __reduce__(self):
        # torch cannot pickle weight-norm parametrizations (HuBERT's positional convolution); the Ray engine
        # ships extractors to its actors, so a HuBERT travels as its config and state dict
        return (_rebuild_hubert, (self.model.config, self.model.state_dict(), self.layer, self.normalize,
                                  self.spec["source"], self.dtype))

    def to(self, device: str) -> "HuBERT":
        self.model.to(device)
        self.device = device
        return self

    def flops(self, samples: int) -> float:
        """Floating-point operations (two per multiply-add) of the forward pass on one utterance of ``samples``
        samples, as :meth:`features_batch` runs it (chunks of at most 100 s), from the config: the convolutional
        front end, the projection, the positional convolution and each kept layer's projections, attention and
        feed-forward (and WavLM's position-bias gate). Norms, activations and softmax are left out, as torch's
        ``FlopCounterMode`` counts (equal to it in a test)."""
        c = self.model.config
        total = 0.0
        for start in range(0, samples, CHUNK_SAMPLES):
            t, c_in = min(CHUNK_SAMPLES, samples - start), 1
            if t < self._receptive:
                continue
            for dim, kernel, stride in zip(c.conv_dim, c.conv_kernel, c.conv_stride):
                t = (t - kernel) // stride + 1
                total += 2 * c_in * dim * kernel * t
                c_in = dim
            d = c.hidden_size
            total += 2 * c_in * d * t  # feature projection
            # the positional convolution, over t + 1 outputs when its kernel is even (the last one is then dropped);
            # data2vec-audio has num_conv_pos_embeddings of them, each with conv_pos_kernel_size
            convs, kernel = ((c.num_conv_pos_embeddings, c.conv_pos_kernel_size) if c.model_type == "data2vec-audio"
                             else (1, c.num_conv_pos_embeddings))
            total += convs * 2 * d * (d // c.num_conv_pos_embedding_groups) * kernel * (t + 1 - kernel % 2)
            per_layer = 2 * t * (4 * d * d + 2 * d * c.intermediate_size) + 4 * t * t * d
            if c.model_type == "wavlm":  # the gate of its relative position bias: a head_dim → 8 projection per head
                per_layer += 16 * t * d
            total += len(self.model.encoder.layers) * per_layer
        return float(total)

    def features(self, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        return self.features_batch([audio.resample(np.asarray(wav, np.float32), sample_rate)])[0]

    @torch.inference_mode()
    def features_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        return self.labels_batch(wavs, None)

    @torch.inference_mode()
    def labels_batch(self, wavs: list[np.ndarray], kmeans) -> list[np.ndarray]:
        """Each utterance's frames assigned to ``kmeans``'s nearest centroids where they are made (``kmeans``
        moved to this model's GPU with ``to``): only the labels come back to the host, one copy per batch, the
        same labels as ``kmeans.assign`` of :meth:`features_batch` (extract's fused units path). ``kmeans`` None:
        the frames themselves."""
        if not self.batched:
            return [f for wav in wavs for f in self._in_precision([wav], kmeans)]
        return self._in_precision(wavs, kmeans)

    def _in_precision(self, wavs: list[np.ndarray], kmeans=None) -> list[np.ndarray]:
        if self.dtype == "float32":
            return self._features_batch(wavs, kmeans)
        # bfloat16 autocast: torch runs the matrix products and convolutions in bf16 (fast on AVX512-BF16/AMX
        # CPUs and on GPUs) and keeps the precision-sensitive ops in float32; frames come back as float32.
        with torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16):
            return self._features_batch(wavs, kmeans)

    def _features_batch(self, wavs: list[np.ndarray], kmeans=None) -> list[np.ndarray]:
        """Chunks of at most 100 s (each utterance normalised whole first) through the front end (on a GPU as one
        padded batch, sent at once from page-locked memory; on the CPU one chunk at a time), then the projection
        and the encoder as one padded batch; the frames (or with ``kmeans`` their labels) come back to the host in
        one copy."""
        pieces: list[tuple[int, torch.Tensor]] = []  # (utterance index, samples of one chunk)
        for i, wav in enumerate(wavs):
            wav = torch.from_numpy(_check_wav(wav, SAMPLE_RATE, min_samples=self._receptive))
            if self.normalize:  # the whole waveform, then chunks: as fairseq's dump_hubert_feature.py does
                wav = torch.nn.functional.layer_norm(wav, wav.shape)
            for start in range(0, wav.numel(), CHUNK_SAMPLES):
                chunk = wav[start : start + CHUNK_SAMPLES]
                if chunk.numel() >= self._receptive:  # a shorter tail yields no frame
                    pieces.append((i, chunk))
        dtype, encoder = getattr(torch, self.dtype), self.model.feature_extractor
        together = self.batched_front_end
        if together is None:  # on the CPU a padded front end was slower than one piece at a time (class docstring)
            together = torch.device(self.device).type != "cpu"
        if together:
            padded = torch.nn.utils.rnn.pad_sequence([c for _, c in pieces], batch_first=True)
            if torch.device(self.device).type == "cuda":  # page-locked host memory: an asynchronous copy
                padded = padded.pin_memory()
            padded = padded.to(self.device, non_blocking=True)
            lengths = torch.tensor([c.numel() for _, c in pieces], device=self.device)
            frames, counts = conv_features_batch(encoder, padded, lengths, dtype)
        else:
            alone = [conv_features(encoder, c.to(self.device), dtype) for _, c in pieces]
            frames = torch.nn.utils.rnn.pad_sequence(alone, batch_first=True)
            counts = torch.tensor([len(f) for f in alone], device=self.device)
        mask = torch.arange(frames.shape[1], device=self.device)[None] < counts[:, None]
        hidden = self.model.feature_projection(frames)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
        hidden = self.model.encoder(hidden, attention_mask=mask).last_hidden_state.float()
        if kmeans is not None:  # every piece's own frames in order, assigned here; their labels split on the host
            labels = kmeans.labels(hidden[mask]).cpu().numpy().astype(np.int64)
            values = np.split(labels, np.cumsum(counts.tolist())[:-1])
        else:
            values = [h[:n].numpy() for n, h in zip(counts.tolist(), hidden.cpu())]
        out: list[list[np.ndarray]] = [[] for _ in wavs]
        for (i, _), value in zip(pieces, values):
            out[i].append(value)
        return [np.concatenate(parts) for parts in out]


def conv_features(encoder, wav: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """HuBERT's convolutional front end (a ``transformers`` ``HubertFeatureEncoder``) on one waveform, as
    (frames, channels): :func:`conv_features_batch` of a batch of one."""
    frames, _ = conv_features_batch(encoder, wav[None], torch.tensor([wav.numel()], device=wav.device), dtype)
    return frames[0]


def conv_features_batch(encoder, wavs: torch.Tensor, lengths: torch.Tensor,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """HuBERT's convolutional front end on zero-padded waveforms (batch, samples) of ``lengths`` samples:
    (batch, frames, channels) and each row's frame count; a row's frames are those it gets alone, and the frames
    after its count are zeros. Each convolution is one matrix product over the unfolded windows, time-major
    throughout: the same arithmetic as the module's own forward (a test holds them to 1e-5), but on CPU
    ``Conv1d`` with one input channel or in bf16 runs far below the machine's GEMM rate, and the channel-major
    layout costs a transposition per utterance (``python -m benchmarks --only extract``). A convolution without
    padding reads only its own row's samples for every frame within the row's count, so only the group norm of
    HuBERT Base's first layer (each channel over time) needs the count: its statistics are each row's own."""
    x = wavs[..., None]  # (B, T, C_in=1)
    counts = lengths
    for layer in encoder.conv_layers:
        conv = layer.conv
        kernel, stride = conv.kernel_size[0], conv.stride[0]
        windows = x.to(dtype).unfold(1, kernel, stride).flatten(2)  # (B, T_out, C_in * k)
        x = torch.nn.functional.linear(windows, conv.weight.flatten(1), conv.bias)  # weights are (C_out, C_in * k)
        counts = (counts - kernel) // stride + 1
        norm = getattr(layer, "layer_norm", None)
        if isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == norm.num_channels:
            # HuBERT Base's first layer: each channel normalised over its row's own frames, in two passes.
            # (batch_norm's training statistics would be one call, but their sums depend on the thread count.)
            x = x.float()
            inside = (torch.arange(x.shape[1], device=x.device)[None] < counts[:, None])[..., None]  # (B, T, 1)
            n = counts[:, None, None].to(x.dtype)
            centred = x - (x * inside).sum(1, keepdim=True) / n
            spread = centred * inside
            scale = norm.weight * torch.rsqrt((spread * spread).sum(1, keepdim=True) / n + norm.eps)
            x = torch.addcmul(norm.bias, centred, scale)
        elif isinstance(norm, torch.nn.GroupNorm):  # groups of channels: each row alone, its own frames
            x = torch.nn.utils.rnn.pad_sequence(
                [norm(row[:n].T[None])[0].T for row, n in zip(x, counts.tolist())], batch_first=True)
        elif norm is not None:  # the layer-norm front end (HuBERT Large): over channels, frame by frame
            x = norm(x)
        x = layer.activation(x)
    inside = torch.arange(x.shape[1], device=x.device)[None] < counts[:, None]
    return x * inside[..., None].to(x.dtype), counts


def _rebuild_hubert(config, state: dict, layer: int, normalize: bool, source: str, dtype: str) -> HuBERT:
    import transformers

    model_class = getattr(transformers, SSL_MODELS.get(config.model_type, "HubertModel"))
    hubert = HuBERT(model_class(config), layer, normalize, source, dtype=dtype)
    hubert.model.load_state_dict(state, strict=True)
    return hubert


def _receptive_field(config) -> int:
    field = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        field = (field - 1) * stride + kernel
    return field


FAIRSEQ_CONV_LAYERS = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"  # fairseq's default, as it saves it

# fairseq HuBERT parameter names → transformers HubertModel names.
_RENAMES = [
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.", r"feature_extractor.conv_layers.\1.conv."),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.", r"feature_extractor.conv_layers.\1.layer_norm."),
    (r"^feature_extractor\.conv_layers\.0\.2\.", r"feature_extractor.conv_layers.0.layer_norm."),
    (r"^layer_norm\.", r"feature_projection.layer_norm."),
    (r"^post_extract_proj\.", r"feature_projection.projection."),
    (r"^encoder\.pos_conv\.0\.bias$", r"encoder.pos_conv_embed.conv.bias"),
    (r"^encoder\.layer_norm\.", r"encoder.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|q_proj|out_proj)\.", r"encoder.layers.\1.attention.\2."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.layers.\1.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.fc1\.", r"encoder.layers.\1.feed_forward.intermediate_dense."),
    (r"^encoder\.layers\.(\d+)\.fc2\.", r"encoder.layers.\1.feed_forward.output_dense."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.final_layer_norm."),
]
_PRETRAINING_ONLY = re.compile(r"^(final_proj|label_embs_concat|label_embs|label_embs_list|mask_emb|target_glu|w2v_encoder\.proj)\b")


def hubert_config_from_fairseq(model_cfg: dict):
    """A ``transformers.HubertConfig`` equal to a fairseq HuBERT model config."""
    from transformers import HubertConfig

    layers = literal_arithmetic(model_cfg.get("conv_feature_layers", FAIRSEQ_CONV_LAYERS), "conv_feature_layers")
    if not (isinstance(layers, (list, tuple)) and layers and all(
            isinstance(x, (list, tuple)) and len(x) == 3 and all(isinstance(v, int) and v > 0 for v in x) for x in layers)):
        raise ValueError(f"conv_feature_layers {model_cfg.get('conv_feature_layers')!r} is not a list of "
                         "(dim, kernel, stride) triples")
    mode = str(model_cfg.get("extractor_mode", "default"))
    if mode not in ("default", "layer_norm"):
        raise ValueError(f"unsupported fairseq extractor_mode {mode!r}")
    return HubertConfig(
        hidden_size=model_cfg.get("encoder_embed_dim", 768),
        num_hidden_layers=model_cfg.get("encoder_layers", 12),
        num_attention_heads=model_cfg.get("encoder_attention_heads", 12),
        intermediate_size=model_cfg.get("encoder_ffn_embed_dim", 3072),
        hidden_act=model_cfg.get("activation_fn", "gelu"),
        feat_extract_norm="group" if mode == "default" else "layer",
        conv_dim=[c for c, _, _ in layers],
        conv_kernel=[k for _, k, _ in layers],
        conv_stride=[s for _, _, s in layers],
        conv_bias=bool(model_cfg.get("conv_bias", False)),
        num_conv_pos_embeddings=model_cfg.get("conv_pos", 128),
        num_conv_pos_embedding_groups=model_cfg.get("conv_pos_groups", 16),
        do_stable_layer_norm=bool(model_cfg.get("layer_norm_first", False)),
        feat_proj_layer_norm=True,
        layer_norm_eps=1e-5,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        layerdrop=0.0, mask_time_prob=0.0,
    )


def read_fairseq_hubert(path: str | Path):
    """(transformers HubertModel, task normalize flag) from a fairseq HuBERT checkpoint, safely."""
    from transformers import HubertModel

    path = Path(path)
    ckpt = torch_load_restricted(path)
    model_cfg, task_cfg = fairseq_config(ckpt, path)
    name = str(model_cfg.get("_name") or model_cfg.get("arch") or "hubert")
    if name in ("hubert_ctc", "hubert_seq2seq") and isinstance(model_cfg.get("w2v_args"), dict):
        inner = model_cfg["w2v_args"]  # fine-tuned: the pre-trained encoder's config is nested
        model_cfg, task_cfg = inner.get("model") or model_cfg, {**(inner.get("task") or {}), **task_cfg}
        name = str(model_cfg.get("_name", "hubert"))
    if not name.startswith("hubert"):
        raise ValueError(f"{path}: a {name!r} checkpoint, not HuBERT")
    try:
        config = hubert_config_from_fairseq(model_cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    model = HubertModel(config)
    target = model.state_dict()
    g_name, v_name = (
        ("encoder.pos_conv_embed.conv.parametrizations.weight.original0", "encoder.pos_conv_embed.conv.parametrizations.weight.original1")
        if "encoder.pos_conv_embed.conv.parametrizations.weight.original0" in target
        else ("encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv_embed.conv.weight_v")
    )
    weight_norm = {"encoder.pos_conv.0.weight_g": g_name, "encoder.pos_conv.0.weight_v": v_name,
                   # fairseq on newer torch saves weight norm as a parametrization
                   "encoder.pos_conv.0.parametrizations.weight.original0": g_name,
                   "encoder.pos_conv.0.parametrizations.weight.original1": v_name}
    mapped, unknown = {}, []
    for key, tensor in ckpt["model"].items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: model weight {key!r} is a {type(tensor).__name__}, not a tensor")
        key = key.removeprefix("w2v_encoder.w2v_model.")
        if _PRETRAINING_ONLY.match(key):
            continue
        if key in weight_norm:
            mapped[weight_norm[key]] = tensor
            continue
        for pattern, repl in _RENAMES:
            if re.match(pattern, key):
                mapped[re.sub(pattern, repl, key)] = tensor
                break
        else:
            unknown.append(key)
    projection = "feature_projection.projection."
    if projection + "weight" not in mapped and config.conv_dim[-1] == config.hidden_size:
        # fairseq builds no post_extract_proj when the conv output already has the encoder's width
        mapped[projection + "weight"] = torch.eye(config.hidden_size)
        mapped[projection + "bias"] = torch.zeros(config.hidden_size)
    unknown += sorted(set(mapped) - set(target))
    missing = sorted(set(target) - set(mapped))
    if unknown or missing:
        raise ValueError(f"{path}: weights do not match a HuBERT model: unknown {unknown[:5]}, missing {missing[:5]}")
    for name, tensor in mapped.items():
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, config implies {tuple(target[name].shape)}")
    model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=True)
    return model, bool(task_cfg.get("normalize", False))


def load_hubert(path: str | Path, layer: int | None = None, device: str = "cpu", dtype: str = "float32",
                kind: str = "hubert") -> HuBERT:
    """Load HuBERT from a fairseq ``.pt``, a Hugging Face folder, or (with internet) a hub id; keep
    layers 1..``layer`` (default: all). ``kind``: another of :data:`SSL_MODELS` (a Hugging Face folder)."""
    source = str(path)
    p = Path(path)
    if kind != "hubert" and p.is_file():
        raise ValueError(f"{p}: --features {kind} reads a Hugging Face folder (fairseq .pt files are read for hubert)")
    if p.is_file():
        model, normalize = read_fairseq_hubert(p)
        source = f"fairseq:{p.name}:sha256={sha256_file(p)[:16]}"
    else:
        import transformers

        local = p.is_dir()
        if local and not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p}: not a Hugging Face model folder (no config.json)")
        if not local and not is_hub_id(source):
            raise FileNotFoundError(f"{source}: no such checkpoint file or model folder")
        if local:
            found = read_json(p / "config.json").get("model_type")
            if found != kind:
                raise ValueError(f"{p}: holds a {found!r} model, not {kind!r}"
                                 + (f"; pass --features {found}" if found in SSL_MODELS else ""))
        model = load_pretrained(getattr(transformers, SSL_MODELS[kind]), source, f"{kind} model", local)
        normalize = _hf_normalize(p) if local else False
        source = f"hf:{source}"
    total = model.config.num_hidden_layers
    if layer is not None and not 1 <= layer <= total:
        raise ValueError(f"{path}: layer {layer} out of range: the model has layers 1..{total}")
    return HuBERT(model, layer or total, normalize, source, device=device, dtype=dtype)


def _hf_normalize(folder: Path) -> bool:
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        return bool(read_json(pre, dict, f"; {folder} is not a transformers model folder as saved").get("do_normalize", False))
    return False

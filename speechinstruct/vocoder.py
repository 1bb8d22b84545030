"""Units back to speech: fairseq's unit HiFi-GAN (``CodeHiFiGANVocoder``), as SpeechGPT's release uses it,
loaded without fairseq.

A vocoder as fairseq and speech-resynthesis ship it is a generator checkpoint (``g_00500000``: a torch pickle
``{"generator": state_dict}``, weight-normed convolutions saved as ``weight_g``/``weight_v``) and a
``config.json`` beside it (``upsample_rates``, ``upsample_kernel_sizes``, ``upsample_initial_channel``,
``resblock_kernel_sizes``, ``resblock_dilation_sizes``, ``num_embeddings``, ``embedding_dim``,
``model_in_dim``, ``sampling_rate``, and ``dur_predictor_params`` for a vocoder trained with a duration
predictor). The checkpoint is read with the same restricted unpickler as HuBERT checkpoints; the network is
``transformers``' SeamlessM4T unit HiFi-GAN (``SeamlessM4THifiGan``, ``SeamlessM4TVariancePredictor``), which
is fairseq's generator and duration predictor layer for layer, with the weight norms folded into the weights
as fairseq's ``remove_weight_norm`` does at load time.

As fairseq's ``CodeHiFiGANVocoder.forward(x, dur_prediction=True)``: units are embedded, each unit's frame
count is ``max(1, round(exp(log_duration) - 1))`` from the duration predictor, the embeddings are repeated
that many times and the generator turns them into 16 kHz samples. A vocoder without a duration predictor
takes frame-rate units (one unit per 20 ms frame, repeats kept).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from .checkpoints import torch_load_restricted
from .io import sha256_file

GENERATOR_FILES = ("g_00500000", "generator.pt", "model.pt")
REQUIRED = ("upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel", "resblock_kernel_sizes",
            "resblock_dilation_sizes", "num_embeddings", "embedding_dim")

# fairseq CodeGenerator parameter names → ours (``embedding``, ``dur_predictor``, ``hifi_gan`` = transformers')
_RENAMES = [
    (r"^dict\.", "embedding."),
    (r"^dur_predictor\.conv([12])\.0\.", r"dur_predictor.conv\1."),
    (r"^dur_predictor\.(ln1|ln2|proj)\.", r"dur_predictor.\1."),
    (r"^ups\.", "hifi_gan.upsampler."),
    (r"^(conv_pre|conv_post|resblocks)\.", r"hifi_gan.\1."),
]


class UnitVocoder(torch.nn.Module):
    """Units → 16 kHz mono float32 samples (``synthesize``). ``dur_prediction``: takes deduplicated units and
    predicts each one's duration; otherwise one unit per frame."""

    def __init__(self, config: dict, source: str = ""):
        super().__init__()
        from transformers import SeamlessM4TConfig
        from transformers.models.seamless_m4t.modeling_seamless_m4t import (SeamlessM4THifiGan,
                                                                            SeamlessM4TVariancePredictor)

        self.config, self.source = config, source
        self.k = int(config["num_embeddings"])
        self.sample_rate = int(config.get("sampling_rate", 16000))
        self.hop = int(np.prod(config["upsample_rates"]))
        dur = config.get("dur_predictor_params") or None
        self.dur_prediction = dur is not None
        embed = int(config["embedding_dim"])
        hf = SeamlessM4TConfig(
            unit_embed_dim=embed, lang_embed_dim=0, spkr_embed_dim=0, leaky_relu_slope=0.1,
            upsample_initial_channel=int(config["upsample_initial_channel"]),
            upsample_rates=list(config["upsample_rates"]), upsample_kernel_sizes=list(config["upsample_kernel_sizes"]),
            resblock_kernel_sizes=list(config["resblock_kernel_sizes"]),
            resblock_dilation_sizes=[list(d) for d in config["resblock_dilation_sizes"]],
            variance_predictor_kernel_size=int(dur["var_pred_kernel_size"]) if dur else 3,
            var_pred_dropout=float(dur.get("var_pred_dropout", 0.5)) if dur else 0.5)
        self.embedding = torch.nn.Embedding(self.k, embed)
        self.dur_predictor = SeamlessM4TVariancePredictor(hf) if dur else None
        self.hifi_gan = SeamlessM4THifiGan(hf)
        self.eval()

    @torch.inference_mode()
    def synthesize(self, units) -> np.ndarray:
        codes = torch.as_tensor(np.asarray(units, dtype=np.int64)).view(1, -1)
        if codes.numel() == 0:
            raise ValueError(f"{self.source}: no units to synthesize")
        if int(codes.min()) < 0 or int(codes.max()) >= self.k:
            bad = int(codes.max()) if int(codes.max()) >= self.k else int(codes.min())
            raise ValueError(f"{self.source}: unit {bad} is outside this vocoder's vocabulary 0..{self.k - 1} "
                             "(units and vocoder come from different k-means)")
        x = self.embedding(codes).transpose(1, 2)  # (1, C, T)
        if self.dur_predictor is not None:
            log_duration = self.dur_predictor(x.transpose(1, 2))
            frames = torch.clamp(torch.round(torch.exp(log_duration) - 1).long(), min=1)  # fairseq's formula
            x = torch.repeat_interleave(x, frames.view(-1), dim=2)
        return self.hifi_gan(x).view(-1).float().numpy()


def _folded(state: dict, name: str) -> torch.Tensor | None:
    """The weight of ``name`` (a prefix), folding a weight norm saved either way: ``weight_g``/``weight_v``
    (``torch.nn.utils.weight_norm``, what fairseq uses) or ``parametrizations.weight.original0/1``."""
    for g, v in ((f"{name}.weight_g", f"{name}.weight_v"),
                 (f"{name}.parametrizations.weight.original0", f"{name}.parametrizations.weight.original1")):
        if g in state and v in state:
            return torch._weight_norm(state.pop(v).float(), state.pop(g).float(), 0)
    return None


def read_config(folder: Path, checkpoint: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no config.json beside the vocoder checkpoint")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a vocoder config (a JSON object)")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{path}: not a unit HiFi-GAN config (missing {', '.join(missing)})")
    if str(config.get("resblock", "1")) != "1":
        raise ValueError(f"{path}: resblock {config['resblock']!r} is not supported (fairseq's generator has type 1 only)")
    for key in ("multispkr", "f0", "embedder_params"):
        if config.get(key):
            raise ValueError(f"{path}: {key} vocoders (speaker or pitch conditioned) are not supported")
    dur = config.get("dur_predictor_params")
    if dur and int(dur.get("var_pred_hidden_dim", config["embedding_dim"])) != int(config["embedding_dim"]):
        raise ValueError(f"{path}: duration predictor width {dur['var_pred_hidden_dim']} differs from embedding_dim "
                         f"{config['embedding_dim']}: not supported")
    if int(config.get("model_in_dim", config["embedding_dim"])) != int(config["embedding_dim"]):
        raise ValueError(f"{path}: model_in_dim differs from embedding_dim (a conditioned vocoder): not supported")
    return config


def load_vocoder(path: str | Path) -> UnitVocoder:
    """A unit HiFi-GAN from a generator checkpoint (``g_00500000``) or its folder, with ``config.json`` beside it."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in GENERATOR_FILES if (path / n).is_file()] or sorted(path.glob("g_*"))
        if not found:
            raise FileNotFoundError(f"{path}: no generator checkpoint ({', '.join(GENERATOR_FILES)} or g_*) in the folder")
        checkpoint = found[-1]
    elif path.is_file():
        checkpoint = path
    else:
        raise FileNotFoundError(f"{path}: no such vocoder checkpoint or folder")
    config = read_config(checkpoint.parent, checkpoint)
    ckpt = torch_load_restricted(checkpoint)
    state = ckpt.get("generator") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{checkpoint}: not a unit HiFi-GAN generator checkpoint (no 'generator' weights)")
    if not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{checkpoint}: the generator weights are not all tensors")
    state = dict(state)
    vocoder = UnitVocoder(config, source=f"{checkpoint.name}:sha256={sha256_file(checkpoint)[:16]}")
    target = vocoder.state_dict()
    for name in sorted({k.rsplit(".", 1)[0] for k in state if k.endswith((".weight_g", ".original0"))}):
        weight = _folded(state, name.removesuffix(".parametrizations.weight"))
        if weight is not None:
            state[name.removesuffix(".parametrizations.weight") + ".weight"] = weight
    mapped, unknown = {}, []
    for key, tensor in state.items():
        for pattern, repl in _RENAMES:
            if re.match(pattern, key):
                mapped[re.sub(pattern, repl, key)] = tensor.float()
                break
        else:
            unknown.append(key)
    unknown += sorted(set(mapped) - set(target))
    missing = sorted(set(target) - set(mapped))
    if unknown or missing:
        raise ValueError(f"{checkpoint}: weights do not match the unit HiFi-GAN its config.json describes: "
                         f"unknown {unknown[:4]}, missing {missing[:4]}")
    for name, tensor in mapped.items():
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise ValueError(f"{checkpoint}: {name} has shape {tuple(tensor.shape)}, config.json implies "
                             f"{tuple(target[name].shape)}")
    vocoder.load_state_dict(mapped, strict=True)
    return vocoder


# ------------------------------------------------------------------------------------------ resynthesis
def _record_units(row: dict, columns: set[str], frame_rate_units: bool) -> tuple[str, list[int]] | None:
    """(kind, units) of one record, or None when it has no speech to say. ``frame_rate_units``: one unit per
    frame (repeats restored from ``durations``), for a vocoder without a duration predictor."""
    if "durations" in columns:  # a quantize / extract --kmeans units folder
        units = row["units"] or []
        return ("utterance", list(np.repeat(units, row["durations"])) if frame_rate_units else list(units)) if units else None
    if frame_rate_units:
        raise ValueError("dataset records hold deduplicated units; this vocoder has no duration predictor and needs "
                         "one unit per frame: resynthesise a units folder (quantize output) instead")
    if "response_units" in columns:  # chain of modality: the spoken answer ([ua])
        return ("chain_of_modality [ua] answer", list(row["response_units"])) if row.get("response_units") else None
    if "task" in columns:  # cross-modal: the speech of the ASR input or the TTS target
        return (f"cross_modal {row['task']}", list(row["units"])) if row.get("units") else None
    if "units" in columns:  # pretrain lines
        return ("pretrain", list(row["units"])) if row.get("units") else None
    return None


def resynthesize(source: str | Path, out: str | Path, vocoder: UnitVocoder, limit: int | None = None,
                 quiet: bool = False) -> dict:
    """Speak the unit records under ``source`` (a units folder, a compose folder or a published dataset:
    every ``*.parquet`` below it) into ``OUT/NNNNN.wav``, with ``OUT/manifest.jsonl`` naming each file's
    record, kind, source file and units. ``limit``: at most that many wavs."""
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from . import audio
    from .io import write_text

    source, out = Path(source), Path(out)
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{source}: no unit records (*.parquet) to resynthesise")
    entries, skipped = [], 0
    bar = tqdm(total=limit, desc=f"resynth {out.name}", unit="wav", disable=quiet)
    for path in files:
        table = pq.ParquetFile(path)
        columns = set(table.schema_arrow.names)
        if not columns & {"units", "response_units"}:
            continue
        for batch in table.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                if limit is not None and len(entries) >= limit:
                    break
                found = _record_units(row, columns, frame_rate_units=not vocoder.dur_prediction)
                if found is None:
                    skipped += 1
                    continue
                kind, units = found
                try:
                    wav = vocoder.synthesize(units)
                except ValueError as e:
                    raise ValueError(f"{path}: record {row.get('id')}: {e}") from None
                name = f"{len(entries):05d}.wav"
                audio.write_wav(out / name, wav, vocoder.sample_rate)
                entries.append({"file": name, "id": row.get("id"), "kind": kind, "source": str(path.relative_to(source))
                                if source.is_dir() else path.name, "units": len(units),
                                "seconds": round(wav.size / vocoder.sample_rate, 3)})
                bar.update()
    bar.close()
    if not entries:
        raise ValueError(f"{source}: no records with units found (expected units, cross-modal, chain-of-modality "
                         "or pretrain records)")
    write_text(out / "manifest.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    return {"wavs": len(entries), "skipped_without_units": skipped, "seconds": round(sum(e["seconds"] for e in entries), 3),
            "vocoder": vocoder.source, "kinds": sorted({e["kind"] for e in entries})}

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

from ..checkpoints import torch_load_restricted
from ..io import sha256_file

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


class OneUnitPerFrame:
    """The face a vocoder of k-means units shares with a codec (which is the vocoder of its own units): ``fit``
    and ``keep`` set a codec to the units it is given; a k-means vocoder has one codebook and nothing to set."""

    def fit(self, vocabulary) -> "OneUnitPerFrame":
        return self

    def keep(self, codebooks: int) -> "OneUnitPerFrame":
        if codebooks != 1:
            raise ValueError(f"{self.source}: --codebooks {codebooks} is for a codec; this vocoder speaks k-means "
                             "units, one codebook")
        return self


class UnitVocoder(OneUnitPerFrame, torch.nn.Module):
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
        self.needs_durations = not self.dur_prediction  # one unit per frame: deduplicated records will not do
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

    is_preview = False

    @torch.inference_mode()
    def synthesize(self, units, durations=None) -> np.ndarray:
        """16 kHz samples of ``units``. Without a duration predictor, ``durations`` (frames per unit) expand
        deduplicated units back to one unit per frame; with one, they are ignored, as fairseq predicts them."""
        units = _checked_units(units, self.k, self.source)
        if durations is not None and self.dur_predictor is None:
            units = np.repeat(units, np.asarray(durations, dtype=np.int64))
        codes = torch.as_tensor(units).view(1, -1)
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


def default_vocoder(source: str | Path):
    """What voices ``source``'s units when no vocoder is given: the codec that made codec units
    (:func:`codecs.codec_of`); for MFCC k-means units, the :class:`PreviewVocoder` of the k-means that made them,
    where their spec names it (a units folder's ``units.json``, or a compose folder's units folders': the path the
    stage was given, so a relative one is read from here) and only when its digest is the one recorded. None
    otherwise: a HiFi-GAN must be named, and a published dataset names its k-means file only (no local path)."""
    from ..shardfiles import composed_units_dirs, read_units_spec
    from .codecs import codec_of
    from .kmeans import load_kmeans

    codec = codec_of(source)
    if codec is not None:
        return codec
    folders = [Path(source), *composed_units_dirs(source)] if Path(source).is_dir() else []
    for spec in [read_units_spec(folder) or {} for folder in folders]:
        features, kmeans = spec.get("features"), spec.get("kmeans")
        path = kmeans.get("source") if isinstance(kmeans, dict) else None
        if features != "mfcc" or not isinstance(path, str) or not Path(path).exists():
            continue
        try:
            found = load_kmeans(path)
        except (OSError, ValueError):
            continue
        if found.meta.get("sha256") == kmeans.get("sha256") and found.dim == 39:
            return PreviewVocoder(found)
    return None


def load_vocoder(path: str | Path) -> UnitVocoder | PreviewVocoder:
    """A unit HiFi-GAN from a generator checkpoint (``g_00500000``) or its folder, with ``config.json`` beside it;
    or, for a ``speechinstruct cluster`` folder of MFCC units, the embedded :class:`PreviewVocoder`."""
    from .codecs import codec_kind, load_codec

    path = Path(path)
    if path.is_dir() and (path / "centroids.npy").is_file():
        from .kmeans import load_kmeans

        return PreviewVocoder(load_kmeans(path))
    kind = codec_kind(path) if path.is_dir() else None
    if kind:  # codec units decode with the codec itself
        return load_codec(kind, str(path))
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


# -------------------------------------------------------------------------------- the embedded preview
class PreviewVocoder(OneUnitPerFrame):
    """A PREVIEW for MFCC units, not SpeechGPT's vocoder: each unit becomes its k-means centroid's 13 Kaldi
    cepstra, which are un-liftered and inverse-DCT'd back to 23 log mel energies (exactly inverting Kaldi's
    DCT-II and lifter), turned into a linear spectrum (NNLS) and a waveform (Griffin-Lim) by librosa, with
    Kaldi's pre-emphasis undone. It needs no weights, so the demo has something to listen to; it sounds
    buzzy and flat (a centroid is an average, and phase is guessed). Deduplicated units are held for
    ``frames_per_unit`` 10 ms frames each; frame-rate units with their ``durations`` keep their timing."""

    is_preview = True
    needs_durations = False  # deduplicated units are held frames_per_unit frames each

    def __init__(self, kmeans, frames_per_unit: float = 2.5, n_iter: int = 32):
        from scipy.fft import idct

        spec = kmeans.meta.get("features") or {}
        if spec.get("features") != "mfcc" or kmeans.dim != 39:
            raise ValueError(f"{kmeans.source}: the preview vocoder needs a k-means of MFCC features (39 dims); "
                             f"this one is of {spec.get('features') or 'unknown'} features ({kmeans.dim} dims): "
                             "use a unit HiFi-GAN (--vocoder g_00500000) for HuBERT units")
        self.k, self.sample_rate, self.frames_per_unit, self.n_iter = kmeans.k, 16000, frames_per_unit, n_iter
        self.source = f"preview (MFCC centroids -> Griffin-Lim) of {Path(kmeans.source).name}"
        ceps = kmeans.centroids[:, :13].astype(np.float64)
        lifter = 1.0 + 11.0 * np.sin(np.pi * np.arange(13) / 22.0)  # Kaldi's cepstral_lifter = 22
        log_mel = idct(ceps / lifter, type=2, n=23, norm="ortho", axis=1)  # Kaldi's DCT is the orthonormal DCT-II
        self._mel_power = np.exp(np.clip(log_mel, -30.0, 30.0))  # (k, 23)

    def synthesize(self, units, durations=None) -> np.ndarray:
        import librosa
        from scipy.signal import lfilter

        units = _checked_units(units, self.k, self.source)
        if durations is None:  # spread the fixed rate evenly: 2.5 frames per unit = 2, 3, 2, 3, ...
            edges = np.round(np.arange(units.size + 1) * self.frames_per_unit).astype(np.int64)
            durations = np.maximum(np.diff(edges), 1)
        frames = np.repeat(units, np.asarray(durations, dtype=np.int64))
        mel = self._mel_power[np.append(frames, frames[-1])].T  # n + 1 centred frames span exactly n * 10 ms
        magnitude = librosa.feature.inverse.mel_to_stft(  # Kaldi's mel scale, 20 Hz to Nyquist, unnormalised
            mel, sr=16000, n_fft=512, power=2.0, htk=True, fmin=20.0, fmax=8000.0, norm=None)
        wav = librosa.griffinlim(magnitude, n_iter=self.n_iter, hop_length=160, win_length=400, random_state=0)
        wav = lfilter([1.0], [1.0, -0.97], wav)  # undo Kaldi's pre-emphasis
        peak = float(np.abs(wav).max()) or 1.0
        return (0.9 * wav / peak).astype(np.float32)


def _checked_units(units, k: int, source: str) -> np.ndarray:
    codes = np.asarray(units, dtype=np.int64).reshape(-1)
    if codes.size == 0:
        raise ValueError(f"{source}: no units to synthesize")
    if codes.min() < 0 or codes.max() >= k:
        bad = int(codes.max()) if codes.max() >= k else int(codes.min())
        raise ValueError(f"{source}: unit {bad} is outside this vocoder's vocabulary 0..{k - 1} "
                         "(units and vocoder come from different k-means)")
    return codes


def mel_cepstral_distortion(reference: str | Path, synthesized: str | Path) -> float:
    """Mean mel-cepstral distance (dB) between two wav files, as Kubichek (1993) defines it, computed by the
    ``mel-cepstral-distance`` package with its defaults: both files peak-normalised, 32 ms Hann windows every
    8 ms, 20 mel bands, cepstra 1..15 (c0, loudness, left out), frames aligned by DTW. Lower is closer. Its
    scale is this method's own: do not compare it with SPTK/WORLD mel-cepstrum MCDs in papers."""
    from mel_cepstral_distance import compare_audio_files

    mcd, _penalty = compare_audio_files(Path(reference), Path(synthesized))
    return float(mcd)


# ------------------------------------------------------------------------------------------ resynthesis
def _record_units(row: dict, columns: set[str], needs_durations: bool) -> tuple[str, list[int], list[int] | None] | None:
    """(kind, deduplicated units, their durations or None) of one record, or None when it has no speech to
    say. ``needs_durations``: the vocoder needs one unit per frame, which only a units folder can give."""
    if "durations" in columns:  # a quantize / extract --kmeans units folder
        return ("utterance", list(row["units"]), list(row["durations"])) if row["units"] else None
    if needs_durations:
        raise ValueError("dataset records hold deduplicated units; this vocoder has no duration predictor and needs "
                         "one unit per frame: resynthesise a units folder (quantize output) instead")
    if "response_units" in columns:  # chain of modality: the spoken answer ([ua])
        return ("chain_of_modality [ua] answer", list(row["response_units"]), None) if row.get("response_units") else None
    if "task" in columns:  # cross-modal: the speech of the ASR input or the TTS target
        return (f"cross_modal {row['task']}", list(row["units"]), None) if row.get("units") else None
    if "units" in columns:  # pretrain lines
        return ("pretrain", list(row["units"]), None) if row.get("units") else None
    return None


def _unit_records(files: list[Path], needs_durations: bool):
    """(file, row, (kind, units, durations) or None) for every row of the unit-holding files, in order."""
    import pyarrow.parquet as pq

    for path in files:
        table = pq.ParquetFile(path)
        columns = set(table.schema_arrow.names)
        if not columns & {"units", "response_units"}:
            continue
        for batch in table.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield path, row, _record_units(row, columns, needs_durations)


_WAV_NAME = re.compile(r"\d{5}\.wav")  # resynth's files: NNNNN.wav and manifest.jsonl (io.claim_outputs)


def _claim(out: Path) -> None:
    """Refuse (one line) when ``out`` holds a NNNNN.wav or manifest.jsonl that resynth did not write; else claim them.
    A folder an earlier version wrote (its manifest.jsonl's lines name file, id, kind and source) is resynth's."""
    from ..io import claim_outputs, wrote_before

    claim_outputs(out, "resynth", r"\d{5}\.wav|manifest\.jsonl",
                  wrote_before(out / "manifest.jsonl", {"file", "id", "kind", "source"}))


def record_files(source: Path) -> list[Path]:
    """The Parquet files of unit records under ``source`` (or ``source`` itself), or one line when there are none."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{source}: no unit records (*.parquet) to resynthesise")
    return files


def resynthesize(source: str | Path, out: str | Path, vocoder: UnitVocoder | PreviewVocoder, limit: int | None = None) -> dict:
    """Speak the unit records under ``source`` (a units folder, a compose folder or a published dataset:
    every ``*.parquet`` below it) into ``OUT/NNNNN.wav``, with ``OUT/manifest.jsonl`` naming each file's
    record, kind, source file and units. ``limit``: at most that many wavs (reading stops there). A NNNNN.wav
    or manifest.jsonl in ``OUT`` that resynth did not write stops it before anything is written (:func:`_claim`);
    its own earlier wavs that this run does not write again are deleted."""
    from .. import audio
    from ..io import write_text
    from ..progress import progress

    source, out = Path(source), Path(out)
    files = record_files(source)
    _claim(out)
    entries, skipped = [], 0
    bar = progress(total=limit, desc=f"resynth {out.name}", unit="wav")
    for path, row, found in _unit_records(files, vocoder.needs_durations):
        if found is None:
            skipped += 1
            continue
        kind, units, durations = found
        try:
            wav = vocoder.synthesize(units, durations)
        except ValueError as e:
            raise ValueError(f"{path}: record {row.get('id')}: {e}") from None
        name = f"{len(entries):05d}.wav"
        audio.write_wav(out / name, wav, vocoder.sample_rate)
        entries.append({"file": name, "id": row.get("id"), "kind": kind, "source": str(path.relative_to(source))
                        if source.is_dir() else path.name, "units": len(units),
                        "seconds": round(wav.size / vocoder.sample_rate, 3)})
        bar.update()
        if limit is not None and len(entries) >= limit:
            break
    bar.close()
    if not entries:
        raise ValueError(f"{source}: no records with units found (expected units, cross-modal, chain-of-modality "
                         "or pretrain records)")
    write_text(out / "manifest.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    written = {e["file"] for e in entries}
    for stale in out.iterdir():  # an earlier run's wavs beyond this one's (resynth's own: see _claim)
        if _WAV_NAME.fullmatch(stale.name) and stale.name not in written:
            stale.unlink()
    return {"wavs": len(entries), "skipped_without_units": skipped, "seconds": round(sum(e["seconds"] for e in entries), 3),
            "vocoder": vocoder.source, "kinds": sorted({e["kind"] for e in entries})}

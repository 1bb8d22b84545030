"""Neural audio codecs as speech tokenizers: transformers' ``MimiModel``, ``EncodecModel``, ``DacModel``,
``XcodecModel`` (X-Codec: acoustic and semantic, 16 kHz) and ``Xcodec2Model`` (XCodec2: one FSQ codebook of
65,536 codes at 50 Hz, 16 kHz).

A codec is dense model and quantizer in one: its codes are the units, with no k-means stage. A codec frame
has ``codebooks`` codes (residual vector quantization: codebook 0 first); the units of an utterance are its
codes frame-major, codebook ``q``'s code ``c`` written as ``q * codebook_size + c``::

    frame 0: q0 q1 … q(Q-1), frame 1: q0 q1 …   →   one vocabulary of codebooks × codebook_size tokens

so the unit text stays ``<sosp><..><..><eosp>``. Codec units are never deduplicated: the decoder needs every
frame. Audio is decoded straight to the codec's own sample rate (Mimi and EnCodec-24k: 24 kHz, DAC-16k:
16 kHz, DAC-44k: 44.1 kHz).

The codes of an utterance are the model's own ``encode`` of that utterance alone. A causal codec (Mimi, EnCodec-24k:
every layer reads only the past) is fed each utterance padded with zeros to a whole number of frames; then no
frame of an utterance reads anything after its end (an unpadded utterance's last frame reads the model's own
right padding, which a batch replaces with the next utterance's padding) and a zero-padded batch gives every
utterance the codes it gets alone, up to float rounding; except where EnCodec's reflect padding on the left is
longer than an utterance (under seven frames, with its default last kernel of 7): alone it reflects zeros
appended first, so its batch sets what lies past each utterance to zero before each convolution
(:func:`each_row_alone`; a one-frame utterance's codes differed in 5 of 6 codebooks before). The units of a causal codec are therefore encoded in
batches on a GPU (the extract stage's, sorted by length), cut back to each utterance's own frames; the frame count
is the same as unpadded (one per started frame), and only a last frame can differ from an encode of the unpadded
audio.

DAC reads the future (symmetric convolutions, zero-padded at both ends), so a plain padded batch changes an
utterance's last frames; its batch sets the activations past each utterance's own length to zero before every
convolution, which is what each convolution reads there when the utterance is alone, and then every code is the
utterance's own (the tests' tiny DAC: all equal). X-Codec (a HuBERT or WavLM beside DAC's encoder) and XCodec2
(Wav2Vec2-BERT beside an encoder of convolutions and anti-aliased activations) attend over the whole clip, and
their ``encode`` takes no padding mask: a plain padded batch changes every frame. Their batches run the steps of
``encode`` here instead: the semantic model with its padding masked (X-Codec's HuBERT as extract batches it, with
the first group norm over each utterance's own frames), and the convolutional parts with the activations past each
utterance's own length set to what each convolution reads there alone (zeros; the last value before XCodec2's
anti-aliasing filters, which pad by repeating the edge). Each utterance's codes are then its own (the tests' tiny
models: all equal, the embeddings before the quantizer within 2e-6), with the model's ``encode`` held to them in
a test as transformers changes.

On the CPU a batch was slower than one utterance at a time (default-config Mimi 0.56x, EnCodec-24k 0.46-0.55x:
eight 3-s utterances, 2 threads, random weights; DAC 0.31x, eight of 1-4 s), so there every codec goes one
utterance at a time (the same codes, up to float rounding). A padded
batch of 32 ran Mimi at 9.6x one at a time on an H200 (``../shared/gpu-check``: transformers' encode, not yet
this code).

Measured on the tests' tiny random models (CPU, 2 threads, twelve utterances of 0.4-3 s): Mimi's batched codes
equal its one-at-a-time codes, all of them; EnCodec's 99.1 % of them, every difference in an inner frame, where a
code is a near tie: scaling the input by 1 + 1e-6 (below 16-bit audio's resolution) flips 1.1 % of that model's
codes alone. Padding to whole frames is in ``units.json`` (``padding``), so a folder of older unpadded units is
not extended with these.

A tokenizer outside transformers (SpeechTokenizer, CosyVoice's S3 tokenizer) is another class with the same
face: ``sample_rate``, ``frame_rate``, ``vocabulary()``, ``units(wav)``, ``units_batch(wavs)``, ``speech(units)``.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..checkpoints import load_pretrained
from ..io import sha256_file
from ..shardfiles import Vocabulary
from ..tokenizers import CODECS  # noqa: F401 (re-exported: the codec kinds)
from .kmeans import Encoded


class Codec:
    """One codec model, ``codebooks`` of its codebooks kept (default: all). It is also the vocoder of its own
    units (``synthesize``, as ``vocoder.UnitVocoder`` has it): resynth, the report and chat decode with it."""

    dim = None  # units come out directly; there are no features to store
    needs_durations = False  # a vocoder face: every frame is in the units
    is_preview = False

    def __init__(self, kind: str, model, source: str, codebooks: int | None = None, sha256: str | None = None,
                 device: str = "cpu", checkpoint: str | None = None):
        import torch

        self.kind, self.model, self.source, self.sha256 = kind, model.eval().to(device), source, sha256
        self.device = device
        cfg = model.config
        self.sample_rate = int(cfg.sample_rate if kind == "xcodec" else cfg.sampling_rate)
        if kind == "xcodec2":  # one finite-scalar codebook: the product of its levels
            self.hop, total = int(cfg.hop_length), 1
            self.frame_rate = self.sample_rate / self.hop
            self.codebook_size = int(np.prod(cfg.quantization_levels))
        elif kind == "xcodec":
            self.frame_rate, self.hop = float(cfg.frame_rate), int(cfg.hop_length)
            total = int(model.quantizer.get_num_quantizers_for_bandwidth(max(cfg.target_bandwidths)))
        elif kind == "mimi":
            self.frame_rate, total = float(cfg.frame_rate), int(cfg.num_quantizers)
            self.hop = int(round(self.sample_rate / self.frame_rate))
        elif kind == "encodec":
            self.frame_rate = float(cfg.frame_rate)
            total = int(model.quantizer.get_num_quantizers_for_bandwidth(max(cfg.target_bandwidths)))
            self.hop = int(np.prod(cfg.upsampling_ratios))
        else:  # dac
            self.hop = int(cfg.hop_length)
            self.frame_rate, total = self.sample_rate / self.hop, int(cfg.n_codebooks)
        if kind != "xcodec2":
            self.codebook_size = int(cfg.codebook_size)
        self.total = total
        # causal end to end (no chunking with overlaps): batched codes are each utterance's own (module docstring)
        self.causal = (kind in ("mimi", "encodec") and bool(getattr(cfg, "use_causal_conv", False))
                       and not getattr(cfg, "chunk_length_s", None))
        self.spec = {"features": kind, "source": source, "frame_rate": self.frame_rate, "sample_rate": self.sample_rate}
        if self.causal:
            self.spec["padding"] = "whole frames"
        # the codecs whose batched codes are each utterance's own (module docstring); X-Codec's semantic model is
        # batched as extract batches it, which data2vec-audio's positional convolutions rule out
        self.batches = (self.causal or kind in ("dac", "xcodec2")
                        or (kind == "xcodec" and cfg.semantic_model_config.model_type != "data2vec-audio"))
        self.keep(codebooks or total)
        if checkpoint:  # where to load it again to decode this folder's units (publish leaves it out)
            self.spec["checkpoint"] = checkpoint
        self._torch = torch

    def keep(self, codebooks: int) -> "Codec":
        """Use the first ``codebooks`` codebooks (residual quantization: the coarsest first)."""
        if not 1 <= codebooks <= self.total:
            raise ValueError(f"{self.source}: --codebooks {codebooks}: this {self.kind} model has {self.total} codebooks")
        self.codebooks = codebooks
        self.offsets = np.arange(codebooks, dtype=np.int64) * self.codebook_size
        self.spec["codebooks"] = codebooks
        return self

    def fit(self, vocabulary) -> "Codec":
        """This codec set to decode units of ``vocabulary`` (a folder's record); one line when they are another
        tokenizer's."""
        if vocabulary is None:
            return self
        if vocabulary.tokenizer != self.kind or vocabulary.codebook_size != self.codebook_size:
            raise ValueError(f"{self.source}: a {self.kind} codec with codebooks of {self.codebook_size} cannot decode "
                             f"{vocabulary.tokenizer} units of {vocabulary.codebook_size}")
        return self.keep(vocabulary.codebooks)

    # the faces the extract stage and the Ray engine use
    @property
    def k(self) -> int:
        return self.codebooks * self.codebook_size

    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self.kind, self.k, codebooks=self.codebooks, codebook_size=self.codebook_size,
                          frame_rate=self.frame_rate, sample_rate=self.sample_rate, features=self.kind,
                          sha256=self.sha256)

    def to(self, device: str) -> "Codec":
        self.model.to(device)
        self.device = device
        return self

    # --------------------------------------------------------------------------------------- encoding
    def codes(self, wav: np.ndarray) -> np.ndarray:
        """(codebooks, frames) codes of one utterance at :attr:`sample_rate`, as the model's ``encode`` gives them
        (a causal codec's of the utterance padded with zeros to whole frames)."""
        return self.codes_batch([wav])[0]

    def codes_batch(self, wavs: list[np.ndarray], batched: bool | None = None) -> list[np.ndarray]:
        """(codebooks, frames) codes of each utterance: on a GPU in one zero-padded batch, each cut to its own
        frames; on the CPU one utterance at a time (module docstring). ``batched``: True or False to choose (the
        codes are the same either way)."""
        for wav in wavs:
            if wav.size < self.hop:
                raise ValueError(f"{wav.size} samples: shorter than one {self.kind} frame ({self.hop} samples at "
                                 f"{self.sample_rate} Hz)")
        if batched is None:
            batched = str(self.device) != "cpu"
        if not self.batches or not batched or not wavs:
            return [self._encode(self._padded(w)[None])[0] for w in wavs]
        if self.kind in ("xcodec", "xcodec2"):
            return getattr(self, f"_{self.kind}_batch")(wavs)
        if self.kind != "mimi":  # DAC and EnCodec pad inside their convolutions
            return self._padding_batch(wavs)
        frames = [-(-w.size // self.hop) for w in wavs]  # Mimi pads with zeros before reading only the past
        codes = self._encode(_zero_padded(wavs, max(frames) * self.hop))
        return [c[:, :n] for c, n in zip(codes, frames)]

    def _padding_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """DAC's and EnCodec's codes of a zero-padded batch, each utterance's its own: before each of their
        convolutions the activations past an utterance's own length (the length it has there when encoded alone;
        EnCodec's utterances padded to whole frames) are set to zero (:func:`each_row_alone`), which is what that
        convolution reads there alone: DAC pads with zeros on both sides, and EnCodec's reflect padding of an
        utterance shorter than it reflects zeros appended first."""
        lengths = [-(-w.size // self.hop) * self.hop if self.causal else w.size for w in wavs]
        batch = _zero_padded(wavs, max(lengths))
        with each_row_alone(self.model.encoder, self._torch.tensor(lengths)) as own:
            codes = self._encode(batch)
        return [c[:, :n] for c, n in zip(codes, own(codes.shape[-1]).tolist())]

    def _xcodec_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """X-Codec's ``encode`` on a zero-padded batch, each utterance's codes its own: the semantic model (a HuBERT
        or WavLM, every layer's output averaged) as extract batches it (:func:`features.conv_features_batch`, then
        its encoder with the padding masked), and its convolutional encoder and the acoustic (DAC) encoder with
        :func:`each_row_alone`; each utterance padded as ``encode`` pads it alone."""
        from .features import conv_features_batch

        torch, m = self._torch, self.model
        device = self.device

        def tensor(rows):  # (utterances, samples) on the device, and each row's own length
            return (torch.from_numpy(_zero_padded(rows, max(r.size for r in rows))).to(device),
                    torch.tensor([r.size for r in rows], device=device))

        with torch.inference_mode():
            semantic, lengths = tensor([np.pad(np.asarray(w, np.float32), m.pad) for w in wavs])
            conv, counts = conv_features_batch(m.semantic_model.feature_extractor, semantic, lengths)
            hidden = m.semantic_model.feature_projection(conv)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            mask = torch.arange(hidden.shape[1], device=device)[None] < counts[:, None]
            # transformers' hidden states: the first layer's input, each layer's output, the last the encoder's own
            encoder, layers = m.semantic_model.encoder, []
            hooks = [encoder.layers[0].register_forward_pre_hook(lambda _, args: layers.append(args[0])),
                     *(layer.register_forward_hook(lambda _, args, out: layers.append(out[0] if isinstance(out, tuple) else out))
                       for layer in encoder.layers)]
            try:
                last = encoder(hidden, attention_mask=mask).last_hidden_state
            finally:
                for hook in hooks:
                    hook.remove()
            layers[-1] = last
            with each_row_alone(m.encoder_semantic, counts) as own_semantic:
                e_semantic = m.encoder_semantic(torch.stack(layers, dim=1).mean(dim=1).transpose(1, 2))
            frames = own_semantic(e_semantic.shape[-1])
            # encode pads the waveform by hop/2 on both sides when the acoustic frames would not match the semantic
            acoustic = [np.pad(w, m.pad) if m._get_conv1d_output_lengths(w.size, m.acoustic_encoder) != n else w
                        for w, n in zip(wavs, frames.tolist())]
            acoustic, lengths = tensor([np.asarray(w, np.float32) for w in acoustic])
            with each_row_alone(m.acoustic_encoder, lengths) as own_acoustic:
                e_acoustic = m.acoustic_encoder(acoustic[:, None])
            if e_acoustic.shape[-1] != e_semantic.shape[-1] or not torch.equal(own_acoustic(e_acoustic.shape[-1]), frames):
                raise ValueError(f"{self.source}: this X-Codec's acoustic and semantic frames differ in length")
            embeddings = m.fc(torch.cat([e_acoustic, e_semantic], dim=1).transpose(1, 2)).transpose(1, 2)
            codes = m.quantizer.encode(embeddings, max(m.config.target_bandwidths)).transpose(0, 1)
        codes = codes[:, : self.codebooks].cpu().numpy().astype(np.int64)
        return [c[:, :n] for c, n in zip(codes, frames.tolist())]

    def _xcodec2_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """XCodec2's ``encode`` on a batch of :func:`xcodec2_inputs`, each utterance's codes its own: the semantic
        encoder (Wav2Vec2-BERT) with its attention mask, its adapter and the acoustic encoder with
        :func:`each_row_alone` (the acoustic encoder's anti-aliased activations pad by repeating the edge)."""
        torch, m = self._torch, self.model
        inputs = [xcodec2_inputs(w, self.hop, self.sample_rate) for w in wavs]
        values = [i["input_values"][0, 0] for i in inputs]
        features = [i["input_features"][0] for i in inputs]
        samples = torch.tensor([v.numel() for v in values], device=self.device)
        counts = torch.tensor([f.shape[0] for f in features], device=self.device)
        values = torch.nn.utils.rnn.pad_sequence(values, batch_first=True)[:, None].to(self.device)
        features = torch.nn.utils.rnn.pad_sequence(features, batch_first=True).to(self.device)
        mask = torch.arange(features.shape[1], device=self.device)[None] < counts[:, None]
        with torch.inference_mode():
            semantic = m.semantic_encoder(features, attention_mask=mask).last_hidden_state.transpose(1, 2)
            with each_row_alone(m.semantic_adapter, counts):
                semantic = m.semantic_adapter(semantic)
            with each_row_alone(m.acoustic_encoder, samples):
                acoustic = m.acoustic_encoder(values)
            _, codes = m.quantizer(m.fc_encoder(torch.cat([semantic, acoustic], dim=1).transpose(1, 2)))
        codes = codes.transpose(1, 2).cpu().numpy().astype(np.int64)
        return [c[:, :n] for c, n in zip(codes, (samples // self.hop).tolist())]

    def _padded(self, wav: np.ndarray) -> np.ndarray:
        """One utterance as the model reads it: a causal codec's padded with zeros to whole frames."""
        wav = np.asarray(wav, dtype=np.float32)
        return np.pad(wav, (0, -wav.size % self.hop)) if self.causal else wav

    def _encode(self, batch: np.ndarray) -> np.ndarray:
        """(utterances, codebooks, frames) codes of a (utterances, samples) batch, by the model's ``encode``."""
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch))[:, None].to(self.device)
        with torch.inference_mode():
            if self.kind == "mimi":  # its encode reads no padding mask (and needs none: causal, zeros to whole frames)
                codes = self.model.encode(x, num_quantizers=self.codebooks).audio_codes
            elif self.kind == "encodec":
                codes = self.model.encode(x, bandwidth=max(self.model.config.target_bandwidths)).audio_codes[0]
            elif self.kind == "xcodec":
                codes = self.model.encode(x, bandwidth=max(self.model.config.target_bandwidths)).audio_codes
            elif self.kind == "xcodec2":
                inputs = xcodec2_inputs(batch[0], self.hop, self.sample_rate)
                codes = self.model.encode(**{k: v.to(self.device) for k, v in inputs.items()}).audio_codes
            else:
                codes = self.model.encode(x, n_quantizers=self.codebooks).audio_codes
        return codes[:, : self.codebooks].cpu().numpy().astype(np.int64)

    def units(self, wav: np.ndarray, sample_rate: int | None = None) -> np.ndarray:
        """The units of one utterance (resampled to the codec's rate when ``sample_rate`` differs)."""
        if sample_rate is not None and sample_rate != self.sample_rate:
            from ..audio import resample

            wav = resample(np.asarray(wav, np.float32), sample_rate, self.sample_rate)
        return self.flatten(self.codes(wav))

    def units_batch(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """Units of many utterances at the codec's rate: in one batch on a GPU, else one at a time."""
        return [self.flatten(c) for c in self.codes_batch(wavs)]

    features = units            # extract calls its tokenizer's features/features_batch
    features_batch = units_batch

    def encode(self, wav: np.ndarray, sample_rate: int | None = None) -> Encoded:
        """The tokenizer's face (tokenizer.py): the units of one utterance, every frame kept (the decoder needs
        them all, so durations are all 1)."""
        units = self.units(wav, sample_rate)
        return Encoded(units, np.ones(units.size, dtype=np.int64), units.size // self.codebooks)

    def describe(self) -> dict:
        """What makes the units, for a compose summary: the codec, no k-means, the vocabulary."""
        return {"extractor": {k: v for k, v in self.spec.items() if k != "checkpoint"}, "kmeans": None,
                "vocabulary": self.vocabulary().to_json()}

    def flatten(self, codes: np.ndarray) -> np.ndarray:
        """(codebooks, frames) codes → frame-major units, codebook q offset by q × codebook_size."""
        return (codes.T + self.offsets).ravel()

    def unflatten(self, units) -> np.ndarray:
        """Units → (codebooks, frames) codes; one clear line when they are not this codec's."""
        units = np.asarray(units, dtype=np.int64)
        if units.size % self.codebooks:
            raise ValueError(f"{units.size} units are not whole {self.kind} frames of {self.codebooks} codebooks")
        codes = units.reshape(-1, self.codebooks) - self.offsets
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"units do not follow this codec's layout (frame-major, codebook q in "
                             f"[q*{self.codebook_size}, (q+1)*{self.codebook_size}))")
        return codes.T

    # --------------------------------------------------------------------------------------- decoding
    def speech(self, units) -> np.ndarray:
        """Units back to a waveform at :attr:`sample_rate`, with the codec's own decoder."""
        torch = self._torch
        codes = torch.from_numpy(self.unflatten(units))[None].to(self.device)
        with torch.inference_mode():
            if self.kind == "encodec":
                wav = self.model.decode(codes[None], [None]).audio_values
            elif self.kind in ("mimi", "xcodec", "xcodec2"):
                wav = self.model.decode(codes).audio_values
            else:
                wav = self.model.decode(audio_codes=codes).audio_values
        wav = wav.reshape(-1).float().cpu().numpy()
        return wav[: codes.shape[-1] * self.hop]

    def synthesize(self, units, durations=None) -> np.ndarray:
        """:meth:`speech`, with a unit vocoder's signature (``durations`` are not needed: units are per frame)."""
        return self.speech(units)

    decode = speech  # the tokenizer's face: a codec decodes its own units


@contextmanager
def each_row_alone(module, own):
    """Within it, ``module``'s padded convolutions read past each row of a batch what they read there when the row
    is alone: before each ``Conv1d`` the activations past the row's own length are set to zero (the convolution's
    zero padding alone; also before each of EnCodec's causal convolutions, whose reflect padding of a row shorter
    than it reads zeros appended first alone), and before each of XCodec2's anti-aliasing resamplers to the row's
    last value (their padding repeats the edge). ``own``: each row's length (samples or frames) at the module's
    input, on any device. Yields a function of a batch length (the module's output's) giving each row's own length
    there. The lengths are kept by batch length, one per level of time resolution (two levels of one length must
    hold the same own lengths)."""
    import torch

    lengths: dict[int, torch.Tensor] = {}

    def note(batch: int, rows: torch.Tensor) -> None:
        if batch in lengths and not torch.equal(lengths[batch], rows):
            raise RuntimeError(f"two levels of {batch} frames hold other lengths: batching would change the codes")
        lengths[batch] = rows

    def past(x):  # (rows, 1, time): True past each row's own length; and those lengths
        rows = lengths[x.shape[-1]]
        return (torch.arange(x.shape[-1], device=x.device)[None] >= rows[:, None])[:, None], rows

    def zeros_past_own_length(conv, args):
        x = args[0]
        beyond, rows = past(x)
        (kernel,), (stride,), (pad,), (dilation,) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        reach = 2 * pad - dilation * (kernel - 1) - 1
        note((x.shape[-1] + reach) // stride + 1, (rows + reach) // stride + 1)
        return (x.masked_fill(beyond, 0),)

    def zeros_past_own_length_encodec(conv, args):  # EnCodec's causal convolution (``EncodecConv1d``)
        x = args[0]
        beyond, rows = past(x)
        stride = int(conv.stride)  # whole frames in: its extra right padding is none, and the output ceil(n / stride)
        note(-(-x.shape[-1] // stride), -(-rows // stride))
        return (x.masked_fill(beyond, 0),)

    def edge_past_own_length(resampler, args):
        x = args[0]
        beyond, rows = past(x)
        if type(resampler).__name__.startswith("Xcodec2UpSample"):
            note(x.shape[-1] * resampler.ratio, rows * resampler.ratio)
        else:  # its padding repeats the edge on both sides, then a strided filter
            reach = resampler.pad_left + resampler.pad_right - resampler.kernel_size
            note((x.shape[-1] + reach) // resampler.stride + 1, (rows + reach) // resampler.stride + 1)
        last = x.gather(-1, (rows - 1).clamp(min=0)[:, None, None].expand(-1, x.shape[1], 1))
        return (torch.where(beyond, last, x),)

    encodec = [m for m in module.modules() if type(m).__name__ == "EncodecConv1d"]
    if any(not m.causal for m in encodec):
        raise ValueError(f"{type(module).__name__}: a non-causal EnCodec convolution: no exact batch")
    inside = {id(m.conv) for m in encodec}  # padded by their EnCodec wrapper, not by themselves
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv1d) and id(m) not in inside]
    for conv in convs:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"{type(module).__name__}: a convolution pads with {conv.padding_mode!r} "
                             f"({conv.padding}): no exact batch")
    hooks = [conv.register_forward_pre_hook(zeros_past_own_length) for conv in convs]
    hooks += [conv.register_forward_pre_hook(zeros_past_own_length_encodec) for conv in encodec]
    hooks += [m.register_forward_pre_hook(edge_past_own_length) for m in module.modules()
              if type(m).__name__ in ("Xcodec2UpSample1d", "Xcodec2DownSample1d")]
    first = module.register_forward_pre_hook(lambda _, args: note(args[0].shape[-1], own.to(args[0].device)))
    try:
        yield lambda batch: lengths[batch]
    finally:
        first.remove()
        for hook in hooks:
            hook.remove()


def _zero_padded(wavs: list[np.ndarray], samples: int) -> np.ndarray:
    """(utterances, ``samples``) float32: each utterance from the start of its row, zeros after it."""
    batch = np.zeros((len(wavs), samples), dtype=np.float32)
    for row, wav in zip(batch, wavs):
        row[: wav.size] = wav
    return batch


def xcodec2_inputs(wav: np.ndarray, hop: int, sample_rate: int) -> dict:
    """The two inputs of XCodec2's ``encode`` for one utterance, as transformers' ``Xcodec2FeatureExtractor``
    makes them: the waveform with one zero appended, padded with zeros to whole frames; and for its semantic
    encoder 80 Kaldi log-mel filterbanks (25 ms / 10 ms, povey window, of the waveform × 2^15 with half a frame of
    zeros on each side), normalised per bin over the utterance, padded with 1.0 to an even count and stacked in
    pairs. That extractor computes the filterbanks with ``torchaudio.compliance.kaldi.fbank``; torchaudio cannot
    load beside our torch, so kaldi-native-fbank computes them here (a test holds the two equal)."""
    import kaldi_native_fbank as knf
    import torch

    wav = np.asarray(wav, dtype=np.float32)
    length = -(-(wav.size + 1) // hop) * hop
    values = np.zeros(length, dtype=np.float32)
    values[: wav.size] = wav
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sample_rate
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.snip_edges = True
    opts.frame_opts.frame_length_ms = 400 / sample_rate * 1000
    opts.frame_opts.frame_shift_ms = 160 / sample_rate * 1000
    opts.mel_opts.num_bins = 80
    opts.mel_opts.low_freq = 20
    opts.mel_opts.high_freq = sample_rate // 2
    opts.use_energy = False
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(sample_rate, np.pad(values, hop // 2) * 2**15)
    fbank.input_finished()
    mel = np.array([fbank.get_frame(i) for i in range(fbank.num_frames_ready)], dtype=np.float64)
    mel = (mel - mel.mean(0)) / np.sqrt(mel.var(0, ddof=1) + 1e-7)
    if len(mel) % 2:
        mel = np.concatenate([mel, np.ones((1, mel.shape[1]))])
    features = mel.reshape(len(mel) // 2, 2 * mel.shape[1]).astype(np.float32)
    return {"input_values": torch.from_numpy(values)[None, None], "input_features": torch.from_numpy(features)[None]}


def load_codec(kind: str, checkpoint: str | None, codebooks: int | None = None, device: str = "cpu") -> Codec:
    """A codec from a folder written by transformers' ``save_pretrained`` (or, with internet, a hub id); one
    line when the folder holds another kind of model."""
    import transformers

    if kind not in CODECS:
        raise ValueError(f"unknown codec {kind!r}: choose {', '.join(CODECS)}")
    if not checkpoint:
        raise ValueError(f"--features {kind} needs --checkpoint (a folder saved by transformers, or a hub id)")
    path = Path(checkpoint)
    local = path.is_dir()
    if local:
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        from ..io import read_json

        raw = read_json(config)
        found = raw.get("model_type")
        if found != kind:
            raise ValueError(f"{path}: holds a {found!r} model, not {kind!r}; pass --features {found}"
                             if found in CODECS else f"{path}: holds a {found!r} model, not a {kind} codec")
        _check_config(kind, raw, config)  # before transformers, which fails on some of these with an IndexError
    model = load_pretrained(getattr(transformers, CODECS[kind]), str(checkpoint), f"{kind} codec", local)
    _check_config(kind, model.config.to_dict(), f"{checkpoint}/config.json")
    weights = sorted(path.glob("*.safetensors")) if local else []
    sha = sha256_file(weights[0]) if len(weights) == 1 else None
    source = f"hf:{path.name}" if local else f"hf:{checkpoint}"
    return Codec(kind, model, source, codebooks=codebooks, sha256=sha, device=device,
                 checkpoint=str(path.resolve()) if local else str(checkpoint))


def _check_config(kind: str, cfg: dict, where) -> None:
    """The numbers a codec's config must hold for its units to mean anything; one line naming those that do not.
    A value the config leaves out is transformers' default, which is fine."""
    problems = []
    rate_key = "sample_rate" if kind == "xcodec" else "sampling_rate"
    rate = cfg.get(rate_key, 1)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0:
        problems.append(f"sampling rate {rate!r}")
    if kind in ("encodec", "xcodec") and "target_bandwidths" in cfg and not (
            isinstance(cfg["target_bandwidths"], list) and cfg["target_bandwidths"]):
        problems.append("no target_bandwidths")
    size = cfg.get("codebook_size", 1)
    if kind != "xcodec2" and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        problems.append(f"codebook_size {size!r}")
    if problems:
        raise ValueError(f"{where}: not a usable {kind} config ({'; '.join(problems)})")


def codec_kind(path: str | Path) -> str | None:
    """Which of :data:`CODECS` a transformers folder holds, or None (not a codec folder)."""
    config = Path(path) / "config.json"
    try:
        kind = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (ValueError, AttributeError):
        return None
    return kind if kind in CODECS else None


def codec_of(folder: str | Path, device: str = "cpu") -> Codec | None:
    """The codec that made a units folder's units (its ``units.json`` names kind, checkpoint and codebooks), or a
    compose folder's (through the units folders its summaries name); None for k-means units. One line when the
    checkpoint is no longer where extract read it."""
    from ..shardfiles import composed_units_dirs, read_units_spec

    folder = Path(folder)
    candidates = [folder, *composed_units_dirs(folder)] if folder.is_dir() else []
    for candidate in candidates:
        spec = read_units_spec(candidate)
        if spec and spec.get("features") in CODECS:
            if not spec.get("checkpoint"):
                raise ValueError(f"{candidate / 'units.json'}: names no codec checkpoint; pass --vocoder CODEC_FOLDER")
            return load_codec(spec["features"], spec["checkpoint"], spec.get("codebooks"), device)
    return None

"""``python -m benchmarks``: every speed and memory target, each measured side by side in one run.

  kmeans    FAISS vs scikit-learn MiniBatchKMeans with fairseq's settings, same sample, K=100 and K=500, on an
            idle machine and beside one other CPU-bound process: speed, held-out inertia
  kmeans_1m cluster's FAISS k-means at issue 38's CPU scale (K=1000, 1M x 768 frames) on every frame vs FAISS's
            own default sample (256 frames per centroid): seconds, held-out inertia
  extract   HuBERT-Base layer 11 (random weights) on CPU: batched vs one at a time; achieved GFLOP/s vs the
            machine's measured fp32 GEMM rate; bfloat16 vs float32 speed and unit agreement
  codecs    Mimi, EnCodec, DAC, X-Codec and XCodec2 at their released sizes (random weights) on CPU: encode and
            decode x real time; the five codecs batched vs one at a time, codes equal
  gpu       every GPU row (skipped without a GPU; GPU_DRYRUN=1 checks their code on the CPU), or one of them:
            gpu_kmeans (K=1000 on 1M x 768 frames vs faiss-cpu; DNSMOS torch engine), gpu_asr (Parakeet-CTC-0.6B
            shape, bf16), gpu_codecs (Mimi, EnCodec-24k, DAC, X-Codec, XCodec2 batched vs one at a time), gpu_train (1B LLaMA:
            tokens/s, MFU), gpu_hubert (HuBERT-Base layer 11, bf16: x real time, MFU)
  engine    local engine vs Ray engine on a two-node local Ray cluster (two raylets): same files, speed,
            model work per node
  memory    peak RSS of extract (MFCC, and an EnCodec-24k codec), quantize, compose and publish at 1x and 8x corpus
            size, default shard size
  vocoder   resynthesis speed (x real time) of a unit HiFi-GAN the size of SpeechGPT's, and of the
            embedded preview vocoder, on CPU
  recordings  shard audio (silero-vad) x real time, and its peak RSS on a 1- and an 8-minute recording
  compose   cross-modal records per second; dialogue turns per second with the TTS cache warm
  score     DNSMOS: ours (batched windows, sessions kept) vs speechmos's dnsmos.run on the same clips, equal scores;
            ASR round trip: a random Whisper (d_model 256, 2+2 layers) batched vs one clip at a time, same texts
  train     stage-2 tokens per second, ours vs TRL's SFTTrainer on the same model, data and steps (and model
            FLOP utilisation on a GPU)
  startup   `speechinstruct --help` and `validate` start-up time, this checkout vs the code before the lazy imports

Prints a table of ratios against the baseline of each pair and appends one JSON line per run to ``--results``
(default ``work/benchmarks/results.jsonl``, untracked: a run never changes the checkout).
``benchmarks/measured.jsonl`` holds the runs the README's figures come from. ``--quick`` shrinks every workload;
``--only kmeans,extract`` picks sections.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def demo_corpus(work: Path, sentences: int, shard_hours: float = 0.05) -> Path:
    from speechinstruct import recipe as sections
    from speechinstruct.sources.demo import make_demo_corpus
    from speechinstruct.sources.shard import shard_corpus

    root = work / f"corpus-{sentences}"
    if not root.exists():
        make_demo_corpus(root, sentences, seed=0)
    manifest = work / (f"manifest-{sentences}" if shard_hours == 0.05 else f"manifest-{sentences}-{shard_hours:g}h")
    if not manifest.exists():
        shard_corpus("speechinstruct-demo", root, manifest, sections.Shard(shard_hours=shard_hours))
    return manifest


def mfcc(work: Path, manifest: Path) -> Path:
    """MFCC features of a demo manifest, extracted once per corpus size."""
    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import MFCC

    out = work / f"mfcc-{manifest.name}"
    if not out.exists():
        extract(manifest, out, MFCC())
    return out


def busy_neighbour():
    """One other CPU-bound process, as on a shared node or beside another job-array task."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def bench_kmeans(work: Path, quick: bool) -> list[dict]:
    from sklearn.cluster import MiniBatchKMeans

    from speechinstruct.units.cluster import fit, sample_frames
    from speechinstruct.units import KMeans

    manifest = demo_corpus(work, 120 if quick else 400)
    features = mfcc(work, manifest)
    frames = sample_frames(features, 60_000 if quick else 240_000, seed=0)
    sample, held_out = frames[: len(frames) * 5 // 6], frames[len(frames) * 5 // 6 :]
    rows = []
    for k in ((50,) if quick else (100, 500)):
        for neighbour in (False, True):
            other = busy_neighbour() if neighbour else None
            try:
                centroids, t_faiss = timed(fit, sample, k, seed=0)
                # fairseq examples/hubert/simple_kmeans/learn_kmeans.py settings
                sk = MiniBatchKMeans(n_clusters=k, init="k-means++", max_iter=100, batch_size=10000, verbose=0,
                                     compute_labels=False, tol=0.0, max_no_improvement=100, init_size=None, n_init=20,
                                     reassignment_ratio=0.0, random_state=0)
                _, t_sk = timed(sk.fit, sample)
            finally:
                if other:
                    other.kill()
                    other.wait()
            ratio = KMeans(centroids).inertia(held_out) / KMeans(sk.cluster_centers_.astype(np.float32)).inertia(held_out)
            rows.append({"name": f"k-means fit K={k}, {len(sample)} frames x {sample.shape[1]}, "
                                 f"{'one busy neighbour process' if neighbour else 'idle'}",
                         "baseline": "sklearn MiniBatchKMeans (fairseq settings)", "baseline_s": t_sk, "ours_s": t_faiss,
                         "speedup": t_sk / t_faiss, "target": ">= 10x",
                         "extra": f"held-out inertia ours/baseline = {ratio:.4f} (target <= 1.02)"})
    return rows


def clustered_frames(k: int, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(n training frames, n/10 held-out ones) of ``dim`` dimensions around 2k random centres (noise 0.6): the
    k-means rows' data at the scale of the issue's targets."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (k * 2, dim)).astype(np.float32)
    frames = centres[rng.integers(0, k * 2, n + n // 10)] + rng.normal(0, 0.6, (n + n // 10, dim)).astype(np.float32)
    return frames[:n], frames[n:]


def bench_kmeans_1m(work: Path, quick: bool) -> list[dict]:
    """``cluster``'s k-means at the scale of issue 38's CPU target (K=1000 on 1M x 768 frames; the target is 60 s
    on 16 cores): FAISS on every frame, as ``cluster`` runs it, against FAISS's own default sample (256 frames per
    centroid), side by side, with their held-out inertia. ``--quick``: K=100 on 100k frames."""
    from speechinstruct.threads import available_cpus
    from speechinstruct.units import KMeans
    from speechinstruct.units.cluster import fit

    k, n, dim = (100, 100_000, 768) if quick else (1000, 1_000_000, 768)
    train, held = clustered_frames(k, n, dim)
    every, t_every = timed(fit, train, k, seed=0, engine="faiss")
    sample = train[np.sort(np.random.default_rng(1).choice(n, 256 * k, replace=False))]
    default, t_default = timed(fit, sample, k, seed=0, engine="faiss")
    ratio = KMeans(every).inertia(held) / KMeans(default).inertia(held)
    return [{"name": f"k-means K={k}, {n} x {dim} frames, 25 iterations, FAISS on {available_cpus()} threads: every frame "
                     f"vs FAISS's default sample ({256 * k} frames)", "baseline": "FAISS's default sample",
             "baseline_s": t_default, "ours_s": t_every, "speedup": t_default / t_every,
             "target": "<= 60 s on 16 cores (every frame); report",
             "extra": f"held-out inertia every frame / default sample = {ratio:.4f}"}]


def hubert_base(work: Path) -> Path:
    """A HuBERT-Base-sized checkpoint (random weights) in Hugging Face layout."""
    from transformers import HubertConfig, HubertModel

    folder = work / "hubert-base-random"
    if not folder.exists():
        import torch

        torch.manual_seed(0)
        HubertModel(HubertConfig()).save_pretrained(folder)
    return folder


def gemm_gflops(threads: int, n: int = 2048, repeat: int = 5) -> float:
    """The machine's fp32 matrix-product rate on ``threads`` threads (best of ``repeat``)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b)[1] for _ in range(repeat))
    return 2 * n**3 / best / 1e9


def model_flops(hubert, wav) -> float:
    """FLOPs of HuBERT's forward pass on one utterance: the extractor's own count (``HuBERT.flops``, equal to
    torch's FlopCounterMode in a test); ../shared/gpu-check/model_bench.py imports it by this name."""
    return hubert.flops(wav.size)


def bench_extract(work: Path, quick: bool) -> list[dict]:
    import torch

    from speechinstruct import audio
    from speechinstruct.units.cluster import fit
    from speechinstruct.units.extract import compute
    from speechinstruct.units.features import load_hubert
    from speechinstruct.threads import available_cpus
    from speechinstruct.units import KMeans

    cpus = available_cpus()
    torch.set_num_threads(cpus)
    hubert = load_hubert(hubert_base(work), layer=11, device="cpu")
    rng = np.random.default_rng(0)
    manifest_dir = demo_corpus(work, 120 if quick else 400)
    import pyarrow.parquet as pq

    rows = [r for f in sorted(manifest_dir.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    rows = [rows[i] for i in rng.permutation(len(rows))[: 16 if quick else 48]]
    root = Path(json.loads((manifest_dir / "summary.json").read_text())["root"])
    wavs = [audio.load(root / r["path"]) for r in rows]
    hubert.features_batch(wavs[:2])  # warm up
    single, t_single = timed(lambda: [hubert.features_batch([w])[0] for w in wavs])
    def batched_run(model):  # the extract engine's own batching: ~60 s of audio per batch, sorted by length
        return [f for _, f in compute(model, iter([({"id": i}, w) for i, w in enumerate(wavs)]), 60.0)]

    batched, t_batched = timed(batched_run, hubert)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(single, batched))
    seconds = sum(w.size for w in wavs) / 16000
    flops = sum(model_flops(hubert, w) for w in wavs)
    gemm = gemm_gflops(cpus)
    out = [{"name": f"HuBERT-Base layer 11 on CPU, {cpus} threads ({len(wavs)} utts, {seconds:.0f} s audio)",
            "baseline": "one utterance at a time", "baseline_s": t_single, "ours_s": t_batched,
            "speedup": t_single / t_batched, "target": ">= 1.5x (CPU)",
            "extra": f"max |batched - single| = {diff:.2e}; {seconds / t_batched:.1f}x real time"},
           {"name": f"HuBERT-Base layer 11 CPU compute rate ({flops / seconds / 1e9:.1f} GFLOP per audio second)",
            "baseline": f"torch fp32 2048x2048 GEMM on {cpus} threads", "baseline_gflops": gemm,
            "ours_gflops": flops / t_batched / 1e9, "fraction": flops / t_batched / 1e9 / gemm, "target": ">= 0.80"}]
    bf16 = load_hubert(hubert_base(work), layer=11, device="cpu", dtype="bfloat16")
    bf16.features_batch(wavs[:2])
    low, t_low = timed(batched_run, bf16)
    km = KMeans(fit(np.concatenate(batched), 100, seed=0))  # units from a k-means fitted on the float32 frames
    agree = float(np.mean(np.concatenate([km.assign(a) == km.assign(b) for a, b in zip(batched, low)])))
    rel = float(np.mean([np.linalg.norm(a - b) / np.linalg.norm(a) for a, b in zip(batched, low)]))
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        isa = "unknown"
    out.append({"name": f"HuBERT-Base layer 11, bfloat16 autocast on CPU ({isa})", "baseline": "float32",
                "baseline_s": t_batched, "ours_s": t_low, "speedup": t_batched / t_low, "target": ">= 1.6x",
                "extra": f"unit agreement with float32 (K=100) {agree:.1%} (target >= 97%); relative feature change {rel:.2%}"})
    return out


def gpu_device() -> str | None:
    """Where the GPU rows run: ``cuda``, the CPU at a small size with ``GPU_DRYRUN=1`` (to check their code), or
    nowhere (None: the row says it was skipped)."""
    import torch

    return "cuda" if torch.cuda.is_available() else ("cpu" if os.environ.get("GPU_DRYRUN") else None)


def gpu_peak_flops() -> float:
    """The GPU's peak in FLOP/s that the GPU rows' MFU divides by: the product's (extract's summary's) figure for the
    card (``devices.peak_tflops``: ``SPEECHINSTRUCT_PEAK_TFLOPS`` or the card's data sheet), ``GPU_PEAK_TFLOPS``
    first when set (../shared/gpu-check's model_bench reads that name), 989 (H100/H200 SXM bf16 dense) for a card
    the table does not know."""
    from speechinstruct.devices import peak_tflops

    given = os.environ.get("GPU_PEAK_TFLOPS")
    known = peak_tflops("cuda")
    return (float(given) if given else known[0] if known else 989.0) * 1e12


NO_GPU = "no GPU on this machine (benchmark ready: run it where one is, or GPU_DRYRUN=1 to check its code on the CPU)"


def bench_gpu(work: Path, quick: bool) -> list[dict]:
    """Every GPU row (issue 38), one section each: ``gpu_kmeans`` (k-means K=1000 on 1M x 768 frames, torch against
    faiss-cpu on the same sample; DNSMOS with the torch engine), ``gpu_asr`` (a Parakeet-CTC-0.6B-shaped model in
    bf16 on 1,000 clips of 9-13 s), ``gpu_codecs`` (the five codecs batched against one at a time),
    ``gpu_train`` (our training loop on a 1B LLaMA: tokens/s, MFU) and ``gpu_hubert`` (HuBERT-Base layer 11 in bf16,
    MFU against the card's bf16 peak (:func:`gpu_peak_flops`), and with an FFT positional convolution).
    ``GPU_DRYRUN=1`` runs them all on the CPU at a small size, to check the code."""
    return [row for name in GPU_SECTIONS for row in SECTIONS[name](work, quick)]


def bench_gpu_kmeans(work: Path, quick: bool) -> list[dict]:
    device = gpu_device()
    if device is None:
        return [{"name": "k-means and DNSMOS on a GPU", "skipped": NO_GPU}]
    return gpu_kmeans_and_dnsmos(work, device, small=device == "cpu" or quick)


def bench_gpu_asr(work: Path, quick: bool) -> list[dict]:
    device = gpu_device()
    if device is None:
        return [{"name": "ASR (Parakeet CTC shape) on a GPU", "skipped": NO_GPU}]
    small = device == "cpu"  # Parakeet-CTC-0.6B's shape on a GPU, a small one in a dry run; bf16 on a GPU
    clips = [(0.1 * np.random.default_rng(i).standard_normal(int((9 + i % 5) * 16000))).astype(np.float32)
             for i in range(8 if small else 1000)]
    return [parakeet_row(work, device, clips, *((128, 2) if small else (1024, 24)), batch_size=4 if small else 64)]


def bench_gpu_train(work: Path, quick: bool) -> list[dict]:
    device = gpu_device()
    if device is None:
        return [{"name": "train a 1B LLaMA on a GPU", "skipped": NO_GPU}]
    return [train_1b_row(work, device)]


def bench_gpu_codecs(work: Path, quick: bool) -> list[dict]:
    """Mimi, EnCodec-24k, DAC, X-Codec and XCodec2 at their default sizes (random weights, drawn on the GPU) on the
    GPU: a batch of 32 utterances of 2-25 s (the gpu-check corpus's lengths) against the same utterances one at a
    time, codes equal. Each row prints as it is measured (a time-limited run keeps the codecs it finished)."""
    import torch
    import transformers

    from speechinstruct.units.codecs import Codec
    from speechinstruct.tokenizers import CODECS

    device = gpu_device()
    if device is None:
        return [{"name": "codecs batched on a GPU", "skipped": NO_GPU}]
    rows = []
    for kind, name in CODECS.items():
        torch.manual_seed(0)
        with torch.device(device):  # XCodec2's 629M random weights take many seconds to draw on the CPU
            model = getattr(transformers, name)(getattr(transformers, name.replace("Model", "Config"))())
        codec = Codec(kind, model, f"random {kind} (default config)", device=device)
        if codec.batches:
            rows.append(codec_batch_row(codec, small=device == "cpu", lengths=(1.0, 4.0) if device == "cpu" else (2.0, 25.0),
                                        count=32))
            print(table_line({"section": "gpu_codecs", **rows[-1]}), flush=True)
        del model, codec
    return rows


def fft_positional_conv(conv):
    """An experiment for issue 38 (58 % of the H200's kernel time went to HuBERT's positional convolution: 768
    channels, kernel 128, 16 groups): a stand-in for ``pos_conv_embed.conv`` that computes the same grouped
    convolution through the FFT, in float32, with about 60x fewer FLOPs at that kernel size. The project does not
    use it unless a GPU measurement says it pays (``gpu_hubert`` runs both)."""
    import torch

    class FFTConv1d(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            conv = self.conv
            w, bias, groups, pad = conv.weight.float(), conv.bias.float(), conv.groups, conv.padding[0]
            with torch.autocast(device_type=x.device.type, enabled=False):
                batch, channels, frames = x.shape
                kernel = w.shape[-1]
                size = 1 << (frames + 2 * pad + kernel - 2).bit_length()  # no wrap-around
                spectrum = torch.fft.rfft(torch.nn.functional.pad(x.float(), (pad, pad)), n=size)
                bins = spectrum.shape[-1]
                taps = torch.fft.rfft(torch.flip(w, [-1]), n=size)  # correlation, as conv1d computes it
                per = channels // groups
                out = torch.matmul(spectrum.view(batch, groups, per, bins).permute(3, 1, 0, 2),
                                   taps.view(groups, per, per, bins).permute(3, 0, 2, 1))  # bins, groups, batch, out
                y = torch.fft.irfft(out.permute(2, 1, 3, 0).reshape(batch, channels, bins), n=size)
                length = frames + 2 * pad - kernel + 1
                return (y[..., kernel - 1: kernel - 1 + length] + bias[None, :, None]).to(x.dtype)

    return FFTConv1d(conv)


def bench_gpu_hubert(work: Path, quick: bool) -> list[dict]:
    """HuBERT-Base layer 11 in bf16 through extract's compute, x real time and MFU; then the same with the
    positional convolution through the FFT (:func:`fft_positional_conv`), and how far its frames are from the first's."""
    import torch

    device = gpu_device()
    if device is None:
        return [{"name": "HuBERT-Base layer 11 on GPU", "skipped": NO_GPU}]
    from speechinstruct.units.extract import compute, decode_rows
    from speechinstruct.units.features import load_hubert

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    hubert = load_hubert(hubert_base(work), layer=11, device=device, dtype="bfloat16")
    # GPU_MANIFEST: a manifest made beforehand (gpu_check.sh: the gpu-check corpus; the demo corpus needs espeak-ng)
    manifest_dir = (Path(os.environ["GPU_MANIFEST"]) if os.environ.get("GPU_MANIFEST") else
                    demo_corpus(work, 16 if device == "cpu" else 120 if quick else 1200))
    import pyarrow.parquet as pq

    rows = [r for f in sorted(manifest_dir.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    root = Path(json.loads((manifest_dir / "summary.json").read_text())["root"])
    wavs = [w for _, w in decode_rows(rows[:32], root, workers=8)]  # for the FLOP count and the warm-up
    flops = sum(model_flops(hubert, w) for w in wavs[:20]) / sum(w.size for w in wavs[:20]) * 16000  # per audio second
    seconds = sum(r["duration"] for r in rows)
    peak = gpu_peak_flops()
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    out, first = [], None
    for variant in ("torch's convolution", "FFT convolution"):
        if variant.startswith("FFT"):
            hubert.model.encoder.pos_conv_embed.conv = fft_positional_conv(hubert.model.encoder.pos_conv_embed.conv)
        probe = [f for _, f in compute(hubert, iter([({"id": i}, w) for i, w in enumerate(wavs[:8])]), 400.0)]
        first = first or probe  # warmed up; the frames of the first 8 utterances, to compare
        sync()
        _, t = timed(lambda: (list(compute(hubert, decode_rows(rows, root, workers=8), 400.0)), sync()))
        differ = max(float(np.abs(a - b).max() / (np.abs(a).max() + 1e-9)) for a, b in zip(first, probe))
        out.append({"name": f"HuBERT-Base layer 11 on {where} (bf16, {len(rows)} utts, {seconds:.0f} s audio), "
                            f"positional convolution: {variant}",
                    "realtime": seconds / t, "ours_s": t, "target": ">= 5000x real time",
                    "extra": f"MFU {flops * seconds / t / peak:.1%} of {peak / 1e12:.0f} TFLOP/s; frames differ from "
                             f"torch's convolution's by {differ:.1e} (relative max)"})
    return out


def gpu_kmeans_and_dnsmos(work: Path, device: str, small: bool) -> list[dict]:
    """k-means K=1000 (torch on ``device``) vs faiss-cpu on one sample of clustered 768-dim frames, held-out
    inertia compared; DNSMOS torch engine x real time on ``device`` with its scores against onnxruntime's."""
    from speechinstruct.units import cluster
    from speechinstruct.judges.dnsmos import DNSMOS
    from speechinstruct.units import KMeans

    k, n, dim = (100, 20_000, 64) if small else (1000, 1_000_000, 768)
    train, held = clustered_frames(k, n, dim)
    cluster.fit(train[: 4 * k], k, seed=0, niter=2, engine="torch", device=device)  # warm up (CUDA's start-up)
    ours, t_ours = timed(cluster.fit, train, k, seed=0, engine="torch", device=device)
    print(f"k-means torch on {device}: {t_ours:.1f} s; faiss-cpu next", flush=True)  # kept if the baseline runs out of time
    theirs, t_faiss = timed(cluster.fit, train, k, seed=0, engine="faiss")
    ratio = KMeans(ours).inertia(held) / KMeans(theirs).inertia(held)
    rows = [{"name": f"k-means K={k}, {n} x {dim} frames: torch on {device} vs faiss-cpu", "baseline": "faiss-cpu",
             "baseline_s": t_faiss, "ours_s": t_ours, "speedup": t_faiss / t_ours,
             "target": "<= 15 s on an H200; held-out inertia <= 1.01x", "extra": f"held-out inertia {ratio:.4f}x faiss"}]
    def clip(seconds: float, seed: int) -> np.ndarray:  # a harmonic tone, syllable-modulated, with a little noise
        r = np.random.default_rng(seed)
        t = np.arange(int(seconds * 16000)) / 16000
        wav = np.sin(2 * np.pi * (120 + 60 * r.random()) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) ** 2
        return (0.3 * wav + 0.01 * r.standard_normal(t.size)).astype(np.float32)

    clips = [clip(9.0 + (i % 5), seed=i) for i in range(8 if small else 400)]
    seconds = sum(c.size for c in clips) / 16000
    judge = DNSMOS(device=device, engine="torch")
    judge.score(clips[:2])  # warm-up
    got, t = timed(judge.score, clips)
    want = DNSMOS(threads=2).score(clips[:4])
    diff = max(abs(a[c] - b[c]) for a, b in zip(got, want) for c in a)
    rows.append({"name": f"DNSMOS, torch engine on {device}, {len(clips)} clips ({seconds:.0f} s)", "realtime": seconds / t,
                 "ours_s": t, "target": ">= 2000x real time on an H200; within 0.02 of speechmos",
                 "extra": f"max difference from onnxruntime {diff:.2e}"})
    return rows


def bench_engine(work: Path, quick: bool) -> list[dict]:
    """Local engine vs the Ray engine on a two-node local cluster (two raylets on this machine, each with half
    the CPUs as model-actor slots plus one for decode tasks), HuBERT-Base layer 11, same manifest."""
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        return [{"name": "local vs Ray engine", "skipped": "ray not installed (pip install 'speechinstruct[ray]')"}]
    from speechinstruct.units.engine_ray import extract_ray
    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import load_hubert
    from speechinstruct.threads import available_cpus

    import torch

    cpus = available_cpus()
    torch.set_num_threads(cpus)
    manifest = demo_corpus(work, 40 if quick else 600)  # full: ~30 min of audio, a job of over 2 minutes
    hubert = load_hubert(hubert_base(work), layer=11)
    per_node = max(1, cpus // 2)
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for _ in range(1 if quick else 2):  # full: local, Ray, local, Ray, so that the host's drift falls on both
        for d in ("engine-local", "engine-ray"):
            shutil.rmtree(work / d, ignore_errors=True)
        local, t = timed(extract, manifest, work / "engine-local", hubert)
        times["local"].append(t)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": per_node + 1})
        try:
            cluster.add_node(num_cpus=per_node + 1)
            cluster.wait_for_nodes()
            stats, t = timed(extract_ray, manifest, work / "engine-ray", hubert, actors=2, cpus_per_actor=per_node,
                             block_seconds=30.0 if quick else None, address=cluster.address)
            times["ray"].append(t)
        finally:
            ray.shutdown()
            cluster.shutdown()
    t_local, t_ray = min(times["local"]), min(times["ray"])
    from speechinstruct.shardfiles import iter_features

    diff = max(float(np.abs(a - b).max()) for f in sorted((work / "engine-ray").glob("features-*.arrow"))
               for (_, a), (_, b) in zip(iter_features(work / "engine-local" / f.name), iter_features(f)))
    same = f"max |ray - local| frame difference {diff:.1e} (other batches and thread counts)"
    return [{"name": f"extract HuBERT-Base L11, {local['utterances']} utts, {local['audio_hours'] * 3600:.0f} s audio, "
                     f"2-node local Ray cluster", "baseline": "local engine", "baseline_s": t_local,
             "ours_s": t_ray, "speedup": t_local / t_ray, "target": ">= 0.8x on one machine (job >= 2 min)",
             "extra": f"{same}; utterances per node {list(stats['nodes'].values())}; best of runs "
                      f"local {[round(t, 1) for t in times['local']]} s, Ray {[round(t, 1) for t in times['ray']]} s"}]



def bench_engine_score(work: Path, quick: bool) -> list[dict]:
    """``score --dnsmos``: the local engine against the Ray engine on a two-node local cluster (as bench_engine:
    two raylets on this machine, each with half the CPUs as judge-actor slots plus one for decode tasks)."""
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        return [{"name": "score: local vs Ray engine", "skipped": "ray not installed (pip install 'speechinstruct[ray]')"}]
    from speechinstruct.curate.score import score, score_ray
    from speechinstruct.io import read_table
    from speechinstruct.judges.judge import Judge
    from speechinstruct.threads import available_cpus

    cpus = available_cpus()
    manifest = demo_corpus(work, 24 if quick else 150)
    per_node = max(1, cpus // 2)
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for _ in range(1 if quick else 2):  # full: local, Ray, local, Ray, so that the host's drift falls on both
        for d in ("score-local", "score-ray"):
            shutil.rmtree(work / d, ignore_errors=True)
        local, t = timed(score, manifest, work / "score-local", Judge.load(dnsmos=True))
        times["local"].append(t)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": per_node + 1})
        try:
            cluster.add_node(num_cpus=per_node + 1)
            cluster.wait_for_nodes()
            stats, t = timed(score_ray, manifest, work / "score-ray", {"dnsmos": True}, actors=2,
                             cpus_per_actor=per_node, block_seconds=30.0 if quick else 120.0, address=cluster.address)
            times["ray"].append(t)
        finally:
            ray.shutdown()
            cluster.shutdown()
    t_local, t_ray = min(times["local"]), min(times["ray"])
    same = all((work / "score-local" / f.name).read_bytes() == f.read_bytes()
               for f in sorted((work / "score-ray").glob("scores-*.parquet")))
    seconds = sum(r["duration"] for f in sorted(manifest.glob("manifest-*.parquet"))
                  for r in read_table(f, columns=["duration"]).to_pylist())
    return [{"name": f"score --dnsmos, {local['utterances']} utts, {seconds:.0f} s audio, 2-node local Ray cluster",
             "baseline": "local engine", "baseline_s": t_local, "ours_s": t_ray, "speedup": t_local / t_ray,
             "target": ">= 0.8x on one machine", "realtime": seconds / t_ray,
             "extra": f"scores files byte-identical: {same}; utterances per node {list(stats['nodes'].values())}; "
                      f"best of runs local {[round(t, 1) for t in times['local']]} s, "
                      f"Ray {[round(t, 1) for t in times['ray']]} s"}]

STAGE_CODE = {
    "extract": "from speechinstruct.units.extract import extract; from speechinstruct.units.features import MFCC;"
               "extract(M, W / 'features', MFCC())",
    "extract-codec": "import torch; torch.set_num_threads(2); from transformers import EncodecConfig, EncodecModel;"
                     "from speechinstruct.units.codecs import Codec; from speechinstruct.units.extract import extract;"
                     "extract(M, W / 'codec-units', Codec('encodec', EncodecModel(EncodecConfig()), 'random'))",
    "quantize": "from speechinstruct.units.quantize import quantize; from speechinstruct.units import load_kmeans;"
                "quantize(W / 'features', load_kmeans(KM), W / 'units')",
    "compose": "from speechinstruct.compose.cross_modal import cross_modal; cross_modal(W / 'units', W / 'composed' / 'cross_modal')",
    "publish": "from speechinstruct.release.publish import publish; publish(W / 'composed', W / 'dataset')",
}


def _stage_rss_mb(stage: str, manifest: Path, work: Path, kmeans: Path) -> float:
    """Peak RSS of one stage run alone in a fresh process: its VmHWM. (Not ru_maxrss: Linux carries that over
    from the parent through fork and exec, so every child would report the benchmark's own peak.)"""
    code = (f"from pathlib import Path; M, W, KM = Path({str(manifest)!r}), Path({str(work)!r}), Path({str(kmeans)!r}); "
            f"{STAGE_CODE[stage]}; print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{stage}: {result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def bench_memory(work: Path, quick: bool) -> list[dict]:
    """Each stage at 1x and 8x the corpus, with the default shard size (10 h: every corpus here is ONE shard,
    so a stage that held a shard would grow 8x)."""
    from speechinstruct import recipe as sections
    from speechinstruct.units.cluster import cluster

    small = 40 if quick else 150
    sizes = {1: demo_corpus(work, small, shard_hours=10.0), 8: demo_corpus(work, small * 8, shard_hours=10.0)}
    rss: dict[str, dict[int, float]] = {stage: {} for stage in STAGE_CODE}
    for times, manifest in sizes.items():
        folder = work / f"mem-{times}x"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for stage in STAGE_CODE:
            if stage == "quantize" and times == 1:
                cluster(folder / "features", work / "mem-km", sections.KMeans(k=50))
            rss[stage][times] = _stage_rss_mb(stage, manifest, folder, work / "mem-km")
    return [{"name": f"{stage} peak RSS, {small} vs {small * 8} utterances in one shard", "baseline": "1x corpus",
             "baseline_mb": r[1], "ours_mb": r[8], "ratio": r[8] / r[1], "target": "<= 1.2x"} for stage, r in rss.items()]


def bench_vocoder(work: Path, quick: bool) -> list[dict]:
    """Resynthesis speed of a unit HiFi-GAN the size of SpeechGPT's (fairseq's mhubert ..._km1000_lj config:
    512 initial channels, upsampling 5x4x4x2x2, resblocks 3/7/11, 128-dim units, duration predictor), random
    weights, on CPU."""
    import torch

    from speechinstruct.threads import available_cpus
    from speechinstruct.units.vocoder import UnitVocoder

    torch.set_num_threads(available_cpus())
    config = {"upsample_rates": [5, 4, 4, 2, 2], "upsample_kernel_sizes": [11, 8, 8, 4, 4],
              "upsample_initial_channel": 512, "resblock_kernel_sizes": [3, 7, 11],
              "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "num_embeddings": 1000,
              "embedding_dim": 128, "model_in_dim": 128, "sampling_rate": 16000,
              "dur_predictor_params": {"encoder_embed_dim": 128, "var_pred_hidden_dim": 128,
                                       "var_pred_kernel_size": 3, "var_pred_dropout": 0.5}}
    torch.manual_seed(0)
    vocoder = UnitVocoder(config, source="speechgpt-size random")
    units = np.random.default_rng(0).integers(0, 1000, 100 if quick else 400)
    vocoder.synthesize(units[:20])
    wav, t = timed(vocoder.synthesize, units)
    seconds = wav.size / vocoder.sample_rate
    rows = [{"name": f"unit HiFi-GAN (SpeechGPT's size) on CPU, {available_cpus()} threads, {len(units)} units",
             "realtime": seconds / t, "ours_s": t, "target": "report",
             "extra": f"{seconds:.1f} s of speech"}]
    # the embedded preview (MFCC centroids -> Griffin-Lim, 32 iterations) at the demo's K=100
    from speechinstruct.units import KMeans
    from speechinstruct.units.vocoder import PreviewVocoder

    centroids = np.random.default_rng(0).normal(0, 1, (100, 39)).astype(np.float32)
    centroids[:, 0] += 40  # a C0 (log energy) in the range real MFCCs have
    preview = PreviewVocoder(KMeans(centroids, "random-mfcc-k100", {"features": {"features": "mfcc"}}))
    preview.synthesize(units[:20] % 100)
    wav, t = timed(preview.synthesize, units % 100)
    seconds = wav.size / preview.sample_rate
    rows.append({"name": f"preview vocoder (Griffin-Lim, 32 iterations) on CPU, {len(units)} units x 2.5 frames",
                 "realtime": seconds / t, "ours_s": t, "target": "report", "extra": f"{seconds:.1f} s of speech"})
    return rows


def bench_codecs(work: Path, quick: bool) -> list[dict]:
    """Codec tokenizers at their default (released) sizes, random weights, on CPU: encode and decode x real time of
    one utterance; for a codec extract batches on a GPU (all five: codecs.py) also a batch of
    utterances of mixed lengths against the same utterances one at a time, side by side, with the share of codes
    that agree."""
    import torch
    import transformers

    from speechinstruct.units.codecs import Codec
    from speechinstruct.threads import available_cpus
    from speechinstruct.tokenizers import CODECS

    torch.set_num_threads(available_cpus())
    rows = []
    seconds = 3.0 if quick else 10.0
    for kind, name in CODECS.items():
        config = getattr(transformers, name.replace("Model", "Config"))()
        model = getattr(transformers, name)(config)
        codec = Codec(kind, model, f"random {kind} (default config)")
        wav = (0.1 * np.random.default_rng(0).standard_normal(int(seconds * codec.sample_rate))).astype(np.float32)
        codec.units(wav[: codec.sample_rate])  # warm up
        units, t_enc = timed(codec.units, wav)
        _, t_dec = timed(codec.speech, units)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append({"name": f"{kind} encode, {params:.0f}M params, {codec.sample_rate} Hz, {codec.codebooks} codebooks, "
                             f"{seconds:g} s, {available_cpus()} threads", "realtime": seconds / t_enc, "ours_s": t_enc,
                     "target": "report", "extra": f"decode {seconds / t_dec:.1f}x real time"})
        if codec.batches:
            rows.append(codec_batch_row(codec, small=quick))
        del model, codec
    return rows


def codec_batch_row(codec, small: bool, lengths: tuple[float, float] = (1.0, 4.0), count: int = 16) -> dict:
    """A codec's batched encode (extract's way on a GPU) against one utterance at a time, side by side: ``count``
    utterances (8 when ``small``) of uniformly drawn lengths in seconds, on the codec's device (warmed up first)."""
    from speechinstruct.threads import available_cpus

    rng = np.random.default_rng(1)
    seconds = rng.uniform(*lengths, 8 if small else count)
    wavs = [(0.1 * rng.standard_normal(int(s * codec.sample_rate))).astype(np.float32) for s in seconds]
    codec.codes_batch(wavs[:2], batched=False), codec.codes_batch(wavs[:2], batched=True)  # warm up (cuDNN's choices)
    alone, t_alone = timed(codec.codes_batch, wavs, batched=False)
    batched, t_batch = timed(codec.codes_batch, wavs, batched=True)  # as on a GPU
    equal = sum(int((a == b).sum()) for a, b in zip(alone, batched)) / sum(a.size for a in alone)
    total = float(seconds.sum())
    where = codec.device if str(codec.device) != "cpu" else f"cpu, {available_cpus()} threads"
    return {"name": f"{codec.kind} encode, {len(wavs)} utterances of {lengths[0]:g}-{lengths[1]:g} s ({total:.0f} s) in "
                    f"one batch vs one at a time, {where}", "baseline": "one at a time", "speedup": t_alone / t_batch,
            "ours_s": t_batch, "baseline_s": t_alone, "target": ">= 5x on a GPU, codes >= 99.9 % equal; report on the CPU",
            "extra": f"batched {total / t_batch:.1f}x real time, alone {total / t_alone:.1f}x; codes equal {equal:.2%}"}


def long_recording(path: Path, minutes: float, seed: int = 0) -> float:
    """A recording of ``minutes``: espeak-ng sentences (demo voices) between silences of 0.3-4 s, 16 kHz FLAC,
    written a sentence at a time. Returns its seconds of speech."""
    import soundfile as sf

    from speechinstruct import audio
    from speechinstruct.sources.demo import sentences
    from speechinstruct.sources.tts import ESPEAK_VOICES, EspeakTTS

    rng = np.random.default_rng(seed)
    tts = EspeakTTS()
    spoken = [audio.resample(*tts.synthesize(t.lower(), ESPEAK_VOICES[i % 3], 165)) for i, t in enumerate(sentences(12, seed))]
    total, speech = int(minutes * 60 * 16000), 0
    with sf.SoundFile(str(path), "w", 16000, 1, format="FLAC") as out:
        written = 0
        while written < total:
            gap = np.zeros(int(rng.uniform(0.3, 4.0) * 16000), np.float32)
            clip = spoken[int(rng.integers(len(spoken)))]
            block = np.concatenate([gap, clip])[: total - written]
            out.write(block)
            written += block.size
            speech += max(0, block.size - gap.size)
    return speech / 16000


SHARD_AUDIO = ("from speechinstruct.sources.shard import shard_corpus; "
               "s = shard_corpus('audio', R, W, license='CC0-1.0'); print(s['utterances'])")


def bench_recordings(work: Path, quick: bool) -> list[dict]:
    """shard audio (silero-vad, streamed in blocks): x real time on a long recording, and peak RSS of the stage
    on a recording of 1x and 8x that length (a fresh process each: its VmHWM)."""
    minutes = 0.5 if quick else 1.0
    rows, rss = [], {}
    for times in (1, 8):
        root = work / f"recordings-{times}x"
        if not root.exists():
            root.mkdir()
            long_recording(root / "long.flac", minutes * times)
        out = work / f"recordings-{times}x-manifest"
        shutil.rmtree(out, ignore_errors=True)
        code = (f"from pathlib import Path; R, W = Path({str(root)!r}), Path({str(out)!r}); import time; t = time.perf_counter(); "
                f"{SHARD_AUDIO}; print(time.perf_counter() - t); "
                "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(result.stderr[-2000:])
        utterances, seconds, hwm = result.stdout.split()[-3:]
        rss[times] = int(hwm) / 1024
        rows.append({"name": f"shard audio, one {minutes * times:g}-minute 16 kHz FLAC recording, {utterances} utterances, "
                             "2 threads", "realtime": minutes * times * 60 / float(seconds), "ours_s": float(seconds),
                     "target": "report"})
    rows.append({"name": f"shard audio peak RSS, a {minutes:g}- vs a {minutes * 8:g}-minute recording", "baseline": "1x",
                 "baseline_mb": rss[1], "ours_mb": rss[8], "ratio": rss[8] / rss[1], "target": "<= 1.2x"})
    rows.append(bench_vad_threads(work, minutes))
    return rows


def bench_vad_threads(work: Path, minutes: float) -> dict:
    """shard audio on four recordings: the VAD in one thread per available CPU against one thread."""
    from speechinstruct.sources.shard import shard_corpus
    from speechinstruct.threads import available_cpus

    root = work / "recordings-4files"
    if not root.exists():
        root.mkdir()
        for seed in range(4):
            long_recording(root / f"r{seed}.flac", minutes, seed)
    times = {}
    for workers in (1, available_cpus(), 1, available_cpus()):  # twice each, interleaved: the host's load drifts
        shutil.rmtree(work / "recordings-4files-manifest", ignore_errors=True)
        _, t = timed(shard_corpus, "audio", root, work / "recordings-4files-manifest", license="CC0-1.0", workers=workers)
        times[workers] = min(times.get(workers, t), t)
    n = available_cpus()
    return {"name": f"shard audio, four {minutes:g}-minute recordings: VAD in {n} threads vs 1", "baseline": "1 thread",
            "speedup": times[1] / times[n], "ours_s": times[n], "baseline_s": times[1],
            "target": "report", "extra": f"{4 * minutes * 60 / times[n]:.0f}x real time in {n} threads"}


def bench_compose(work: Path, quick: bool) -> list[dict]:
    from speechinstruct.compose.cross_modal import cross_modal
    from speechinstruct import recipe as sections
    from speechinstruct.units.cluster import cluster
    from speechinstruct.units.quantize import quantize
    from speechinstruct.units import load_kmeans

    manifest = demo_corpus(work, 120 if quick else 400)
    features = mfcc(work, manifest)
    units = work / f"units-{manifest.name}"
    if not units.exists():
        cluster(features, work / f"km-{manifest.name}", sections.KMeans(k=50))
        quantize(features, load_kmeans(work / f"km-{manifest.name}"), units)
    shutil.rmtree(work / "cm", ignore_errors=True)
    summary, t = timed(cross_modal, units, work / "cm")
    return [{"name": "compose cross-modal", "records": summary["records"], "ours_s": t,
             "records_per_s": summary["records"] / t, "target": "report"}, bench_dialogue(work, quick, load_kmeans(work / f"km-{manifest.name}"))]


def bench_dialogue(work: Path, quick: bool, km) -> dict:
    """compose dialogue with the TTS cache warm (every turn synthesized once before): spoken turns per second.
    The conversations are the shipped sample's, repeated under new ids."""
    from importlib import resources

    from speechinstruct.compose.dialogue import dialogue
    from speechinstruct.units.features import MFCC
    from speechinstruct.sources.tts import make_tts
    from speechinstruct.units import SpeechEncoder

    sample = resources.files("speechinstruct.data").joinpath("dialogues_sample.jsonl").read_text().splitlines()
    chats = work / "chats.jsonl"
    copies = 4 if quick else 16
    chats.write_text("".join(json.dumps({**json.loads(line), "id": f"{json.loads(line)['id']}-{i}"}) + "\n"
                             for i in range(copies) for line in sample))
    tts = make_tts("espeak", work / "dialogue-tts")
    shutil.rmtree(work / "dialogue-cold", ignore_errors=True)
    dialogue(chats, work / "dialogue-cold", SpeechEncoder(km, MFCC()), tts)  # every voice and text synthesized once
    shutil.rmtree(work / "dialogue", ignore_errors=True)
    calls = tts.calls
    summary, t = timed(dialogue, chats, work / "dialogue", SpeechEncoder(km, MFCC()), tts)
    assert tts.calls == calls, "the TTS cache was not warm"
    turns = 2 * summary["turns"]
    return {"name": f"compose dialogue, TTS cache warm (espeak-ng), MFCC + K=50, {summary['records']} dialogues",
            "turns": turns, "ours_s": t, "turns_per_s": turns / t, "target": ">= 50 turns/s"}


def bench_score(work: Path, quick: bool) -> list[dict]:
    from speechmos import dnsmos as speechmos_dnsmos

    from speechinstruct import audio
    from speechinstruct.io import read_table
    from speechinstruct.judges.dnsmos import DNSMOS, dnsmos_windows
    from speechinstruct.judges.asr import load_asr
    from speechinstruct.shardfiles import corpus_root, manifest_files

    manifest = demo_corpus(work, 60)
    root = corpus_root(manifest)
    rows = read_table(manifest_files(manifest)[0]).to_pylist()[: 8 if quick else 24]
    clips = [audio.load(root / r["path"]) for r in rows]
    seconds = sum(len(c) for c in clips) / audio.TARGET_SR
    judge = DNSMOS()
    judge.score(clips[:1])  # sessions built and warm, as in a long run
    speechmos_dnsmos.run(clips[0], 16000)
    ours, t_ours = timed(judge.score, clips)
    theirs, t_theirs = timed(lambda: [speechmos_dnsmos.run(c, 16000) for c in clips])
    diff = max(abs(o["dnsmos_ovrl"] - float(t["ovrl_mos"])) for o, t in zip(ours, theirs))
    windows = sum(len(dnsmos_windows(c)) for c in clips)
    p835 = judge.p835
    batch = np.zeros((judge.batch_windows, 144160), np.float32)
    _, t_model = timed(lambda: [p835.run(None, {"input_1": batch}) for _ in range(max(1, windows // judge.batch_windows))])
    out = [{"name": f"DNSMOS, {len(clips)} demo clips ({seconds:.0f} s, {windows} windows)", "baseline": "speechmos dnsmos.run",
            "baseline_s": t_theirs, "ours_s": t_ours, "speedup": t_theirs / t_ours, "target": ">= 20x",
            "extra": f"max |OVRL difference| {diff:.2g}; {seconds / t_ours:.1f}x real time; the P.835 network alone on "
                     f"the same number of windows: {t_model:.2f} s"}]
    sys.path.insert(0, str(HERE.parent / "tests"))
    from asr_fixture import write_tiny_whisper

    folder = work / "whisper-256"
    if not folder.exists():
        write_tiny_whisper(folder, d_model=256, layers=2)
    asr = load_asr(str(folder), batch_size=8)
    asr.transcribe(clips[:2])
    asr_clips = clips[:16]
    batched, t_batched = timed(asr.transcribe, asr_clips)
    asr.batch_size = 1
    single, t_single = timed(asr.transcribe, asr_clips)
    out.append({"name": f"ASR, random Whisper d_model 256, {len(asr_clips)} clips, batch 8", "baseline": "one clip at a time",
                "baseline_s": t_single, "ours_s": t_batched, "speedup": t_single / t_batched, "target": ">= 2x",
                "extra": f"same texts: {batched == single}"})
    out.append(parakeet_row(work, "cpu", clips[:4 if quick else 8], hidden=256 if quick else 1024,
                            layers=4 if quick else 24, batch_size=4))
    return out


def parakeet_row(work: Path, device: str, clips: list, hidden: int = 1024, layers: int = 24, batch_size: int = 64,
                 dtype: str = "auto") -> dict:
    """A Parakeet CTC model (random weights; 1024 x 24 layers is parakeet-ctc-0.6b's shape) transcribing ``clips``
    through score's ASR judge: x real time (the Open ASR leaderboard's fastest, Parakeet-TDT-0.6B, reports RTFx
    3,380 on its GPU)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from asr_fixture import write_tiny_parakeet_ctc

    from speechinstruct.judges.asr import load_asr
    from speechinstruct.threads import available_cpus

    folder = work / f"parakeet-ctc-{hidden}x{layers}"
    if not folder.exists():
        write_tiny_parakeet_ctc(folder, hidden=hidden, layers=layers, device=device)
    asr = load_asr(str(folder), device=device, batch_size=batch_size, dtype=dtype)
    params = sum(p.numel() for p in asr.model.parameters()) / 1e6
    asr.transcribe(clips[:2])  # warm up
    seconds = sum(len(c) for c in clips) / 16000
    _, t = timed(asr.transcribe, clips)
    where = device if device != "cpu" else f"cpu, {available_cpus()} threads"
    return {"name": f"ASR, Parakeet CTC shape {hidden}x{layers} ({params:.0f}M params, random), {len(clips)} clips "
                    f"({seconds:.0f} s), batch {batch_size}, {asr.dtype}, {where}",
            "realtime": seconds / t, "ours_s": t, "target": ">= 4000x real time on an H200 (0.6B shape); report on the CPU"}


STARTUP_BASELINE = "1e43768"  # the landed code before imports moved to where they are used (issue 18)


def bench_startup(work: Path, quick: bool) -> list[dict]:
    """``speechinstruct --help`` and ``validate DATASET`` wall time, this checkout vs the baseline commit's
    package (``git archive`` of it, run from a temporary folder), alternating, best of N each."""
    from speechinstruct.compose.cross_modal import cross_modal
    from speechinstruct import recipe as sections
    from speechinstruct.units.cluster import cluster
    from speechinstruct.release.publish import publish
    from speechinstruct.units.quantize import quantize
    from speechinstruct.units import load_kmeans

    manifest = demo_corpus(work, 40)
    features = mfcc(work, manifest)
    units, dataset = work / "startup-units", work / "startup-dataset"
    if not dataset.exists():
        cluster(features, work / "startup-km", sections.KMeans(k=20))
        quantize(features, load_kmeans(work / "startup-km"), units)
        cross_modal(units, work / "startup-composed" / "cross_modal")
        publish(work / "startup-composed", dataset)
    before = work / f"startup-{STARTUP_BASELINE}"
    if not before.exists():
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", STARTUP_BASELINE, "speechinstruct", "schemas",
                                  "recipes"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    code = "import sys; from speechinstruct.cli import main; sys.argv = ['speechinstruct', *sys.argv[1:]]; main()"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(folder: Path, args: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, *args], cwd=folder, env=env, check=True, capture_output=True)
        return time.perf_counter() - start

    rows = []
    for label, args in (("--help", ["--help"]), ("validate", ["validate", str(dataset)])):
        ours, base = [], []
        for _ in range(3 if quick else 7):
            base.append(run(before, args))
            ours.append(run(HERE.parent, args))
        rows.append({"name": f"speechinstruct {label} start-up", "baseline": f"commit {STARTUP_BASELINE}", "baseline_s": min(base),
                     "ours_s": min(ours), "speedup": min(base) / min(ours), "target": "faster"})
    return rows


def train_data(work: Path, quick: bool) -> tuple[Path, Path]:
    """(a demo dataset of 60 sentences, a tiny LLaMA with its tokenizer), made once in ``work``."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from speechinstruct.pipeline import run

    data = work / "train-data"
    if not (data / "dataset").exists():
        import yaml

        (work / "train.yaml").write_text(yaml.safe_dump({"workdir": str(data), "demo_corpus": {"sentences": 60},
                                                         "kmeans": {"k": 100, "max_frames": 50000}}))
        run(work / "train.yaml")
    base = work / "tiny-llama"
    if not base.exists():
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(["speech text instruction transcribe read aloud"] * 50,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        hidden = 256 if quick else 512
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
                                     num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)).save_pretrained(base)
        tokenizer.save_pretrained(base)
    return data, base


def bench_train(work: Path, quick: bool) -> list[dict]:
    import torch
    from transformers import LlamaForCausalLM

    from speechinstruct.model import train as T

    data, base = train_data(work, quick)
    shutil.rmtree(work / "train-out", ignore_errors=True)
    steps, batch, max_length = (5 if quick else 20), 8, 512
    cfg = T.TrainConfig(max_steps=steps, batch_size=batch, lr=1e-4, save_every=10**6, log_every=1, max_length=max_length,
                        warmup_ratio=0.0, max_grad_norm=1.0, mask="prefix")
    result, t = timed(T.train, 2, base, data / "dataset", work / "train-out", cfg)
    tps = result["history"][-1]["tokens_per_s"]
    extra = "no GPU here: model FLOP utilisation needs one"
    if torch.cuda.is_available():
        params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(work / "train-out" / "model").parameters())
        peak = gpu_peak_flops()
        extra = f"MFU ~ {6 * params * tps / peak:.2%} (6 N tokens/s over {peak / 1e12:.0f} TFLOP/s)"
    rows = [{"name": f"train stage 2, tiny LLaMA, {steps} steps", "tokens_per_s": tps, "ours_s": t, "target": "report", "extra": extra}]
    try:
        trl_tps = _trl_sft(base, data / "dataset", work / "trl-out", steps, batch, max_length)
    except ImportError:
        return rows + [{"name": "ours vs TRL SFTTrainer", "skipped": "trl is not installed (pip install trl)"}]
    rows.append({"name": "stage 2 training loop, same model/data/steps/batch/max length, non-padding tokens/s",
                 "baseline": "TRL SFTTrainer", "baseline_tps": trl_tps, "ours_tps": tps, "throughput": tps / trl_tps,
                 "target": ">= 1.3x"})
    return rows


def train_1b_row(work: Path, device: str) -> dict:
    """Our training loop (stage 1: unit text packed into 1024-token blocks) on a LLaMA of 1.0B parameters
    (TinyLlama's shape: 2048 wide, 22 layers, 32 heads, 4 KV heads; random weights), bf16 and SDPA on a GPU:
    tokens/s of the last steps and MFU as 6 N tokens/s over the card's peak (:func:`gpu_peak_flops`).
    On the CPU (``GPU_DRYRUN``) a small LLaMA of the same build, to check the code."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from speechinstruct.model import train as T

    # TRAIN_DATA: a folder with the demo's published ``dataset`` and ``tiny-llama`` made beforehand (train_data), as
    # benchmarks/gpu_check.sh brings them: making them here runs the whole pipeline (espeak-ng, scoring, …)
    if os.environ.get("TRAIN_DATA"):
        data = Path(os.environ["TRAIN_DATA"])
        tiny = data / "tiny-llama"
    else:
        data, tiny = train_data(work, quick=True)
    small = device == "cpu"
    base = work / ("llama-small" if small else "llama-1b")
    if not base.exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tiny)
        shape = (dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
                 if small else dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                                    num_key_value_heads=4))
        with torch.device(device):  # random weights drawn where the model trains: a GPU draws 1B in a moment
            model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, **shape))
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        del model
    steps = 4 if small else 30
    cfg = T.TrainConfig(max_steps=steps, batch_size=4 if small else 16, lr=1e-4, save_every=10**6, log_every=1,
                        block_size=256 if small else 1024, warmup_ratio=0.0)
    shutil.rmtree(work / "train-1b-out", ignore_errors=True)
    result, t = timed(T.train, 1, base, data / "dataset", work / "train-1b-out", cfg)
    tps = result["history"][-1]["tokens_per_s"]
    from transformers import AutoConfig

    with torch.device("meta"):  # the trained model's size (its vocabulary grew by the unit tokens), no weights read
        params = sum(p.numel() for p in LlamaForCausalLM(AutoConfig.from_pretrained(work / "train-1b-out" / "model")).parameters())
    row = {"name": f"train stage 1, LLaMA {params / 1e9:.2f}B params (random), blocks of {cfg.block_size}, batch "
                   f"{cfg.batch_size}, {steps} steps, {'bf16' if torch.cuda.is_available() else 'fp32'}, sdpa, {device}",
           "tokens_per_s": tps, "ours_s": t, "target": "report tokens/s and MFU"}
    if torch.cuda.is_available():
        peak = gpu_peak_flops()
        row["extra"] = f"MFU ~ {6 * params * tps / peak:.2%} (6 N tokens/s over {peak / 1e12:.0f} TFLOP/s)"
    return row


def _trl_sft(base: Path, dataset: Path, out: Path, steps: int, batch: int, max_length: int) -> float:
    """TRL's SFTTrainer on the published cross_modal config as loaded (prompt/completion), with the settings
    our loop uses: non-padding tokens per second of its training loop (its own ``num_tokens`` over its
    ``train_runtime``), as our loop measures itself."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from speechinstruct.model import train as T

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    T.expand_vocabulary(model, tok, T.dataset_k(dataset))
    train = datasets.load_dataset(str(dataset), "cross_modal", split="train")
    shutil.rmtree(out, ignore_errors=True)
    # in our loop's precision (bf16 where the GPU has it, else fp32): SFTConfig's bf16 defaults to True, which on a
    # CPU without native bf16 (an AVX2 EPYC) made TRL's steps 30 s each, 22x slower than ours in fp32
    import torch

    bf16 = torch_cuda() and torch.cuda.is_bf16_supported()
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                     lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, max_length=max_length,
                     report_to=[], save_strategy="no", logging_steps=1, use_cpu=not torch_cuda(),
                     gradient_checkpointing=False, dataloader_num_workers=0, bf16=bf16, fp16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    runtime = trainer.train().metrics["train_runtime"]
    tokens = max(entry.get("num_tokens", 0) for entry in trainer.state.log_history)
    return tokens / runtime


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def bench_dedup(work: Path, quick: bool) -> list[dict]:
    """dedup: utterances per second over synthetic unit rows (K=1000, 150 units each, 1 % planted copies), and the
    recall of planted re-encoded copies (MP3 64 kbit/s, Opus, resampled, 10 % cut, white noise at 20 dB SNR) of
    espeak-ng sentences on MFCC units (K=100) and on the units of a tiny random HuBERT, with the false drops among
    the distinct sentences."""
    import sys

    from speechinstruct import records
    from speechinstruct.curate.dedup import dedup
    from speechinstruct.io import write_parquet
    from speechinstruct.units import to_text

    sys.path.insert(0, str(HERE.parent / "tests"))
    rows_n = 2000 if quick else 20000
    rng = np.random.default_rng(0)
    folder = work / f"dedup-synthetic-{rows_n}"
    if not folder.exists():
        folder.mkdir(parents=True)
        for shard in range(4):
            rows = []
            for i in range(rows_n // 4):
                units = rng.integers(0, 1000, 150)
                if i % 100 == 1:  # a copy of the row before, 10 % of its units changed
                    units = rows[-1]["units"].copy()
                    units[rng.integers(0, 150, 15)] = rng.integers(0, 1000, 15)
                rows.append({"units": np.asarray(units)})
            table_rows = [{"id": f"syn/{shard}-{i:06d}", "path": "x.flac", "offset": 0.0, "duration": 3.0,
                           "sample_rate": 16000, "text": f"sentence {shard} {i}", "speaker": f"s{i % 50}", "corpus": "syn",
                           "license": "x", "split": "train", "corpus_split": "train", "units": r["units"].tolist(),
                           "durations": [2] * 150, "n_frames": 300, "unit_text": to_text(r["units"])} for i, r in enumerate(rows)]
            write_parquet(folder / f"units-{shard:05d}.parquet", records.to_table("units", table_rows))
    shutil.rmtree(work / "dedup-out", ignore_errors=True)
    summary, t = timed(dedup, folder, work / "dedup-out")
    planted = (rows_n // 100)
    out = [{"name": f"dedup of {rows_n} synthetic unit rows (K=1000, 150 units), first run (signatures computed)",
            "records": rows_n, "ours_s": t, "records_per_s": rows_n / t, "target": ">= 1000 utterances/s on 2 cores",
            "extra": f"dropped {sum(summary['dropped'].values())} of {planted} planted; {summary['bytes_per_utterance']} "
                     "bytes per utterance (signature and units)"}]
    _, t2 = timed(dedup, folder, work / "dedup-out")
    out.append({"name": "the same, rerun (signatures cached)", "records": rows_n, "ours_s": t2, "records_per_s": rows_n / t2})
    import tracemalloc

    tracemalloc.start()  # what the decisions hold per utterance: Python's allocations at the peak, over the rows
    dedup(folder, work / "dedup-out")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out[0]["extra"] += f"; peak Python memory of a (cached) run {peak / rows_n:.0f} bytes per utterance"
    return out + dedup_recall(work, quick)


def dedup_recall(work: Path, quick: bool) -> list[dict]:
    from test_dedup import COPIES, copy_of, spoken_sentences, write_utterances

    from speechinstruct import recipe as sections
    from speechinstruct.units.cluster import cluster
    from speechinstruct.curate.dedup import dedup
    from speechinstruct.sources.demo import sentences
    from speechinstruct.units.extract import extract
    from speechinstruct.units.features import MFCC, load_hubert
    from speechinstruct.units.quantize import quantize
    from speechinstruct.sources.shard import shard_corpus
    from speechinstruct.units import load_kmeans

    base = work / "dedup-recall"
    n, copied = (40, 10) if quick else (200, 40)
    if not (base / "manifest").exists():
        spoken = spoken_sentences(list(dict.fromkeys(sentences(n * 2, seed=11)))[:n])
        root = base / "LibriSpeech"
        for s in range(0, n, 20):
            write_utterances(root, "train-clean-100", f"{100 + s // 20}", spoken[s: s + 20])
        write_utterances(root, "train-clean-100", "900", [(copy_of(spoken[i][0], kind, i), spoken[i][1])
                                                          for i in range(copied) for kind in COPIES])
        shard_corpus("librispeech", root, base / "manifest")
    import torch
    from transformers import HubertConfig, HubertModel

    if not (base / "hubert").exists():
        torch.manual_seed(0)
        HubertModel(HubertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                 conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
                    ).save_pretrained(base / "hubert")
    out = []
    for name, extractor in (("MFCC", MFCC()), ("tiny random HuBERT", load_hubert(base / "hubert", layer=2))):
        tag = name.split()[0].lower()
        if not (base / f"units-{tag}").exists():
            extract(base / "manifest", base / f"features-{tag}", extractor)
            cluster(base / f"features-{tag}", base / f"km-{tag}", sections.KMeans(k=100))
            quantize(base / f"features-{tag}", load_kmeans(base / f"km-{tag}"), base / f"units-{tag}")
        shutil.rmtree(base / f"out-{tag}", ignore_errors=True)
        dedup(base / f"units-{tag}", base / f"out-{tag}")
        gone = {json.loads(line)["id"] for f in (base / f"out-{tag}").glob("dropped-*.jsonl") for line in f.read_text().splitlines()}
        found = {kind: np.mean([f"librispeech/900-1-{i * len(COPIES) + k:04d}" in gone for i in range(copied)])
                 for k, kind in enumerate(COPIES)}
        originals = [f"librispeech/{100 + i // 20}-1-{i % 20:04d}" for i in range(n)]
        false = np.mean([o in gone for o in originals])
        out.append({"name": f"dedup recall of planted copies, {name} units (K=100), {n} sentences, {copied} copied",
                    "figure": ", ".join(f"{k} {v:.0%}" for k, v in found.items()) + f"; originals dropped {false:.1%}",
                    "target": "exact and re-encoded >= 95 %, false positives <= 1 %"})
    return out


def bench_speakers(work: Path, quick: bool) -> list[dict]:
    """Speaker embeddings (Resemblyzer's GE2E, as score --speaker runs it) per second and x real time, on the CPU
    with the process's threads, and on a GPU when there is one; and language ID of transcripts per second."""
    import torch

    from speechinstruct.judges.judge import language_of
    from speechinstruct.judges.speakers import GE2E

    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(int(16000 * (2 + 4 * rng.random())))).astype(np.float32)
             for _ in range(40 if quick else 200)]
    seconds = sum(c.size for c in clips) / 16000
    rows = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        encoder = GE2E(device)
        encoder.embed(clips[0])
        _, t = timed(lambda: [encoder.embed(c) for c in clips])
        rows.append({"name": f"GE2E speaker embeddings on {device}, {len(clips)} clips of 2-6 s", "records": len(clips),
                     "ours_s": t, "records_per_s": len(clips) / t, "extra": f"{seconds / t:.0f}x real time"})
    texts = ["the old sailor walked slowly to the red house by the sea", "das alte haus am meer war leer"] * (500 if quick else 2500)
    language_of(texts[0])
    _, t = timed(lambda: [language_of(x) for x in texts])
    rows.append({"name": f"langid on {len(texts)} transcripts", "records": len(texts), "ours_s": t,
                 "records_per_s": len(texts) / t})
    return rows


SECTIONS = {"kmeans": bench_kmeans, "kmeans_1m": bench_kmeans_1m, "dedup": bench_dedup, "speakers": bench_speakers, "extract": bench_extract, "codecs": bench_codecs, "gpu": bench_gpu, "engine": bench_engine, "engine_score": bench_engine_score,
            "memory": bench_memory, "vocoder": bench_vocoder, "recordings": bench_recordings, "compose": bench_compose, "score": bench_score, "train": bench_train,
            "startup": bench_startup}
GPU_SECTIONS = ("gpu_kmeans", "gpu_asr", "gpu_codecs", "gpu_train", "gpu_hubert")  # `gpu` runs them all
SECTIONS.update({name: globals()[f"bench_{name}"] for name in GPU_SECTIONS})


def table_line(r: dict) -> str:
    """One row of the printed table: the figure against its baseline and target."""
    if "skipped" in r:
        return f"{r['section']:>8} | {r['name']}: skipped: {r['skipped']}"
    if "figure" in r:
        line = f"{r['figure']} (target {r['target']})"
    elif "speedup" in r:
        line = f"{r['baseline_s']:.2f} s ({r['baseline']}) vs {r['ours_s']:.2f} s → {r['speedup']:.2f}x (target {r['target']})"
    elif "ratio" in r:
        line = f"{r['baseline_mb']:.0f} MB ({r['baseline']}) vs {r['ours_mb']:.0f} MB → {r['ratio']:.2f}x (target {r['target']})"
    elif "throughput" in r:
        line = (f"{r['baseline_tps']:.0f} tokens/s ({r['baseline']}) vs {r['ours_tps']:.0f} tokens/s → "
                f"{r['throughput']:.2f}x (target {r['target']})")
    elif "realtime" in r:
        line = f"{r['realtime']:.0f}x real time ({r['ours_s']:.1f} s; target {r['target']})"
    elif "fraction" in r:
        line = (f"{r['baseline_gflops']:.0f} GFLOP/s ({r['baseline']}) vs {r['ours_gflops']:.0f} GFLOP/s → "
                f"{r['fraction']:.2f} (target {r['target']})")
    elif "records_per_s" in r:
        line = f"{r['records']} records in {r['ours_s']:.2f} s → {r['records_per_s']:.0f} records/s"
    elif "turns_per_s" in r:
        line = f"{r['turns']} turns in {r['ours_s']:.2f} s → {r['turns_per_s']:.0f} turns/s (target {r['target']})"
    else:
        line = f"{r['tokens_per_s']:.0f} tokens/s"
    return f"{r['section']:>8} | {r['name']}: {line}" + (f"; {r['extra']}" if r.get("extra") else "")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small workloads (a minute or two)")
    parser.add_argument("--only", default=",".join(n for n in SECTIONS if n not in GPU_SECTIONS),
                        help="comma-separated sections")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--results", default="work/benchmarks/results.jsonl", help="append the run's JSON line here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from speechinstruct import threads

    threads.configure()  # as every command does: thread counts from the usable CPUs, passive OpenMP waiting
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="speechinstruct-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only.split(","):
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        print(f"running {name} …", flush=True)
        done = [{"section": name, **r} for r in SECTIONS[name](work, args.quick)]
        for r in done:  # as each section ends: a run stopped at a time limit keeps what it measured
            print(table_line(r), flush=True)
        rows += done
    print()
    for r in rows:
        print(table_line(r))
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": platform.node(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "quick": args.quick, "results": rows}
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"\nappended to {results}")


if __name__ == "__main__":
    main()

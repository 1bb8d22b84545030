"""Listening to units: the embedded preview vocoder (MFCC centroids → Griffin-Lim), the report's samples
with their mel-cepstral distance, and the report played in a real browser (headless Chromium)."""

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml
from scipy.fft import dct, idct
from typer.testing import CliRunner

from speechinstruct import audio
from speechinstruct.cli import app
from speechinstruct.units.features import MFCC
from speechinstruct.pipeline import run
from speechinstruct.units import KMeans
from speechinstruct.units.vocoder import PreviewVocoder, load_vocoder, mel_cepstral_distortion

from conftest import speechlike

runner = CliRunner()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The embedded default at its smallest: demo corpus → MFCC units (K=16) → dataset → report (preview)."""
    tmp = tmp_path_factory.mktemp("listen")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"workdir": str(tmp / "work"), "demo_corpus": {"sentences": 12, "seed": 1},
                                      "kmeans": {"k": 16, "max_frames": 20000},
                                      "compose": {"chain_of_modality": {"max_pairs": 4}}}))
    summary = run(recipe)
    return tmp / "work", summary


def test_preview_inverts_kaldis_cepstra_to_kaldis_log_mel_energies():
    """The preview's first step, checked against Kaldi's own filterbank (kaldi-native-fbank): the 13 cepstra
    of an MFCC frame, un-liftered and inverse-DCT'd, are that frame's 23 log mel energies, smoothed to 13
    cepstral terms (what 13 cepstra can hold)."""
    import kaldi_native_fbank as knf

    wav = speechlike(1.0, seed=3)
    ceps = MFCC().features(wav)[:, :13]
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = 23
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, wav)
    fbank.input_finished()
    log_mel = np.array([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])
    smoothed = idct(dct(log_mel, type=2, norm="ortho", axis=1)[:, :13], type=2, n=23, norm="ortho", axis=1)

    centroids = np.zeros((ceps.shape[0], 39), dtype=np.float32)
    centroids[:, :13] = ceps
    preview = PreviewVocoder(KMeans(centroids, "frames", {"features": {"features": "mfcc"}}))
    np.testing.assert_allclose(np.log(preview._mel_power), smoothed, atol=2e-3)


def test_preview_speech_is_closer_to_the_original_than_noise_and_keeps_its_timing(work, tmp_path):
    folder, _ = work
    vocoder = load_vocoder(folder / "kmeans")
    assert vocoder.is_preview and "preview" in vocoder.source
    row = pq.read_table(sorted((folder / "speechinstruct-demo" / "units").glob("units-*.parquet"))[0]).to_pylist()[0]
    root = json.loads((folder / "speechinstruct-demo" / "units" / "units.json").read_text())["root"]
    original = audio.load(f"{root}/{row['path']}", row["offset"], row["duration"])
    timed = vocoder.synthesize(row["units"], row["durations"])
    assert timed.dtype == np.float32 and timed.size == sum(row["durations"]) * 160  # 10 ms per frame
    np.testing.assert_array_equal(vocoder.synthesize(row["units"], row["durations"]), timed)  # deterministic
    fixed = vocoder.synthesize(row["units"])  # deduplicated units: 2.5 frames each
    assert fixed.size == round(len(row["units"]) * 2.5) * 160
    noise = np.random.default_rng(0).normal(0, 0.1, original.size).astype(np.float32)
    for name, wav in (("original", original), ("preview", timed), ("noise", noise)):
        audio.write_wav(tmp_path / f"{name}.wav", wav)
    close = mel_cepstral_distortion(tmp_path / "original.wav", tmp_path / "preview.wav")
    far = mel_cepstral_distortion(tmp_path / "original.wav", tmp_path / "noise.wav")
    assert mel_cepstral_distortion(tmp_path / "original.wav", tmp_path / "original.wav") == pytest.approx(0, abs=1e-6)
    assert 0 < close < 0.7 * far, (close, far)


def test_preview_refuses_hubert_units_and_foreign_units():
    hubert = KMeans(np.zeros((8, 768), dtype=np.float32), "km-hubert", {"features": {"features": "hubert"}})
    with pytest.raises(ValueError, match="needs a k-means of MFCC features.*768 dims.*unit HiFi-GAN"):
        PreviewVocoder(hubert)
    small = PreviewVocoder(KMeans(np.zeros((4, 39), dtype=np.float32), "km4", {"features": {"features": "mfcc"}}))
    with pytest.raises(ValueError, match="unit 7 is outside this vocoder's vocabulary 0..3"):
        small.synthesize([1, 7])
    with pytest.raises(ValueError, match="no units"):
        small.synthesize([])


def test_demo_report_has_originals_resyntheses_and_their_distance(work):
    folder, summary = work
    report = folder / "report"
    numbers = json.loads((report / "report.json").read_text())
    page = (report / "index.html").read_text()
    assert "Preview vocoder" in page and "not SpeechGPT's unit vocoder" in page
    assert summary["resynthesis"]["mcd_db"] == numbers["resynthesis_mcd_db"] > 0
    originals, resyntheses = sorted(report.glob("audio/*-original.wav")), sorted(report.glob("audio/*-resynth.wav"))
    assert len(originals) == 4 and len(resyntheses) == 5  # 4 utterances + one chain-of-modality [ua] answer
    for wav in originals + resyntheses:
        info = sf.info(str(wav))
        assert info.samplerate == 16000 and info.channels == 1 and info.duration > 0.5
        assert f"src='audio/{wav.name}'" in page


def test_report_cli_takes_units_and_any_vocoder(work, tmp_path):
    from fairseq_vocoder_fixture import random_generator_state, save_vocoder, vocoder_config

    folder, _ = work
    dataset, units = folder / "dataset", folder / "speechinstruct-demo" / "units"
    only_originals = runner.invoke(app, ["report", str(dataset), str(tmp_path / "a"), "--units", str(units), "--samples", "2"])
    assert only_originals.exit_code == 0, only_originals.output
    assert len(list((tmp_path / "a" / "audio").glob("*-original.wav"))) == 2
    assert not list((tmp_path / "a" / "audio").glob("*-resynth.wav"))

    cfg = vocoder_config(True, k=16)
    save_vocoder(tmp_path / "voc", cfg, random_generator_state(cfg))
    hifigan = runner.invoke(app, ["report", str(dataset), str(tmp_path / "b"), "--vocoder", str(tmp_path / "voc")])
    assert hifigan.exit_code == 0, hifigan.output
    numbers = json.loads((tmp_path / "b" / "report.json").read_text())
    assert numbers["samples"] == 5 and "resynthesis_mcd_db" not in numbers  # no originals: no distance
    assert "Preview vocoder" not in (tmp_path / "b" / "index.html").read_text()

    wrong = runner.invoke(app, ["report", str(dataset), str(tmp_path / "c"), "--units", str(dataset)])
    assert wrong.exit_code == 2 and "not a units folder" in wrong.output and "Traceback" not in wrong.output
    foreign = tmp_path / "foreign"  # a units folder whose file is another table: named, with what it lacks
    shutil.copytree(units, foreign)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "x": [1]}), sorted(foreign.glob("units-*.parquet"))[0])
    wrong = runner.invoke(app, ["report", str(dataset), str(tmp_path / "d"), "--units", str(foreign)])
    assert wrong.exit_code == 2 and "units-00000.parquet: not a units file (no path" in wrong.stderr, wrong.output


def units_in_a_tar_and_on_a_channel(work, tmp_path) -> tuple[Path, np.ndarray, list[dict]]:
    """A copy of the demo's units folder whose first two rows' audio lies in a WebDataset tar (`tar_offset`) and whose
    third row is the right channel of a stereo file (`channel`, the left silent): (the folder, that speech, rows)."""
    import io
    import tarfile

    import pyarrow as pa

    folder, _ = work
    units = folder / "speechinstruct-demo" / "units"
    spec = json.loads((units / "units.json").read_text())
    copy, tars = tmp_path / "units", tmp_path / "tars"
    shutil.copytree(units, copy)
    tars.mkdir()
    first = sorted(copy.glob("units-*.parquet"))[0]
    table = pq.read_table(first)
    rows = table.to_pylist()[:2]
    with tarfile.open(tars / "train-000000.tar", "w") as tar:
        for i, row in enumerate(rows):
            data = (Path(spec["root"]) / row["path"]).read_bytes()
            info = tarfile.TarInfo(f"{i:03d}.flac")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tars / "train-000000.tar") as tar:
        for i, row in enumerate(rows):
            member = tar.getmember(f"{i:03d}.flac")
            row.update(path="train-000000.tar", tar_offset=member.offset_data, tar_size=member.size)
    speech = sf.read(Path(spec["root"]) / table.to_pylist()[2]["path"], dtype="float32")[0]
    sf.write(tars / "call.wav", np.stack([np.zeros_like(speech), speech], axis=1), 16000)
    rows.append({**table.to_pylist()[2], "path": "call.wav", "offset": 0.0, "duration": 1.0, "channel": 1})
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), first)
    for other in sorted(copy.glob("units-*.parquet"))[1:]:
        other.unlink()
    (copy / "units.json").write_text(json.dumps({**spec, "root": str(tars)}))
    return copy, speech, rows


def test_report_plays_originals_that_lie_in_a_tar_or_on_one_channel(work, tmp_path):
    """The report's originals are read as every stage reads a row's audio (decode_row's columns): a row whose
    audio is a WebDataset tar member (`tar_offset`) or one channel of a file (`channel`). It read path, offset
    and duration only, so such a corpus's report had no originals (the whole tar taken for a sound file)."""
    folder, _ = work
    copy, speech, _ = units_in_a_tar_and_on_a_channel(work, tmp_path)
    result = runner.invoke(app, ["report", str(folder / "dataset"), str(tmp_path / "r"), "--units", str(copy), "--samples", "3"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "r" / "audio").glob("*-original.wav"))) == 3
    right = sf.read(tmp_path / "r" / "audio" / "02-original.wav", dtype="float32")[0]  # its channel alone, not halved
    assert np.abs(right).max() == pytest.approx(np.abs(speech[:16000]).max(), rel=0.02)


def test_the_reports_duplicate_pairs_play_audio_in_a_tar_or_on_one_channel(work, tmp_path):
    """The duplicates section plays a dropped copy beside what it duplicates, read as every stage reads a row's
    audio: it read path, offset and duration only (no pair for a tar's or a dataset file's rows)."""
    from speechinstruct.release.report import _dedup

    copy, _, rows = units_in_a_tar_and_on_a_channel(work, tmp_path)
    (tmp_path / "corpus" / "dedup").mkdir(parents=True)
    examples = {"near duplicate": [{"id": rows[0]["id"], "of": rows[1]["id"]}],
                "exact duplicate": [{"id": rows[2]["id"], "of": rows[0]["id"]}]}
    (tmp_path / "corpus" / "dedup" / "dedup.json").write_text(json.dumps({"inputs": [str(copy)], "examples": examples}))
    meta = {"dedup": {"checked_against": {"eval_sources": [], "eval_split_rows": 0}, "dropped": {"near duplicate": 1},
                      "kept": 2, "utterances": 3}}
    (tmp_path / "r" / "audio").mkdir(parents=True)
    section = _dedup(meta, tmp_path, tmp_path / "r")
    assert [pair[2:] for pair in section["pairs"]] == [["audio/dup-0-dropped.wav", "audio/dup-0-kept.wav"],
                                                       ["audio/dup-1-dropped.wav", "audio/dup-1-kept.wav"]]
    assert all((tmp_path / "r" / name).is_file() for pair in section["pairs"] for name in pair[2:])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (scripts/test.sh installs it)")
def test_report_plays_in_headless_chromium(work):
    """Served on loopback and opened in Chromium: the verdict is on the first screen, every plot decodes,
    every <audio> loads its metadata with the file's duration, and one sample really plays (its clock advances)."""
    from playwright.sync_api import sync_playwright

    report = work[0] / "report"
    handler = functools.partial(QuietHandler, directory=str(report))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required"])
            page = browser.new_page()
            page.set_viewport_size({"width": 1000, "height": 800})
            page.goto(f"http://127.0.0.1:{server.server_port}/index.html")
            verdict = page.locator("#verdict")  # readable at a glance: the verdict is on the first screen
            verdict_box, verdict_text = verdict.bounding_box(), verdict.inner_text()
            dropped_heading = page.locator("#dropped").bounding_box()
            images = page.evaluate("() => [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])")
            clips = page.evaluate("""() => Promise.all([...document.querySelectorAll('audio')].map(a => new Promise(done => {
                const report = () => done({src: a.getAttribute('src'), duration: a.duration, error: a.error && a.error.code});
                if (a.readyState >= 1) report(); else { a.addEventListener('loadedmetadata', report); a.addEventListener('error', report); }
            })))""")
            overflow = {}
            for width in (1400, 1000):  # nothing wider than the page: the listen table's players once were
                page.set_viewport_size({"width": width, "height": 800})
                overflow[width] = page.evaluate("""() => [...document.querySelectorAll('table, pre, img')]
                    .filter(e => e.getBoundingClientRect().right > document.body.getBoundingClientRect().right + 1)
                    .map(e => e.tagName + ' ' + Math.round(e.getBoundingClientRect().width))""")
            played = page.evaluate("""() => new Promise(done => {
                const a = document.querySelector('audio');
                a.addEventListener('timeupdate', () => { if (a.currentTime > 0.2) done(a.currentTime); });
                a.play().catch(e => done('refused: ' + e));
                setTimeout(() => done(a.currentTime), 20000);
            })""")
            browser.close()
    finally:
        server.shutdown()
    assert verdict_text.startswith("PASS: all") and verdict_box["y"] + verdict_box["height"] < 300
    assert overflow == {1400: [], 1000: []}, overflow
    assert dropped_heading["y"] < 800 * 1.5  # what was dropped follows right after the counts
    assert images and all(width > 0 for _, width in images), images
    assert len(clips) == 9
    for clip in clips:
        assert clip["error"] is None, clip
        assert clip["duration"] == pytest.approx(sf.info(str(report / clip["src"])).duration, abs=0.01)
    assert isinstance(played, float) and played > 0.2, played


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_resynth_with_the_preview_speaks_dataset_records_and_units(work, tmp_path):
    """Every record kind, one wav each (a file per config, --limit 1), and frame-timed units."""
    folder, _ = work
    sources = [sorted((folder / "dataset" / "data" / c).glob("*.parquet"))[0]
               for c in ("chain_of_modality", "cross_modal", "pretrain")] + [folder / "speechinstruct-demo" / "units"]
    kinds = set()
    for i, source in enumerate(sources):
        out = tmp_path / f"wavs-{i}"
        result = runner.invoke(app, ["resynth", str(source), str(out), "--vocoder", str(folder / "kmeans"), "--limit", "1", "-q"])
        assert result.exit_code == 0, result.output
        [entry] = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        kinds.add(entry["kind"].split(" ")[0])
        info = sf.info(str(out / entry["file"]))
        assert info.samplerate == 16000 and info.duration == pytest.approx(entry["seconds"], abs=1e-3)
    assert kinds == {"chain_of_modality", "cross_modal", "pretrain", "utterance"}

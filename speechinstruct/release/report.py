"""``speechinstruct report``: an HTML page with PNG plots of a published dataset.

Plots: hours per corpus, utterance durations, unit usage (K bars), units per second, records per
task/format, and text lengths. Each plot is a PNG beside ``index.html``; the page also lists the numbers.
With a units folder and/or a vocoder it also has samples to listen to (``audio/*.wav``): the original
utterance, its resynthesis from units, and the mel-cepstral distance between them.
"""

from __future__ import annotations

import collections
import json
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..io import atomic_path, write_json, write_text
from ..kinds import RECORD_KINDS
from ..shardfiles import folder_k, read_dataset_meta, read_units_spec, unit_files


def _plot(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    draw(ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def _read(folder: Path, config: str, columns: list[str]) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in columns}
    for row in _rows(folder, config, columns):
        for c in columns:
            out[c].append(row[c])
    return out


def _listen(dataset: Path, out: Path, units: Path | None, vocoder, samples: int, asr=None) -> tuple[dict | None, dict]:
    """The listening table (for the page) and its numbers, for up to ``samples`` utterances: original audio (from ``units``, a units
    folder whose ``units.json`` names the corpus root), its resynthesis by ``vocoder`` and, with ``asr``, the
    WER of that resynthesis against the text: how much of the words the units keep."""
    picked = _listen_picks(dataset, units, vocoder, samples)
    if not picked:
        return None, {}
    items, mcds, wers, seconds, spent, numbers_skipped = [], [], [], 0.0, 0.0, []
    for j, item in enumerate(picked):
        shown, heard = _listen_to(j, item, out, vocoder, asr)
        items.append(shown)
        if heard.get("skipped"):
            numbers_skipped.append(heard["skipped"])
        mcds += [heard["mcd"]] if "mcd" in heard else []
        wers += [heard["wer"]] if "wer" in heard else []
        seconds, spent = seconds + heard.get("seconds", 0.0), spent + heard.get("spent", 0.0)
    numbers: dict[str, object] = {"samples": len(picked)}
    if numbers_skipped:
        numbers["samples_without_original"] = numbers_skipped
    listen = {"items": items, "preview": bool(getattr(vocoder, "is_preview", False)),
              "vocoder": vocoder.source if vocoder is not None else None, "asr": asr.name if asr is not None else None,
              "wer": float(np.mean(wers)) if wers else None, "wer_count": len(wers),
              "mcd": float(np.mean(mcds)) if mcds else None, "mcd_count": len(mcds)}
    if vocoder is not None:
        numbers["vocoder"] = vocoder.source
        numbers["resynthesis_real_time_factor"] = round(seconds / max(spent, 1e-9), 2)
    if wers:
        numbers["resynthesis_wer"] = round(float(np.mean(wers)), 4)
        numbers["resynthesis_asr"] = asr.spec
    if mcds:
        numbers["resynthesis_mcd_db"] = round(float(np.mean(mcds)), 3)
    return listen, numbers


def _listen_picks(dataset: Path, units: Path | None, vocoder, samples: int) -> list[dict]:
    """What to listen to: the first ``samples`` utterances with units of the units folder (or, without one, the
    first cross-modal TTS records), and one chain-of-modality spoken answer when there is a vocoder."""
    from ..io import iter_rows
    from ..sources.decoding import audio_columns

    picked: list[dict] = []
    if units is not None:
        root = (read_units_spec(units) or {}).get("root")
        for path in unit_files(units):  # each checked to be a units file
            if len(picked) == samples:
                break
            for row in iter_rows(path, columns=audio_columns(path, ("text", "units", "durations"))):
                if len(picked) == samples:
                    break
                if row["units"]:
                    picked.append({**row, "root": root, "kind": "utterance"})
    elif vocoder is not None and (dataset / "data" / "cross_modal").is_dir():
        tts = [r for r in _rows(dataset, "cross_modal", ["id", "task", "units", "transcript"]) if r["task"] == "tts"]
        picked = [{"id": r["id"], "text": r["transcript"], "units": r["units"], "durations": None, "kind": "cross_modal tts"}
                  for r in tts[:samples]]
    if vocoder is not None and (dataset / "data" / "chain_of_modality").is_dir():
        for r in _rows(dataset, "chain_of_modality", ["id", "response", "response_units"]):
            if r["response_units"]:
                picked.append({"id": r["id"], "text": r["response"], "units": r["response_units"], "durations": None,
                               "kind": "chain_of_modality [ua] answer"})
                break
    return picked


def _listen_to(j: int, item: dict, out: Path, vocoder, asr) -> tuple[dict, dict]:
    """One row of the listening table (its wav files written as ``audio/{j:02d}-*.wav``) and what was measured on
    it: ``mcd``, ``wer``, the seconds synthesized and the seconds that took, or why the original was skipped."""
    from .. import audio
    from ..sources.decoding import decode_row
    from ..units.vocoder import mel_cepstral_distortion

    shown = {"kind": item["kind"], "id": str(item["id"]), "text": str(item.get("text") or ""), "original": None,
             "resynth": None, "mcd": None, "wer": None}
    heard: dict = {}
    if "path" in item:
        rate = vocoder.sample_rate if vocoder is not None else audio.TARGET_SR  # the original beside its resynthesis
        wav = decode_row(item, item["root"], rate)
        if isinstance(wav, str):
            heard["skipped"] = f"{item['id']}: original audio unavailable: {wav}"
        else:
            shown["original"] = f"audio/{j:02d}-original.wav"
            audio.write_wav(out / shown["original"], wav, rate)
    if vocoder is not None:
        start = time.perf_counter()
        wav = vocoder.synthesize(item["units"], item["durations"])
        heard["spent"] = time.perf_counter() - start
        heard["seconds"] = wav.size / vocoder.sample_rate
        shown["resynth"] = f"audio/{j:02d}-resynth.wav"
        audio.write_wav(out / shown["resynth"], wav, vocoder.sample_rate)
    if shown["original"] and shown["resynth"]:
        heard["mcd"] = mel_cepstral_distortion(out / shown["original"], out / shown["resynth"])
        shown["mcd"] = f"{heard['mcd']:.2f}"
    if asr is not None and shown["resynth"] and (item.get("text") or "").strip():
        from ..judges.asr import BadAnswer, error_rates

        said = asr.transcribe([audio.resample(wav, vocoder.sample_rate)])[0]
        rates = None if isinstance(said, BadAnswer) else error_rates(item["text"], said, asr.normalise)
        if isinstance(rates, tuple):
            heard["wer"] = rates[0]
            shown["wer"] = f"{rates[0]:.2f}"
    return shown, heard


def _rows(folder: Path, config: str, columns: list[str] | None):
    """The records of ``config`` (their ``columns``, or all) that the kind's schema takes: one another tool wrote
    with a transcript that is a number, or units that are text, is the verdict's to name, and is left out here."""
    from ..io import iter_rows
    from ..records import columns_problem, json_schema

    known = set(json_schema(config)["properties"])
    for f in sorted((folder / "data" / config).glob("*.parquet")):
        for row in iter_rows(f, columns=columns):
            if columns_problem(config, row, tuple(c for c in (columns or row) if c in known)) is None:
                yield row


_UNIT_RUN = re.compile(r"<sosp>((?:<\d+>)+)<eosp>")


def short_units(text: str, keep: int = 6) -> str:
    """``<sosp><1><2>…<eosp>`` runs cut to their first ``keep`` units and a count, for reading."""
    def cut(m):
        units = re.findall(r"<\d+>", m.group(1))
        if len(units) <= keep:
            return m.group(0)
        return f"<sosp>{''.join(units[:keep])}… {len(units)} units …<eosp>"
    return _UNIT_RUN.sub(cut, text)


SAMPLED = tuple((name, kind.sampled_by) for name, kind in RECORD_KINDS.items())  # config, the column whose values
# each get a record of their own (kinds.RECORD_KINDS)


def _sample_records(dataset: Path) -> list[tuple[str, dict]]:
    """(label, record) for the first record of every kind: cross-modal ASR/TTS, each chain-of-modality
    format, a dialogue of each length, interleaved, pretrain."""
    picked: dict[str, dict] = {}
    for config, column in SAMPLED:
        if not (dataset / "data" / config).is_dir():
            continue
        for row in _rows(dataset, config, None):
            label = f"{config}: {row[column]}{' turns' if column == 'turns' else ''}" if column else config
            picked.setdefault(label, row)
            if column is None:
                break
    return sorted(picked.items())


def _reason_kind(reason: str) -> str:
    """The kind of an extract error, without its file and details: ``x.flac: truncated: asked…`` → truncated."""
    parts = [p.strip() for p in reason.split(": ")]
    kind = parts[1] if len(parts) > 1 and ("/" in parts[0] or "." in parts[0]) else parts[0]
    return re.sub(r"\s*\(.*$", "", kind)


def dropped(work: Path) -> list[dict]:
    """What each stage of a ``run`` workdir left out, and why: {stage, reason, count, example}."""
    out: list[dict] = []
    for summary in sorted(work.glob("*/manifest/summary.json")):
        data = json.loads(summary.read_text())
        examples = {e["reason"]: f"{e['path']}" + (f" ({e['detail']})" if e.get("detail") else "")
                    for e in reversed(data.get("skipped_examples", []))}
        out += [{"stage": f"shard {data['corpus']}", "reason": r, "count": n, "example": examples.get(r, "")}
                for r, n in sorted(data.get("skipped", {}).items())]
    for folder in sorted({p.parent for p in work.glob("*/*/errors-*.jsonl")}):
        kinds: collections.Counter[str] = collections.Counter()
        first: dict[str, str] = {}
        for f in sorted(folder.glob("errors-*.jsonl")):
            for line in f.read_text().splitlines():
                reason = json.loads(line)["reason"]
                kinds[_reason_kind(reason)] += 1
                first.setdefault(_reason_kind(reason), reason)
        stage = "score" if folder.name == "scores" else "extract"
        out += [{"stage": f"{stage} {folder.parent.name}", "reason": k, "count": n, "example": first[k]}
                for k, n in sorted(kinds.items())]
    for summary in sorted(work.glob("composed/*/summary*.json")):
        data = json.loads(summary.read_text())
        stage = f"compose {summary.parent.name}"
        # the counts are the "dropped: REASON" / "skipped: REASON" keys; an example's reason is REASON (detail)
        examples = {e["reason"].split(" (")[0]: e.get("where") or e.get("id", "")
                    for e in reversed(data.get("dropped_examples", []))}
        counts = {k.split(": ", 1)[1]: v for k, v in data.items() if k.startswith(("dropped: ", "skipped: "))}
        out += [{"stage": stage, "reason": r, "count": n, "example": examples.get(r, "")} for r, n in sorted(counts.items())]
    return out


SCORE_PLOTS = (("dnsmos_ovrl", "DNSMOS OVRL", "min_dnsmos", np.linspace(1, 5, 33)), ("wer", "WER", "max_wer", np.linspace(0, 1.5, 31)))


def _quality(dataset: Path, out: Path, work: Path | None, quality: dict | None) -> tuple[dict | None, list, dict]:
    """The quality section: DNSMOS and WER histograms per corpus (every scored utterance, from the workdir's
    ``*/scores``) and per record kind (the records kept), the gates' thresholds drawn on them, and the five
    utterances with the lowest DNSMOS, with their audio. None when nothing was scored."""
    groups, worst = _score_groups(dataset, work)
    numbers: dict[str, dict] = {}
    plots: list[tuple[str, str]] = []
    for column, name, gate, bins in SCORE_PLOTS:
        series = {label: v[column][~np.isnan(v[column])] for label, v in groups.items()}
        series = {label: v for label, v in series.items() if v.size}
        if not series:
            continue
        numbers[column] = {label: {"count": int(v.size), "mean": round(float(v.mean()), 3)} for label, v in series.items()}
        limit = (quality or {}).get(gate)

        def draw(ax, series=series, name=name, limit=limit, bins=bins):
            for label, values in series.items():
                ax.hist(np.clip(values, bins[0], bins[-1]), bins=bins, histtype="step", linewidth=1.5, label=label)
            if limit is not None:
                ax.axvline(limit, color="#bb3333", linestyle="--", label=f"gate {limit:g}")
            ax.set_xlabel(name), ax.set_ylabel("utterances / records"), ax.legend(fontsize=8), ax.set_title(f"{name} per corpus and record kind")
        _plot(out / f"{column}.png", draw)
        plots.append((f"{column}.png", f"{name} of every scored corpus utterance and of the records kept"
                      + (f"; the gate at {limit:g}" if limit is not None else "")))
    if not numbers:
        return None, [], {}
    section = {"table": [[column, label, v["count"], f"{v['mean']:.3f}"] for column, by in numbers.items() for label, v in by.items()],
               "worst": _worst_utterances(sorted(worst)[:5], out)}
    return section, plots, {"quality": numbers}


def _score_groups(dataset: Path, work: Path | None) -> tuple[dict[str, dict[str, np.ndarray]], list]:
    """DNSMOS OVRL and WER per group (``corpus NAME``: every scored utterance of the workdir's ``*/scores``;
    ``records KIND``: the records kept), and (OVRL, id, scores file) of every scored utterance."""
    from ..io import read_table

    groups: dict[str, dict[str, np.ndarray]] = {}
    scored: list[tuple[float, str, Path]] = []
    for folder in sorted(work.glob("*/scores")) if work is not None else []:
        files = sorted(folder.glob("scores-*.parquet"))
        tables = [read_table(f, columns=["id", "dnsmos_ovrl", "wer"]) for f in files]
        if not tables:
            continue
        groups[f"corpus {folder.parent.name}"] = {c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for t in tables])
                                                  .astype(float) for c in ("dnsmos_ovrl", "wer")}
        for f, t in zip(files, tables):
            scored += [(v, uid, f) for uid, v in zip(t.column("id").to_pylist(), t.column("dnsmos_ovrl").to_pylist()) if v is not None]
    for config in [name for name, kind in RECORD_KINDS.items() if kind.gated]:
        if (dataset / "data" / config).is_dir():
            rows = _read(dataset, config, ["dnsmos_ovrl", "wer"]) if _has_columns(dataset, config) else {}
            if rows:
                groups[f"records {config}"] = {c: np.array([np.nan if v is None else v for v in rows[c]], dtype=float)
                                               for c in ("dnsmos_ovrl", "wer")}
    return groups, scored


def _worst_utterances(worst: list[tuple[float, str, Path]], out: Path) -> list[list]:
    """[id, OVRL, text, wav file or None] of each of ``worst``, its audio written as ``audio/worst-N.wav``: each
    manifest shard read once, for the rows wanted from it, and each scores folder's ``score.json`` once."""
    from .. import audio
    from ..io import read_table
    from ..sources.decoding import decode_row

    shown: list[list] = []
    manifest_rows: dict[Path, dict[str, dict]] = {}
    specs: dict[Path, dict] = {}
    for value, uid, scores_file in worst:
        if scores_file.parent not in specs:
            specs[scores_file.parent] = json.loads((scores_file.parent / "score.json").read_text())
        spec = specs[scores_file.parent]
        manifest = Path(spec["source"])
        shard = manifest / scores_file.name.replace("scores-", "manifest-") if manifest.is_dir() else manifest
        if shard.is_file() and shard not in manifest_rows:
            wanted = {u for _, u, f in worst if f == scores_file}
            manifest_rows[shard] = {r["id"]: r for r in read_table(shard).to_pylist() if r["id"] in wanted}
        manifest_rows.setdefault(shard, {})
        row = manifest_rows[shard].get(uid)
        wav = decode_row(row, spec["root"]) if row else "manifest row not found"
        file = None
        if not isinstance(wav, str):
            file = f"audio/worst-{len(shown)}.wav"
            audio.write_wav(out / file, wav)
        shown.append([uid, f"{value:.2f}", str(row.get("text") or "") if row else "", file])
    return shown


def _dedup(meta: dict, work: Path | None, out: Path, pairs: int = 3) -> dict | None:
    """The duplicates section: what dedup checked against, what it dropped, and (with the run's workdir) a few
    dropped utterances beside the one they duplicate or match, to listen to."""
    from .. import audio
    from ..io import iter_rows
    from ..shardfiles import read_units_spec
    from ..sources.decoding import audio_columns, decode_row

    found = meta.get("dedup")
    if not found:
        return None
    section = {"checked": [[s["source"], s["texts"], s["utterances"]] for s in found["checked_against"]["eval_sources"]],
               "eval_split_rows": found["checked_against"]["eval_split_rows"],
               "dropped": sorted(found["dropped"].items()), "kept": found["kept"], "utterances": found["utterances"],
               "speakers": len(found.get("speakers_in_train_and_eval") or []), "pairs": []}
    full = next((json.loads(p.read_text()) for p in sorted(work.glob("*/dedup/dedup.json"))), None) if work else None
    if not full:
        return section
    wanted = [e for reason in ("exact duplicate", "near duplicate", "evaluation audio")
              for e in full["examples"].get(reason, [])[:1] if not e["of"].startswith("eval:")][:pairs]
    ids = {e["id"] for e in wanted} | {e["of"] for e in wanted}
    rows: dict[str, tuple[dict, Path]] = {}
    for folder in map(Path, full["inputs"]):
        root = Path((read_units_spec(folder) or {}).get("root") or ".")
        for path in sorted(folder.glob("units-*.parquet")):
            for row in iter_rows(path, columns=audio_columns(path, ("text",))):
                if row["id"] in ids:
                    rows[row["id"]] = (row, root)
    for n, e in enumerate(wanted):
        files = []
        for side, uid in (("dropped", e["id"]), ("kept", e["of"])):
            row, root = rows.get(uid, (None, None))
            wav = decode_row(row, root) if row else "not found"
            files.append(None if isinstance(wav, str) else f"audio/dup-{n}-{side}.wav")
            if files[-1]:
                audio.write_wav(out / files[-1], wav)
        section["pairs"].append([e["id"], e["of"], *files])
    return section


def _who_and_language(work: Path | None, out: Path, quality: dict | None) -> tuple[dict | None, list]:
    """Speakers per corpus and talk time per speaker (from the run's units), the languages measured and the speaker
    similarities (from its scores), with the gates; None without a run folder."""
    from ..io import iter_rows

    if work is None:
        return None, []
    talk: dict[str, collections.Counter] = {}
    for path in sorted(work.glob("*/units/units-*.parquet")):
        corpus_talk = talk.setdefault(path.parent.parent.name, collections.Counter())
        for row in iter_rows(path, columns=["speaker", "duration"]):
            corpus_talk[row["speaker"] or "unknown"] += row["duration"]
    languages: collections.Counter[tuple[str, str]] = collections.Counter()
    similarity: list[float] = []
    for path in sorted(work.glob("*/scores/scores-*.parquet")):
        present = set(pq.read_schema(path).names)
        columns = [c for c in ("text_language", "asr_language", "speaker_similarity") if c in present]
        for row in iter_rows(path, columns=columns) if columns else []:
            for column, side in (("text_language", "transcript"), ("asr_language", "audio")):
                if row.get(column):
                    languages[(side, row[column])] += 1
            if row.get("speaker_similarity") is not None:
                similarity.append(row["speaker_similarity"])
    if not talk and not languages:
        return None, []
    plots = []
    if talk:
        def draw(ax):
            for corpus, seconds in talk.items():
                ax.hist(np.array(list(seconds.values())) / 60, bins=30, histtype="step", linewidth=1.5, label=corpus)
            ax.set_xlabel("minutes of speech"), ax.set_ylabel("speakers"), ax.legend(fontsize=8)
            ax.set_title("Talk time per speaker")
        _plot(out / "talk_time.png", draw)
        plots.append(("talk_time.png", "Minutes of speech per speaker, per corpus"))
    gate = ((quality or {}).get("synthesized") or {}).get("min_speaker_similarity")
    if similarity:
        def draw(ax):
            ax.hist(similarity, bins=np.linspace(-0.2, 1, 25), color="#4477aa")
            if gate is not None:
                ax.axvline(gate, color="#bb3333", linestyle="--", label=f"gate {gate:g}")
                ax.legend(fontsize=8)
            ax.set_xlabel("cosine similarity to the speaker's reference"), ax.set_ylabel("utterances")
            ax.set_title("Speaker similarity")
        _plot(out / "speaker_similarity.png", draw)
        plots.append(("speaker_similarity.png", "Speaker similarity of the scored utterances to their references"))
    section = {"speakers": [[corpus, len(seconds), f"{sum(seconds.values()) / 3600:.3f}",
                             f"{max(seconds.values()) / max(sum(seconds.values()), 1e-9):.0%}"]
                            for corpus, seconds in talk.items()],
               "languages": [[side, code, n] for (side, code), n in sorted(languages.items(), key=lambda kv: -kv[1])],
               "kept": ", ".join((quality or {}).get("languages") or []) or None}
    return section, plots


def _duplex(work: Path | None, out: Path) -> tuple[dict | None, list]:
    """Full-duplex conversations (the run's ``composed/duplex``): gaps and overlaps between turns, backchannels per
    minute, talk time per speaker, and the first conversation to listen to in stereo."""
    import shutil

    folder = work / "composed" / "duplex" if work is not None else None
    if folder is None or not (folder / "stats.jsonl").is_file():
        return None, []
    stats = [json.loads(line) for line in (folder / "stats.jsonl").read_text().splitlines() if line.strip()]
    if not stats:
        return None, []
    gaps = [g for s in stats for g in s["gaps"]]
    overlaps = [o for s in stats for o in s["overlaps"]]
    minutes = sum(s["duration"] for s in stats) / 60

    def draw(ax):
        ax.hist([-o for o in overlaps] + gaps, bins=np.linspace(-1, 2, 31), color="#66ccee")
        ax.axvline(0, color="#444444", linewidth=1)
        ax.set_xlabel("seconds from one turn's end to the next's start (below 0: overlap)"), ax.set_ylabel("speaker changes")
        ax.set_title("Turn-taking offsets")
    _plot(out / "duplex_offsets.png", draw)
    manifest = [json.loads(line) for line in (folder / "duplex.jsonl").read_text().splitlines() if line.strip()]
    listen = None
    if manifest and (folder / manifest[0]["path"]).is_file():
        listen = "audio/duplex-0.wav"
        (out / "audio").mkdir(exist_ok=True)
        shutil.copyfile(folder / manifest[0]["path"], out / listen)
    talk = collections.Counter()
    for s in stats:
        talk.update(s["talk_seconds"])
    section = {"conversations": len(stats), "minutes": f"{minutes:.1f}",
               "table": [["speaker changes with a gap", len(gaps)], ["with an overlap", len(overlaps)],
                         ["overlap share", f"{len(overlaps) / max(1, len(gaps) + len(overlaps)):.0%}"],
                         ["interruptions", sum(s["interruptions"] for s in stats)],
                         ["backchannels per minute", f"{sum(s['backchannels'] for s in stats) / max(minutes, 1e-9):.1f}"],
                         *[[f"talk time, {who}", f"{seconds / 60:.1f} min"] for who, seconds in sorted(talk.items())]],
               "listen": listen}
    return section, [("duplex_offsets.png", "Turn-taking offsets of the full-duplex conversations")]


def _has_columns(dataset: Path, config: str) -> bool:
    files = sorted((dataset / "data" / config).glob("*.parquet"))
    return bool(files) and {"dnsmos_ovrl", "wer"} <= set(pq.read_schema(files[0]).names)


def _corpus_plots(dataset: Path, out: Path, meta: dict, numbers: dict) -> list[tuple[str, str]]:
    """Hours per corpus, utterance durations and units per second (from ``stats/utterances.parquet``)."""
    plots = []
    if meta["hours"]:
        corpora, hours = zip(*sorted(meta["hours"].items()))
        _plot(out / "hours_per_corpus.png", lambda ax: (ax.bar(corpora, hours, color="#4477aa"), ax.set_ylabel("hours"),
                                                         ax.set_title("Audio hours per corpus")))
        plots.append(("hours_per_corpus.png", "Hours of audio per source corpus"))
    stats_path = dataset / "stats" / "utterances.parquet"
    s = _utterance_stats(stats_path) if stats_path.is_file() else None
    if s is not None:
        durations = s["duration"]
        ups = s["n_units"] / durations
        fps = s["n_frames"] / durations
        _plot(out / "durations.png", lambda ax: (ax.hist(durations, bins=40, color="#66ccee"), ax.set_xlabel("seconds"),
                                                  ax.set_ylabel("utterances"), ax.set_title("Utterance durations")))
        _plot(out / "units_per_second.png", lambda ax: (ax.hist(ups, bins=40, color="#228833"), ax.set_xlabel("units per second (repeats merged)"),
                                                         ax.set_ylabel("utterances"), ax.set_title(f"Units per second (frames: {fps.mean():.1f}/s)")))
        plots += [("durations.png", "Utterance duration histogram"), ("units_per_second.png", "Units per second after merging repeats")]
        numbers.update({"utterances": int(durations.size), "mean_duration_s": round(float(durations.mean()), 3),
                        "mean_units_per_second": round(float(ups.mean()), 3), "frames_per_second": round(float(fps.mean()), 3)})
    return plots


def _utterance_stats(path: Path) -> dict[str, np.ndarray] | None:
    """Each utterance's duration, frames and units from ``stats/utterances.parquet`` (publish writes it), of those
    whose duration is a positive number, or None when none is; one line naming the file when it is not publish's."""
    from ..io import naming, read_table

    names = ("duration", "n_frames", "n_units")
    with naming(path):
        schema = pq.read_schema(path)
    for name in names:
        if name not in schema.names:
            raise ValueError(f"{path}: no {name} column: not the file publish writes (publish the dataset again)")
        kind = schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise ValueError(f"{path}: its {name} column holds {kind}, not numbers: not the file publish writes "
                             "(publish the dataset again)")
    table = read_table(path, columns=list(names))  # not the ids, corpora and licenses beside them
    columns = {name: table.column(name).to_numpy(zero_copy_only=False).astype(float) for name in names}
    kept = np.isfinite(columns["duration"]) & (columns["duration"] > 0)
    for name in ("n_frames", "n_units"):
        kept &= np.isfinite(columns[name])
    return {name: values[kept] for name, values in columns.items()} if kept.any() else None


def _unit_usage_plot(dataset: Path, out: Path, k: int, numbers: dict) -> list[tuple[str, str]]:
    """How often each of the K units occurs, corpus utterances and TTS speech stacked."""
    utterances, tts = "corpus utterances (cross-modal, pretrain)", "chain-of-modality speech (TTS)"
    usage = {utterances: np.zeros(max(k, 1), dtype=np.int64), tts: np.zeros(max(k, 1), dtype=np.int64)}
    sources = [("cross_modal", ["units"], utterances), ("pretrain", ["units"], utterances),
               ("chain_of_modality", ["instruction_units", "response_units"], tts)]
    counted: set[str] = set()
    for config, columns, label in sources:
        if not (dataset / "data" / config).is_dir() or label in counted:
            continue  # cross-modal and pretrain records hold the same utterances: count them once
        counted.add(label)
        target = usage[label]
        for row in _rows(dataset, config, columns):
            for column in columns:
                if row[column]:
                    units = np.asarray(row[column], dtype=np.int64)
                    target += np.bincount(units[(units >= 0) & (units < target.size)], minlength=target.size)  # else: the verdict's unit-range
    total = sum(usage.values())
    if not total.sum():
        return []

    def draw(ax):
        bottom = np.zeros(total.size)
        for (label, counts), color in zip(usage.items(), ("#aa3377", "#4477aa")):
            if counts.sum():
                ax.bar(np.arange(counts.size), counts, width=1.0, bottom=bottom, color=color, label=label)
                bottom += counts
        ax.set_xlabel("unit id"), ax.set_ylabel("count"), ax.legend()
        ax.set_title(f"Unit usage ({int((total > 0).sum())} of {total.size} used)")
    _plot(out / "unit_usage.png", draw)
    numbers["units_used"] = int((total > 0).sum())
    numbers["units_by_kind"] = {label: int(c.sum()) for label, c in usage.items()}
    return [("unit_usage.png", f"Unit usage histogram over every record kind, K = {total.size}")]


def _record_plots(dataset: Path, out: Path, meta: dict) -> list[tuple[str, str]]:
    """Records per task and format, and the lengths of transcripts, instructions and responses."""
    plots = []
    kinds = collections.Counter()
    for config, kv in meta.get("by_kind", {}).items():
        for kind, n in kv.items():
            kinds[f"{config}: {kind}"] = n
    for config in [name for name, kind in RECORD_KINDS.items() if not kind.counted_by]:  # counted by split
        for split, n in meta["counts"].get(config, {}).items():
            kinds[f"{config}: {split}"] = n
    if kinds:
        labels, values = zip(*sorted(kinds.items()))
        _plot(out / "records.png", lambda ax: (ax.barh(labels, values, color="#ccbb44"), ax.set_xlabel("records"),
                                                ax.set_title("Records per task / format")))
        plots.append(("records.png", "Record counts per task and format"))
    lengths = {}
    if (dataset / "data" / "cross_modal").is_dir():
        lengths["transcripts"] = [len(t) for t in _read(dataset, "cross_modal", ["transcript"])["transcript"]]
    if (dataset / "data" / "chain_of_modality").is_dir():
        com = _read(dataset, "chain_of_modality", ["instruction", "response"])
        lengths["instructions"] = [len(t) for t in com["instruction"]]
        lengths["responses"] = [len(t) for t in com["response"]]
    if lengths:
        _plot(out / "text_lengths.png", lambda ax: (ax.hist(list(lengths.values()), bins=30, label=list(lengths), stacked=False),
                                                     ax.legend(), ax.set_xlabel("characters"), ax.set_title("Text lengths")))
        plots.append(("text_lengths.png", "Text length distribution"))
    return plots


def _timings(stages: list[dict] | None) -> list[list[str]]:
    """Each stage's time; then this page's own line (its time is known only after it is written: run-summary.json)."""
    if not stages:
        return []
    return [[st["stage"], f"{st['seconds']:.1f} s" + (f" (again: {st['again']})" if st.get("again") else "") if "seconds" in st else
             f"up to date ({st['ran_seconds']:.1f} s when it ran)" if "ran_seconds" in st else "up to date"]
            for st in stages] + [["report", "this page (its time: run-summary.json)"]]


def render(context: dict) -> str:
    """The page: ``data/report.html`` (a Jinja2 template; every value is HTML-escaped) filled with ``context``."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("speechinstruct", "data"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    return env.get_template("report.html").render(**context)


def _claim(out: Path) -> None:
    """Refuse (one line) when ``out`` holds an index.html, report.json, PNG or audio/*.wav the report did not write,
    else claim them (:func:`io.claim_outputs`). A folder an earlier version wrote (its report.json gives records
    and hours) is the report's."""
    from ..io import claim_outputs, wrote_before

    claim_outputs(out, "report", r"index\.html|report\.json|[^/]+\.png|audio/[^/]+\.wav",
                  wrote_before(out / "report.json", {"records", "hours"}))


def report(dataset: str | Path, out: str | Path, units: str | Path | None = None, vocoder=None, samples: int = 4,
           work: str | Path | None = None, stages: list[dict] | None = None, verdict=None, quality: dict | None = None,
           asr=None) -> dict:
    """Write ``OUT/index.html`` for a published dataset: the validation verdict (``verdict``, else validated
    here), what each stage dropped and why (from the ``run`` workdir ``work``), one record of every kind,
    samples to listen to, plots, and each stage's time (``stages``: the run's log, else the workdir's
    ``run-summary.json``). ``units``: a units folder to take original audio from; ``vocoder`` (see
    :func:`speechinstruct.units.vocoder.load_vocoder`): resynthesise samples with it; ``asr`` (``judges.asr.load_asr``):
    transcribe each resynthesis and give its WER against the text. ``quality``: the recipe's gates, drawn on the
    DNSMOS and WER histograms of the workdir's scores. The statistics are computed here, step by step; the
    page is the template's (:func:`render`)."""
    dataset, out = Path(dataset), Path(out)
    units = Path(units) if units is not None else None
    if units is not None and read_units_spec(units) is None:
        raise FileNotFoundError(f"{units}: no units.json: not a units folder (quantize or extract --kmeans output)")
    meta = read_dataset_meta(dataset)
    _claim(out)
    k = folder_k(dataset) or 0
    numbers: dict[str, object] = {"records": meta["counts"], "hours": meta["hours"]}
    plots = _corpus_plots(dataset, out, meta, numbers) + _unit_usage_plot(dataset, out, k, numbers)
    plots += _record_plots(dataset, out, meta)

    if verdict is None:
        from .validate import validate

        verdict = validate(dataset)
    work = Path(work) if work is not None else None
    if stages is None and work is not None and (work / "run-summary.json").is_file():
        ran = json.loads((work / "run-summary.json").read_text())
        stages = ran.get("stages", []) + ([ran["validate"]] if ran.get("validate") else [])
    drops = dropped(work) if work is not None else None
    listen, heard = _listen(dataset, out, units, vocoder, samples, asr)
    numbers.update(heard)
    judged, quality_plots, quality_numbers = _quality(dataset, out, work, quality)
    plots += quality_plots
    who, who_plots = _who_and_language(work, out, quality)
    plots += who_plots
    conversations, duplex_plots = _duplex(work, out)
    plots += duplex_plots
    if who:
        numbers["speakers"] = {corpus: n for corpus, n, _, _ in who["speakers"]}
        numbers["languages"] = {f"{side} {code}": n for side, code, n in who["languages"]}
    numbers.update(quality_numbers)
    numbers["valid"] = verdict.ok
    numbers["dropped"] = {f"{d['stage']}: {d['reason']}": d["count"] for d in drops or []}

    page = render({
        "name": meta["name"], "version": meta["pipeline_version"], "k": k, "features": str(meta["extractor"].get("features")),
        "verdict": {"ok": verdict.ok, "records": sum(verdict.records.values()),
                    "rules": ", ".join(f"{rule} ×{n}" for rule, n in sorted(verdict.by_rule.items())),
                    "examples": [[e["file"], e["row"], e["id"], e["rule"], e["message"]] for e in verdict.examples]},
        "records": [[config, split, n] for config, splits in meta["counts"].items() for split, n in splits.items()],
        "sources": [[src["corpus"], src["license"], f"{meta['hours'][src['corpus']]:.3f}" if src["corpus"] in meta["hours"]
                     else "- (text; its speech synthesized)"] for src in meta["sources"]],
        "dropped": None if drops is None else [[d["stage"], d["reason"], d["count"], d["example"]] for d in drops],
        "samples": [(label, row["id"], short_units(row.get("plain_text") or row.get("text") or ""))
                    for label, row in _sample_records(dataset)],
        "listen": listen, "quality": judged, "dedup": _dedup(meta, work, out), "who": who,
        "duplex": conversations, "plots": plots, "timings": _timings(stages),
        "numbers": json.dumps(numbers, indent=2),
    })
    write_text(out / "index.html", page)
    write_json(out / "report.json", numbers)
    return {"page": str(out / "index.html"), "plots": [p for p, _ in plots], **numbers}

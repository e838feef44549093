"""`sfa data prep`: official annotations + videos → WebDataset tar shards + manifest.json.

Layout at the output URL::

    manifest.json                         written last, only when the reject fraction is acceptable
    {split}-{index:06d}-{fp}.tar          one shard: per sample `<key>.json` + `<key>.jpgs`
    {split}-{index:06d}-{fp}.done.json    shard sidecar: sample count, sha256, rejects, input fingerprint

`fp` is the start of the shard's input fingerprint (its videos, their segments and labels, the
options), so a prep run with other inputs writes other files: a published manifest and the shards it
lists are never changed under a reader. Publish-last, unpublish-never: the new manifest replaces the
old one in one write once every shard is written and the reject fraction is acceptable; only then
are shards removed that neither it nor the manifest it replaced lists (a reader that loaded the old one
keeps its shards for one more generation). A failed run leaves the published dataset as it was.

A sample's `<key>.jpgs` is its frames' JPEG files back to back; `<key>.json` holds the byte offsets,
so a reader decodes only the frames a clip samples. Shards are byte-for-byte deterministic (fixed tar
headers, records in key order) and a shard whose sidecar matches its inputs, and whose bytes still match
the sha256 in its sidecar, is not redone: re-running prep is idempotent, resumes an interrupted run and
repairs a damaged shard. Whether the bytes still match is first asked of the store (size and generation on
Cloud Storage, inode and mtime on a disk, recorded when the shard was written): a re-run reads a shard's
bytes only where the store says it changed, or with `verify`. Readers only trust shards listed in a manifest.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
import time
from typing import Any, Iterable

from sfa_vivit.core.lease import Lease, lease_key
from sfa_vivit.core.options import option
from sfa_vivit.core.storage import is_local, join, url_to_fs, write_bytes_atomic
from sfa_vivit.data.manifest import MANIFEST_FILE, MANIFEST_FORMAT, ShardChecksumError, read_verified
from sfa_vivit.data.prep.annotations import (
    DUPLICATE,
    EXPECTED_CLASSES,
    VIDEO_EXTENSIONS,
    Annotations,
    Rejection,
    VideoRecord,
    read_annotations,
)
from sfa_vivit.data.prep.video import VideoRejected, decode_segment

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class PrepOptions:
    """How videos become shards. Defaults and why (bench/data_loader.py, results in the README):

    fps 12.5: Scenic's ViViT recipes take every 2nd frame of 25 fps video, which is every frame at
        12.5 fps. Storing 12.5 fps halves storage and reader bytes (3.2 vs 6.4 MB per 10 s clip
        measured) at the same prep speed (prep time is spent decoding the source, not encoding
        output), and 128 frames still span 10.24 s, a whole Kinetics clip.
    short_side 256: the resize before scale jitter (0.9-1.33) and the 224 crop in Scenic/DMVR;
        320 costs 1.4x the bytes, 224 would upsample most crops.
    jpeg_quality 90: visually lossless; 75 saves 40% of the bytes, an option where storage is tight.
    shard_size 128 samples: ~400 MB per shard of 10 s clips at the defaults, within WebDataset's advice
        (100 MB-1 GB), and ~1900 shards for Kinetics-400 train: enough for 64 hosts x 4 workers each.
    """
    fps: float = option(12.5, "frames per second stored in the shards", pipeline="fps")
    short_side: int = option(256, "the stored frames' short side in pixels", pipeline="short_side")
    jpeg_quality: int = option(90, "JPEG quality of the stored frames", pipeline="jpeg_quality")
    shard_size: int = option(128, "samples per shard", pipeline="shard_size")
    max_reject_fraction: float = option(0.05, "fail, publishing nothing, past this fraction of rejected videos",
                                        pipeline="max_reject_fraction")
    # A pod sees every CPU of its node but may use its limit's: the pipeline decodes with 4 per piece.
    workers: int = option(0, "video decoding processes (0: one per CPU)", pipeline="prep_workers",
                          pipeline_default=4)
    verify: bool = option(False, "re-hash the shards of an earlier run even where the store vouches for them "
                                 "(size and generation or inode and mtime)", pipeline="prep_verify")

    def validate(self) -> None:
        if not (isinstance(self.fps, (int, float)) and 0 < self.fps <= 120):
            raise ValueError(f"fps={self.fps!r} must be in (0, 120]")
        for name, low, high in (("short_side", 16, 4096), ("jpeg_quality", 1, 100), ("shard_size", 1, 1_000_000)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name}={value!r} must be an integer in [{low}, {high}]")
        if not 0 <= self.max_reject_fraction <= 1:
            raise ValueError(f"max_reject_fraction={self.max_reject_fraction!r} must be in [0, 1]")
        if self.workers < 0:
            raise ValueError(f"workers={self.workers!r} must be >= 0")

    def content(self) -> dict[str, Any]:
        """The options that change shard bytes (not how many workers made them)."""
        return {"fps": self.fps, "short_side": self.short_side, "jpeg_quality": self.jpeg_quality,
                "shard_size": self.shard_size}


class PrepError(RuntimeError):
    """Prep finished but the result must not be published (too many rejects)."""


@dataclasses.dataclass
class _ShardTask:
    split: str
    index: int
    out: str
    items: list[tuple[VideoRecord, str]]      # record, video URL
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}-{self.fingerprint()[:10]}"

    def fingerprint(self) -> str:
        payload = {"options": self.options,
                   "items": [[dataclasses.asdict(r), url.rsplit("/", 1)[-1]] for r, url in self.items]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def prepare(dataset: str, annotations: Iterable[str], videos: str, out: str, *, split: str | None = None,
            options: PrepOptions = PrepOptions(), progress: bool = True,
            shard_range: tuple[int, int] | None = None) -> dict[str, Any]:
    """Turn `dataset`'s annotation files and the videos under `videos` into shards + manifest at `out`.

    shard_range=(part, parts): write only shards part, part + parts, ... and no manifest (one piece
    of a fan-out, e.g. a Kubeflow ParallelFor); returns {'part', 'parts', 'shards', 'num_samples',
    'rejected'}. A final call without it finds those shards done and publishes the manifest.

    Returns the manifest. Raises AnnotationError for unusable annotation files, ValueError for bad
    options, and PrepError (after writing the shards, without publishing a manifest) when more than
    `options.max_reject_fraction` of the samples were rejected.
    """
    options.validate()
    ann = read_annotations(dataset, annotations, split)
    expected = EXPECTED_CLASSES.get(dataset)
    if expected and ann.classes is not None and len(ann.classes) != expected:
        log.warning("%s: %d classes in the annotations, the dataset has %d", dataset, len(ann.classes), expected)
    resolved, missing = _resolve_videos(ann.records, videos)   # every input is checked before any write
    fs, out_path = url_to_fs(out)
    fs.makedirs(out_path, exist_ok=True)
    if shard_range is not None:      # one part of a fan-out: writes its own shards, removes nothing, no lease
        return _prepare_part(ann, resolved, out, options, shard_range, progress)
    # One writer publishes at `out` at a time: a second prep is refused before it writes or removes anything.
    with Lease(out, f"sfa data prep ({dataset})", key=lease_key()):
        return _prepare_and_publish(dataset, annotations, videos, out, ann, resolved, missing, options, progress)


def _prepare_part(ann: Annotations, resolved: list[tuple[VideoRecord, str]], out: str, options: PrepOptions,
                  shard_range: tuple[int, int], progress: bool) -> dict[str, Any]:
    part, parts = shard_range
    if not (isinstance(parts, int) and parts >= 1 and isinstance(part, int) and 0 <= part < parts):
        raise ValueError(f"shard_range={shard_range!r}: expected (part, parts) with 0 <= part < parts")
    mine = _plan_shards(resolved, out, options)[part::parts]
    done = _run_tasks(mine, options, progress=progress, total=sum(len(t.items) for t in mine))
    return {"part": part, "parts": parts, "shards": len(mine), "num_samples": sum(r["num_samples"] for r in done),
            "rejected": sum(len(r["rejected"]) for r in done)}


def _prepare_and_publish(dataset: str, annotations: Iterable[str], videos: str, out: str, ann: Annotations,
                         resolved: list[tuple[VideoRecord, str]], missing: list[Rejection], options: PrepOptions,
                         progress: bool) -> dict[str, Any]:
    previous, published = _kept_splits(out, ann, options)
    rejected: list[Rejection] = list(ann.rejected) + missing
    log_rejections(rejected, f"{dataset} annotations")

    tasks = _plan_shards(resolved, out, options)
    results = _run_tasks(tasks, options, progress=progress, total=len(resolved))
    splits: dict[str, dict[str, Any]] = {}
    decoded_rejects: list[Rejection] = []
    for task, result in sorted(zip(tasks, results), key=lambda tr: tr[0].name):
        decoded_rejects += [Rejection(**r) for r in result["rejected"]]
        entry = splits.setdefault(task.split, {"num_samples": 0, "shards": [], "options": options.content()})
        entry.setdefault("_frames", []).extend(result.get("frames", []))
        entry.setdefault("_sides", []).extend(result.get("short_sides", []))
        if result["num_samples"]:
            entry["num_samples"] += result["num_samples"]
            entry["shards"].append({"path": f"{task.name}.tar", "num_samples": result["num_samples"],
                                    "sha256": result["sha256"]})

    log_rejections(decoded_rejects, f"{dataset} videos")
    rejected += decoded_rejects
    # A repeated row loses no sample: it is reported, not counted against the reject limit.
    lost = [r for r in rejected if not r.reason.startswith(DUPLICATE)]
    total = len(ann.records) + len(ann.rejected) - (len(rejected) - len(lost))
    fraction = len(lost) / total if total else 1.0
    if fraction > options.max_reject_fraction:
        first = "; ".join(f"{r.video}: {r.reason}" for r in lost[:5])
        raise PrepError(f"{len(lost)} of {total} samples rejected ({fraction:.1%}), more than "
                        f"max_reject_fraction={options.max_reject_fraction:g}; no manifest written at {out} "
                        f"(a manifest published there before is unchanged). First reasons: {first}")

    for entry in splits.values():    # what a reader can expect of a clip: frames stored, short side
        counts, sides = sorted(entry.pop("_frames")), sorted(entry.pop("_sides"))
        if counts:
            entry["frames"] = {"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1]}
            entry["short_side"] = {"min": sides[0], "max": sides[-1]}
    manifest = {
        "format": MANIFEST_FORMAT,
        "dataset": dataset,
        **({"heads": ann.heads} if ann.heads is not None else {"classes": ann.classes}),
        "horizontal_flip": ann.horizontal_flip,
        "splits": {**previous, **splits},
        "rejected": [dataclasses.asdict(r) for r in rejected],
        "options": {**options.content(), "max_reject_fraction": options.max_reject_fraction},
        "sources": {"annotations": [os.fspath(a) for a in annotations], "videos": videos},
    }
    write_bytes_atomic(join(out, MANIFEST_FILE), json.dumps(manifest, indent=1).encode())
    _remove_unlisted(out, manifest, keep={t.name for t in tasks} | published, splits=set(splits))
    counts = ", ".join(f"{s}: {v['num_samples']}" for s, v in manifest["splits"].items())
    log.info("%s: manifest written at %s (%s; %d rejected)", dataset, join(out, MANIFEST_FILE), counts, len(rejected))
    return manifest


def log_rejections(rejected: list[Rejection], what: str, examples: int = 3) -> None:
    """One warning per kind of rejection (its count and first examples), not one line per row: 50,000
    malformed rows are 1 line here and 50,000 entries in the manifest."""
    if not rejected:
        return
    kinds: dict[str, list[Rejection]] = {}
    for r in rejected:
        kinds.setdefault(_reason_kind(r.reason), []).append(r)
    for kind, group in kinds.items():
        shown = "; ".join(f"{r.video}: {r.reason}" for r in group[:examples])
        more = f" (and {len(group) - examples} more; every one is listed under 'rejected' in manifest.json)" \
            if len(group) > examples else ""
        log.warning("%s: %d rejected, %s. E.g. %s%s", what, len(group), kind, shown, more)


def _reason_kind(reason: str) -> str:
    """The kind of a rejection reason: its words before the first detail ('malformed annotation row',
    'unknown label', 'duplicate', ...)."""
    head = re.split(r"[:(]| \d", reason, maxsplit=1)[0].strip()
    return head or reason[:40]


CLIP_OPTIONS = ("fps", "short_side")      # options that change what a clip is: the same in every split


class SplitOptionsMismatch(ValueError):
    """A split kept from an earlier prep at `out` was made with other options than this run's."""


def _kept_splits(out: str, ann: Annotations, options: PrepOptions) -> tuple[dict[str, Any], set[str]]:
    """The splits a published manifest at `out` lists that this run does not touch, if it describes the
    same dataset and classes (so train and validation can be prepared by separate runs into one place),
    and the shard names it lists: they are kept for one more generation, so a reader (or a pipeline's
    retried step) that loaded it before the switch still finds its shards. The manifest itself stays
    published until the new one replaces it. A kept split made with other options (frame rate, size,
    quality, shard size) is refused: one manifest describes every split it lists truly."""
    fs, path = url_to_fs(join(out, MANIFEST_FILE))
    try:
        old = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return {}, set()
    except ValueError:
        log.warning("%s is not readable JSON; it will be replaced", join(out, MANIFEST_FILE))
        return {}, set()
    published = {shard["path"].rsplit("/", 1)[-1][: -len(".tar")] for split in old.get("splits", {}).values()
                 for shard in split.get("shards", [])}
    same = (old.get("dataset") == ann.dataset and old.get("classes") == ann.classes
            and old.get("heads") == ann.heads)
    touched = {r.split for r in ann.records}
    kept = {s: v for s, v in old.get("splits", {}).items() if same and s not in touched}
    for name, entry in kept.items():
        # What a clip is made of (its frame rate and size) must agree between splits; shard size and JPEG quality
        # may differ, since the manifest records each split's options.
        if "options" not in entry:          # an older manifest: its one set of options describes this split
            entry["options"] = {k: v for k, v in old.get("options", {}).items() if k in options.content()}
        theirs = entry["options"]
        differ = {k: (theirs.get(k), v) for k, v in options.content().items()
                  if k in CLIP_OPTIONS and theirs.get(k) != v}
        if differ:
            said = ", ".join(f"{k} {a} there, {b} now" for k, (a, b) in differ.items())
            raise SplitOptionsMismatch(
                f"{out}: split {name!r} there was prepared with other options ({said}); a manifest must describe "
                f"every split truly. Prepare {name!r} again with this run's options (give its annotation files "
                "too), or prepare this split into another --out")
    dropped = sorted(set(old.get("splits", {})) - touched - set(kept))
    if dropped:
        log.warning("%s: the published manifest's splits %s are for another dataset or classes; the new manifest "
                    "does not list them", out, dropped)
    return kept, published


def _remove_unlisted(out: str, manifest: dict[str, Any], *, keep: set[str], splits: set[str]) -> None:
    """After a manifest switch: remove the shards and sidecars of `splits` that neither the manifest
    lists nor `keep` names (this run's shards and the previous manifest's), and temporary files a killed
    writer of one of those names left behind."""
    listed = {shard["path"].rsplit("/", 1)[-1][: -len(".tar")] for split in manifest["splits"].values()
              for shard in split["shards"]}
    fs, root = url_to_fs(out)
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        stem = name.split(".", 1)[0]
        ours = stem.split("-", 1)[0] in splits
        stale = ours and (".tmp-" in name or (name.endswith((".tar", ".done.json")) and stem not in listed
                                              and stem not in keep))
        if stale:
            try:
                fs.rm_file(entry)
            except FileNotFoundError:
                pass


def _resolve_videos(records: list[VideoRecord], videos: str) -> tuple[list[tuple[VideoRecord, str]], list[Rejection]]:
    """Find each record's file under the videos root (one listing of the whole tree)."""
    fs, root = url_to_fs(videos)
    if not fs.exists(root):
        raise FileNotFoundError(f"videos folder {videos} does not exist")
    root = root.rstrip("/")
    by_rel: dict[str, str] = {}
    by_stem: dict[str, str] = {}
    for path in fs.find(root):
        rel = path[len(root) + 1:] if path.startswith(root + "/") else os.path.basename(path)
        if not rel.endswith(VIDEO_EXTENSIONS) or ".tmp-" in rel:
            continue
        by_rel[rel] = rel
        stem = os.path.splitext(rel)[0]
        by_rel.setdefault(stem, rel)
        by_stem.setdefault(os.path.basename(stem), rel)
    def lookup(candidate: str) -> str | None:
        return (by_rel.get(candidate) or by_rel.get(os.path.splitext(candidate)[0])
                or (by_stem.get(candidate) if "/" not in candidate else None))

    resolved, missing = [], []
    for record in sorted(records, key=lambda r: (r.split, r.key)):
        rel = next((hit for c in record.videos if (hit := lookup(c))), None)
        if rel is None:
            missing.append(Rejection(record.videos[0], f"missing: no video file under {videos} "
                                     f"(tried {', '.join(record.videos)})"))
        else:
            resolved.append((record, join(videos, rel)))
    return resolved, missing


def _plan_shards(resolved: list[tuple[VideoRecord, str]], out: str, options: PrepOptions) -> list[_ShardTask]:
    by_split: dict[str, list[tuple[VideoRecord, str]]] = {}
    for item in resolved:
        by_split.setdefault(item[0].split, []).append(item)
    tasks = []
    for split, items in sorted(by_split.items()):
        for index, start in enumerate(range(0, len(items), options.shard_size)):
            tasks.append(_ShardTask(split, index, out, items[start:start + options.shard_size], options.content()))
    return tasks


def _run_tasks(tasks: list[_ShardTask], options: PrepOptions, *, progress: bool, total: int) -> list[dict]:
    from sfa_vivit.core.progress import bar as progress_bar

    results: list[dict | None] = [None] * len(tasks)
    todo = []
    for i, task in enumerate(tasks):
        done = _finished_shard(task, verify=options.verify)
        if done is not None:
            results[i] = done
        else:
            todo.append(i)
    skipped = sum(len(tasks[i].items) for i in range(len(tasks)) if results[i] is not None)
    bar = progress_bar(total=total, initial=skipped, unit="video", desc="prep", disable=not progress,
                       smoothing=0.05)
    workers = min(options.workers or os.cpu_count() or 1, max(1, len(todo)))
    try:
        if workers == 1:
            for i in todo:
                results[i] = _write_shard(tasks[i])
                bar.update(len(tasks[i].items))
        else:
            ctx = multiprocessing.get_context("spawn")  # PyAV's threads and fork do not mix
            with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=die_with_parent,
                                        initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(_write_shard, tasks[i]): i for i in todo}
                for future in cf.as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    bar.update(len(tasks[i].items))
    finally:
        bar.close()
    return results  # type: ignore[return-value]


def die_with_parent(parent: int) -> None:
    """In a worker process: be killed when the parent dies, however it dies (SIGKILL included), so a killed
    prep leaves no decoder processes behind (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    import ctypes
    import signal
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)    # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:      # the parent died before prctl took effect
        os._exit(1)


def stored_identity(url: str) -> dict[str, Any]:
    """What the store says of the object at `url` without reading its bytes: its size and, on Cloud Storage,
    its generation and checksums (any rewrite changes the generation); on a local disk, its inode and mtime."""
    fs, path = url_to_fs(url)
    if is_local(fs):
        st = os.stat(path)
        return {"size": st.st_size, "inode": st.st_ino, "mtime_ns": st.st_mtime_ns}
    fs.invalidate_cache(path)               # the object's own metadata, not a listing cached earlier
    info = fs.info(path)
    return {"size": info.get("size"), **{k: info[k] for k in ("generation", "crc32c", "md5Hash") if info.get(k)}}


def _finished_shard(task: _ShardTask, verify: bool = False) -> dict | None:
    """The sidecar of a shard written earlier with these inputs, when the shard is still what was written: by
    what the store already knows of it (a re-run reads no shard's bytes: about 770 GB for Kinetics-400), or,
    when the store says otherwise, when never recorded, or with `verify`, by its sha256."""
    fs, path = url_to_fs(join(task.out, f"{task.name}.done.json"))
    try:
        done = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
    if done.get("fingerprint") != task.fingerprint():
        return None
    if done["num_samples"]:
        tar = join(task.out, f"{task.name}.tar")
        try:
            identity = stored_identity(tar)
        except FileNotFoundError:
            return None
        if not verify and done.get("stored") == identity:
            return done
        try:
            read_verified(tar, done["sha256"])
        except FileNotFoundError:
            return None
        except ShardChecksumError as e:
            log.warning("%s; writing it again", e)
            return None
        if done.get("stored") != identity:       # hashed once: the next re-run trusts the store again
            done["stored"] = identity
            write_bytes_atomic(join(task.out, f"{task.name}.done.json"), json.dumps(done, indent=1).encode())
    return done


def _write_shard(task: _ShardTask) -> dict:
    """Decode the task's videos, write its tar, then its sidecar. Runs in a worker process."""
    options = task.options
    buf = io.BytesIO()
    rejected: list[dict] = []
    count = 0
    frames: list[int] = []
    short_sides: list[int] = []
    started = time.perf_counter()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for record, url in task.items:
            try:
                clip = decode_segment(url, start=record.start, end=record.end, trimmed=record.trimmed,
                                      fps=options["fps"], short_side=options["short_side"],
                                      jpeg_quality=options["jpeg_quality"])
            except VideoRejected as e:
                rejected.append({"video": url, "reason": e.reason})
                continue
            except Exception as e:  # noqa: BLE001 - one bad video must never stop 800k others
                rejected.append({"video": url, "reason": f"unreadable: {type(e).__name__}: {e}"})
                continue
            offsets = [0]
            for jpeg in clip.frames:
                offsets.append(offsets[-1] + len(jpeg))
            meta = {"key": record.key, "label": record.label, "split": record.split,
                    "video": url.rsplit("/", 1)[-1], "start": record.start, "end": record.end,
                    "fps": clip.fps, "num_frames": len(clip.frames), "height": clip.height, "width": clip.width,
                    "offsets": offsets}
            _add(tar, f"{record.key}.json", json.dumps(meta, sort_keys=True).encode())
            _add(tar, f"{record.key}.jpgs", b"".join(clip.frames))
            count += 1
            frames.append(len(clip.frames))
            short_sides.append(min(clip.height, clip.width))
    data = buf.getvalue()
    result = {"name": task.name, "num_samples": count, "sha256": hashlib.sha256(data).hexdigest(),
              "bytes": len(data), "rejected": rejected, "fingerprint": task.fingerprint(),
              "frames": frames, "short_sides": short_sides,
              "seconds": round(time.perf_counter() - started, 3)}
    if count:
        write_bytes_atomic(join(task.out, f"{task.name}.tar"), data)
        result["stored"] = stored_identity(join(task.out, f"{task.name}.tar"))
    write_bytes_atomic(join(task.out, f"{task.name}.done.json"), json.dumps(result, indent=1).encode())
    return result


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0          # deterministic bytes: same inputs, same shard, same sha256
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))

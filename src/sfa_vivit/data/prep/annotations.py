"""The six datasets' official annotation files → one record type.

Each adapter reads the files as their authors release them and returns `Annotations`: the class
list (or, for EPIC-KITCHENS, one class list per head) in a stable order, one `VideoRecord` per
annotated sample, and a `Rejection` for every row that cannot become a sample (malformed row,
unknown label). Nothing here opens a video.

Formats (and where they come from):

- Kinetics-400 / 600 (DeepMind, kinetics_{400,600}_{train,val,test}.csv in the cvdfoundation and
  DeepMind releases): CSV with header ``label,youtube_id,time_start,time_end,split[,is_cc]``.
  Clips are files named ``<youtube_id>_<start:06d>_<end:06d>.mp4`` (already trimmed) or
  ``<youtube_id>.mp4`` (trimmed or the full video; decided from its duration). Kinetics has no
  class-index file: classes are the sorted label names.
- Moments in Time (MIT-IBM, Moments_in_Time_Raw/{trainingSet,validationSet}.csv): no header, first
  column ``category/file.mp4`` (further columns: label, agreement counts); the label is the folder.
  ``moments_categories.txt`` lists ``name,index``: classes ordered by index.
- EPIC-KITCHENS-100 (epic-kitchens-100-annotations, EPIC_100_{train,validation}.csv): header with
  ``narration_id, participant_id, video_id, start_timestamp, stop_timestamp, start_frame,
  stop_frame, verb_class, noun_class`` among others, read by name; timestamps ``HH:MM:SS.ff``.
  ``EPIC_100_verb_classes.csv`` / ``EPIC_100_noun_classes.csv`` (``id,key,...``): the heads' class
  lists ordered by id. Samples are segments of long videos ``<video_id>.MP4``.
- Something-Something v2 (20BN/Qualcomm, something-something-v2-{train,validation}.json): a JSON list
  of ``{id, label, template, placeholders}``; ``something-something-v2-labels.json`` maps the
  template (``[something]`` brackets removed) to its index as a string. Videos ``<id>.webm``.
- Something-Else, compositional split (Materzynska et al. 2020, dataset_splits/compositional/
  {train,validation,labels}.json): the same JSON layout over the SSv2 videos, with its own labels.json.
- synthetic: Kinetics CSV written by `sfa data synth`; its labels are directions of motion, so
  horizontal flipping is off, as for the Something-Something datasets.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
from typing import Callable, Iterable

from sfa_vivit.core.storage import open_url

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
LABELLED_SPLITS = ("train", "validation")     # a sample of these must have a label; test may have none

DATASETS = ("kinetics400", "kinetics600", "mit", "epic-kitchens-100", "ssv2", "something-else", "synthetic")

# Datasets whose labels name a left/right direction: a horizontal flip would change the label.
NO_FLIP = {"ssv2", "something-else", "synthetic"}

EXPECTED_CLASSES = {"kinetics400": 400, "kinetics600": 600, "mit": 339, "ssv2": 174, "something-else": 174}

DUPLICATE = "duplicate:"     # how a repeated annotation row's rejection reason starts

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".MP4", ".m4v")


@dataclasses.dataclass(frozen=True)
class VideoRecord:
    """One annotated sample.

    key: unique sample id (a WebDataset key: no dots or slashes).
    videos: candidate file names, relative to the videos root, tried in order.
    label: class index, or head → class index (EPIC), or None (unlabelled test split).
    start, end: the segment in seconds, None for "the whole file".
    trimmed: True when the file is known to hold exactly the segment (Kinetics clip files);
        None when it may be either (decided from the file's duration).
    """
    key: str
    videos: tuple[str, ...]
    label: int | dict[str, int] | None
    split: str
    start: float | None = None
    end: float | None = None
    trimmed: bool | None = None


@dataclasses.dataclass(frozen=True)
class Rejection:
    video: str
    reason: str


@dataclasses.dataclass
class Annotations:
    dataset: str
    classes: list[str] | None
    heads: dict[str, list[str]] | None
    records: list[VideoRecord]
    rejected: list[Rejection]

    @property
    def horizontal_flip(self) -> bool:
        return self.dataset not in NO_FLIP


class AnnotationError(ValueError):
    """The annotation files as a whole cannot be used (missing class list, wrong file)."""


def read_annotations(dataset: str, files: Iterable[str], split: str | None = None) -> Annotations:
    """Parse `dataset`'s official annotation `files` (local paths or URLs) into Annotations.

    split: keep only records of this split ('train', 'validation', 'test'); None keeps all.
    Raises AnnotationError for an unknown dataset, a missing required file, or an unreadable file.
    """
    if dataset not in _ADAPTERS:
        raise AnnotationError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    files = [os.fspath(f) for f in files]
    if not files:
        raise AnnotationError(f"{dataset}: no annotation files given (--annotations)")
    texts = {f: _read_text(f) for f in files}
    result = _ADAPTERS[dataset](dataset, texts)
    result.records, checked = _check_records(result.records)
    result.rejected += checked
    result.records, duplicates = unique_records(result.records)
    result.rejected += duplicates
    for head, names in ({"": result.classes} if result.classes is not None else result.heads or {}).items():
        _warn_near_duplicates(names, f"{dataset}{f' {head}' if head else ''} classes")
    if split is not None:
        result.records = [r for r in result.records if r.split == split]
        if not result.records:
            raise AnnotationError(f"{dataset}: no records of split {split!r} in {files}")
    return result


def _check_records(records: list[VideoRecord]) -> tuple[list[VideoRecord], list[Rejection]]:
    """Reject what no adapter may let through: a split that is not train/validation/test (a typo would
    otherwise become a split of its own), an unlabelled sample in a labelled split, a segment that is
    not a finite time."""
    kept, rejected = [], []
    for r in records:
        if r.split not in SPLITS:
            rejected.append(Rejection(r.videos[0], f"unknown split {r.split!r} (expected one of {list(SPLITS)})"))
        elif r.label is None and r.split in LABELLED_SPLITS:
            rejected.append(Rejection(r.videos[0], f"no label: a {r.split} sample must have one (only test "
                                                   "splits may be unlabelled)"))
        elif any(t is not None and not math.isfinite(t) for t in (r.start, r.end)):
            rejected.append(Rejection(r.videos[0], f"malformed segment: start {r.start}, end {r.end} are not finite "
                                                   "times"))
        else:
            kept.append(r)
    return kept, rejected


def _warn_near_duplicates(names: list[str], what: str) -> None:
    """Warn about class names that differ only in case or whitespace: almost always one class typed twice."""
    seen: dict[str, str] = {}
    for name in names:
        folded = " ".join(name.split()).casefold()
        if folded in seen:
            log.warning("%s: %r and %r differ only in case or whitespace; they are two classes here. If they are "
                        "one, make the annotations spell it one way", what, seen[folded], name)
        else:
            seen[folded] = name


def _unique_index(pairs: Iterable[tuple[str, int, str]], path: str) -> dict[int, str]:
    """(name, index, where) entries of a class-list file → index → name; a repeated index or a repeated name is
    an AnnotationError naming the file and both entries."""
    by_index: dict[int, tuple[str, str]] = {}
    by_name: dict[str, str] = {}
    for name, index, where in pairs:
        if index in by_index:
            other, other_where = by_index[index]
            raise AnnotationError(f"{path}: index {index} is given twice, to {other!r} ({other_where}) and to "
                                  f"{name!r} ({where}); every class needs its own index")
        if name in by_name:
            raise AnnotationError(f"{path}: class {name!r} is listed twice ({by_name[name]} and {where})")
        by_index[index], by_name[name] = (name, where), where
    return {i: name for i, (name, _) in by_index.items()}


def _read_text(url: str) -> str:
    try:
        with open_url(url, "rb") as f:
            return f.read().decode("utf-8-sig")
    except FileNotFoundError:
        raise AnnotationError(f"annotation file {url} does not exist") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"annotation file {url} is not UTF-8 text: {e}") from None


def _normalise_split(name: str) -> str:
    name = name.strip().lower()
    return {"val": "validation", "valid": "validation", "validate": "validation",
            "training": "train", "trainingset": "train", "validationset": "validation"}.get(name, name)


def _split_from_filename(path: str) -> str:
    base = os.path.basename(path).lower()
    for word, split in (("train", "train"), ("validation", "validation"), ("val", "validation"),
                        ("test", "test")):
        if word in base:
            return split
    raise AnnotationError(f"cannot tell the split of {path} from its name (expected train, validation or test in it)")


def unique_records(records: list[VideoRecord]) -> tuple[list[VideoRecord], list[Rejection]]:
    """One record per sample key of a split: a row repeated with the same label is rejected (kept once);
    the same sample with two labels is an AnnotationError; two different videos whose ids sanitise to
    the same key (``1.5`` and ``1_5``) both keep their samples, each key made unique by a hash of its
    video name (a tar holding the same key twice could not be read)."""
    by_key: dict[tuple[str, str], list[VideoRecord]] = {}
    for r in records:
        by_key.setdefault((r.split, r.key), []).append(r)
    kept: list[VideoRecord] = []
    rejected: list[Rejection] = []
    for (split, key), group in by_key.items():
        by_video: dict[tuple[str, ...], VideoRecord] = {}
        for r in group:
            first = by_video.setdefault(r.videos, r)
            if first is r:
                continue
            if first.label != r.label:
                raise AnnotationError(f"sample {r.videos[0]!r} of split {split!r} is annotated twice with different "
                                      f"labels ({first.label} and {r.label}); fix the annotation file")
            rejected.append(Rejection(r.videos[0], f"{DUPLICATE} sample {key!r} of split {split!r} is listed more than "
                                                   "once with the same label; kept once"))
        if len(by_video) == 1:
            kept.extend(by_video.values())
            continue
        for videos, r in by_video.items():
            digest = hashlib.sha256(videos[0].encode()).hexdigest()[:8]
            kept.append(dataclasses.replace(r, key=f"{key}-{digest}"))
    return kept, rejected


def safe_key(*parts: str) -> str:
    """A WebDataset-safe sample key: no dots (they start the extension) or slashes."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", "_".join(parts))


# ---------------------------------------------------------------------------------------------
# Kinetics (and the synthetic dataset, which uses its layout)
# ---------------------------------------------------------------------------------------------

def _kinetics(dataset: str, texts: dict[str, str]) -> Annotations:
    rows: list[tuple[str, int, dict[str, str]]] = []
    rejected: list[Rejection] = []
    for path, text in texts.items():
        reader = csv.DictReader(io.StringIO(text))
        required = {"youtube_id", "time_start", "time_end"}
        if reader.fieldnames is None or not required <= set(reader.fieldnames):
            raise AnnotationError(f"{path}: not a Kinetics CSV; header must have label,youtube_id,time_start,"
                                  f"time_end,split, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            if None in row or any(row.get(k) is None for k in required):
                rejected.append(Rejection(f"{path}:{line}", f"malformed annotation row {line} of {path}: "
                                          f"expected {len(reader.fieldnames)} columns"))
                continue
            rows.append((path, line, row))
    classes = sorted({row["label"].strip() for _, _, row in rows if row.get("label", "").strip()})
    index = {name: i for i, name in enumerate(classes)}
    records = []
    for path, line, row in rows:
        ytid = row["youtube_id"].strip()
        try:
            start, end = float(row["time_start"]), float(row["time_end"])
            if not (math.isfinite(start) and math.isfinite(end)):
                raise ValueError(f"time_start={row['time_start']!r} and time_end={row['time_end']!r} must be finite")
            if not 0 <= start < end:
                raise ValueError(f"time_start={start} must be >= 0 and < time_end={end}")
        except ValueError as e:
            rejected.append(Rejection(ytid or f"{path}:{line}",
                                      f"malformed annotation row {line} of {path}: {e}"))
            continue
        split = _normalise_split(row["split"]) if row.get("split") else _split_from_filename(path)
        label_name = (row.get("label") or "").strip()
        label = index[label_name] if label_name else None
        clip = f"{ytid}_{int(start):06d}_{int(end):06d}"
        records.append(VideoRecord(key=safe_key(clip), videos=(clip, ytid), label=label, split=split,
                                   start=start, end=end, trimmed=None))
    return Annotations(dataset, classes, None, records, rejected)


# ---------------------------------------------------------------------------------------------
# Moments in Time
# ---------------------------------------------------------------------------------------------

def _mit(dataset: str, texts: dict[str, str]) -> Annotations:
    categories = [p for p in texts if os.path.basename(p).startswith("moments_categories")]
    if not categories:
        raise AnnotationError("mit needs moments_categories.txt among --annotations")
    entries = []
    for line_no, line in enumerate(texts[categories[0]].splitlines(), start=1):
        if not line.strip():
            continue
        name, _, idx = line.strip().rpartition(",")
        try:
            entries.append((name, int(idx), f"line {line_no}"))
        except ValueError:
            raise AnnotationError(f"{categories[0]}:{line_no}: expected 'name,index', got {line!r}") from None
    by_index = _unique_index(entries, categories[0])
    classes = [by_index[i] for i in sorted(by_index)]
    index = {name: i for i, name in enumerate(classes)}
    records, rejected = [], []
    for path, text in texts.items():
        if path in categories:
            continue
        split = _split_from_filename(path)
        for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if not row or not row[0].strip():
                continue
            rel = row[0].strip()
            if "/" not in rel:
                rejected.append(Rejection(f"{path}:{line}", f"malformed annotation row {line} of {path}: "
                                          f"expected 'category/file.mp4', got {rel!r}"))
                continue
            category = rel.split("/", 1)[0]
            if category not in index:
                rejected.append(Rejection(
                    rel, f"unknown label {category!r} (not in {os.path.basename(categories[0])})"))
                continue
            folder = {"train": "training", "validation": "validation"}.get(split, split)
            records.append(VideoRecord(key=safe_key(os.path.splitext(rel)[0]), videos=(rel, f"{folder}/{rel}"),
                                       label=index[category], split=split))
    return Annotations(dataset, classes, None, records, rejected)


# ---------------------------------------------------------------------------------------------
# EPIC-KITCHENS-100
# ---------------------------------------------------------------------------------------------

def _timestamp(text: str) -> float:
    """'HH:MM:SS.ff' → seconds."""
    h, m, s = text.strip().split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def _epic_classes(path: str, text: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"id", "key"} <= set(reader.fieldnames):
        raise AnnotationError(f"{path}: expected columns id,key,..., got {reader.fieldnames}")
    try:
        by_index = _unique_index(((r["key"], int(r["id"]), f"line {n}") for n, r in enumerate(reader, start=2)), path)
    except ValueError as e:
        if isinstance(e, AnnotationError):
            raise
        raise AnnotationError(f"{path}: a class id is not an integer ({e})") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise AnnotationError(f"{path}: class ids are not 0..{len(by_index) - 1}")
    return [by_index[i] for i in range(len(by_index))]


def _epic(dataset: str, texts: dict[str, str]) -> Annotations:
    verb_files = [p for p in texts if "verb_classes" in os.path.basename(p)]
    noun_files = [p for p in texts if "noun_classes" in os.path.basename(p)]
    if not verb_files or not noun_files:
        raise AnnotationError("epic-kitchens-100 needs EPIC_100_verb_classes.csv and EPIC_100_noun_classes.csv "
                              "among --annotations")
    heads = {"verb": _epic_classes(verb_files[0], texts[verb_files[0]]),
             "noun": _epic_classes(noun_files[0], texts[noun_files[0]])}
    required = ("narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp")
    records, rejected = [], []
    for path, text in texts.items():
        if path in verb_files or path in noun_files:
            continue
        split = _split_from_filename(path)
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or not set(required) <= set(reader.fieldnames):
            raise AnnotationError(f"{path}: not an EPIC-KITCHENS-100 CSV; needs columns {list(required)}, "
                                  f"got {reader.fieldnames}")
        labelled = {"verb_class", "noun_class"} <= set(reader.fieldnames)
        for line, row in enumerate(reader, start=2):
            nid = (row.get("narration_id") or f"{path}:{line}").strip()
            try:
                if None in row or any(row.get(k) in (None, "") for k in required):
                    raise ValueError("missing columns")
                start, end = _timestamp(row["start_timestamp"]), _timestamp(row["stop_timestamp"])
                if not 0 <= start < end:
                    raise ValueError(f"start {row['start_timestamp']} is not before stop {row['stop_timestamp']}")
                label = None
                if labelled:
                    label = {"verb": int(row["verb_class"]), "noun": int(row["noun_class"])}
            except ValueError as e:
                rejected.append(Rejection(nid, f"malformed annotation row {line} of {path}: {e}"))
                continue
            if label is not None:
                bad = [h for h in ("verb", "noun") if not 0 <= label[h] < len(heads[h])]
                if bad:
                    rejected.append(Rejection(nid, f"unknown label: {bad[0]}_class {label[bad[0]]} is outside "
                                              f"0..{len(heads[bad[0]]) - 1}"))
                    continue
            video_id, participant = row["video_id"].strip(), row["participant_id"].strip()
            records.append(VideoRecord(key=safe_key(nid), videos=(video_id, f"{participant}/videos/{video_id}",
                                                                   f"{participant}/{video_id}"),
                                       label=label, split=split, start=start, end=end, trimmed=False))
    return Annotations(dataset, None, heads, records, rejected)


# ---------------------------------------------------------------------------------------------
# Something-Something v2 and Something-Else
# ---------------------------------------------------------------------------------------------

def _template_key(template: str) -> str:
    # The labels file names templates without the [ ] around placeholders.
    return re.sub(r"\s+", " ", template.replace("[", "").replace("]", "")).strip()


def _ssv2(dataset: str, texts: dict[str, str]) -> Annotations:
    label_files = [p for p in texts if os.path.basename(p).endswith("labels.json")]
    if not label_files:
        expected = "something-something-v2-labels.json" if dataset == "ssv2" else "labels.json"
        raise AnnotationError(f"{dataset} needs {expected} among --annotations")
    try:
        # Pairs, not a dict: a template given twice must be seen, not silently kept once.
        pairs = json.loads(texts[label_files[0]], object_pairs_hook=list)
        entries = [(_template_key(k), int(v), f"entry {k!r}: {v!r}") for k, v in pairs]
    except (ValueError, TypeError, AttributeError) as e:
        raise AnnotationError(f"{label_files[0]}: expected a JSON object template → index, {e}") from None
    by_index = _unique_index(entries, label_files[0])
    mapping = {t: i for i, t in by_index.items()}
    if sorted(by_index) != list(range(len(by_index))):
        raise AnnotationError(f"{label_files[0]}: indices are not 0..{len(by_index) - 1}")
    classes = [by_index[i] for i in range(len(by_index))]
    records, rejected = [], []
    for path, text in texts.items():
        if path in label_files:
            continue
        split = _split_from_filename(path)
        try:
            items = json.loads(text)
        except ValueError as e:
            raise AnnotationError(f"{path}: not JSON: {e}") from None
        if not isinstance(items, list):
            raise AnnotationError(f"{path}: expected a JSON list of samples")
        for n, item in enumerate(items):
            if not isinstance(item, dict) or not str(item.get("id", "")).strip():
                rejected.append(Rejection(f"{path}[{n}]", f"malformed annotation entry {n} of {path}: no 'id'"))
                continue
            vid = str(item["id"]).strip()
            label = None
            if "template" in item:
                template = _template_key(str(item["template"]))
                if template not in mapping:
                    rejected.append(Rejection(vid, f"unknown label: template {item['template']!r} is not in "
                                              f"{os.path.basename(label_files[0])}"))
                    continue
                label = mapping[template]
            records.append(VideoRecord(key=safe_key(vid), videos=(vid,), label=label, split=split))
    return Annotations(dataset, classes, None, records, rejected)


_ADAPTERS: dict[str, Callable[[str, dict[str, str]], Annotations]] = {
    "kinetics400": _kinetics, "kinetics600": _kinetics, "synthetic": _kinetics, "mit": _mit,
    "epic-kitchens-100": _epic, "ssv2": _ssv2, "something-else": _ssv2,
}

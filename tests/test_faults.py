"""Bad input and faults (the README's "When something goes wrong" table). Each test injects one fault and
checks what the user sees (one line, naming the input), the exit code, and that what was published or
committed before is byte-identical after."""

import csv
import errno
import fractions
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import simplejpeg
import torch

from faults import FullDisk, break_header, break_jpegs, snapshot
from helpers import TINY, config, final_state
from sfa_vivit.cli import main
from sfa_vivit.core.storage import write_bytes_atomic
from sfa_vivit.data.manifest import load_manifest, verify_shards
from sfa_vivit.data.prep import PrepOptions, prepare, synth
from sfa_vivit.data.prep.video import VideoRejected, decode_segment
from sfa_vivit.data.reader import ClipDataset
from sfa_vivit.models import checkpoints, vivit
from sfa_vivit.train import Trainer, resolve
from sfa_vivit.train.trainer import TrainError

OPTIONS = PrepOptions(fps=8, short_side=32, shard_size=4, workers=1)
PREP_FLAGS = ["--fps", "8", "--short-side", "32", "--shard-size", "4", "--workers", "1"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Eight short synthetic videos (6 train, 2 validation) and their Kinetics-layout CSVs."""
    root = tmp_path_factory.mktemp("raw")
    return synth.generate(str(root), synth.SynthOptions(num_train=6, num_val=2, num_frames=8, size=32, fps=8),
                          progress=False)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def write_rows(path, table):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(table)
    return str(path)


def prep_cli(raw, out, *extra, annotations=None, videos=None):
    anns = annotations or [raw["train"], raw["validation"]]
    return main(["data", "prep", "--dataset", "synthetic", *[a for p in anns for a in ("--annotations", p)],
                 "--videos", videos or raw["videos"], "--out", str(out), *PREP_FLAGS, *extra])


def one_error_line(capsys, *needles):
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sfa ")]
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def copy_data(tiny_data, tmp_path, name="data"):
    return Path(shutil.copytree(tiny_data, tmp_path / name))


# ---------------------------------------------------------------------------------------------
# Prep: keys, publish-last, unpublish-never
# ---------------------------------------------------------------------------------------------

def test_duplicate_rows_are_rejected_and_ids_that_sanitise_alike_keep_unique_keys(raw, tmp_path):
    table = rows(raw["train"])
    header, first = table[0], table[1]
    videos = tmp_path / "videos"
    shutil.copytree(raw["videos"], videos)
    source = videos / f"{first[1]}_000000_{int(first[3]):06d}.mp4"
    for ytid in ("clip.1", "clip_1"):                      # both become the sample key clip_1_000000_000001
        shutil.copy(source, videos / f"{ytid}_000000_{int(first[3]):06d}.mp4")
    train = write_rows(tmp_path / "train.csv", [*table, first, [first[0], "clip.1", *first[2:]],
                                                [first[0], "clip_1", *first[2:]]])
    manifest = prepare("synthetic", [train, raw["validation"]], str(videos), str(tmp_path / "out"), options=OPTIONS,
                       progress=False)
    assert manifest["splits"]["train"]["num_samples"] == 6 + 2
    (duplicate,) = manifest["rejected"]
    assert duplicate["reason"].startswith("duplicate: sample") and "kept once" in duplicate["reason"]
    # Every shard reads to the end (a tar holding one key twice could not) and every key is unique.
    keys = [clip["key"] for clip in ClipDataset(str(tmp_path / "out"), "train", sampling="eval", num_frames=4,
                                                image_size=32, num_clips=1, num_crops=1)]
    assert len(keys) == len(set(keys)) == 8
    assert len([k for k in keys if k.startswith("clip_1_000000_000001-")]) == 2
    assert header == ["label", "youtube_id", "time_start", "time_end", "split"]


def test_a_sample_labelled_twice_differently_is_an_error_and_publishes_nothing(raw, tmp_path, capsys):
    table = rows(raw["train"])
    other = next(r[0] for r in table[1:] if r[0] != table[1][0])
    train = write_rows(tmp_path / "train.csv", [*table, [other, *table[1][1:]]])
    assert prep_cli(raw, tmp_path / "out", annotations=[train, raw["validation"]]) == 2
    one_error_line(capsys, "annotated twice with different labels", table[1][1])
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_failed_prep_rerun_leaves_the_published_dataset_byte_identical(raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert prep_cli(raw, out) == 0
    published = snapshot(out)
    capsys.readouterr()
    # A typo in --videos: refused before anything is written.
    assert prep_cli(raw, out, videos=str(tmp_path / "vidoes")) == 2
    one_error_line(capsys, "vidoes does not exist")
    assert snapshot(out) == published
    # Other inputs with too many rejected videos: new shards are written, nothing is published or removed.
    missing = write_rows(tmp_path / "more.csv", [*rows(raw["train"]), *[["a", f"gone{i}", 0, 1, "train"]
                                                                        for i in range(5)]])
    assert prep_cli(raw, out, "--max-reject-fraction", "0.1", annotations=[missing, raw["validation"]]) == 1
    one_error_line(capsys, "5 of 13 samples rejected", "manifest published there before is unchanged")
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in published} == published
    assert verify_shards(load_manifest(str(out))) == []
    # A rerun that succeeds switches the manifest, then removes the shards that neither it nor the one it
    # replaced lists (a reader of the previous manifest keeps its shards for one more generation).
    def listed():
        manifest = load_manifest(str(out))
        assert verify_shards(manifest) == []
        return {s["path"] for split in manifest.data["splits"].values() for s in split["shards"]}
    first = listed()
    assert prep_cli(raw, out, "--short-side", "24") == 0
    second = listed()
    assert {p for p in snapshot(out) if p.endswith(".tar")} == first | second and not first & second
    assert prep_cli(raw, out, "--short-side", "28") == 0
    assert {p for p in snapshot(out) if p.endswith(".tar")} == second | listed()


def test_prep_on_a_full_disk_fails_in_one_line_and_keeps_the_published_dataset(raw, capsys):
    FullDisk.reset()
    assert prep_cli(raw, "fulldisk://bucket/data") == 0
    published = FullDisk.snapshot()
    FullDisk.free = 2000                                  # less than one new shard
    capsys.readouterr()
    assert prep_cli(raw, "fulldisk://bucket/data", "--jpeg-quality", "80") == 1
    one_error_line(capsys, "sfa data prep: error: No space left on device: fulldisk://bucket/data/")
    assert FullDisk.snapshot() == published
    FullDisk.reset()


def test_prep_rewrites_a_damaged_shard_instead_of_reusing_it(raw, tmp_path):
    out = tmp_path / "out"
    first = prepare("synthetic", [raw["train"], raw["validation"]], raw["videos"], str(out), options=OPTIONS,
                    progress=False)
    shard = out / first["splits"]["train"]["shards"][0]["path"]
    good = shard.read_bytes()
    shard.write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])
    assert prepare("synthetic", [raw["train"], raw["validation"]], raw["videos"], str(out), options=OPTIONS,
                   progress=False) == first
    assert shard.read_bytes() == good


def test_killing_prep_kills_its_worker_processes(raw, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(raw["videos"], videos)
    table = rows(raw["train"])
    many = [table[0]]
    for i in range(60):                                   # enough work to still be running when killed
        row = table[1 + i % 6]
        shutil.copy(videos / f"{row[1]}_000000_{int(row[3]):06d}.mp4", videos / f"many{i}_000000_{int(row[3]):06d}.mp4")
        many.append([row[0], f"many{i}", *row[2:]])
    train = write_rows(tmp_path / "train.csv", many)
    prep = subprocess.Popen([sys.executable, "-m", "sfa_vivit.cli", "data", "prep", "--dataset", "synthetic",
                             "--annotations", train, "--videos", str(videos), "--out", str(tmp_path / "out"),
                             "--fps", "8", "--short-side", "32", "--shard-size", "1", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and len(workers) < 2 and prep.poll() is None:
        workers = [pid for pid in _children(prep.pid) if "spawn_main" in _cmdline(pid)]
        time.sleep(0.2)
    assert len(workers) == 2, "the prep workers never started"
    prep.kill()
    prep.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Videos the decoder reports oddly
# ---------------------------------------------------------------------------------------------

def _write(path, frames, *, rate=8, pts=None, rotation=None):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        if pts is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def test_rotation_variable_frame_rate_and_still_images(tmp_path):
    # A phone video stored sideways (64x32 pixels, displayed rotated 90 degrees): stored upright, 32 wide.
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :16] = 255                                   # the stored left edge is the displayed bottom
    clip = decode_segment(_write(tmp_path / "rot.mp4", [image] * 8, rotation=90), start=None, end=None,
                          trimmed=None, fps=8, short_side=32)
    first = simplejpeg.decode_jpeg(clip.frames[0])
    assert (clip.height, clip.width) == first.shape[:2] == (64, 32)
    assert first[-8:].mean() > 200 and first[:8].mean() < 50
    # Variable frame rate: a burst, then frames a second apart. The whole file is kept, not called truncated.
    frames = [np.full((32, 32, 3), 20 * i, np.uint8) for i in range(12)]
    pts = [0, 33, 66, 100, 133, 166, 200, 233, 266, 300, 1000, 2000]
    clip = decode_segment(_write(tmp_path / "vfr.mp4", frames, rate=30, pts=pts), start=None, end=None,
                          trimmed=None, fps=8, short_side=32)
    assert len(clip.frames) >= 8
    # One frame is a still image, not a video.
    with pytest.raises(VideoRejected, match="a single decodable frame"):
        decode_segment(_write(tmp_path / "still.mp4", [image]), start=None, end=None, trimmed=None, fps=8,
                       short_side=32)


# ---------------------------------------------------------------------------------------------
# Checkpoints: write the new, then switch
# ---------------------------------------------------------------------------------------------

def _model(seed):
    torch.manual_seed(seed)
    return vivit("S", num_frames=4, image_size=16, num_classes=3, width=32, spatial_depth=1, temporal_depth=1,
                 heads=2, mlp_dim=32, patch=8)


def test_a_checkpoint_resave_on_a_full_store_keeps_the_committed_one(tmp_path):
    FullDisk.reset()
    url = "fulldisk://bucket/run/model"
    checkpoints.save(_model(0), url, extra={"epoch": 1})
    committed = FullDisk.snapshot()
    FullDisk.free = 1000
    with pytest.raises(OSError) as raised:
        checkpoints.save(_model(1), url, extra={"epoch": 2})
    assert raised.value.errno == errno.ENOSPC
    assert FullDisk.snapshot() == committed
    loaded = checkpoints.load(url)
    assert loaded.extra == {"epoch": 1}
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), _model(0).state_dict().values()))
    # With space again, the re-save switches to the new files and removes the old ones.
    FullDisk.free = None
    checkpoints.save(_model(1), url, extra={"epoch": 2})
    assert checkpoints.load(url).extra == {"epoch": 2}
    assert len([k for k in FullDisk.store if k.startswith("fulldisk://bucket/run/model/")]) == 3
    FullDisk.reset()


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem that fills up: a tmpfs of a given size (root only; skipped where mount is refused)."""
    mounts = []

    def make(size_bytes):
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        size = -(-size_bytes // 4096) * 4096
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", str(where)], check=False)


def test_a_local_full_disk_leaves_no_temporary_files_and_the_committed_checkpoint(tmp_path, small_disk):
    checkpoints.save(_model(0), tmp_path / "probe")
    size = sum(p.stat().st_size for p in (tmp_path / "probe").iterdir())
    disk = small_disk(size * 3 // 2)
    checkpoints.save(_model(0), disk / "model", extra={"epoch": 1})
    committed = snapshot(disk / "model")
    with pytest.raises(OSError) as raised:
        checkpoints.save(_model(1), disk / "model", extra={"epoch": 2})
    assert raised.value.errno == errno.ENOSPC
    assert snapshot(disk / "model") == committed               # no *.tmp-* left, nothing changed
    assert checkpoints.load(disk / "model").extra == {"epoch": 1}
    with pytest.raises(OSError):
        write_bytes_atomic(str(disk / "big.bin"), b"x" * size * 2)
    assert sorted(p.name for p in disk.iterdir()) == ["model"]


# ---------------------------------------------------------------------------------------------
# Training and evaluation on the wrong or damaged data
# ---------------------------------------------------------------------------------------------

def _train_cli(data, out, *sets, mode="stage1", init=None):
    tiny = [a for s in [*TINY, "epochs=1", "num_frames=4", *sets] for a in ("--set", s)]
    return main(["train", "--mode", mode, "--recipe", "synthetic", "--data", str(data), "--out", str(out), *tiny,
                 *(["--init", str(init)] if init else [])])


def _renamed_classes(tiny_data, tmp_path):
    other = copy_data(tiny_data, tmp_path, "renamed")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["classes"] = [f"other-{c}" for c in manifest["classes"]]
    (other / "manifest.json").write_text(json.dumps(manifest))
    return other


def test_resuming_a_run_on_other_data_is_refused_and_changes_nothing(tiny_data, tmp_path, capsys, no_mlflow_env):
    other = _renamed_classes(tiny_data, tmp_path)
    assert _train_cli(tiny_data, tmp_path / "done") == 0
    finished = snapshot(tmp_path / "done")
    capsys.readouterr()
    assert _train_cli(other, tmp_path / "done") == 2
    one_error_line(capsys, "holds a run trained on other data", str(other))
    assert snapshot(tmp_path / "done") == finished
    Trainer(config("stage1", epochs=2), tiny_data, str(tmp_path / "half")).fit(stop_after_steps=1)
    half = snapshot(tmp_path / "half")
    with pytest.raises(TrainError, match="trained on other data"):
        Trainer(config("stage1", epochs=2), str(other), str(tmp_path / "half"))
    assert snapshot(tmp_path / "half") == half


def test_a_damaged_shard_is_named_mid_run_and_verify_data_finds_it_first(tiny_data, tmp_path, capsys, no_mlflow_env):
    data = copy_data(tiny_data, tmp_path)
    shards = load_manifest(str(data)).shard_urls("train")
    break_header(shards[1])                               # the tar stream ends after its first sample
    assert _train_cli(data, tmp_path / "run", "workers=1") == 2
    one_error_line(capsys, f"shard {shards[1]} holds 1 readable samples, the manifest lists")
    assert _train_cli(data, tmp_path / "checked", "verify_data=true") == 2
    one_error_line(capsys, "verify_data: 1 shard(s)", shards[1])
    assert not (tmp_path / "checked" / "checkpoints").exists()
    # Damaged JPEG bytes inside a sample: the sample and its shard are named.
    data = copy_data(tiny_data, tmp_path, "jpegs")
    shard = load_manifest(str(data)).shard_urls("train")[0]
    key = break_jpegs(shard)
    assert _train_cli(data, tmp_path / "jpeg", "workers=0") == 2
    one_error_line(capsys, f"sample {key!r} of shard {shard} is damaged")


def test_verify_names_a_shard_that_is_a_directory(tiny_data, tmp_path, capsys):
    data = copy_data(tiny_data, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["path"] = "a-folder"
    (data / "a-folder").mkdir()
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert main(["data", "verify", str(data)]) == 1
    assert f"{data}/a-folder" in capsys.readouterr().err
    shard = load_manifest(str(data)).shard_urls("validation")[0]
    assert main(["data", "verify", shard]) == 2                   # a shard, not the dataset
    one_error_line(capsys, f"{shard} is not a prep output folder or its manifest.json")


def test_out_of_range_settings_are_refused_by_name(tiny_data, tmp_path, capsys):
    for setting, needle in (("base_lr=inf", "base_lr=inf must be a finite number"),
                            ("base_lr=nan", "base_lr=nan must be a finite number"),
                            ("augment.std=[0.5,0,0.5]", "must be > 0 per channel"),
                            ("momentum=1.5", "momentum=1.5 must be < 1")):
        with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
            resolve("stage1", "synthetic", sets=[setting])
        assert _train_cli(tiny_data, tmp_path / "never", setting) == 2
        one_error_line(capsys, needle)
    assert not (tmp_path / "never").exists()
    if not torch.cuda.is_available():
        assert _train_cli(tiny_data, tmp_path / "never", "device=cuda") == 2
        one_error_line(capsys, "device=cuda but no CUDA device is visible")


def test_stage2_refuses_an_init_of_another_mode_and_evaluation_other_class_names(tiny_data, tmp_path, capsys,
                                                                                  no_mlflow_env):
    assert _train_cli(tiny_data, tmp_path / "base", mode="baseline") == 0
    capsys.readouterr()
    assert _train_cli(tiny_data, tmp_path / "s2", mode="stage2", init=tmp_path / "base") == 2
    one_error_line(capsys, "is a baseline checkpoint; mode stage2 starts from a stage1 model", "--force-init")
    assert not (tmp_path / "s2").exists()
    forced = Trainer(config("stage2"), tiny_data, str(tmp_path / "s2"), init=str(tmp_path / "base"),
                     force_init=True).fit()
    assert forced["steps"] > 0 and final_state(tmp_path / "s2")
    other = _renamed_classes(tiny_data, tmp_path)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "base"), "--data", str(other), "--views", "1x1",
                 "--workers", "0"]) == 2
    one_error_line(capsys, "was trained on other class names", "class 0 is")


# ---------------------------------------------------------------------------------------------
# Side systems
# ---------------------------------------------------------------------------------------------

class _LoginPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        body = b"<!doctype html><html><body><form>Sign in</form></body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_submit_to_a_sign_in_page_says_so(capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LoginPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}/pipeline"
        package = str(Path(__file__).parents[1] / "pipelines" / "sfa-cpu.yaml")
        assert main(["pipeline", "submit", package, "--host", host, "--param", 'tracking_uri="none"',
                     "--pipeline-root", "gs://sfa-test/root", "--image", "registry.example/sfa-vivit:1-cpu"]) == 2
        one_error_line(capsys, "does not answer as a KFP endpoint", "text/html", "sign-in page")
    finally:
        server.shutdown()


def test_errors_print_as_one_line():
    from sfa_vivit.cli import one_line
    assert one_line(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/x.tar")) == \
        "No space left on device: /data/x.tar"
    wrapped = ("Caught ShardReadError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "reader.py", line 1, in <module>\nsfa_vivit.data.manifest.ShardReadError: shard s.tar is bad')
    assert one_line(ValueError(wrapped)) == "shard s.tar is bad"
    assert one_line(ValueError("two\n  lines")) == "two lines"

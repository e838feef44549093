"""The XLA path, on torch-xla's CPU backend with two devices (`make test-xla`): SPMD over every device of
the host trains stage 1 and stage 2 (videos and the feature cache) as the CPU does, keeps the replicas
identical, compiles no new graph per step, resumes bit-exactly after a kill, and evaluates and benchmarks.

Tolerance against the CPU: the per-epoch mean loss within 1e-4 relative (the same fp32 arithmetic,
reduced in another order over the devices; measured here: ~1e-7), and the same top-1.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY, config, final_state
from sfa_vivit.models import checkpoints

pytestmark = pytest.mark.xla
xla = pytest.importorskip("torch_xla", reason="the xla tier runs in .venv-xla (`make test-xla`)")

# 24 training clips in batches of 6: 4 steps per epoch. 8 validation clips in evaluation batches of 6:
# the second batch is padded (one shape for every batch). log_every=4: the host reads losses once an epoch.
XLA_RUN = ["batch_size=6", "log_every=4", "eval_views=1x1", "precision=fp32"]
EPOCHS = 6
TOLERANCE = 1e-4


def _run(mode, data, out, *extra, device, init=None, epochs=EPOCHS):
    from sfa_vivit.train import Trainer
    c = config(mode, *XLA_RUN, f"device={device}", *extra, epochs=epochs)
    return Trainer(c, data, str(out), init=str(init) if init else None).fit()


def _losses(metrics):
    return [h["loss"] for h in metrics["history"]]


def _close(a, b):
    return all(abs(x - y) <= TOLERANCE * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def stage1(tiny_data, tmp_path_factory):
    """Stage 1 on XLA (2 devices) and on the CPU, same seed and data."""
    root = tmp_path_factory.mktemp("xla-stage1")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return {device: (root / device, _run("stage1", tiny_data, root / device, device=device))
            for device in ("xla", "cpu")}


def test_stage1_trains_on_every_device_as_on_the_cpu_and_compiles_once(stage1):
    (_, on_xla), (_, on_cpu) = stage1["xla"], stage1["cpu"]
    assert on_xla["runtime"]["device"] == "xla" and on_xla["runtime"]["devices"] == 2
    assert on_xla["ranks_identical"] is True           # every device holds the same weights
    assert _close(_losses(on_xla), _losses(on_cpu)), (_losses(on_xla), _losses(on_cpu))
    assert on_xla["top1"] == on_cpu["top1"] and on_xla["final"]["top1"] == on_cpu["final"]["top1"]
    # Warm-up is the first epoch (its steps, evaluation and reads); the 20 steps after it compile nothing.
    counts = [h["xla_compilations"] for h in on_xla["history"]]
    assert on_xla["steps"] - 4 >= 20 and len(set(counts)) == 1, counts
    assert on_xla["runtime"]["xla_compilations"] == counts[0]


@pytest.mark.parametrize("cached", [False, True], ids=["videos", "feature-cache"])
def test_stage2_trains_on_every_device_as_on_the_cpu(stage1, tiny_data, tmp_path, cached):
    init = stage1["xla"][0]
    extra = ["cache_views=2", "eval_views=2x2"] if cached else []   # 4 views a clip: batches cut inside clips
    on_xla = _run("stage2", tiny_data, tmp_path / "xla", *extra, device="xla", init=init, epochs=3)
    on_cpu = _run("stage2", tiny_data, tmp_path / "cpu", *extra, device="cpu", init=init, epochs=3)
    assert on_xla["ranks_identical"] is True
    assert (on_xla["cache"] is not None) == cached
    if cached:
        assert on_xla["cache"]["train_views"] == 2 and on_xla["cache"]["clips"] == 24
    assert _close(_losses(on_xla), _losses(on_cpu)), (_losses(on_xla), _losses(on_cpu))
    assert on_xla["final"]["top1"] == on_cpu["final"]["top1"]


def test_a_killed_xla_run_resumes_to_the_same_weights_bit_for_bit(stage1, tiny_data, tmp_path):
    """SIGKILL after a committed checkpoint (no chance to write anything), then the same command again:
    the final weights are those of the uninterrupted XLA run (the module's stage-1 run)."""
    out = tmp_path / "killed"
    sets = [*TINY, *XLA_RUN, "device=xla", f"epochs={EPOCHS}", "num_frames=4", "checkpoint_every=2"]
    cmd = [sys.executable, "-m", "sfa_vivit.cli", "train", "--mode", "stage1", "--recipe", "synthetic",
           "--data", tiny_data, "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        step = checkpoints.latest_step(str(out)) if (out / "checkpoints").exists() else None
        if step and int(step.rstrip("/").rsplit("-", 1)[1]) >= 6:     # mid-epoch 2, after commits
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoints.latest_step(str(out))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {killed_at}" in done.stderr
    reference, resumed = final_state(stage1["xla"][0]), final_state(out)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights_sha256"] == stage1["xla"][1]["weights_sha256"]


def test_evaluate_on_xla_gives_the_cpu_top1(stage1, tiny_data, tmp_path):
    from sfa_vivit.tools.evaluate import evaluate
    model = str(stage1["xla"][0])
    # batch 3 runs as 4 (a multiple of the 2 devices); 8 clips x 2x2 views.
    on_xla = evaluate(model, tiny_data, views="2x2", batch_size=3, workers=0, device="xla", out=str(tmp_path))
    on_cpu = evaluate(model, tiny_data, views="2x2", batch_size=3, workers=0, device="cpu")
    assert on_xla["num_examples"] == on_cpu["num_examples"] == 8
    assert on_xla["top1"] == on_cpu["top1"] and on_xla["confusion"] == on_cpu["confusion"]
    assert json.loads((tmp_path / "metrics.json").read_text())["top1"] == on_cpu["top1"]


def test_membench_runs_a_step_on_one_xla_device(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "sfa_vivit.cli", "membench", "--variant", "Ti", "--frames", "4,8",
           "--regimes", "full,stage2", "--image-size", "32", "--steps", "3", "--device", "xla", "--out", str(out),
           *[a for s in ("model.width=32", "model.spatial_depth=1", "model.temporal_depth=1", "model.heads=2",
                         "model.mlp_dim=64", "model.patch=8") for a in ("--set", s)]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "xla" and len(result["rows"]) == 4
    for row in result["rows"]:
        assert row["fits"] and row["loss_finite"] and row["peak_memory_bytes"] > 0, row
        assert row["xla_compilations"] >= 1, row
    full, stage2 = result["rows"][0], result["rows"][2]
    assert stage2["trainable_parameters"] < full["trainable_parameters"]


def test_info_names_the_torch_xla_pair_and_the_devices():
    done = subprocess.run([sys.executable, "-m", "sfa_vivit.cli", "info", "--variant", "Ti", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    runtime = json.loads(done.stdout)["runtime"]
    assert runtime["torch"].startswith("2.9.0") and runtime["torch_xla"] == "2.9.0"
    assert runtime["xla_devices"] == int(os.environ.get("CPU_NUM_DEVICES", "1"))
    from sfa_vivit.core.runtime import resolve_device
    assert resolve_device("auto") == "xla"          # PJRT_DEVICE is set: evaluation and membench steps use it


def test_the_xla_environment_is_the_tpu_images_pair():
    """constraints-xla.txt pins what containers/Dockerfile.tpu installs, and this environment has it."""
    root = Path(__file__).resolve().parents[1]
    pins = dict(line.split("==") for line in (root / "constraints-xla.txt").read_text().splitlines()
                if line.startswith(("torch==", "torch_xla==")))
    assert torch.__version__.split("+")[0] == pins["torch"] and xla.__version__ == pins["torch_xla"]
    assert "constraints-xla.txt" in (root / "containers" / "Dockerfile.tpu").read_text()

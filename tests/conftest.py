import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def unit_sizes(**extra):
    """ViViTConfig sizes for model unit tests: 2+1 blocks of width 64, 8x8 patches (wider and deeper
    than the library's TINY_MODEL, which is the smallest model a tiny *run* trains)."""
    return dict(width=64, spatial_depth=2, temporal_depth=1, heads=4, mlp_dim=128, patch=8) | extra


@torch.no_grad()
def randomize_(module: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values (norms near 1), so equality tests cannot pass by zeros."""
    for name, p in module.named_parameters():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
            p.copy_(1 + scale * torch.randn_like(p))
        else:
            p.copy_(scale * torch.randn_like(p))
    return module


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Synthetic shards (24 train, 8 validation clips of 16 frames at 32x32), built once and only read."""
    from sfa_vivit.data.prep import PrepOptions, prepare, synth
    root = tmp_path_factory.mktemp("synth")
    paths = synth.generate(str(root / "raw"), synth.SynthOptions(num_train=24, num_val=8, num_frames=16, size=32,
                                                                 fps=16, difficulty="easy"), progress=False)
    prepare("synthetic", [paths["train"], paths["validation"]], paths["videos"], str(root / "shards"),
            options=PrepOptions(fps=16, short_side=32, shard_size=6, workers=1), progress=False)
    return str(root / "shards")


@pytest.fixture
def no_mlflow_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GCS JSON-API emulator on loopback (in memory), shared by the tests that read or write gs://."""
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    if not exe.exists():
        pytest.skip("gcp-storage-emulator is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the GCS emulator did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def stage1_run(tiny_data, tmp_path_factory):
    """A tiny stage-1 run folder on `tiny_data` (1 epoch), trained once and only read by the tests that use it."""
    from helpers import config
    from sfa_vivit.train import Trainer
    out = tmp_path_factory.mktemp("stage1")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    Trainer(config("stage1"), tiny_data, str(out)).fit()
    return str(out)

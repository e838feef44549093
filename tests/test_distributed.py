"""DDP under torchrun on CPU: two training ranks hold identical weights, and evaluation over two ranks
(one of them without clips) equals one process."""

import json
import subprocess
import sys

import pytest
import torch

from helpers import TINY
from helpers import free_port as _free_port
from sfa_vivit import checkpoints

pytestmark = pytest.mark.integration


def test_torchrun_two_ranks_on_cpu_hold_identical_weights(tiny_data, tmp_path, no_mlflow_env):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(_free_port()), "-m", "sfa_vivit.cli", "train", "--mode", "stage1", "--recipe", "synthetic",
           "--data", tiny_data, "--out", str(out), *[a for s in [*TINY, "epochs=1", "num_frames=4"]
                                                     for a in ("--set", s)]]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ranks_identical"] is True
    assert metrics["steps"] == 6     # 24 samples / global batch 4, each rank 2 per step


_DDP_EVAL = """
import json, sys, torch, torch.distributed as dist
from sfa_vivit import checkpoints
from sfa_vivit.evaluate import evaluate
from sfa_vivit.train.evaluation import evaluate_model
ckpt, data, out = sys.argv[1:4]
metrics = evaluate(ckpt, data, views="2x1", out=out, workers=0, device="cpu")
rank = dist.get_rank()
# A rank that gets no clips at all must still take part in the reductions.
model, batches = checkpoints.load(ckpt)[0], torch.load(out + "/batches.pt")
mine = batches if rank == 0 else []
empty = evaluate_model(model, mine, device=torch.device("cpu"), num_classes=12, confusion=True)
json.dump({"metrics": metrics, "empty": empty}, open(f"{out}/rank{rank}.json", "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_torchrun_evaluation_equals_one_process_and_survives_an_empty_rank(tiny_data, tmp_path, no_mlflow_env):
    from conftest import randomize_
    from sfa_vivit.evaluate import evaluate
    from sfa_vivit.models import vivit
    from sfa_vivit.train.evaluation import evaluate_model
    model = randomize_(vivit("Ti", num_frames=4, image_size=32, num_classes=12, width=32, spatial_depth=1,
                             temporal_depth=1, heads=2, mlp_dim=64, patch=8), scale=0.5).eval()
    batches = [{"video": torch.rand(3, 2, 4, 3, 32, 32), "label": torch.tensor([0, 5, 11])}]
    with torch.no_grad():   # centre the logits, so that the class each clip gets depends on the clip
        model.head.bias -= model(batches[0]["video"].flatten(0, 1)).mean(0)
    checkpoints.save(model, tmp_path / "ckpt")
    single = evaluate(str(tmp_path / "ckpt"), tiny_data, views="2x1", workers=0, device="cpu")
    predicted = {c for row in single["confusion"] for c, count in enumerate(row) if count}
    assert single["num_examples"] == 8 and len(predicted) > 1     # the model tells clips apart
    out = tmp_path / "ddp"
    out.mkdir()
    torch.save(batches, out / "batches.pt")
    (tmp_path / "ddp_eval.py").write_text(_DDP_EVAL)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           str(tmp_path / "ddp_eval.py"), str(tmp_path / "ckpt"), tiny_data, str(out)]
    # A rank left out of a reduction hangs its peers: a bounded wait turns that into a failure.
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    written = json.loads((out / "metrics.json").read_text())
    # The two ranks read different shards (6 and 2 clips) and report the totals of both.
    for got in (ranks[0]["metrics"], ranks[1]["metrics"], written):
        for key in ("num_examples", "top1", "top5", "confusion", "per_class_top1"):
            assert got[key] == single[key], key      # sums of whole counts: exact
    alone = evaluate_model(model, batches, device=torch.device("cpu"), num_classes=12, confusion=True)
    for r in (0, 1):
        assert ranks[r]["empty"] == alone

"""DDP under torchrun on CPU: two training ranks hold identical weights, and evaluation over two ranks
(one of them without clips) equals one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import TINY
from helpers import free_port as _free_port
from sfa_vivit.models import checkpoints

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
from sfa_vivit.models import checkpoints
from sfa_vivit.tools.evaluate import evaluate
from sfa_vivit.train.evaluation import evaluate_model
ckpt, data, out = sys.argv[1:4]
metrics = evaluate(ckpt, data, views="2x1", out=out, workers=0, device="cpu")
rank = dist.get_rank()
# A rank that gets no clips at all must still take part in the reductions.
model, batches = checkpoints.load(ckpt)[0], torch.load(out + "/batches.pt")
mine = batches if rank == 0 else []
empty = evaluate_model(model, mine, num_classes=12, confusion=True)
json.dump({"metrics": metrics, "empty": empty}, open(f"{out}/rank{rank}.json", "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_torchrun_evaluation_equals_one_process_and_survives_an_empty_rank(tiny_data, tmp_path, no_mlflow_env):
    from conftest import randomize_
    from sfa_vivit.models import vivit
    from sfa_vivit.tools.evaluate import evaluate
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
    alone = evaluate_model(model, batches, num_classes=12, confusion=True)
    for r in (0, 1):
        assert ranks[r]["empty"] == alone


_STOP_EARLY = """
import sys
from sfa_vivit.core import runtime
from sfa_vivit.train import Trainer, resolve
sets, data, out, steps = sys.argv[1].split(","), sys.argv[2], sys.argv[3], int(sys.argv[4])
Trainer(resolve("stage1", "synthetic", sets=sets), data, out).fit(stop_after_steps=steps)
runtime.close()
"""

# Two tiny epochs, no dropout, drop-path or mixup: every random draw of a step is then per sample.
_SAME = [*TINY, "epochs=2", "num_frames=4", "dropout=0", "drop_path=0", "mixup_alpha=0"]
TOLERANCE = 1e-4     # float reduction order: the gradient is averaged over 2 ranks instead of summed in one


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """The weights of one uninterrupted single-process run of `_SAME` (every test here compares to them)."""
    from sfa_vivit.train import Trainer, resolve
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path_factory.mktemp("straight")
    Trainer(resolve("stage1", "synthetic", sets=_SAME), tiny_data, str(out)).fit()
    return checkpoints.load(str(out / "model")).model.state_dict()


def _max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _torchrun(tmp_path, args, *, env=None, nproc=2, port=None, **popen):
    """`_STOP_EARLY` under torchrun (`env`: the rendezvous an engine sets; else a local master port)."""
    script = tmp_path / "stop_early.py"
    script.write_text(_STOP_EARLY)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           *([f"--master_port={port or _free_port()}"] if env is None else []), str(script), *args]
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True} if not popen else {}
    return subprocess.Popen(cmd, env=env, **output, **popen)


def _finish(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]


def test_two_nodes_started_as_a_trainjob_starts_them_train_the_weights_of_one_process(
        tiny_data, tmp_path, no_mlflow_env, straight):
    """Kubeflow Trainer's torch-distributed runtime starts `torchrun` in each node's pod with PET_NNODES,
    PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT; torchrun reads them. Two
    "nodes" of one process each, on loopback, train what one process trains with the same global batch."""
    port = _free_port()
    nodes = []
    for node in range(2):
        env = {**os.environ, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(node),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
        nodes.append(_torchrun(tmp_path, [",".join(_SAME), tiny_data, str(tmp_path / "two"), "1000"], env=env,
                               nproc=1))
    for proc in nodes:
        _finish(proc)
    # stop_after_steps=1000 is past the end: both runs finished (12 steps); compare the committed weights.
    two = checkpoints.load(str(tmp_path / "two" / "model")).model.state_dict()
    assert _max_difference(straight, two) <= TOLERANCE


def test_a_run_resumes_on_another_number_of_ranks_to_the_same_weights(tiny_data, tmp_path, no_mlflow_env, straight):
    """Killed after a committed checkpoint (step 3 of 12) on 2 ranks and resumed on 1, or the reverse: the
    weights of an uninterrupted run (the global batches do not depend on the number of ranks)."""
    from sfa_vivit.train import Trainer, resolve
    config = resolve("stage1", "synthetic", sets=_SAME)
    _finish(_torchrun(tmp_path, [",".join(_SAME), tiny_data, str(tmp_path / "2to1"), "3"]))
    Trainer(config, tiny_data, str(tmp_path / "2to1")).fit()
    Trainer(config, tiny_data, str(tmp_path / "1to2")).fit(stop_after_steps=3)
    _finish(_torchrun(tmp_path, [",".join(_SAME), tiny_data, str(tmp_path / "1to2"), "1000"]))
    for run in ("2to1", "1to2"):
        resumed = checkpoints.load(str(tmp_path / run / "model")).model.state_dict()
        assert _max_difference(straight, resumed) <= TOLERANCE, run


def test_two_vertex_worker_pool_nodes_form_one_job(tiny_data, tmp_path, no_mlflow_env, straight):
    """Vertex AI starts the same command on the chief (workerpool0) and the other nodes (workerpool1) with
    CLUSTER_SPEC describing the pools: the nodes form one job and train what one process trains."""
    from sfa_vivit.train import resolve
    from sfa_vivit.train.launch import spec_of
    spec = spec_of(resolve("stage1", "synthetic", sets=_SAME), tiny_data, str(tmp_path / "two"))
    chief = f"127.0.0.1:{_free_port()}"
    nodes = []
    for pool, index in (("workerpool0", 0), ("workerpool1", 0)):
        cluster = {"cluster": {"workerpool0": [chief], "workerpool1": ["127.0.0.1:2222"]},
                   "environment": "cloud", "task": {"type": pool, "index": index}}
        env = {**os.environ, "CLUSTER_SPEC": json.dumps(cluster)}
        nodes.append(subprocess.Popen([sys.executable, "-m", "sfa_vivit.train.launch", "node", "--nproc", "1",
                                       "--spec-json", spec], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for proc in nodes:
        _finish(proc)
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ranks_identical"] is True
    two = checkpoints.load(str(tmp_path / "two" / "model")).model.state_dict()
    assert _max_difference(straight, two) <= TOLERANCE


def test_the_rendezvous_comes_from_vertex_cluster_spec():
    from sfa_vivit.train.launch import node_args
    spec = {"cluster": {"workerpool0": ["chief-0:2222"], "workerpool1": ["w-0:2222", "w-1:2222", "w-2:2222"]},
            "task": {"type": "workerpool1", "index": 2}}
    assert node_args({"CLUSTER_SPEC": json.dumps(spec)}) == [
        "--nnodes=4", "--node_rank=3", "--master_addr=chief-0", "--master_port=2222"]
    assert node_args({}) == []
    with pytest.raises(ValueError, match="CLUSTER_SPEC is not a Vertex AI cluster spec"):
        node_args({"CLUSTER_SPEC": "{}"})


def test_a_node_killed_after_a_checkpoint_and_the_job_restarted_ends_with_the_uninterrupted_weights(
        tiny_data, tmp_path, no_mlflow_env, straight):
    """A node lost mid-run (SIGKILL, as a preempted VM): the engine tears the job down and starts it again;
    training resumes from the last committed checkpoint and ends with the weights of an uninterrupted run."""
    import signal
    import time

    sets, out = ",".join([*_SAME, "checkpoint_every=2"]), str(tmp_path / "job")

    def start_job():
        port, nodes = _free_port(), []
        for node in range(2):
            env = {**os.environ, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(node),
                   "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
            nodes.append(_torchrun(tmp_path, [sets, tiny_data, out, "1000"], env=env, nproc=1,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        return nodes

    nodes = start_job()
    deadline = time.time() + 240
    while time.time() < deadline and not checkpoints.committed_steps(out):
        time.sleep(0.05)
    os.killpg(nodes[1].pid, signal.SIGKILL)                 # node 1 is lost...
    os.killpg(nodes[0].pid, signal.SIGKILL)                 # ...and the engine tears the job down
    for proc in nodes:
        proc.wait(30)
    assert checkpoints.committed_steps(out), "no checkpoint was committed before the kill"
    assert not checkpoints.is_committed(os.path.join(out, "model")), "the run finished before the kill"
    for proc in start_job():                                 # the engine starts the job again
        assert proc.wait(300) == 0
    resumed = checkpoints.load(os.path.join(out, "model")).model.state_dict()
    assert _max_difference(straight, resumed) <= TOLERANCE

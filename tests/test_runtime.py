"""The runtime module's host-side parts, on the CPU: a TPU slice's hosts as torch.distributed ranks, the
device feed's thread, evaluation batches of one shape."""

import threading

import pytest
import torch

from sfa_vivit.core import runtime
from sfa_vivit.train.evaluation import _views_as_rows


def test_a_multi_host_tpu_slice_gives_each_host_its_rank_and_the_first_host_as_master():
    env = {"TPU_WORKER_ID": "2", "TPU_WORKER_HOSTNAMES": "host-0.sfa,host-1.sfa,host-2.sfa,host-3.sfa"}
    assert runtime.hosts_env(env) == {"RANK": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "host-0.sfa",
                                      "MASTER_PORT": runtime.DEFAULT_MASTER_PORT}
    assert env["WORLD_SIZE"] == "4"
    # One host, or ranks already set by a launcher: nothing to add.
    assert runtime.hosts_env({"TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "host-0"}) == {}
    assert runtime.hosts_env({**env, "WORLD_SIZE": "8"}) == {}
    with pytest.raises(runtime.RuntimeSetupError, match="TPU_WORKER_ID is None"):
        runtime.hosts_env({"TPU_WORKER_HOSTNAMES": "a,b"})


def test_auto_picks_xla_only_where_a_pjrt_device_is_configured_and_torch_xla_is_installed(monkeypatch):
    import importlib.util
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    assert runtime.resolve_device("auto") in ("cpu", "cuda") and runtime.resolve_device("xla") == "xla"
    monkeypatch.setenv("PJRT_DEVICE", "TPU")         # the TPU image's setting
    has_xla = importlib.util.find_spec("torch_xla") is not None
    assert runtime.resolve_device("auto") == ("xla" if has_xla else "cpu")


def test_the_feed_thread_hands_on_items_and_errors_and_stops_with_its_consumer():
    assert list(runtime._prefetched(range(5), lambda x: x * 10, depth=2)) == [0, 10, 20, 30, 40]

    def failing():
        yield 1
        raise RuntimeError("DataLoader worker (pid 7) is killed")

    fed = runtime._prefetched(failing(), lambda x: x, depth=2)
    assert next(fed) == 1
    with pytest.raises(RuntimeError, match="worker .* is killed"):
        next(fed)
    endless = runtime._prefetched(iter(int, 1), lambda x: x, depth=1)      # never ends by itself
    assert next(endless) == 0
    endless.close()          # the consumer stops early: the thread ends too
    assert not any(t.name == "sfa-device-feed" for t in threading.enumerate())


def test_on_the_cpu_a_batch_is_placed_as_it_is_and_counts_round_up_to_devices():
    rt = runtime.on_cpu()
    assert (rt.rank, rt.world, rt.devices, rt.lazy, rt.compilations()) == (0, 1, 1, False, None)
    batch = {"video": torch.ones(2, 3), "label": {"verb": torch.tensor([1, 2])}, "key": ["a", "b"]}
    assert runtime.map_tensors(batch, lambda t: t * 2)["label"]["verb"].tolist() == [2, 4]
    assert list(rt.feed([batch]))[0]["key"] == ["a", "b"]
    assert rt.per_device_multiple(3) == 3
    assert runtime.Runtime(torch.device("cpu"), 0, 1, rt.autocast, devices=4).per_device_multiple(3) == 4


def test_an_evaluation_batch_is_padded_with_unlabelled_rows_and_its_views_become_rows():
    batch = {"video": torch.ones(3, 2, 4, 3, 8, 8), "label": torch.tensor([0, 1, 2])}
    rows = _views_as_rows(batch, 4)
    assert rows["video"].shape == (8, 4, 3, 8, 8) and rows["views"] == 2
    assert rows["label"].tolist() == [0, 1, 2, -1]
    assert rows["video"][6:].abs().sum() == 0
    heads = _views_as_rows({"features": torch.ones(1, 3, 5, 16), "label": {"verb": torch.tensor([4])}}, 2)
    assert heads["features"].shape == (6, 5, 16) and heads["label"]["verb"].tolist() == [4, -1]

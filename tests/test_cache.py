"""The stage-2 frozen-feature cache (sfa_vivit.train.cache): cached equals uncached, DDP ranks hold
disjoint parts, an interrupted build resumes, a stale cache is refused, and training from it resumes exactly."""


import pytest
import torch

from helpers import config, final_state
from sfa_vivit.train import Trainer


def test_cached_and_uncached_stage2_compute_the_same_logits(tiny_data, stage1_run, tmp_path, no_mlflow_env):
    from conftest import randomize_
    from sfa_vivit.data.reader import iter_samples
    trainer = Trainer(config("stage2", "cache_views=2", frames=8), tiny_data, str(tmp_path / "s2"), init=stage1_run)
    for part in (trainer.model.adapter, trainer.model.temporal, trainer.model.head):
        randomize_(part)                      # so that equal logits cannot come from zero weights
    trainer._prepare_cache()
    model = trainer.model.eval()
    cached = trainer.data.cached_train
    assert cached.features.shape == (24, 2, 4, 32)        # clips, views, tubelets, width
    first = next(iter_samples(trainer.data.train_data.shards[:1]))
    i = cached.keys.index(first["key"])
    with torch.no_grad():
        for view in (0, 1):
            video = trainer.data.train_data.clip(first, epoch=view)["video"][None]
            assert torch.allclose(model(video), model(features=cached.features[i, view][None]), atol=1e-5)
        assert not torch.equal(cached.features[i, 0], cached.features[i, 1])   # two different augmentations
        eval_data = trainer.data.eval_dataset("1x1")
        sample = next(iter_samples(eval_data.shards[:1]))
        views = eval_data.clip(sample)["video"]
        cached_eval = trainer.data.cached_eval["1x1"]
        j = cached_eval.keys.index(sample["key"])
        assert torch.allclose(model(views), model(features=cached_eval.features[j]), atol=1e-5)


def test_ddp_ranks_hold_disjoint_parts_of_the_cache(tiny_data, stage1_run, tmp_path, no_mlflow_env):
    from sfa_vivit.train.cache import CachedSplit
    trainer = Trainer(config("stage2", "cache_views=2", frames=8), tiny_data, str(tmp_path / "s2"), init=stage1_run)
    trainer._prepare_cache()
    whole, key, url = trainer.data.cached_train, trainer.data.cache_report.key, str(tmp_path / "s2" / "feature_cache")
    shards = len(trainer.data.train_data.shards)
    parts = [CachedSplit(url, key, "train", None, shards, rank, 2, streams=4) for rank in (0, 1)]
    assert [len(p) for p in parts] == [12, 12] and not set(parts[0].keys) & set(parts[1].keys)
    for part in parts:
        for i, clip in enumerate(part.keys):
            j = whole.keys.index(clip)
            assert (torch.equal(part.features[i], whole.features[j])
                    and part.labels["label"][i] == whole.labels["label"][j])
        # One epoch of a rank: its half of each global batch, every clip it holds once.
        batches = list(part.train_batches(epoch=0, seed=0, batch_size=4, num_batches=6))
        assert all(b["features"].shape == (2, 4, 32) for b in batches)
        seen = torch.cat([b["features"] for b in batches])
        clip_of = [next(i for i in range(12) for v in (0, 1) if torch.equal(f, part.features[i, v])) for f in seen]
        assert sorted(clip_of) == list(range(12))
    evals = [CachedSplit(url, key, "validation", "1x1", len(trainer.data.eval_dataset("1x1").shards), r, 2)
             for r in (0, 1)]
    assert sorted(evals[0].keys + evals[1].keys) == sorted(trainer.data.cached_eval["1x1"].keys)
    lonely = CachedSplit(url, key, "train", None, shards, 29, 30, streams=30)       # more ranks than clips
    with pytest.raises(ValueError, match="stream 29 of the training cache holds no clips"):
        next(lonely.train_batches(epoch=0, seed=0, batch_size=30, num_batches=1))
    # The global batches do not depend on the number of ranks: two ranks' halves are one rank's batch.
    one = CachedSplit(url, key, "train", None, shards, 0, 1, streams=4)
    together = [torch.cat(pair) for pair in zip(*[[b["features"] for b in p.train_batches(
        epoch=1, seed=3, batch_size=4, num_batches=6, skip_batches=2)] for p in parts])]
    alone = [b["features"] for b in one.train_batches(epoch=1, seed=3, batch_size=4, num_batches=6, skip_batches=2)]
    assert len(alone) == 4 and all(torch.equal(a, b) for a, b in zip(together, alone))


def test_cache_resumes_its_build_and_rejects_another_checkpoint(tiny_data, stage1_run, tmp_path, no_mlflow_env):
    from sfa_vivit.train.cache import StaleCacheError
    shared = tmp_path / "cache"
    args = ("cache_views=1", f"cache_dir={shared}")
    first = Trainer(config("stage2", *args, frames=8), tiny_data, str(tmp_path / "a"), init=stage1_run)
    first._prepare_cache()
    files = sorted(shared.glob("*.safetensors"))
    assert first.data.cache_report.built_now == len(files) == 4 + 2      # 4 train shards + 2 validation shards
    assert first.data.cache_report.bytes_per_clip > 4 * 32 * 4           # T' x D fp32, plus labels and keys
    # An interrupted build: one file missing. The next run computes that one only.
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    files[1].unlink()
    second = Trainer(config("stage2", *args, frames=8), tiny_data, str(tmp_path / "b"), init=stage1_run)
    second._prepare_cache()
    assert second.data.cache_report.built_now == 1
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items() if f != files[1])
    assert torch.equal(second.data.cached_train.features, first.data.cached_train.features)
    # Another stage-1 checkpoint (other frozen weights): the cache is refused, not reused or overwritten.
    other_stage1 = tmp_path / "other"
    Trainer(config("stage1", "seed=1"), tiny_data, str(other_stage1)).fit()
    third = Trainer(config("stage2", *args, frames=8), tiny_data, str(tmp_path / "c"), init=str(other_stage1))
    with pytest.raises(StaleCacheError, match=r"built for other inputs .*frozen_sha256"):
        third._prepare_cache()
    # Other views (another K) are refused too.
    fourth = Trainer(config("stage2", "cache_views=3", f"cache_dir={shared}", frames=8), tiny_data,
                     str(tmp_path / "d"), init=stage1_run)
    with pytest.raises(StaleCacheError, match=r"train\.views"):
        fourth._prepare_cache()
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items() if f != files[1])


def test_stage2_from_the_cache_trains_resumes_exactly_and_counts_the_cache_time(tiny_data, stage1_run, tmp_path,
                                                                              no_mlflow_env):
    args = ("cache_views=2", "checkpoint_every=2", "mixup_alpha=0.2", "dropout=0.1")
    reference = Trainer(config("stage2", *args, frames=8, epochs=2), tiny_data, str(tmp_path / "a"),
                        init=stage1_run).fit()
    cache = reference["cache"]
    assert cache["clips"] == 24 and cache["train_views"] == 2 and cache["train_build_time_s"] > 0
    assert reference["train_time_s"] == pytest.approx(reference["steps_time_s"] + cache["train_build_time_s"], abs=1e-2)
    assert reference["final"]["top1"] is not None and reference["trainable_parameters"] < reference["total_parameters"]
    before, after = final_state(stage1_run), final_state(tmp_path / "a")
    assert all(torch.equal(after[n], before[n]) for n in after if n.startswith(("embedding", "spatial")))
    out = tmp_path / "b"
    Trainer(config("stage2", *args, frames=8, epochs=2), tiny_data, str(out), init=stage1_run).fit(
        stop_after_steps=3, checkpoint_on_stop=False)
    resumed = Trainer(config("stage2", *args, frames=8, epochs=2), tiny_data, str(out), init=stage1_run).fit()
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    assert resumed["cache"]["built_now"] == 0


def test_a_truncated_cache_file_is_named_with_the_remedy(tiny_data, stage1_run, tmp_path, no_mlflow_env):
    from sfa_vivit.train.cache import CorruptCacheError
    args = ("cache_views=1", f"cache_dir={tmp_path / 'cache'}")
    Trainer(config("stage2", *args, frames=8), tiny_data, str(tmp_path / "a"), init=stage1_run)._prepare_cache()
    victim = sorted((tmp_path / "cache").glob("train-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    again = Trainer(config("stage2", *args, frames=8), tiny_data, str(tmp_path / "b"), init=stage1_run)
    with pytest.raises(CorruptCacheError, match=f"feature-cache file {victim} is truncated or damaged.*delete it"):
        again._prepare_cache()

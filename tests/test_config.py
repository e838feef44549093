"""Run configuration (sfa_vivit.train.config): recipe layers, augmentation fields, the learning rate."""

import pytest

from sfa_vivit.train import resolve


def test_config_layers_and_augmentation_fields():
    from sfa_vivit.data.augment import AugmentConfig
    from sfa_vivit.train.config import augment_config
    from sfa_vivit.train.optim import learning_rate
    c = resolve("stage2", "ssv2",
                sets=["batch_size=32", "augment.mean=[0.485,0.456,0.406]", "model.spatial_depth=3"])
    assert (c.num_frames, c.freeze_spatial, c.adapter, c.temporal_init) == (32, True, True, "stage1")
    assert (c.drop_path, c.label_smoothing, c.mixup_alpha, c.augment["randaugment_magnitude"]) == (0.3, 0.3, 0.3, 20)
    assert learning_rate(c) == pytest.approx(0.5 * 32 / 128)                # linear scaling rule
    assert augment_config(c) == AugmentConfig(color_jitter_probability=0.0, randaugment_layers=2,
                                              randaugment_magnitude=20, mean=(0.485, 0.456, 0.406))
    assert resolve("stage1", "kinetics400").num_frames == 8 and resolve("baseline", "kinetics400").num_frames == 32
    for bad, message in ((["augment.mean=[1,2]"], "three numbers"),
                         (["min_scale=1.0"], r"'min_scale' is now 'augment.min_scale'"),
                         (["augment.min_scale=2", "augment.max_scale=1"], "augment: min_scale=2"),
                         (["augment.flip=0.5"], "did you mean 'augment.flip_probability'"),
                         (["eval_views=4"], "CLIPSxCROPS"),
                         (["model.dropout=0.1"], "unknown key 'model.dropout'"),
                         (["batch_size=x"], "--set batch_size='x'"), (["temporal_init=videomae"], "not one of")):
        with pytest.raises(ValueError, match=message):
            resolve("stage1", "kinetics400", sets=bad)


def test_a_checkpoint_of_an_earlier_release_reads_in_todays_terms():
    """Its flat augmentation keys go under `augment`, its recipe gets its new name: resuming it compares like
    with like (sfa_vivit.train.start._as_today)."""
    from sfa_vivit.train.start import _as_today
    now = resolve("stage1", "kinetics400").to_dict()
    stored = {k: v for k, v in now.items() if k != "augment"}
    stored.update(recipe="k400", **{k: v for k, v in now["augment"].items()})
    today = _as_today(stored, now)
    assert today["augment"] == now["augment"] and today["recipe"] == "kinetics400"
    assert {k for k in set(today) | set(now) if today.get(k) != now.get(k)} == set()


def test_a_recipe_gives_values_per_mode_below_the_runs_own(tiny_data, caplog):
    """synthetic-small (the quick start's): stage 1 at 8 frames, stride 2, stage 2 and the baseline at 16 frames,
    stride 1; --set still wins; it belongs to the synthetic dataset, so training on it is no mismatch."""
    from sfa_vivit.train.config import RECIPES, TINY_MODEL, recipe_dataset
    from sfa_vivit.train.start import recipe_for
    got = {m: (c.num_frames, c.stride, c.epochs) for m in ("stage1", "stage2", "baseline")
           for c in [resolve(m, "synthetic-small")]}
    assert got == {"stage1": (8, 2, 10), "stage2": (16, 1, 5), "baseline": (16, 1, 10)}
    assert resolve("stage1", "synthetic-small").model == TINY_MODEL
    assert (resolve("stage1", "synthetic-small", sets=["stride=1", "num_frames=4"]).stride,
            resolve("stage1", "synthetic-small", sets=["stride=1", "num_frames=4"]).num_frames) == (1, 4)
    assert "modes" not in resolve("stage1", "synthetic-small").to_dict()
    assert recipe_dataset("synthetic-small") == "synthetic" and recipe_dataset("ssv2") == "ssv2"
    assert all(recipe_dataset(r) in RECIPES for r in RECIPES)
    assert recipe_for("synthetic-small", tiny_data) == "synthetic-small" and "were chosen for" not in caplog.text
    assert recipe_for("ssv2", tiny_data) == "ssv2" and "recipe ssv2 on dataset synthetic" in caplog.text

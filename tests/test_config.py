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

"""Scenic interop: ViViT factorised-encoder checkpoints written by Scenic's own model (tests/data/scenic,
made by its make_fixtures.py with jax/flax, every parameter perturbed) load here with Scenic's logits, go
back out unchanged, and start stage 2 and evaluation."""

import dataclasses
import json
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from sfa_vivit.cli import main
from sfa_vivit.models.checkpoints import CheckpointError
from sfa_vivit.models.importers import load_scenic, read_flax_msgpack, save_scenic
from sfa_vivit.models.vivit import ViViT

DATA = Path(__file__).parent / "data" / "scenic"
# name → the heads of the multi-head fixture, in Scenic's class_splits order
FIXTURES = {"fe_token_central": None, "fe_gap_average": None, "fe_token_multihead": {"noun": 6, "verb": 4},
            "fe_token_prelogits": None}
TOLERANCE = 1e-4       # fp32 logits against Scenic's (measured: <= 6e-7)


def _reference(name):
    data = np.load(DATA / f"{name}.npz")
    video = torch.from_numpy(data["input"]).permute(0, 1, 4, 2, 3)       # (B, T, H, W, C) → (B, T, C, H, W)
    return video, data, json.loads(str(data["config"]))


def _params(tree):
    """The parameter tree of a fixture, wherever its layout keeps it."""
    return tree["optimizer"]["target"] if "optimizer" in tree else tree.get("params", tree)


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_scenics_own_model(name):
    video, data, config = _reference(name)
    model = load_scenic(DATA / f"{name}.msgpack", heads=FIXTURES[name]).eval()
    c = model.config
    # The architecture was read from the shapes alone.
    assert (c.width, c.spatial_depth, c.temporal_depth, c.patch, c.tubelet, c.classifier) == (
        config["hidden_size"], config["spatial_num_layers"], config["temporal_num_layers"], config["patch_size"],
        config["tubelet_t"], config["classifier"])
    assert (c.heads, c.temporal_heads or c.heads) == (config["spatial_num_heads"], config["temporal_num_heads"])
    assert c.representation_size == config["representation_size"] and model.scenic_step == 1234
    with torch.no_grad():
        logits = model(video)
    if isinstance(logits, dict):
        assert list(logits) == config["split_names"]
        for head, value in logits.items():
            assert (value - torch.from_numpy(data[f"logits_{head}"])).abs().max() <= TOLERANCE, head
    else:
        assert (logits - torch.from_numpy(data["logits"])).abs().max() <= TOLERANCE
    # The parts too: the spatial encoder's output per tubelet.
    with torch.no_grad():
        features = model.spatial_features(video)
    assert (features - torch.from_numpy(data["spatial_out"])).abs().max() <= TOLERANCE


def test_a_bare_parameter_tree_loads_the_same_model():
    full = load_scenic(DATA / "fe_token_central.msgpack").state_dict()
    bare = load_scenic(DATA / "fe_token_central.params.msgpack").state_dict()
    assert all(torch.equal(full[k], bare[k]) for k in full)


@pytest.mark.parametrize("name", FIXTURES)
def test_round_trips_are_exact(name, tmp_path):
    model = load_scenic(DATA / f"{name}.msgpack", heads=FIXTURES[name])
    # Our model → Scenic → our model: bit-identical weights.
    out = save_scenic(model, tmp_path / "ckpt", step=7)
    again = load_scenic(out, heads=FIXTURES[name])
    assert again.scenic_step == 7
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # Scenic → our model → Scenic: the fixture's parameter tree, every name, shape and value.
    save_scenic(model, tmp_path / "params", layout="params")
    written = read_flax_msgpack(str(tmp_path / "params"))
    original = _params(read_flax_msgpack(str(DATA / f"{name}.msgpack")))

    def flat(tree, prefix=""):
        for key, value in tree.items():
            yield from flat(value, f"{prefix}{key}/") if isinstance(value, dict) else [(prefix + key, value)]
    mine, theirs = dict(flat(written)), dict(flat(original))
    assert sorted(mine) == sorted(theirs)
    for key, value in theirs.items():
        assert mine[key].shape == value.shape and mine[key].dtype == value.dtype, key
        assert np.array_equal(mine[key], value), key


def test_more_frames_resize_the_temporal_positions_as_scenic_does():
    """Scenic's interpolate_1d_positional_embeddings: scipy.ndimage.zoom(order=1) of the grid, CLS row kept."""
    from scipy import ndimage
    base = load_scenic(DATA / "fe_token_central.msgpack")
    longer = load_scenic(DATA / "fe_token_central.msgpack", num_frames=16)
    assert longer.config.num_frames == 16
    old, new = base.temporal.pos_embedding[0].detach().numpy(), longer.temporal.pos_embedding[0].detach().numpy()
    assert new.shape == (1 + 8, old.shape[1]) and np.array_equal(new[0], old[0])
    grid = old[1:].astype(np.float64)
    zoomed = ndimage.zoom(grid, (8 / grid.shape[0], 1), order=1)
    np.testing.assert_allclose(new[1:], zoomed, atol=1e-6)


def test_another_model_is_refused_naming_the_first_parameter_that_does_not_fit(tmp_path):
    tree = read_flax_msgpack(str(DATA / "fe_token_central.params.msgpack"))

    def write(params, name):
        def ext(value):
            return msgpack.ExtType(1, msgpack.packb((value.shape, value.dtype.name, value.tobytes())))
        path = tmp_path / name
        path.write_bytes(msgpack.packb(params, default=ext))
        return path
    # An unfactorised ViViT: one Transformer over all tokens, its CLS token named `cls`.
    unfactorised = {"embedding": tree["embedding"], "cls": tree["cls_SpatialTransformer"],
                    "Transformer": tree["SpatialTransformer"], "output_projection": tree["output_projection"]}
    with pytest.raises(CheckpointError, match=r"parameter (cls|Transformer/\S+) .* unfactorised ViViT"):
        load_scenic(write(unfactorised, "unfactorised"))
    # Factorised self-attention names its attention differently.
    block = tree["SpatialTransformer"]["encoderblock_0"]
    block["MultiHeadDotProductAttention_space"] = block.pop("MultiHeadDotProductAttention_0")
    with pytest.raises(CheckpointError, match="SpatialTransformer/encoderblock_0/MultiHeadDotProductAttention_space"):
        load_scenic(write(tree, "factorised_self_attention"))
    (tmp_path / "junk").write_bytes(b"not msgpack at all \xc1")
    with pytest.raises(CheckpointError, match="junk is not a Flax msgpack checkpoint"):
        load_scenic(tmp_path / "junk")
    model = load_scenic(DATA / "fe_token_central.msgpack").add_adapter()
    with pytest.raises(CheckpointError, match="SFA adapter"):
        save_scenic(model, tmp_path / "adapter")


@pytest.mark.integration
def test_a_scenic_checkpoint_on_gcs_loads(gcs_emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    from sfa_vivit.core.storage import url_to_fs
    fs, _ = url_to_fs("gs://sfa-scenic")
    fs.mkdir("sfa-scenic")
    fs.put_file(str(DATA / "fe_gap_average.msgpack"), "sfa-scenic/vivit/checkpoint")
    model = load_scenic("gs://sfa-scenic/vivit/checkpoint")
    local = load_scenic(DATA / "fe_gap_average.msgpack")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))
    save_scenic(model, "gs://sfa-scenic/export/checkpoint")
    assert torch.equal(load_scenic("gs://sfa-scenic/export/checkpoint").head.weight, local.head.weight)


def test_stage2_starts_from_an_imported_scenic_checkpoint_and_evaluate_runs_on_it(tiny_data, tmp_path,
                                                                                 no_mlflow_env, capsys):
    """`sfa scenic import`, then `sfa evaluate` and stage 2 (spatial frozen, adapter on, 16 frames: the temporal
    positions resized) through --init, on the synthetic data (32 px, as the fixture)."""
    imported = tmp_path / "imported"
    assert main(["scenic", "import", str(DATA / "fe_token_central.msgpack"), str(imported)]) == 0
    assert "sfa scenic import" in capsys.readouterr().out
    evaluated = tmp_path / "eval.json"
    # The fixture predicts 5 classes, the synthetic data has 12: evaluation refuses, naming both.
    evaluate = ["evaluate", "--data", tiny_data, "--views", "1x1", "--out", str(evaluated), "--checkpoint"]
    assert main([*evaluate, str(imported)]) == 2
    assert "predicts 5 classes" in capsys.readouterr().err
    run = tmp_path / "stage2"
    sets = ["epochs=1", "num_frames=16", "batch_size=4", "workers=0", "reinit_head=true", "log_every=1",
            "final_eval_views=1x1"]
    assert main(["train", "--mode", "stage2", "--data", tiny_data, "--out", str(run), "--init", str(imported),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mode"] == "stage2" and metrics["final"]["top1"] is not None
    from sfa_vivit.models import checkpoints
    trained, _ = checkpoints.load(str(run / "model"))
    source = load_scenic(DATA / "fe_token_central.msgpack")
    assert trained.config.num_frames == 16 and trained.adapter is not None
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in source.state_dict().items()
               if k.startswith(("embedding", "spatial")))                       # frozen: Scenic's weights
    assert main([*evaluate, str(run)]) == 0
    assert "top1" in capsys.readouterr().out
    # ... and back to Scenic (an adapter has no place there: refused in one line).
    assert main(["scenic", "export", str(imported), str(tmp_path / "back")]) == 0
    assert main(["scenic", "export", str(run), str(tmp_path / "nope")]) == 2
    assert "SFA adapter" in capsys.readouterr().err


def test_heads_are_matched_by_name_not_by_position(tmp_path):
    """Scenic's EPIC model puts nouns first in its one output layer, our EPIC data verbs first: stage 2 started
    from an import and an export back to Scenic both follow the heads by name."""
    from sfa_vivit.models.vivit import init_from
    scenic_order = load_scenic(DATA / "fe_token_multihead.msgpack", heads={"noun": 6, "verb": 4}).eval()
    video, _, _ = _reference("fe_token_multihead")
    ours = init_from(scenic_order, num_frames=8, num_classes={"verb": 4, "noun": 6}, drop_path=0.0, dropout=0.0,
                     spatial_chunk=0).eval()
    with torch.no_grad():
        want, got = scenic_order(video), ours(video)
    assert list(got) == ["verb", "noun"]
    for head in want:                               # the same rows, multiplied in another order: to rounding
        torch.testing.assert_close(got[head], want[head], rtol=0, atol=1e-6)
    # Exported with verbs first here: written nouns first, as Scenic's EPIC split reads them (397 outputs).
    epic = load_scenic(DATA / "fe_token_central.msgpack")
    c = epic.config
    epic_verbs_first = ViViT(dataclasses.replace(c, num_classes={"verb": 97, "noun": 300}))
    state = {k: v for k, v in epic.state_dict().items() if not k.startswith("head.")}
    epic_verbs_first.load_state_dict({**state, "head.weight": torch.randn(397, c.width), "head.bias": torch.randn(397)})
    epic_verbs_first.eval()
    save_scenic(epic_verbs_first, tmp_path / "epic")
    back = load_scenic(tmp_path / "epic").eval()                  # 397 outputs: read as nouns, then verbs
    assert list(back.config.num_classes) == ["noun", "verb"]
    video = torch.randn(1, 8, 3, 32, 32)
    with torch.no_grad():
        a, b = epic_verbs_first(video), back(video)
    for head in ("noun", "verb"):
        torch.testing.assert_close(b[head], a[head], rtol=0, atol=1e-6)


def test_flax_numpy_scalars_and_bfloat16_arrays_decode_without_ml_dtypes(tmp_path):
    value = np.float32(3.5)
    scalar = msgpack.ExtType(3, msgpack.packb(((), "float32", np.asarray(value).tobytes())))
    bf16 = np.array([1.0, -2.5, 0.15625], dtype=np.float32)
    bits = (bf16.view(np.uint32) >> 16).astype(np.uint16)
    array = msgpack.ExtType(1, msgpack.packb(((3,), "bfloat16", bits.tobytes())))
    (tmp_path / "state").write_bytes(msgpack.packb({"global_step": scalar, "x": array}))
    tree = read_flax_msgpack(str(tmp_path / "state"))
    assert tree["global_step"] == 3.5 and np.array_equal(tree["x"], bf16)

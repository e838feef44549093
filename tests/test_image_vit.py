"""The synthetic recipe's image ViT: its labels, its format (a Hugging Face ViT the loader maps) and reuse."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from sfa_vivit.cli import main
from sfa_vivit.data.prep import synth
from sfa_vivit.models import importers
from sfa_vivit.models.vivit import vivit
from sfa_vivit.tools import synth_vit as image_vit
from sfa_vivit.train import resolve

SIZES = ["model.width=32", "model.spatial_depth=2", "model.heads=2", "model.mlp_dim=64", "model.patch=8",
         "image_size=32"]
TINY = image_vit.ImageViTOptions(videos=6, val_videos=2, frames_per_video=2, steps=3, batch_size=4, warmup_steps=1)


def test_each_frame_is_labelled_with_the_cell_of_the_target():
    """Easy scenes have no distractor: the white pixels' centre must lie in the labelled cell."""
    options = synth.SynthOptions(size=64, difficulty="easy")
    for i in range(24):
        rng = random.Random(i)
        scene = synth.scene(i % len(synth.CLASSES), options, rng)
        video = torch.from_numpy(synth.draw(scene, options, rng)).float()
        for t in (0, 15, 31):
            white = (video[t].min(-1).values > 200).nonzero().float()   # (row, col) of white pixels
            row, col = (white.mean(0) * 4 / 64).long().tolist()
            assert scene.target_cell(t, 64, 4) == row * 4 + col, (i, t)


def test_frames_are_deterministic_and_balanced_over_cells():
    x, y = image_vit.frames(TINY, "train", 32)
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (12,)
    x2, y2 = image_vit.frames(TINY, "train", 32)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    _, labels = image_vit.frames(image_vit.ImageViTOptions(videos=120), "train", 64)
    counts = torch.bincount(labels, minlength=16)
    assert counts.min() > 0, counts   # the target visits every cell


def test_pretrained_folder_loads_into_the_recipes_spatial_encoder_and_is_reused(tmp_path):
    out = tmp_path / "vit"
    report = image_vit.pretrain(str(out), TINY, sets=SIZES, progress=False)
    assert 0 <= report["val_accuracy"] <= 100 and report["chance_accuracy"] == 6.25
    assert json.loads((out / image_vit.REPORT).read_text()) == report
    hf = load_file(out / "model.safetensors")

    config = resolve("baseline", "synthetic", sets=[*SIZES, f"image_checkpoint={out}"])
    model = vivit(config.variant, num_frames=4, image_size=32, num_classes=12, **config.model)
    assert importers.detect_image_format(str(out)) == "hf"
    importers.load_image_vit(model, str(out))
    kernel = hf["vit.embeddings.patch_embeddings.projection.weight"]
    assert torch.equal(model.embedding.weight[:, :, 1], kernel)          # central frame of the tubelet
    assert torch.equal(model.spatial.pos_embedding, hf["vit.embeddings.position_embeddings"])
    assert model.config.activation == "gelu"

    # Same options: reused as it is. Other options: refused, nothing overwritten.
    assert image_vit.pretrain(str(out), TINY, sets=SIZES, progress=False) == report
    with pytest.raises(ValueError, match="other options"):
        image_vit.pretrain(str(out), image_vit.ImageViTOptions(steps=4), sets=SIZES, progress=False)
    assert load_file(out / "model.safetensors").keys() == hf.keys()


def test_cli_rejects_bad_options_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:      # a choice of the option's declaration, checked by argparse
        main(["data", "synth-vit", "--out", str(tmp_path / "v"), "--difficulty", "impossible"])
    assert exited.value.code == 2 and "--difficulty: invalid choice: 'impossible'" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_textures_world_draws_real_photographs_and_its_target_is_the_fur():
    """The textures world: a photographic background, objects cut from photographs, the target the cat's fur."""
    options = synth.SynthOptions(size=64, difficulty="textures")
    # A scene whose target is drawn last, so that nothing covers it.
    seed = next(s for s in range(100) if (lambda sc: sc.target == len(sc.objects) - 1)(
        synth.scene(3, options, random.Random(s))))
    scene = synth.scene(3, options, random.Random(seed))
    assert scene.background is not None and scene.objects[scene.target][0][0] == synth.TARGET_TEXTURE
    assert all(look[0] != synth.TARGET_TEXTURE for i, (look, _) in enumerate(scene.objects) if i != scene.target)
    video = synth.draw(scene, options, random.Random("noise"))
    assert video.shape == (32, 64, 64, 3) and video.dtype.name == "uint8"
    # The target's square shows its part of the fur photo (up to the noise), wherever it is.
    index, tx, ty = scene.objects[scene.target][0]
    fur = synth.photo(synth.TEXTURES[index], synth.TEXTURE_SIDE)[ty:ty + scene.side, tx:tx + scene.side]
    for t in (0, 31):
        x, y = (int(round(v)) for v in scene.objects[scene.target][1][t])
        patch = video[t, y:y + scene.side, x:x + scene.side].astype(float)
        assert abs(patch - fur.astype(float)).mean() < 6, t
    # Deterministic: the same seed gives the same pixels.
    assert (synth.render(3, options, random.Random(seed)) == synth.render(3, options, random.Random(seed))).all()


def test_texture_task_labels_what_a_still_shows_never_where():
    options = image_vit.ImageViTOptions(difficulty="textures", task="texture", videos=30, frames_per_video=2)
    x, y = image_vit.frames(options, "train", 64)
    assert x.shape == (60, 3, 64, 64) and set(y.tolist()) <= set(range(len(synth.TEXTURES)))
    assert len(set(y.tolist())) > 3 and image_vit.num_labels(options) == len(synth.TEXTURES)
    x2, y2 = image_vit.frames(options, "train", 64)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # The same texture anywhere in the frame gets the same label: a still's label carries no position.
    rng = random.Random(0)
    labels = {synth.still(synth.SynthOptions(size=64, difficulty="textures"), rng)[1] for _ in range(40)}
    assert labels == set(range(len(synth.TEXTURES)))
    with pytest.raises(ValueError, match="task=.texture. needs a textured world"):
        image_vit.ImageViTOptions(task="texture").validate()
    # object_cell: one object of any texture, labelled with the 4 x 4 cell of its centre.
    cells = image_vit.ImageViTOptions(difficulty="textures", task="object_cell", videos=40, frames_per_video=1)
    x, y = image_vit.frames(cells, "train", 64)
    assert image_vit.num_labels(cells) == 16 and y.max() < 16 and len(set(y.tolist())) > 8
    with pytest.raises(ValueError, match="task='where'"):
        image_vit.ImageViTOptions(task="where").validate()

"""Image-ViT import (parity with transformers' ViTModel) and ViViT save/load."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import ViTConfig, ViTModel

from conftest import randomize_, unit_sizes
from sfa_vivit.models import checkpoints, importers, vivit
from sfa_vivit.models.checkpoints import CheckpointError
from sfa_vivit.models.importers import load_image_vit

WIDTH, DEPTH, HEADS, MLP, PATCH, IMAGE = 64, 2, 4, 128, 8, 32


def peer_vit(hidden_act="gelu", layer_norm_eps=1e-12, image_size=IMAGE) -> ViTModel:
    """A random transformers ViTModel; LayerNorms randomised too so that they are really checked."""
    config = ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                       intermediate_size=MLP, image_size=image_size, patch_size=PATCH,
                       hidden_act=hidden_act, layer_norm_eps=layer_norm_eps)
    model = ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def peer_weights(peer: ViTModel) -> dict[str, np.ndarray]:
    """The peer's weights under their on-disk Hugging Face names."""
    return {k: v.detach().numpy().copy() for k, v in peer.state_dict().items()}


def hf_on_disk(peer: ViTModel, folder) -> dict[str, np.ndarray]:
    peer.save_pretrained(folder)
    return {k: v.numpy() for k, v in safetensors.torch.load_file(folder / "model.safetensors").items()}


def write_flax_npz(w: dict[str, np.ndarray], path, layout: str) -> None:
    """Write the peer's weights as a Flax ViT .npz: 'big_vision' (MHA_0/LayerNorm_1/MlpBlock_0,
    pos_embedding at the top, under params/), 'big_vision_scan' (blocks stacked), or 'vit_jax'
    (the original release: MHA_1/LayerNorm_2/MlpBlock_3, Transformer/posembed_input)."""
    D, nh = WIDTH, HEADS
    out = {
        "embedding/kernel": w["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": w["embeddings.patch_embeddings.projection.bias"],
        "cls": w["embeddings.cls_token"],
        "Transformer/encoder_norm/scale": w["layernorm.weight"],
        "Transformer/encoder_norm/bias": w["layernorm.bias"],
        "head/kernel": np.zeros((D, 10), np.float32),
        "head/bias": np.zeros(10, np.float32),
    }
    pos = w["embeddings.position_embeddings"]
    if layout == "vit_jax":
        out["Transformer/posembed_input/pos_embedding"] = pos
        mha, ln2, mlp = "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"
    else:
        out["pos_embedding"] = pos
        mha, ln2, mlp = "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"
    blocks = []
    for i in range(DEPTH):
        h = f"encoder.layer.{i}."
        b = {
            "LayerNorm_0/scale": w[h + "layernorm_before.weight"], "LayerNorm_0/bias": w[h + "layernorm_before.bias"],
            f"{ln2}/scale": w[h + "layernorm_after.weight"], f"{ln2}/bias": w[h + "layernorm_after.bias"],
            f"{mlp}/Dense_0/kernel": w[h + "intermediate.dense.weight"].T,
            f"{mlp}/Dense_0/bias": w[h + "intermediate.dense.bias"],
            f"{mlp}/Dense_1/kernel": w[h + "output.dense.weight"].T, f"{mlp}/Dense_1/bias": w[h + "output.dense.bias"],
            f"{mha}/out/kernel": w[h + "attention.output.dense.weight"].T.reshape(nh, D // nh, D),
            f"{mha}/out/bias": w[h + "attention.output.dense.bias"],
        }
        for name in ("query", "key", "value"):
            b[f"{mha}/{name}/kernel"] = w[h + f"attention.attention.{name}.weight"].T.reshape(D, nh, D // nh)
            b[f"{mha}/{name}/bias"] = w[h + f"attention.attention.{name}.bias"].reshape(nh, D // nh)
        blocks.append(b)
    if layout == "big_vision_scan":
        for key in blocks[0]:
            out[f"Transformer/encoderblock/{key}"] = np.stack([b[key] for b in blocks])
    else:
        for i, b in enumerate(blocks):
            out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
    if layout.startswith("big_vision"):
        out = {f"params/{k}": v for k, v in out.items()}
    np.savez(path, **out)


def write_timm_state_dict(w: dict[str, np.ndarray], path) -> None:
    t = {"cls_token": w["embeddings.cls_token"], "pos_embed": w["embeddings.position_embeddings"],
         "patch_embed.proj.weight": w["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": w["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": w["layernorm.weight"], "norm.bias": w["layernorm.bias"],
         "head.weight": np.zeros((10, WIDTH), np.float32), "head.bias": np.zeros(10, np.float32)}
    for i in range(DEPTH):
        h = f"encoder.layer.{i}."
        t[f"blocks.{i}.norm1.weight"], t[f"blocks.{i}.norm1.bias"] = (
            w[h + "layernorm_before.weight"], w[h + "layernorm_before.bias"])
        t[f"blocks.{i}.norm2.weight"], t[f"blocks.{i}.norm2.bias"] = (
            w[h + "layernorm_after.weight"], w[h + "layernorm_after.bias"])
        t[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
            [w[h + f"attention.attention.{n}.weight"] for n in ("query", "key", "value")])
        t[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(
            [w[h + f"attention.attention.{n}.bias"] for n in ("query", "key", "value")])
        t[f"blocks.{i}.attn.proj.weight"] = w[h + "attention.output.dense.weight"]
        t[f"blocks.{i}.attn.proj.bias"] = w[h + "attention.output.dense.bias"]
        t[f"blocks.{i}.mlp.fc1.weight"], t[f"blocks.{i}.mlp.fc1.bias"] = (
            w[h + "intermediate.dense.weight"], w[h + "intermediate.dense.bias"])
        t[f"blocks.{i}.mlp.fc2.weight"], t[f"blocks.{i}.mlp.fc2.bias"] = (
            w[h + "output.dense.weight"], w[h + "output.dense.bias"])
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}
    if str(path).endswith(".safetensors"):
        safetensors.torch.save_file(tensors, path)
    else:
        torch.save(tensors, path)


def video_model(image_size=IMAGE, num_frames=6, **extra):
    sizes = unit_sizes(width=WIDTH, spatial_depth=DEPTH, heads=HEADS, mlp_dim=MLP, patch=PATCH)
    return vivit("Ti", num_frames=num_frames, image_size=image_size, num_classes=5, **{**sizes, **extra})


def assert_spatial_matches_peer(model, peer, image_size=IMAGE, interpolate=False):
    """spatial_features of each tubelet == the peer's final-LayerNorm CLS of its central frame."""
    video = torch.randn(2, model.config.num_frames, 3, image_size, image_size)
    with torch.no_grad():
        ours = model.eval().spatial_features(video)                           # (B, T', D)
        t = model.config.tubelet
        central = video[:, t // 2::t]                                         # (B, T', C, H, W)
        frames = central.reshape(-1, 3, image_size, image_size)
        ref = peer(pixel_values=frames, interpolate_pos_encoding=interpolate).last_hidden_state[:, 0]
    ref = ref.view(ours.shape)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-5, f"max abs error {err}"
    return err


# ---------------------------------------------------------------------------------------------
# Parity with transformers' ViTModel
# ---------------------------------------------------------------------------------------------

def test_hf_folder_parity(tmp_path):
    peer = peer_vit()
    peer.save_pretrained(tmp_path / "vit")
    model = video_model()
    summary = load_image_vit(model, tmp_path / "vit")
    assert summary["format"] == "hf" and summary["layer_norm_eps"] == 1e-12 and summary["activation"] == "gelu"
    assert model.config.layer_norm_eps == 1e-12
    assert_spatial_matches_peer(model, peer)
    # The CLS token is copied (Scenic leaves it at zero).
    assert torch.equal(model.spatial.cls, peer.embeddings.cls_token)


@pytest.mark.parametrize("layout", ["big_vision", "big_vision_scan", "vit_jax"])
def test_flax_npz_parity(tmp_path, layout):
    # Flax ViTs use tanh-GELU and eps 1e-6; the peer is built with the same numerics.
    peer = peer_vit(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    write_flax_npz(hf_on_disk(peer, tmp_path / "vit"), tmp_path / "vit.npz", layout)
    model = video_model()
    summary = load_image_vit(model, tmp_path / "vit.npz")
    assert summary["format"] == "npz" and model.config.activation == "gelu_tanh"
    assert_spatial_matches_peer(model, peer)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_parity(tmp_path, suffix):
    peer = peer_vit(hidden_act="gelu", layer_norm_eps=1e-6)
    write_timm_state_dict(hf_on_disk(peer, tmp_path / "vit"), tmp_path / f"vit{suffix}")
    model = video_model()
    assert load_image_vit(model, tmp_path / f"vit{suffix}")["format"] == "timm"
    assert_spatial_matches_peer(model, peer)


def test_position_embedding_is_resized_bicubically_for_another_image_size(tmp_path):
    peer = peer_vit()
    peer.save_pretrained(tmp_path / "vit")
    model = video_model(image_size=48)
    assert load_image_vit(model, tmp_path / "vit")["positions_resized"]
    assert_spatial_matches_peer(model, peer, image_size=48, interpolate=True)


def test_average_inflation_embeds_a_static_video_like_the_image(tmp_path):
    peer = peer_vit()
    peer.save_pretrained(tmp_path / "vit")
    model = video_model(tubelet_init="average")
    load_image_vit(model, tmp_path / "vit")
    frame = torch.randn(2, 1, 3, IMAGE, IMAGE)
    video = frame.expand(2, 6, 3, IMAGE, IMAGE)
    with torch.no_grad():
        ours = model.eval().spatial_features(video)
        ref = peer(pixel_values=frame[:, 0]).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, ref[:, None].expand_as(ours), rtol=0, atol=1e-5)


def test_image_vit_errors_name_the_problem(tmp_path):
    peer = peer_vit()
    peer.save_pretrained(tmp_path / "vit")
    with pytest.raises(CheckpointError,
                       match=r"embedding kernel .* has shape \(64, 3, 8, 8\) .* needs \(64, 3, 16, 16\)"):
        load_image_vit(video_model(patch=16, image_size=32), tmp_path / "vit")
    with pytest.raises(CheckpointError,
                       match=r"patch embedding kernel .* has shape \(64, 3, 8, 8\) .* needs \(96, 3, 8, 8\)"):
        load_image_vit(video_model(width=96, heads=4), tmp_path / "vit")
    model = video_model(mlp_dim=96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError,
                       match=r"tensor spatial.blocks.0.mlp.fc1.weight has shape \(128, 64\) .* needs \(96, 64\)"):
        load_image_vit(model, tmp_path / "vit")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-copied
    with pytest.raises(CheckpointError, match="image ViT has 2 blocks but .* spatial_depth=3"):
        load_image_vit(video_model(spatial_depth=3), tmp_path / "vit")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint format"):
        load_image_vit(video_model(), tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="unrecognised checkpoint format.*without config.json"):
        load_image_vit(video_model(), tmp_path / "empty")
    safetensors.torch.save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint format.*neither timm"):
        load_image_vit(video_model(), tmp_path / "other.safetensors")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_image_vit(video_model(), tmp_path / "bad.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_image_vit(video_model(), tmp_path / "missing")
    with pytest.raises(CheckpointError, match="unknown image checkpoint format 'onnx'"):
        load_image_vit(video_model(), tmp_path / "vit", format="onnx")


def test_pickled_code_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"patch_embed.proj.weight": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_image_vit(video_model(), tmp_path / "evil.pth", format="timm")


# ---------------------------------------------------------------------------------------------
# ViViT save / load
# ---------------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    model = randomize_(video_model(adapter=True))
    model.freeze_spatial()
    url = checkpoints.save(model, tmp_path / "ckpt", extra={"stage": 1, "top1": 0.5})
    assert checkpoints.is_committed(url)
    loaded, extra = checkpoints.load(url)
    assert extra == {"stage": 1, "top1": 0.5}
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    video = torch.randn(1, 6, 3, IMAGE, IMAGE)
    assert torch.equal(loaded.eval()(video), model.eval()(video))
    # Only the three files remain: no temporaries.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["COMMITTED", "config.json", "model.safetensors"]


def test_extra_state_tensors_round_trip(tmp_path):
    model = video_model()
    momentum = {"optimizer.state.0.momentum_buffer": torch.randn(3, 4), "rng": torch.arange(5, dtype=torch.uint8)}
    url = checkpoints.save(model, tmp_path / "ckpt", state=momentum)
    loaded = checkpoints.load_state(url)
    assert loaded.keys() == momentum.keys() and all(torch.equal(loaded[k], momentum[k]) for k in momentum)
    assert checkpoints.load_state(checkpoints.save(model, tmp_path / "plain")) == {}
    (tmp_path / "ckpt" / "state.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="state.safetensors does not match the sha256"):
        checkpoints.load_state(url)


def test_load_refuses_uncommitted_or_tampered_checkpoints(tmp_path):
    model = video_model()
    url = checkpoints.save(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "COMMITTED").unlink()
    with pytest.raises(CheckpointError, match="no committed checkpoint .* COMMITTED is missing"):
        checkpoints.load(url)
    url = checkpoints.save(model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        checkpoints.load(url)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    model = randomize_(video_model())
    url = checkpoints.save(model, tmp_path / "ckpt", extra={"step": 1})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        checkpoints.save(model, url, extra={"step": object()})
    assert checkpoints.load(url).extra == {"step": 1}


def test_load_names_tensors_that_do_not_fit(tmp_path):
    model = video_model()
    url = checkpoints.save(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["model"]["num_classes"] = 9
    small = video_model()
    with pytest.raises(CheckpointError, match=r"tensor head.weight has shape \(5, 64\) .* needs \(9, 64\)"):
        from sfa_vivit.models import ViViT, ViViTConfig
        checkpoints.load_state_dict_checked(ViViT(ViViTConfig.from_dict(config["model"])),
                                            small.state_dict(), source=url)


def test_save_and_load_through_an_fsspec_url():
    model = randomize_(video_model())
    url = "memory://sfa-tests/ckpt"
    checkpoints.save(model, url)
    loaded, _ = checkpoints.load(url)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


# ---------------------------------------------------------------------------------------------
# Scenic names
# ---------------------------------------------------------------------------------------------

def test_every_parameter_has_one_distinct_scenic_name():
    model = vivit("B", num_frames=32, image_size=224, num_classes={"verb": 97, "noun": 300}, adapter=True)
    names = {n: importers.scenic_name(n) for n, _ in model.named_parameters()}
    assert len(set(names.values())) == len(names)
    assert names["spatial.blocks.3.attn.query.weight"] == \
        "SpatialTransformer/encoderblock_3/MultiHeadDotProductAttention_0/query/kernel"
    assert names["temporal.blocks.0.mlp.fc2.bias"] == "TemporalTransformer/encoderblock_0/MlpBlock_0/Dense_1/bias"
    assert names["temporal.norm.weight"] == "TemporalTransformer/encoder_norm/scale"
    assert names["spatial.cls"] == "cls_SpatialTransformer"
    assert names["temporal.pos_embedding"] == "TemporalTransformer/posembed_input/pos_embedding"
    assert names["embedding.weight"] == "embedding/kernel" and names["head.bias"] == "output_projection/bias"

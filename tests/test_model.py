"""The ViViT-FE model: sizes, forward/backward, stage-2 surgery, temporal resizing, bad input."""

import math

import pytest
import torch
from transformers import ViTConfig, ViTModel

from conftest import randomize_, unit_sizes
from sfa_vivit.models import VARIANTS, ViViT, ViViTConfig, vivit

# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------

def expected_parameters(c: ViViTConfig) -> dict[str, int]:
    """Parameter count per part, derived from the architecture (pre-LN ViT blocks)."""
    D, C, t, p = c.width, c.in_channels, c.tubelet, c.patch
    cls = int(c.classifier == "token")

    def encoder(tokens, depth, mlp):
        block = 4 * (D * D + D) + 2 * (2 * D) + (D * mlp + mlp) + (mlp * D + D)
        return cls * D + (tokens + cls) * D + depth * block + 2 * D

    adapter_dim = c.adapter_dim or D
    return {
        "embedding": D * C * t * p * p + D,
        "spatial": encoder(c.grid**2, c.spatial_depth, c.mlp_dim),
        "adapter": (D * adapter_dim + adapter_dim + adapter_dim * D + D) if c.adapter else 0,
        "temporal": encoder(c.num_tubelets, c.temporal_depth, c.temporal_mlp_dim or c.mlp_dim),
        "head": D * c.total_classes + c.total_classes,
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_has_the_derived_parameter_count(variant):
    with torch.device("meta"):
        model = vivit(variant, num_frames=32, image_size=224, num_classes=400)
    c = model.config
    assert (c.width, c.spatial_depth, c.heads, c.mlp_dim) == tuple(
        VARIANTS[variant][k] for k in ("width", "spatial_depth", "heads", "mlp_dim"))
    groups = {name: sum(p.numel() for _, p in params) for name, params in model.parameter_groups().items()}
    assert groups == expected_parameters(c)
    assert model.num_parameters() == sum(groups.values())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_spatial_encoder_has_the_size_of_the_peer_image_vit(variant):
    """The spatial encoder is an image ViT of the paper's size: the same count as transformers'
    ViTModel, up to the tubelet kernel, which is t times the 2D patch kernel."""
    sizes = VARIANTS[variant]
    with torch.device("meta"):
        model = vivit(variant, num_frames=8, image_size=224, num_classes=10)
        peer = ViTModel(ViTConfig(hidden_size=sizes["width"], num_hidden_layers=sizes["spatial_depth"],
                                  num_attention_heads=sizes["heads"], intermediate_size=sizes["mlp_dim"],
                                  image_size=224, patch_size=16), add_pooling_layer=False)
    peer_count = sum(p.numel() for p in peer.parameters())
    patch_kernel_2d = sizes["width"] * 3 * 16 * 16
    ours = sum(p.numel() for part in ("embedding", "spatial") for _, p in model.parameter_groups()[part])
    assert ours == peer_count + (model.config.tubelet - 1) * patch_kernel_2d


def test_variant_names_and_overrides():
    model = vivit("b", num_frames=8, image_size=64, num_classes=3, spatial_depth=1, temporal_depth=2,
                  width=96, heads=4, mlp_dim=64, patch=16, tubelet=4, drop_path=0.1, layer_norm_eps=1e-5)
    c = model.config
    assert (c.variant, c.spatial_depth, c.temporal_depth, c.width, c.tubelet) == ("B", 1, 2, 96, 4)
    assert len(model.temporal.blocks) == 2 and model.embedding.kernel_size == (4, 16, 16)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    # Stochastic depth grows linearly from 0 to drop_path over each encoder's blocks.
    assert [b.drop_path.p for b in model.temporal.blocks] == [0.0, 0.1]


# ---------------------------------------------------------------------------------------------
# Forward / backward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["Ti", "S"])
def test_forward_backward_full_size_variants(variant):
    model = vivit(variant, num_frames=8, image_size=224, num_classes=10, drop_path=0.1, dropout=0.1)
    randomize_(model.head, 0.02)
    video = torch.randn(2, 8, 3, 224, 224)
    logits = model(video)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 7]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.spatial.blocks[0].attn.query.weight.grad.abs().sum() > 0


def test_several_heads_return_a_dict_of_logits():
    model = randomize_(vivit("Ti", num_frames=4, image_size=32, num_classes={"verb": 97, "noun": 300},
                             **unit_sizes()))
    out = model(torch.randn(2, 4, 3, 32, 32))
    assert list(out) == ["verb", "noun"]
    assert out["verb"].shape == (2, 97) and out["noun"].shape == (2, 300)
    # One Dense split by class count, as Scenic's multi-head model.
    full = model.head(model.temporal(model.spatial_features(torch.zeros(1, 4, 3, 32, 32))))
    split = model.forward_head(model.spatial_features(torch.zeros(1, 4, 3, 32, 32)))
    assert torch.equal(torch.cat([split["verb"], split["noun"]], -1), full)


def test_gap_classifier_has_no_cls_tokens():
    model = vivit("Ti", num_frames=4, image_size=32, num_classes=3, classifier="gap", **unit_sizes())
    assert model.spatial.cls is None and model.temporal.cls is None
    assert model.spatial.pos_embedding.shape == (1, 16, 64)
    assert model(torch.randn(1, 4, 3, 32, 32)).shape == (1, 3)


def test_grad_checkpointing_gives_the_same_gradients():
    model = randomize_(vivit("Ti", num_frames=4, image_size=32, num_classes=3, **unit_sizes()))
    video = torch.randn(2, 4, 3, 32, 32)
    model(video).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(video).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-6)


def test_tubelet_init_central_frame_and_average():
    central = vivit("Ti", num_frames=6, image_size=32, num_classes=3, tubelet=3,
                    **unit_sizes(), tubelet_init="central_frame").embedding.weight
    assert central[:, :, 1].abs().sum() > 0
    assert central[:, :, 0].abs().sum() == 0 and central[:, :, 2].abs().sum() == 0
    average = vivit("Ti", num_frames=6, image_size=32, num_classes=3, tubelet=3,
                    **unit_sizes(), tubelet_init="average").embedding.weight
    assert torch.equal(average[:, :, 0], average[:, :, 1]) and torch.equal(average[:, :, 1], average[:, :, 2])


# ---------------------------------------------------------------------------------------------
# Stage 2: frozen spatial encoder + adapter
# ---------------------------------------------------------------------------------------------

def test_frozen_spatial_with_adapter_trains_exactly_adapter_temporal_and_head():
    model = randomize_(vivit("Ti", num_frames=8, image_size=32, num_classes=5, adapter=True,
                             dropout=0.1, drop_path=0.2, spatial_chunk=1, **unit_sizes()))
    model.freeze_spatial().train()
    assert not model.spatial.training and not model.embedding.training and model.temporal.training

    saved = []

    def pack(t):
        saved.append(t)
        return t

    video = torch.randn(2, 8, 3, 32, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        features = model.spatial_features(video)
    assert saved == [] and features.grad_fn is None and not features.requires_grad

    loss = torch.nn.functional.cross_entropy(model(video), torch.tensor([0, 3]))
    loss.backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"adapter", "temporal", "head"}
    trainable = {id(p) for p in model.trainable_parameters()}
    expected = {id(p) for part in ("adapter", "temporal", "head") for _, p in model.parameter_groups()[part]}
    assert trainable == expected
    for name, p in model.named_parameters():
        if name.startswith(("adapter", "temporal", "head")):
            assert p.grad.abs().sum() > 0, name


def test_frozen_spatial_is_deterministic_in_train_mode_and_chunking_does_not_change_it():
    model = randomize_(vivit("Ti", num_frames=8, image_size=32, num_classes=5, dropout=0.3, drop_path=0.3,
                             **unit_sizes()))
    video = torch.randn(2, 8, 3, 32, 32)
    reference = model.eval().spatial_features(video)
    model.freeze_spatial().train()
    for chunk in (0, 1, 3):
        model.config.spatial_chunk = chunk
        torch.testing.assert_close(model.spatial_features(video), reference, rtol=1e-5, atol=1e-5)


def test_fresh_adapter_leaves_the_stage1_logits_unchanged():
    stage1 = randomize_(vivit("Ti", num_frames=8, image_size=32, num_classes=7, **unit_sizes())).eval()
    video = torch.randn(3, 8, 3, 32, 32)
    expected = stage1(video)
    stage2 = stage1.add_adapter().freeze_spatial().eval()
    assert stage2.config.adapter and stage2.adapter is not None
    assert torch.equal(stage2(video), expected)
    # A model built with the adapter on behaves the same way.
    built = vivit("Ti", num_frames=8, image_size=32, num_classes=7, adapter=True, adapter_dim=16,
                  **unit_sizes()).eval()
    without = {k: v for k, v in built.state_dict().items() if not k.startswith("adapter")}
    plain = vivit("Ti", num_frames=8, image_size=32, num_classes=7, **unit_sizes()).eval()
    plain.load_state_dict(without)
    randomize_(plain.head)
    built.head.load_state_dict(plain.head.state_dict())
    assert torch.equal(built(video), plain(video))


def test_adapter_without_residual_or_zero_init_is_configurable():
    model = vivit("Ti", num_frames=4, image_size=32, num_classes=3, adapter=True, adapter_residual=False,
                  adapter_zero_init=False, adapter_dim=8, **unit_sizes())
    assert model.adapter.fc2.weight.abs().sum() > 0 and not model.adapter.residual
    assert model.adapter.fc1.weight.shape == (8, 64)


# ---------------------------------------------------------------------------------------------
# Temporal position interpolation
# ---------------------------------------------------------------------------------------------

def test_resize_temporal_8_to_32_frames_keeps_end_points_and_is_linear():
    model = randomize_(vivit("Ti", num_frames=8, image_size=32, num_classes=3, **unit_sizes()))
    old = model.temporal.pos_embedding.detach().clone()[0]          # (1 + 4, D)
    model.resize_temporal(32)
    new = model.temporal.pos_embedding.detach()[0]                   # (1 + 16, D)
    assert model.config.num_frames == 32 and new.shape == (17, 64)
    torch.testing.assert_close(new[0], old[0], rtol=0, atol=0)      # CLS position untouched
    grid_old, grid_new = old[1:], new[1:]
    torch.testing.assert_close(grid_new[0], grid_old[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(grid_new[-1], grid_old[-1], rtol=0, atol=1e-6)
    # Linear: position j of 16 sits at x = j * 3/15 on the old grid of 4 points.
    for j in range(16):
        x = j * (4 - 1) / (16 - 1)
        lo = min(int(math.floor(x)), 2)
        w = x - lo
        torch.testing.assert_close(grid_new[j], (1 - w) * grid_old[lo] + w * grid_old[lo + 1],
                                   rtol=1e-5, atol=1e-6)
    # Second differences vanish inside each old interval: linear between the old points.
    assert model(torch.randn(1, 32, 3, 32, 32)).shape == (1, 3)


def test_resize_temporal_matches_scipy_zoom_order_1():
    """Scenic's interpolate_1d_positional_embeddings is scipy.ndimage.zoom(order=1)."""
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    model = randomize_(vivit("Ti", num_frames=8, image_size=32, num_classes=3, **unit_sizes()))
    old = model.temporal.pos_embedding.detach()[0, 1:].double().numpy()
    model.resize_temporal(26)
    expected = scipy_ndimage.zoom(old, (13 / 4, 1), order=1)
    torch.testing.assert_close(model.temporal.pos_embedding.detach()[0, 1:].double(),
                               torch.from_numpy(expected), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(variant="XL"), "unknown ViViT variant 'XL'"),
    (dict(num_frames=9), "num_frames=9 is not divisible by the tubelet length tubelet=2"),
    (dict(image_size=230), "image_size=230 is not divisible by the patch size patch=16"),
    (dict(num_classes=0), "num_classes=0 must be an integer >= 1"),
    (dict(num_classes={}), "num_classes is an empty dict"),
    (dict(classifier="mean"), "classifier='mean' is not one of ['token', 'gap']"),
    (dict(heads=5), "width=192 is not divisible by heads=5"),
    (dict(drop_path=1.5), "drop_path=1.5 must be a number in [0, 1)"),
    (dict(tubelet_init="random"), "tubelet_init='random' is not one of"),
    (dict(spatial_detph=3), "unknown ViViT option(s) ['spatial_detph']"),
])
def test_bad_config_is_rejected_with_a_clear_message(kwargs, message):
    args = dict(variant="Ti", num_frames=8, image_size=224, num_classes=10)
    args.update(kwargs)
    with pytest.raises(ValueError) as err:
        vivit(args.pop("variant"), **args)
    assert message in str(err.value)


def test_bad_video_is_rejected_with_a_clear_message():
    model = vivit("Ti", num_frames=8, image_size=32, num_classes=3, **unit_sizes())
    with pytest.raises(ValueError, match=r"video has 16 frames .*resize_temporal\(16\)"):
        model(torch.randn(1, 16, 3, 32, 32))
    with pytest.raises(ValueError, match=r"expected \(B, T=8, C=3, H=32, W=32\)"):
        model(torch.randn(1, 8, 3, 48, 32))
    with pytest.raises(ValueError, match="5-d tensor"):
        model(torch.randn(8, 3, 32, 32))
    with pytest.raises(ValueError, match=r"looks like \(B, C, T, H, W\).*video.permute\(0, 2, 1, 3, 4\)"):
        model(torch.randn(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="float tensor"):
        model(torch.zeros(1, 8, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="num_frames=7 is not divisible"):
        model.resize_temporal(7)


def test_config_round_trips_and_rejects_unknown_keys():
    config = vivit("S", num_frames=16, image_size=224, num_classes={"verb": 97, "noun": 300}).config
    assert ViViTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown ViViT config keys \['depth'\]"):
        ViViTConfig.from_dict({**config.to_dict(), "depth": 3})
    assert isinstance(ViViT(config), ViViT)

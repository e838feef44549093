"""ViViT factorised encoder ("Model 2" of Arnab et al., ICCV 2021) with the SFA adapter.

Reads top to bottom: config → tubelet embedding → attention → MLP → block → encoder → adapter →
the factorised model → the `vivit()` constructor.

The model follows Scenic's `SpaceTimeViViT` (scenic/projects/vivit/model.py) so that its
checkpoints map one to one onto ours. Every parameter has exactly one Scenic counterpart:

    ours                                   Scenic
    embedding.weight / .bias               embedding/kernel, embedding/bias        (Conv3d)
    spatial.cls                            cls_SpatialTransformer
    spatial.pos_embedding                  SpatialTransformer/posembed_input/pos_embedding
    spatial.blocks.{i}.norm1               SpatialTransformer/encoderblock_{i}/LayerNorm_0
    spatial.blocks.{i}.attn.{query,key,value,out}
                                           .../encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value,out}
    spatial.blocks.{i}.norm2               .../encoderblock_{i}/LayerNorm_1
    spatial.blocks.{i}.mlp.fc1 / fc2       .../encoderblock_{i}/MlpBlock_0/Dense_0 / Dense_1
    spatial.norm                           SpatialTransformer/encoder_norm
    temporal.*                             cls_TemporalTransformer, TemporalTransformer/*   (same layout)
    pre_logits (representation_size set)   pre_logits          (Dense, then tanh)
    head                                   output_projection  (several heads: one Dense, split by class count,
                                                               as Scenic's multi-head model)
    adapter.fc1 / fc2                      (SFA only; no Scenic counterpart)

`sfa_vivit.models.importers.scenic_name()` is that table as code; `importers.load_scenic` / `save_scenic` read and
write Scenic's checkpoints through it, and tests hold our logits to Scenic's own model's.

Where Scenic leaves something out we fix it and say so: the spatial CLS token is copied from the image
checkpoint (Scenic leaves `cls_SpatialTransformer` at zero), and a frozen spatial encoder runs in
chunks of tubelets under `no_grad`, so its memory does not grow with the frame count.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Logits = torch.Tensor | dict[str, torch.Tensor]

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

# Sizes from the SFA supplementary §2 (B/L/H/g) and the ViT paper's table; Ti and S (DeiT sizes)
# exist for CPU work. Temporal depth 4 is Scenic's ViViT-B/L factorised-encoder default.
VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, spatial_depth=12, heads=3, mlp_dim=768),
    "S": dict(width=384, spatial_depth=12, heads=6, mlp_dim=1536),
    "B": dict(width=768, spatial_depth=12, heads=12, mlp_dim=3072),
    "L": dict(width=1024, spatial_depth=24, heads=16, mlp_dim=4096),
    "H": dict(width=1280, spatial_depth=32, heads=16, mlp_dim=5120),
    "g": dict(width=1408, spatial_depth=40, heads=16, mlp_dim=6144),
}

CLASSIFIERS = ("token", "gap")
TUBELET_INITS = ("central_frame", "average")
ACTIVATIONS = ("gelu_tanh", "gelu")


@dataclasses.dataclass
class ViViTConfig:
    """Every field that shapes a ViViT-FE model. Saved with every checkpoint.

    Sizes: `width` (token dimension D), `spatial_depth`/`temporal_depth` (blocks per encoder),
    `heads`/`mlp_dim` (both encoders unless `temporal_heads`/`temporal_mlp_dim` are set),
    `patch` (spatial patch side), `tubelet` (frames per tubelet).
    Numerics: `layer_norm_eps` and `activation` ('gelu_tanh' as Flax/Scenic/big_vision, 'gelu' exact as
    Hugging Face and timm); `load_image_vit` sets both from the image checkpoint.
    `classifier`: 'token' (CLS token in both encoders, Scenic's ViViT-FE default) or 'gap' (mean of tokens).
    `representation_size`: a pre-logits layer (Dense → tanh, Scenic's `pre_logits`) of that size between
    the temporal encoder and the head; None (the default, and the paper's models): none.
    `adapter`: the SFA 2-layer MLP between spatial and temporal encoders, of hidden size `adapter_dim`
    (default `width`), with a residual path and a zero-initialised output layer by default, so that
    adding it leaves the model's function unchanged.
    `spatial_chunk`: tubelets per chunk when the spatial encoder is frozen (0: all at once).
    """

    num_frames: int
    image_size: int
    num_classes: int | dict[str, int]
    width: int = 768
    spatial_depth: int = 12
    temporal_depth: int = 4
    heads: int = 12
    mlp_dim: int = 3072
    temporal_heads: int | None = None
    temporal_mlp_dim: int | None = None
    patch: int = 16
    tubelet: int = 2
    in_channels: int = 3
    classifier: Literal["token", "gap"] = "token"
    tubelet_init: Literal["central_frame", "average"] = "central_frame"
    representation_size: int | None = None
    adapter: bool = False
    adapter_dim: int | None = None
    adapter_residual: bool = True
    adapter_zero_init: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    layer_norm_eps: float = 1e-6
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"
    spatial_chunk: int = 0
    variant: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, dict):
            self.num_classes = dict(self.num_classes)
        self.validate()

    # Derived sizes -----------------------------------------------------------------------------
    @property
    def num_tubelets(self) -> int:
        """T' = T / t: temporal tokens (one per tubelet)."""
        return self.num_frames // self.tubelet

    @property
    def grid(self) -> int:
        """Patches per side of a frame."""
        return self.image_size // self.patch

    @property
    def total_classes(self) -> int:
        return sum(self.num_classes.values()) if isinstance(self.num_classes, dict) else self.num_classes

    # Validation --------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the field and what is wrong."""
        for name in ("num_frames", "image_size", "width", "spatial_depth", "heads", "mlp_dim",
                     "patch", "tubelet", "in_channels"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("temporal_depth", self.temporal_depth, allow_zero=True)
        for name in ("temporal_heads", "temporal_mlp_dim", "adapter_dim", "representation_size"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        _check_positive_int("spatial_chunk", self.spatial_chunk, allow_zero=True)
        if self.num_frames % self.tubelet:
            raise ValueError(f"num_frames={self.num_frames} is not divisible by the tubelet length "
                             f"tubelet={self.tubelet}; use a multiple of {self.tubelet}")
        if self.image_size % self.patch:
            raise ValueError(f"image_size={self.image_size} is not divisible by the patch size "
                             f"patch={self.patch}; use a multiple of {self.patch}")
        for heads_name, heads in (("heads", self.heads), ("temporal_heads", self.temporal_heads)):
            if heads is not None and self.width % heads:
                raise ValueError(f"width={self.width} is not divisible by {heads_name}={heads}")
        _check_choice("classifier", self.classifier, CLASSIFIERS)
        _check_choice("tubelet_init", self.tubelet_init, TUBELET_INITS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        for name in ("dropout", "attention_dropout", "drop_path"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r} must be a number in [0, 1)")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps!r} must be a positive number")
        classes = self.num_classes
        if isinstance(classes, dict):
            if not classes:
                raise ValueError("num_classes is an empty dict; give at least one head, e.g. {'verb': 97}")
            for head, count in classes.items():
                if not isinstance(head, str) or not head:
                    raise ValueError(f"num_classes has a head named {head!r}; head names must be non-empty strings")
                _check_positive_int(f"num_classes[{head!r}]", count)
        else:
            _check_positive_int("num_classes", classes)

    # Serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ViViTConfig":
        """Build from a dict (e.g. a checkpoint's config.json); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ViViT config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def _check_positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


# ----------------------------------------------------------------------------------------------
# Initialisers (Flax's defaults as used by Scenic, so a fresh model trains like Scenic's)
# ----------------------------------------------------------------------------------------------

def lecun_normal_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Flax `lecun_normal`: truncated normal (±2σ) with variance 1/fan_in."""
    # 0.8796... is the std of a unit normal truncated at ±2; dividing by it restores variance 1.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def inflate_patch_kernel(kernel2d: torch.Tensor, tubelet: int, method: str) -> torch.Tensor:
    """Turn a 2D patch kernel (D, C, p, p) into a tubelet kernel (D, C, t, p, p).

    'central_frame' puts the kernel at frame t//2 and zeros elsewhere (Scenic's default), so each
    tubelet embeds exactly its central frame as the image ViT would. 'average' repeats it over the t
    frames divided by t (filter inflation, I3D), so a static video embeds as the image does.
    """
    _check_choice("tubelet_init", method, TUBELET_INITS)
    out = kernel2d.new_zeros(kernel2d.shape[:2] + (tubelet,) + kernel2d.shape[2:])
    if method == "central_frame":
        out[:, :, tubelet // 2] = kernel2d
    else:
        out[:] = (kernel2d / tubelet).unsqueeze(2)
    return out


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

class TubeletEmbedding(nn.Conv3d):
    """Non-overlapping (t, p, p) tubelets → D-dim tokens. Scenic: `embedding` (3d_conv)."""

    def __init__(self, config: ViViTConfig):
        kernel = (config.tubelet, config.patch, config.patch)
        super().__init__(config.in_channels, config.width, kernel_size=kernel, stride=kernel)
        fan_in = config.in_channels * config.tubelet * config.patch**2
        kernel2d = torch.empty(config.width, config.in_channels, config.patch, config.patch)
        lecun_normal_(kernel2d, fan_in)
        with torch.no_grad():
            self.weight.copy_(inflate_patch_kernel(kernel2d, config.tubelet, config.tubelet_init))
            nn.init.zeros_(self.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        # video: (B, T, C, H, W) → (B, C, T, H, W) for the convolution
        x = super().forward(video.transpose(1, 2))            # (B, D, T', h, w)
        return x.flatten(3).permute(0, 2, 3, 1)               # (B, T', N=h*w, D)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA. Separate q/k/v projections, as Flax's
    MultiHeadDotProductAttention, so that each maps onto one Scenic tensor."""

    def __init__(self, width: int, heads: int, attention_dropout: float):
        super().__init__()
        self.heads = heads
        self.attention_dropout = attention_dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        for layer in (self.query, self.key, self.value, self.out):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        # (B, N, D) → (B, nh, N, hs)
        q, k, v = (proj(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, N, D))  # (B, nh, N, hs) → (B, N, D)


class MLP(nn.Module):
    """Scenic's MlpBlock: Dense → GELU → dropout → Dense → dropout."""

    def __init__(self, width: int, mlp_dim: int, dropout: float, activation: str):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.dropout = nn.Dropout(dropout)
        for layer in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"
        x = self.dropout(F.gelu(self.fc1(x), approximate=approximate))
        return self.dropout(self.fc2(x))


class DropPath(nn.Module):
    """Stochastic depth per example. As Scenic (not timm), the kept branch is not rescaled by
    1/(1-p): training and evaluation then weight residual branches the way Scenic checkpoints expect."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype)


class Block(nn.Module):
    """Pre-LN transformer block (Scenic EncoderBlock)."""

    def __init__(self, width: int, heads: int, mlp_dim: int, dropout: float, attention_dropout: float,
                 drop_path: float, layer_norm_eps: float, activation: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.attn = Attention(width, heads, attention_dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = MLP(width, mlp_dim, dropout, activation)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.dropout(self.attn(self.norm1(x))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Encoder(nn.Module):
    """Token sequence → one vector: [CLS] + learned positions → blocks → LayerNorm → CLS or mean.

    Used twice: spatially (tokens = patches of one tubelet) and temporally (tokens = tubelets).
    """

    def __init__(self, config: ViViTConfig, num_tokens: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        width = config.width
        self.use_cls = config.classifier == "token"
        self.cls = nn.Parameter(torch.zeros(1, 1, width)) if self.use_cls else None
        self.pos_embedding = nn.Parameter(torch.empty(1, num_tokens + self.use_cls, width))
        nn.init.normal_(self.pos_embedding, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        # Stochastic depth grows linearly from 0 at the first block to drop_path at the last (Scenic).
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_dim, config.dropout, config.attention_dropout,
                  config.drop_path * i / max(depth - 1, 1), config.layer_norm_eps, config.activation)
            for i in range(depth))
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, N, D) → (B, D)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)   # (B, 1+N, D)
        x = self.dropout(x + self.pos_embedding)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        return x[:, 0] if self.cls is not None else x.mean(dim=1)


class Adapter(nn.Module):
    """SFA adapter: 2-layer MLP on each spatial feature, residual by default, with its output layer
    zero-initialised so that a freshly inserted adapter is the identity."""

    def __init__(self, config: ViViTConfig):
        super().__init__()
        hidden = config.adapter_dim or config.width
        self.residual = config.adapter_residual
        self.activation = config.activation
        self.fc1 = nn.Linear(config.width, hidden)
        self.fc2 = nn.Linear(hidden, config.width)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)
        if config.adapter_zero_init:
            nn.init.zeros_(self.fc2.weight)
        else:
            nn.init.xavier_uniform_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"
        y = self.fc2(F.gelu(self.fc1(x), approximate=approximate))
        return x + y if self.residual else y


def resample_positions_1d(pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linear interpolation of (L, D) position embeddings to (length, D), end points kept.

    Same as Scenic's `interpolate_1d_positional_embeddings` (scipy.ndimage.zoom, order=1), whose
    sample grid aligns the first and last positions.
    """
    if pos.shape[0] == length:
        return pos.clone()
    out = F.interpolate(pos.T.unsqueeze(0).float(), size=length, mode="linear", align_corners=True)
    return out[0].T.to(pos.dtype)


def resample_positions_2d(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubic resize of (g*g, D) patch-grid position embeddings to (grid*grid, D), as Hugging Face
    and timm do when the image size changes."""
    old = math.isqrt(pos.shape[0])
    if old * old != pos.shape[0]:
        raise ValueError(f"position embedding has {pos.shape[0]} patch positions, not a square grid")
    if old == grid:
        return pos.clone()
    x = pos.T.reshape(1, -1, old, old).float()                       # (1, D, g, g)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.reshape(-1, grid * grid).T.to(pos.dtype)                 # (grid*grid, D)


# ----------------------------------------------------------------------------------------------
# The factorised-encoder model
# ----------------------------------------------------------------------------------------------

class ViViT(nn.Module):
    """ViViT factorised encoder: tubelets → spatial encoder per tubelet → [adapter] → temporal
    encoder over tubelets → linear head(s).

    forward(video) takes a float tensor (B, T, C, H, W) and returns logits (B, classes), or a dict
    head → logits when `num_classes` is a dict (EPIC-KITCHENS verb/noun).
    """

    def __init__(self, config: ViViTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embedding = TubeletEmbedding(config)
        self.spatial = Encoder(config, config.grid**2, config.spatial_depth, config.heads, config.mlp_dim)
        # Registered even when absent, so that parameters keep one order whether the adapter came
        # with the config or from add_adapter().
        self.register_module("adapter", Adapter(config) if config.adapter else None)
        self.temporal = self._new_temporal()
        self.register_module("pre_logits", nn.Linear(config.width, config.representation_size)
                             if config.representation_size else None)
        self.head = nn.Linear(config.representation_size or config.width, config.total_classes)
        nn.init.zeros_(self.head.weight)   # Scenic zero-initialises output_projection
        nn.init.zeros_(self.head.bias)
        self.spatial_frozen = False

    def _new_temporal(self) -> Encoder:
        c = self.config
        return Encoder(c, c.num_tubelets, c.temporal_depth, c.temporal_heads or c.heads,
                       c.temporal_mlp_dim or c.mlp_dim)

    # Forward ------------------------------------------------------------------------------------
    def check_video(self, video: torch.Tensor) -> None:
        """Raise ValueError unless video is a float tensor (B, T, C, H, W) of this model's sizes."""
        c = self.config
        expected = f"(B, T={c.num_frames}, C={c.in_channels}, H={c.image_size}, W={c.image_size})"
        if not isinstance(video, torch.Tensor) or video.ndim != 5:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be a 5-d tensor {expected}, got {shape}")
        if not video.is_floating_point():
            raise ValueError(f"video must be a float tensor, got dtype {video.dtype}")
        _, T, C, H, W = video.shape
        if video.shape[1] == c.in_channels and video.shape[2] != c.in_channels:
            raise ValueError(f"video has shape {tuple(video.shape)}, which looks like (B, C, T, H, W); the model takes "
                             f"{expected}: pass video.permute(0, 2, 1, 3, 4)")
        if T != c.num_frames:
            hint = (f"; call model.resize_temporal({T}) to change the model's frame count"
                    if T % c.tubelet == 0 else f" (and {T} is not a multiple of the tubelet length {c.tubelet})")
            raise ValueError(f"video has {T} frames but the model was built for num_frames={c.num_frames}{hint}")
        if (C, H, W) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"video has shape {tuple(video.shape)}, expected {expected}")

    def _spatial(self, video: torch.Tensor) -> torch.Tensor:
        # Frames fold into the batch: each tubelet is one "image" for the spatial encoder.
        tokens = self.embedding(video)                        # (B, T', N, D)
        B, Tp, N, D = tokens.shape
        features = self.spatial(tokens.reshape(B * Tp, N, D))  # (B*T', D)
        return features.view(B, Tp, D)                         # (B, T', D)

    def spatial_features(self, video: torch.Tensor) -> torch.Tensor:
        """Spatial encoder output per tubelet, before the adapter: (B, T, C, H, W) → (B, T', D).

        When the spatial encoder is frozen this runs under no_grad, in eval mode, over
        `config.spatial_chunk` tubelets at a time, so no autograd graph is kept and activation
        memory is that of one chunk whatever the frame count.
        """
        self.check_video(video)
        if not self.spatial_frozen:
            return self._spatial(video)
        frames_per_chunk = (self.config.spatial_chunk or self.config.num_tubelets) * self.config.tubelet
        with torch.no_grad():
            chunks = [self._spatial(video[:, s:s + frames_per_chunk])
                      for s in range(0, video.shape[1], frames_per_chunk)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)

    def forward_head(self, features: torch.Tensor) -> Logits:
        """Spatial features (B, T', D) → adapter → temporal encoder → logits."""
        if self.adapter is not None:
            features = self.adapter(features)
        pooled = self.temporal(features)                        # (B, D)
        if self.pre_logits is not None:
            pooled = torch.tanh(self.pre_logits(pooled))        # (B, representation_size)
        logits = self.head(pooled)                              # (B, total_classes)
        classes = self.config.num_classes
        if isinstance(classes, dict):
            return dict(zip(classes, logits.split(list(classes.values()), dim=-1)))
        return logits

    def forward(self, video: torch.Tensor | None = None, *, features: torch.Tensor | None = None) -> Logits:
        """Logits of a video (B, T, C, H, W), or of precomputed spatial `features` (B, T', D), e.g.
        from the stage-2 feature cache."""
        if (video is None) == (features is None):
            raise ValueError("give exactly one of video and features")
        return self.forward_head(self.spatial_features(video) if features is None else features)

    # Stage-2 surgery ------------------------------------------------------------------------------
    def freeze_spatial(self) -> "ViViT":
        """Freeze tubelet embedding and spatial encoder: no gradients, eval mode (no dropout or
        drop-path) even under model.train(), no_grad forward in chunks. Returns self."""
        for module in (self.embedding, self.spatial):
            module.requires_grad_(False)
            module.eval()
        self.spatial_frozen = True
        return self

    def freeze_temporal(self) -> "ViViT":
        """Freeze the temporal encoder's parameters (Table 1, row II). Returns self."""
        self.temporal.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "ViViT":
        super().train(mode)
        if self.spatial_frozen:
            self.embedding.eval()
            self.spatial.eval()
        return self

    def add_adapter(self, adapter_dim: int | None = None, *, residual: bool = True,
                    zero_init: bool = True) -> "ViViT":
        """Insert the SFA adapter (stage 2). With the defaults the model's outputs do not change."""
        if self.adapter is not None:
            raise ValueError("this model already has an adapter")
        config = dataclasses.replace(self.config, adapter=True, adapter_dim=adapter_dim,
                                     adapter_residual=residual, adapter_zero_init=zero_init)
        ref = self.head.weight
        self.adapter = Adapter(config).to(device=ref.device, dtype=ref.dtype)
        self.config = config
        return self

    @torch.no_grad()
    def resize_temporal(self, num_frames: int) -> "ViViT":
        """Change the frame count: the temporal position embedding (CLS position kept) is
        interpolated linearly over tubelets, as Scenic does between stages. Returns self."""
        config = dataclasses.replace(self.config, num_frames=num_frames)   # validates
        pos = self.temporal.pos_embedding
        cls = int(self.temporal.use_cls)
        grid = resample_positions_1d(pos[0, cls:], config.num_tubelets)
        self.temporal.pos_embedding = nn.Parameter(torch.cat([pos[0, :cls], grid])[None],
                                                   requires_grad=pos.requires_grad)
        self.config = config
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (less memory, ~1/3 more compute)."""
        self.spatial.grad_checkpointing = enable
        self.temporal.grad_checkpointing = enable

    # Parameter bookkeeping -------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters by part: embedding, spatial, adapter, temporal, head (pre-logits included)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            "embedding": [], "spatial": [], "adapter": [], "temporal": [], "head": []}
        for name, param in self.named_parameters():
            part = name.split(".", 1)[0]
            groups["head" if part == "pre_logits" else part].append((name, param))
        return groups

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should see (requires_grad=True)."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self, trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable)

    def reset_temporal(self) -> "ViViT":
        """A fresh temporal encoder and a zero head (Table 1 rows I-III: only the spatial encoder is kept)."""
        self.temporal = self._new_temporal().to(self.head.weight.device)
        if self.pre_logits is not None:
            self.pre_logits.reset_parameters()
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
        return self

    def no_weight_decay(self) -> set[str]:
        """Parameter names that conventionally get no weight decay: positions, CLS, norms, biases."""
        return {name for name, p in self.named_parameters()
                if p.ndim <= 1 or name.endswith(("pos_embedding", ".cls"))}


# ----------------------------------------------------------------------------------------------
# Initialising one model from another (SFA stage 2 from stage 1, cross-dataset fine-tuning)
# ----------------------------------------------------------------------------------------------

ARCHITECTURE_FIELDS = ("width", "spatial_depth", "temporal_depth", "heads", "mlp_dim", "patch", "tubelet",
                       "in_channels", "classifier", "temporal_heads", "temporal_mlp_dim", "image_size",
                       "representation_size")


def architecture_differences(source: ViViTConfig, target: ViViTConfig) -> list[str]:
    """The fields whose weights could not carry over from `source` (a checkpoint) to `target` (a run)."""
    return [f"{k}: checkpoint {getattr(source, k)!r}, run {getattr(target, k)!r}" for k in ARCHITECTURE_FIELDS
            if getattr(source, k) != getattr(target, k)]


def init_from(source: ViViT, *, num_frames: int, num_classes: int | dict[str, int], drop_path: float,
              dropout: float, spatial_chunk: int, keep_temporal: bool = True) -> ViViT:
    """A new model with `source`'s architecture and weights, this run's frames, classes and
    regularisation: the temporal positions are resized to `num_frames`; the head is kept when the
    classes are the same, else starts at zero; keep_temporal=False starts the temporal encoder and head
    afresh. An adapter in `source` is kept."""
    same_classes = source.config.num_classes == num_classes      # dicts: the same heads, in any order
    config = dataclasses.replace(source.config, num_classes=num_classes, drop_path=drop_path, dropout=dropout,
                                 spatial_chunk=spatial_chunk)
    model = ViViT(config)
    state = {k: v for k, v in source.state_dict().items() if same_classes or not k.startswith("head.")}
    if same_classes and isinstance(num_classes, dict):
        # One output layer holds the heads back to back in the config's order: follow the heads by name
        # (Scenic's EPIC model puts nouns first, our EPIC data verbs first).
        state["head.weight"] = head_rows(source, list(num_classes), "weight")
        state["head.bias"] = head_rows(source, list(num_classes), "bias")
    model.load_state_dict(state, strict=same_classes)
    if config.num_frames != num_frames:
        model.resize_temporal(num_frames)
    if not keep_temporal:
        model.reset_temporal()
    return model


def head_rows(model: ViViT, order: list[str], part: str = "weight") -> torch.Tensor:
    """The output layer's `part` ('weight' or 'bias') with its heads' rows in `order` (head names)."""
    classes = model.config.num_classes
    tensor = getattr(model.head, part).detach()
    chunks = dict(zip(classes, tensor.split(list(classes.values()), dim=0)))
    return torch.cat([chunks[name] for name in order], dim=0)


def set_training_switches(model: ViViT, *, adapter: bool, adapter_dim: int | None, freeze_spatial: bool,
                          freeze_temporal: bool, spatial_chunk: int) -> ViViT:
    """What is trained (the paper's Table 1 switches): insert the adapter (the model's residual and
    zero-init choices), freeze the spatial and/or temporal encoder, chunk the frozen spatial pass.
    Raises ValueError when `model` already has an adapter and adapter=False."""
    if adapter and model.adapter is None:
        model.add_adapter(adapter_dim, residual=model.config.adapter_residual, zero_init=model.config.adapter_zero_init)
    elif not adapter and model.adapter is not None:
        raise ValueError("the checkpoint has an adapter but adapter=false; set adapter=true")
    if freeze_spatial:
        model.freeze_spatial()
    if freeze_temporal:
        model.freeze_temporal()
    model.config.spatial_chunk = spatial_chunk
    return model


def vivit(variant: str, *, num_frames: int, image_size: int, num_classes: int | dict[str, int],
          **overrides: Any) -> ViViT:
    """Build a ViViT-FE model of a named size.

    variant: one of Ti, S, B, L, H, g (case-insensitive for the letters that are unambiguous).
    num_frames: T, frames per clip (multiple of the tubelet length, 2 by default).
    image_size: frame side in pixels (multiple of the patch, 16 by default).
    num_classes: an int, or a dict head name → classes for several heads.
    overrides: any ViViTConfig field, e.g. spatial_depth, temporal_depth, width, heads, mlp_dim,
        tubelet, patch, adapter, classifier, drop_path, layer_norm_eps.
    Raises ValueError for an unknown variant or field, or sizes that do not fit.
    """
    sizes = _variant_sizes(variant)
    fields = {f.name for f in dataclasses.fields(ViViTConfig)} - {"num_frames", "image_size", "num_classes"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ViViT option(s) {unknown}; allowed: {sorted(fields)}")
    params = {**sizes[1], "variant": sizes[0], **overrides}
    return ViViT(ViViTConfig(num_frames=num_frames, image_size=image_size, num_classes=num_classes, **params))


def _variant_sizes(variant: str) -> tuple[str, dict[str, int]]:
    if isinstance(variant, str):
        for name, sizes in VARIANTS.items():
            if variant == name or variant.lower() == name.lower():
                return name, sizes
    raise ValueError(f"unknown ViViT variant {variant!r}; choose one of {list(VARIANTS)}")

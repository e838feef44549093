"""Clip augmentations of the paper's recipes (supplementary Table 1), in torch, same parameters for
every frame of a clip so that motion is preserved.

A clip is a uint8 tensor (T, H, W, C) as decoded; `train_transform` / `eval_views` return float
tensors (T, C, S, S) normalised for the image checkpoint. Mixup and label smoothing act on batches
and are called by the trainer.

Scale jitter, crop and flip follow Scenic/DMVR: the frames (short side ~256) are scaled by a random
factor in [min_scale, max_scale], then a random S×S crop is taken, then flipped with probability
0.5 where the labels allow it. RandAugment follows the TF EfficientNet implementation Scenic uses
(magnitude on a 0-10 scale; the recipes' 15 and 20 go beyond 10, as there).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

_MAX_LEVEL = 10.0
# Scenic/DMVR resize the short side to 256 for a 224 crop: the same ratio at any crop size.
RESIZE_RATIO = 256 / 224


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentations of one recipe. Defaults: Kinetics (random crop, flip 0.5, scale jitter 0.9-1.33,
    colour jitter 0.8, no RandAugment)."""
    min_scale: float = 0.9
    max_scale: float = 1.33
    flip_probability: float = 0.5
    color_jitter_probability: float = 0.8
    randaugment_layers: int = 0
    randaugment_magnitude: float = 0.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)   # ViT image checkpoints (in21k, augreg)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def validate(self) -> None:
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"min_scale={self.min_scale} and max_scale={self.max_scale} must satisfy 0 < min <= max")
        for name in ("flip_probability", "color_jitter_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.randaugment_layers < 0 or self.randaugment_magnitude < 0:
            raise ValueError("randaugment_layers and randaugment_magnitude must be >= 0")


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel, in place. x: (..., C, H, W) float."""
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return x.sub_(m).div_(s)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W); on uint8 (channels-last) torch's fast integer kernels run."""
    if x.shape[-2:] == (h, w):
        return x
    shrink = h < x.shape[-2] or w < x.shape[-1]   # antialiasing only matters when shrinking
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)


def crop_window(height: int, width: int, size: int, config: AugmentConfig,
                generator: torch.Generator) -> tuple[int, int, int]:
    """Scale jitter + random crop, as the square window (top, left, side) of the stored frames that
    becomes the size×size output. Scenic/DMVR resize the short side to 256 (for a 224 crop), scale
    by a random factor in [min_scale, max_scale], then crop; cropping the matching window first and
    resizing only it is the same, and lets the reader decode-and-crop before any copy."""
    short = min(height, width)
    u = torch.rand(3, generator=generator).tolist()
    scale = config.min_scale + (config.max_scale - config.min_scale) * u[0]
    side = max(1, min(short, round(size * short / (size * RESIZE_RATIO * scale))))
    return int(u[1] * (height - side + 1)), int(u[2] * (width - side + 1)), side


def finish_train(crops: torch.Tensor, size: int, config: AugmentConfig, generator: torch.Generator,
                 allow_flip: bool = True) -> torch.Tensor:
    """Cropped uint8 (T, side, side, C) → resize, flip, colour jitter, RandAugment, normalise →
    float (T, C, size, size)."""
    # Resize and flip on uint8 (4x less memory traffic than float), then convert once.
    x = _resize(crops.permute(0, 3, 1, 2), size, size)
    u = torch.rand(2, generator=generator).tolist()
    if allow_flip and u[0] < config.flip_probability:
        x = x.flip(-1)
    x = x.float().div_(255)   # stays channels-last, where the colour conv2d is several times faster
    if u[1] < config.color_jitter_probability:
        x = color_jitter(x, generator)
    for _ in range(config.randaugment_layers):
        x = randaugment_op(x, config.randaugment_magnitude, generator)
    return normalize(x.clamp_(0, 1), config.mean, config.std)


def train_transform(frames: torch.Tensor, size: int, config: AugmentConfig, generator: torch.Generator,
                    allow_flip: bool = True) -> torch.Tensor:
    """Augment one training clip: (T, H, W, C) uint8 → (T, C, size, size) float, normalised."""
    top, left, side = crop_window(frames.shape[1], frames.shape[2], size, config, generator)
    return finish_train(frames[:, top:top + side, left:left + side], size, config, generator, allow_flip)


def eval_views(frames: torch.Tensor, size: int, num_crops: int, config: AugmentConfig) -> torch.Tensor:
    """Evaluation crops of one clip: short side → size, then `num_crops` size×size crops evenly
    spaced along the long side (3: left/centre/right or top/centre/bottom).
    (T, H, W, C) uint8 → (num_crops, T, C, size, size)."""
    T, H, W, _ = frames.shape
    scale = size / min(H, W)
    h, w = max(size, round(H * scale)), max(size, round(W * scale))
    x = _resize(frames.permute(0, 3, 1, 2), h, w).float().div_(255)
    views = []
    for i in range(num_crops):
        frac = 0.5 if num_crops == 1 else i / (num_crops - 1)
        top = round((h - size) * frac) if h > w else (h - size) // 2
        left = round((w - size) * frac) if w >= h else (w - size) // 2
        views.append(x[:, :, top:top + size, left:left + size])
    return normalize(torch.stack(views), config.mean, config.std)


def color_jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast, saturation (each x0.6-1.4) and hue (±0.1 turn), in random order.

    Each is an affine map of RGB, so the four compose into one 3x3 matrix plus offset, applied in a
    single pass (contrast pulls towards the clip's mean gray, itself an affine function of the input).
    x: (T, C, H, W) in [0, 1]."""
    order = torch.randperm(4, generator=generator).tolist()
    factors = (0.6 + 0.8 * torch.rand(4, generator=generator)).tolist()
    gray = torch.tensor([0.299, 0.587, 0.114])
    matrix, offset = torch.eye(3), torch.zeros(3)
    mean_rgb = x.mean(dim=(0, 2, 3))
    for op in order:
        f = factors[op]
        if op == 0:      # brightness
            step, shift = torch.eye(3) * f, torch.zeros(3)
        elif op == 1:    # contrast: towards the mean gray of the image as it is at this point
            mean_gray = gray @ (matrix @ mean_rgb + offset)
            step, shift = torch.eye(3) * f, torch.full((3,), (1 - f) * float(mean_gray))
        elif op == 2:    # saturation: towards each pixel's gray
            step, shift = torch.eye(3) * f + (1 - f) * gray.expand(3, 3), torch.zeros(3)
        else:            # hue
            step, shift = _hue_matrix((f - 1.0) * 0.25), torch.zeros(3)
        matrix, offset = step @ matrix, step @ offset + shift
    y = F.conv2d(x, matrix.to(x.dtype)[:, :, None, None], offset.to(x.dtype))
    return y.clamp_(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _hue_matrix(turns: float) -> torch.Tensor:
    # Rotate chroma around the gray axis (YIQ): gray pixels are unchanged.
    theta = 2 * math.pi * turns
    c, s = math.cos(theta), math.sin(theta)
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float32)
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


def _affine(x: torch.Tensor, matrix: list[list[float]]) -> torch.Tensor:
    theta = torch.tensor(matrix, dtype=x.dtype).unsqueeze(0).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Fill outside the image with gray (0.5), as TF's RandAugment fills with 128.
    return F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5


RANDAUGMENT_OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize",
                   "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")


def randaugment_op(x: torch.Tensor, magnitude: float, generator: torch.Generator) -> torch.Tensor:
    """One RandAugment operation, chosen uniformly, at `magnitude` (0-10 scale, may exceed 10),
    with a random sign where the op has one. x: (T, C, H, W) in [0, 1]."""
    op = RANDAUGMENT_OPS[int(torch.randint(len(RANDAUGMENT_OPS), (), generator=generator))]
    level = magnitude / _MAX_LEVEL
    sign = 1.0 if torch.rand((), generator=generator).item() < 0.5 else -1.0
    if op == "identity":
        return x
    if op == "autocontrast":
        lo = x.amin(dim=(0, 2, 3), keepdim=True)
        hi = x.amax(dim=(0, 2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
    if op == "equalize":
        return _equalize(x)
    if op == "rotate":
        a = math.radians(30 * level * sign)
        return _affine(x, [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0]]).clamp(0, 1)
    if op == "solarize":
        threshold = 1.0 - min(level, 1.0)
        return torch.where(x >= threshold, 1 - x, x)
    if op == "posterize":
        bits = max(1, int(8 - 4 * min(level, 1.0)))
        q = 2 ** (8 - bits)
        return torch.floor(x * 255 / q) * q / 255
    if op in ("color", "contrast", "brightness", "sharpness"):
        f = max(0.0, 1.0 + 0.9 * level * sign)
        if op == "color":
            base = _gray(x)
        elif op == "contrast":
            base = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
        elif op == "brightness":
            base = torch.zeros_like(x)
        else:
            kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype) / 13
            kernel = kernel.expand(x.shape[1], 1, 3, 3)
            base = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])
        return (base + (x - base) * f).clamp(0, 1)
    if op in ("shear_x", "shear_y"):
        s = 0.3 * level * sign
        return _affine(x, [[1, s, 0], [0, 1, 0]] if op == "shear_x" else [[1, 0, 0], [s, 1, 0]]).clamp(0, 1)
    t = 2 * 0.45 * level * sign   # translate by up to 45% of the side (affine grid spans 2 units)
    return _affine(x, [[1, 0, t], [0, 1, 0]] if op == "translate_x" else [[1, 0, 0], [0, 1, t]]).clamp(0, 1)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel over the whole clip."""
    q = (x * 255).round().long().clamp(0, 255)
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        hist = torch.bincount(q[:, c].flatten(), minlength=256).float()
        cdf = hist.cumsum(0)
        cdf_min = cdf[cdf > 0][0]
        denom = (cdf[-1] - cdf_min).clamp_min(1)
        lut = ((cdf - cdf_min) / denom).clamp(0, 1)
        out[:, c] = lut[q[:, c]]
    return out


# ---------------------------------------------------------------------------------------------
# Batch-level hooks for the trainer
# ---------------------------------------------------------------------------------------------

def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Labels (B,) → targets (B, num_classes), smoothed: (1 - s) on the label + s / K everywhere."""
    target = F.one_hot(labels.long(), num_classes).float()
    if smoothing:
        target = target * (1 - smoothing) + smoothing / num_classes
    return target


def mixup(videos: torch.Tensor, targets: torch.Tensor, alpha: float,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) of a batch with its reverse, one λ ~ Beta(alpha, alpha) per batch,
    as Scenic. videos (B, ...), targets (B, K) soft labels → mixed videos and targets."""
    if alpha <= 0:
        return videos, targets
    gamma = torch.distributions.Gamma(torch.tensor([alpha, alpha]), torch.tensor([1.0, 1.0]))
    if generator is not None:  # Gamma has no generator argument: draw through the given one
        state = torch.random.get_rng_state()
        torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
        g = gamma.sample()
        torch.random.set_rng_state(state)
    else:
        g = gamma.sample()
    # λ stays a (CPU, 0-d) tensor: on XLA a Python number would be a constant of the graph, so every
    # step would compile a new one.
    lam = (g[0] / g.sum()).to(videos.dtype)
    mixed = videos * lam + videos.flip(0) * (1 - lam)
    return mixed, targets * lam + targets.flip(0) * (1 - lam)

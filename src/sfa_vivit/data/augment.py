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
    jitter = u[1] < config.color_jitter_probability
    mean_rgb = uint8_means(x) if jitter else None
    x = x.float().div_(255)
    if jitter:
        x = color_jitter(x, generator, mean_rgb)
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


# Every operation below gives the same bytes whatever the thread count and whichever CPU kernels torch
# dispatches to (AVX2, AVX-512, none): a clip must not depend on whether a DataLoader worker (one
# thread) or the main process (one thread per core) made it. Elementwise float operations are exact
# per element, so they are free to use; reductions (`mean`), convolutions and matrix products are not
# (their summation order follows the threads and the vector width), so the few this module needs are
# exact integer sums, Python arithmetic on a handful of numbers, or sums of shifted copies in a fixed
# order. tests/test_data.py holds this across thread counts and ATEN_CPU_CAPABILITY values.

_FIXED_POINT = 2.0 ** 32


def exact_mean(x: torch.Tensor, dim: tuple[int, ...]) -> list[float]:
    """Mean of x over `dim`, as Python floats, independent of threads and CPU kernels: each value is
    truncated to a multiple of 2**-32 (elementwise) and summed as int64, which is exact in any order.
    The error is below 2**-32. x: values in [0, 1]; the kept dimensions must flatten to a list."""
    fixed = x.double().mul_(_FIXED_POINT).long()
    count = math.prod(x.shape[d] for d in dim)
    return (fixed.sum(dim=dim).double() / (count * _FIXED_POINT)).flatten().tolist()


def uint8_means(x: torch.Tensor) -> list[float]:
    """Per-channel means of a uint8 (T, C, H, W) clip in [0, 1] units (value / 255), exact: from integer
    histograms (torch.bincount), whatever the summation order."""
    levels = torch.arange(256, dtype=torch.int64)
    count = x.numel() // x.shape[1]
    return [int((torch.bincount(x[:, c].flatten(), minlength=256) * levels).sum()) / (count * 255)
            for c in range(x.shape[1])]


def _mat3(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)] for i in range(3)]


def _vec3(a: list[list[float]], v: list[float]) -> list[float]:
    return [sum(a[i][k] * v[k] for k in range(3)) for i in range(3)]


def _eye3(f: float = 1.0) -> list[list[float]]:
    return [[f if i == j else 0.0 for j in range(3)] for i in range(3)]


_GRAY = (0.299, 0.587, 0.114)
_TO_YIQ = [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]]


def _inverse3(m: list[list[float]]) -> list[list[float]]:
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    adj = [[e * i - f * h, c * h - b * i, b * f - c * e],
           [f * g - d * i, a * i - c * g, c * d - a * f],
           [d * h - e * g, b * g - a * h, a * e - b * d]]
    return [[v / det for v in row] for row in adj]


_FROM_YIQ = _inverse3(_TO_YIQ)


def _apply_color_matrix(x: torch.Tensor, matrix: list[list[float]], offset: list[float]) -> torch.Tensor:
    """y_c = sum_k matrix[c][k] x_k + offset[c] per pixel, by elementwise operations in a fixed order, on
    contiguous channel planes (where they vectorise). x: (T, C, H, W) → a new (T, C, H, W)."""
    x = x.contiguous()
    out, term = torch.empty_like(x), torch.empty_like(x[:, 0])
    for c in range(3):
        y = out[:, c]
        torch.mul(x[:, 0], matrix[c][0], out=y)
        for k in (1, 2):
            y.add_(torch.mul(x[:, k], matrix[c][k], out=term))
        y.add_(offset[c])
    return out


def color_jitter(x: torch.Tensor, generator: torch.Generator, mean_rgb: list[float] | None = None) -> torch.Tensor:
    """Random brightness, contrast, saturation (each x0.6-1.4) and hue (±0.1 turn), in random order.

    Each is an affine map of RGB, so the four compose into one 3x3 matrix plus offset, applied in a
    single pass (contrast pulls towards the clip's mean gray, itself an affine function of the input).
    x: (T, C, H, W) in [0, 1]; `mean_rgb`: its per-channel means where the caller has them exactly
    (`uint8_means` of the uint8 clip x came from), else computed here (`exact_mean`)."""
    order = torch.randperm(4, generator=generator).tolist()
    factors = (0.6 + 0.8 * torch.rand(4, generator=generator)).tolist()
    matrix, offset = _eye3(), [0.0, 0.0, 0.0]
    mean_rgb = exact_mean(x, (0, 2, 3)) if mean_rgb is None else mean_rgb
    for op in order:
        f = factors[op]
        shift = [0.0, 0.0, 0.0]
        if op == 0:      # brightness
            step = _eye3(f)
        elif op == 1:    # contrast: towards the mean gray of the image as it is at this point
            current = [m + o for m, o in zip(_vec3(matrix, mean_rgb), offset)]
            mean_gray = sum(g * v for g, v in zip(_GRAY, current))
            step, shift = _eye3(f), [(1 - f) * mean_gray] * 3
        elif op == 2:    # saturation: towards each pixel's gray
            step = [[f * (i == j) + (1 - f) * _GRAY[j] for j in range(3)] for i in range(3)]
        else:            # hue
            step = _hue_matrix((f - 1.0) * 0.25)
        matrix, offset = _mat3(step, matrix), [s + t for s, t in zip(_vec3(step, offset), shift)]
    return _apply_color_matrix(x, matrix, offset).clamp_(0, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2]).unsqueeze(-3)


def _hue_matrix(turns: float) -> list[list[float]]:
    # Rotate chroma around the gray axis (YIQ): gray pixels are unchanged.
    theta = 2 * math.pi * turns
    c, s = math.cos(theta), math.sin(theta)
    rot = [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]]
    return _mat3(_FROM_YIQ, _mat3(rot, _TO_YIQ))


def _affine(x: torch.Tensor, matrix: list[list[float]]) -> torch.Tensor:
    """Bilinear resampling of x (T, C, H, W) at `matrix` (2x3, output → input in [-1, 1] coordinates, as
    `affine_grid` with align_corners=False), outside filled with gray (0.5, as TF's RandAugment fills with
    128). By gathering the four neighbours of each pixel (for all frames and channels at once) and weighting
    them elementwise, not `affine_grid` + `grid_sample`, whose results differ between CPU kernels."""
    T, C, H, W = x.shape
    xs = (torch.arange(W, dtype=torch.float64) * 2 + 1) / W - 1
    ys = (torch.arange(H, dtype=torch.float64) * 2 + 1) / H - 1
    (a, b, c), (d, e, f) = matrix
    px = ((xs[None, :] * a + ys[:, None] * b + c + 1) * W - 1) / 2      # (H, W) input pixel coordinates
    py = ((xs[None, :] * d + ys[:, None] * e + f + 1) * H - 1) / 2
    x0, y0 = px.floor(), py.floor()
    wx, wy = (px - x0).to(x.dtype), (py - y0).to(x.dtype)
    planes = (x - 0.5).reshape(T * C, H * W)                           # one row per frame and channel
    out, corner = torch.empty(T * C, H * W, dtype=x.dtype), torch.empty(T * C, H * W, dtype=x.dtype)
    for n, (dy, dx, weight) in enumerate(((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx),
                                          (1, 0, wy * (1 - wx)), (1, 1, wy * wx))):
        cx, cy = x0.long() + dx, y0.long() + dy
        inside = (cx >= 0) & (cx < W) & (cy >= 0) & (cy < H)
        index = (cy.clamp(0, H - 1) * W + cx.clamp(0, W - 1)).flatten()
        target = out if n == 0 else corner          # buffers reused: large allocations cost page faults
        torch.index_select(planes, 1, index, out=target).mul_((weight * inside).flatten())
        if n:
            out.add_(corner)
    return out.add_(0.5).reshape(T, C, H, W)


def _sharpen_base(x: torch.Tensor) -> torch.Tensor:
    """TF's sharpness blur ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13) with replicated edges: the 3x3 box sum
    (three columns, then three rows) plus 4 x the centre, over 13. Sums of shifted copies in a fixed order,
    not a convolution kernel whose summation order varies."""
    H, W = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    across = padded[..., 0:W] + padded[..., 1:W + 1] + padded[..., 2:W + 2]          # (..., H+2, W)
    box = across[..., 0:H, :] + across[..., 1:H + 1, :] + across[..., 2:H + 2, :]
    return (box + padded[..., 1:H + 1, 1:W + 1] * 4) / 13


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
            # Towards the mean of the gray image quantised to 8 bits (exact integer counts, any summation order).
            gray8 = _gray(x).mul(255).round_().clamp_(0, 255).to(torch.uint8)
            base = torch.tensor(uint8_means(gray8)[0], dtype=x.dtype)
        elif op == "brightness":
            base = torch.zeros_like(x)
        else:
            base = _sharpen_base(x)
        return (base + (x - base) * f).clamp(0, 1)
    if op in ("shear_x", "shear_y"):
        s = 0.3 * level * sign
        return _affine(x, [[1, s, 0], [0, 1, 0]] if op == "shear_x" else [[1, 0, 0], [s, 1, 0]]).clamp(0, 1)
    t = 2 * 0.45 * level * sign   # translate by up to 45% of the side (affine grid spans 2 units)
    return _affine(x, [[1, 0, t], [0, 1, 0]] if op == "translate_x" else [[1, 0, 0], [0, 1, t]]).clamp(0, 1)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel over the whole clip (integer counts: exact in any order)."""
    q = (x * 255).round().long().clamp(0, 255)
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        hist = torch.bincount(q[:, c].flatten(), minlength=256)
        cdf = hist.cumsum(0)
        cdf_min = int(cdf[cdf > 0][0])
        denom = max(int(cdf[-1]) - cdf_min, 1)
        lut = ((cdf - cdf_min).double() / denom).clamp(0, 1).to(x.dtype)
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

"""What a training run costs, in forward FLOPs, for the conventional recipe and for SFA.

The parts of one clip's forward pass (multiply-add = 2 FLOPs; norms, activations and softmax left out):

    block(N tokens)  = 2 N (4 D^2 + 2 D M) + 4 N^2 D          q/k/v/out and MLP matmuls, QK^T and AV
    S  spatial       = F/t tubelets x (L_s blocks of N_s = (I/p)^2 + 1 tokens + the tubelet embedding)
    T  temporal      = L_t blocks of N_t = F/t + 1 tokens, and the head
    A  adapter       = F/t tubelets x 2 layers x 2 D a

A training step costs about three forwards where gradients flow (backward ~ 2 x forward):

    full step        = 3 (S + T)
    stage-2 step     = S + 3 (A + T)          the frozen spatial encoder runs forward only
    cached step      = 3 (A + T)              its features come from the cache

and a run of E epochs (per training clip; validation left out, as in the paper's train times):

    conventional     = E x full(F)
    SFA              = E x full(8)  +  E x stage2(F)
    SFA + cache      = E x full(8)  +  K x S(F)  +  E x cached(F)     K cached views per clip

`forward_flops` is checked against torch's FLOP counter on the model itself (tests/test_costmodel.py).
The model ignores data loading, the optimizer and memory-bound work: the cached step in particular is
dominated by them at small sizes, so its figure is a lower bound.
"""

from __future__ import annotations

import dataclasses

from sfa_vivit.models.vivit import ViViTConfig


def _block(tokens: int, width: int, mlp: int) -> float:
    return 2 * tokens * (4 * width**2 + 2 * width * mlp) + 4 * tokens**2 * width


def forward_flops(config: ViViTConfig) -> dict[str, float]:
    """Forward FLOPs of one clip: spatial encoder with the tubelet embedding (S), temporal encoder and
    head (T), adapter (A; counted whether or not `config.adapter` is on)."""
    c = config
    d, n = c.width, c.num_tubelets
    patches = c.grid**2
    embed = 2 * patches * (c.tubelet * c.patch**2 * c.in_channels) * d
    spatial = n * (c.spatial_depth * _block(patches + 1, d, c.mlp_dim) + embed)
    temporal_mlp = c.temporal_mlp_dim or c.mlp_dim
    temporal = c.temporal_depth * _block(n + 1, d, temporal_mlp) + 2 * d * c.total_classes
    adapter = n * 2 * 2 * d * (c.adapter_dim or d)
    return {"S": float(spatial), "T": float(temporal), "A": float(adapter)}


def step_flops(config: ViViTConfig) -> dict[str, float]:
    """FLOPs of one training step per clip, by mode: full, stage2, stage2-cached."""
    f = forward_flops(config)
    return {"full": 3 * (f["S"] + f["T"]), "stage2": f["S"] + 3 * (f["A"] + f["T"]),
            "stage2-cached": 3 * (f["A"] + f["T"])}


def run_ratios(config: ViViTConfig, epochs: int, cache_views: int, stage1_frames: int = 8) -> dict[str, float]:
    """Total training cost of SFA and of SFA with the cache, each over the conventional recipe at
    `config.num_frames` for the same epochs; and stage 1's share."""
    target, stage1 = step_flops(config), step_flops(dataclasses.replace(config, num_frames=stage1_frames))
    spatial = forward_flops(config)["S"]
    conventional = epochs * target["full"]
    first = epochs * stage1["full"]
    return {"stage1_share": first / conventional,
            "sfa": (first + epochs * target["stage2"]) / conventional,
            "sfa_cached": (first + cache_views * spatial + epochs * target["stage2-cached"]) / conventional}


"""The cost model behind bench/projection.py, checked against torch's FLOP counter on the model."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sfa_vivit.models import vivit
from sfa_vivit.tools.costmodel import forward_flops, run_ratios, step_flops


@pytest.mark.parametrize("frames,adapter", [(4, False), (8, True)])
def test_forward_flops_match_the_flop_counter(frames, adapter):
    model = vivit("Ti", num_frames=frames, image_size=32, num_classes=10, width=48, spatial_depth=2,
                  temporal_depth=2, heads=2, mlp_dim=96, patch=8, adapter=adapter, adapter_dim=24).eval()
    counter = FlopCounterMode(display=False)
    # The math backend computes attention as matmuls, which the counter sees (CPU's fused kernel it does not).
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(1, frames, 3, 32, 32))
    parts = forward_flops(model.config)
    expected = parts["S"] + parts["T"] + (parts["A"] if adapter else 0)
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.01)


def test_step_and_run_ratios_follow_the_frame_count():
    model = vivit("B", num_frames=32, image_size=224, num_classes=400).config
    steps = step_flops(model)
    assert 0.3 < steps["stage2"] / steps["full"] < 0.36          # no backward below the adapter
    assert steps["stage2-cached"] / steps["full"] < 0.01          # the spatial encoder is most of it
    r = run_ratios(model, epochs=30, cache_views=2)
    assert r["stage1_share"] == pytest.approx(0.25, abs=0.01)    # 8 of 32 frames, spatial-dominated
    assert r["sfa_cached"] < r["sfa"] < 1

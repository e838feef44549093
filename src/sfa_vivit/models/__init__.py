"""Models: the ViViT factorised encoder and its variants."""

from sfa_vivit.models.vivit import VARIANTS, ViViT, ViViTConfig, vivit

__all__ = ["VARIANTS", "ViViT", "ViViTConfig", "vivit"]

"""The model and every format of its weights: the ViViT factorised encoder and its variants (`vivit`), its
checkpoints (`checkpoints`: safetensors + JSON, committed atomically on any fsspec URL), image-ViT and Scenic
weights in and out (`importers`), and the MLflow model that serves a checkpoint (`mlflow_model`)."""

from sfa_vivit.models.vivit import VARIANTS, ViViT, ViViTConfig, vivit

__all__ = ["VARIANTS", "ViViT", "ViViTConfig", "vivit"]

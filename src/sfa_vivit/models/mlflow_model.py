"""A trained ViViT as an MLflow model, without pickling anything.

MLflow's "models from code": this file is logged with the run and `mlflow.models.set_model` names the
model it defines; the weights travel as the run's own checkpoint folder (safetensors + JSON, checked
against its sha256 on load). `mlflow.pyfunc.load_model("runs:/<run id>/model").predict(videos)` takes
float32 videos (B, T, C, H, W), normalised as in training, and returns the logits (B, classes), or one
array per head for a multi-head model.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np


class ViViTModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from sfa_vivit.models import checkpoints
        self.model = checkpoints.load(context.artifacts["checkpoint"]).model.eval()

    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> Any:
        import torch
        if isinstance(model_input, dict):      # a named tensor input ("videos") arrives as {name: array}
            (model_input,) = model_input.values()
        with torch.no_grad():
            out = self.model(torch.as_tensor(np.asarray(model_input, dtype=np.float32)))
        if isinstance(out, dict):
            return {head: logits.numpy() for head, logits in out.items()}
        return out.numpy()


mlflow.models.set_model(ViViTModel())

"""Kubeflow Pipelines v2 over the library: step functions, components, pipelines, profiles, runner."""

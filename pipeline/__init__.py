"""Orchestration of NPPNet-TF runs: the `nppnet` CLI, pipeline stages, MLflow.

Nothing in `nppnet_tf` or `beam_jobs` imports this package.
"""

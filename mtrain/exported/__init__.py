"""Exported models: a checkpoint consolidated into a model directory, verified, loaded, and
written as a transformers model."""

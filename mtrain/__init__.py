"""Pretrain GPT-style models on symbolic music."""

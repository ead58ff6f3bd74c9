"""Evaluation and training entry points of multilingual-clip-hf."""

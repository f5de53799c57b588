"""Inference: a run's base + adapters loaded, generation, CUDA-graph decoding."""

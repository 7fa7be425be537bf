"""Evaluation: perplexity and device placement."""

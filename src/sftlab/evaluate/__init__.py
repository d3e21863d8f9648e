"""Evaluation: loss and perplexity on held-out data (more metrics land with the eval issue)."""

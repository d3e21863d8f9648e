"""Evaluation: loss and perplexity, generation metrics, benchmark tasks, base-vs-tuned runs and reports."""

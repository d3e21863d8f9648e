"""Scores that tasks, the loop and `sftlab eval` share: eval loss and perplexity, text metrics."""

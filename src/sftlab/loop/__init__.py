"""The training loop and what it keeps: the step, AdamW and schedules, checkpoints, metrics.jsonl and status."""

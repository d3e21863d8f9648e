"""Exports of a trained run: the merged Hugging Face model, checked against the run before it is kept."""

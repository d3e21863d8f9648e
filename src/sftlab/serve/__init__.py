"""Talking to a trained model: terminal chat and an OpenAI-compatible HTTP server."""

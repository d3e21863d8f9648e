"""sftlab ui: the runs dashboard and blind human evaluation (FastAPI + plain HTML/JS, no CDN)."""

"""Offline data tools apart from the training path: `sftlab data clean|split|stats|synth`."""

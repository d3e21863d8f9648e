"""The model half: find and load the base, wrap it for train.method, its precision, the training loss."""

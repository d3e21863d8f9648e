"""The data half of SFT: files -> Conversation -> template -> tokens + labels -> batches."""

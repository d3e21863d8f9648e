"""sftlab: supervised fine-tuning of language models with an exactly right loss."""

__version__ = "0.1.0"

"""factory: recommendation logs in, LLM-generated training data and caches out."""

__version__ = "0.1.0"

"""Integrations of pagedkv with model libraries (transformers: :mod:`.transformers`)."""

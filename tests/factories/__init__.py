"""Tiny random-weight models and tokenizers built offline inside the tests."""

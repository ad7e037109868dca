# cython: language_level=3
"""Placeholder while the mqtt codec is written."""

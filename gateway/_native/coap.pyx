# cython: language_level=3
"""Placeholder while the coap codec is written."""

"""Distributed tensor-parallel inference runtime for Llama-family models."""

__version__ = "0.1.0"

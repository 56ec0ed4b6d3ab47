"""Helpers to run real vLLM on a CPU: a tiny model and server processes."""

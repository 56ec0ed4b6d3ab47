"""Loggers under vLLM's ``vllm`` namespace, so plugin messages get vLLM's
format, level and handlers (``VLLM_LOGGING_LEVEL``) in every process."""

from __future__ import annotations

import logging


def get_logger(name: str) -> logging.Logger:
    try:
        from vllm.logger import init_logger
    except ImportError:  # the proxy runs without vLLM
        return logging.getLogger(name)
    return init_logger(f"vllm.plugins.{name}")

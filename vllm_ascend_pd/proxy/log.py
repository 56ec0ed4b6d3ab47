"""Logger factory: vLLM's logger when vLLM is importable, else ``logging``.

Importing ``vllm.logger`` pulls in torch (seconds of start-up), so it can be
skipped with ``VLLM_ASCEND_PD_PLAIN_LOGGING=1``; the proxy itself never needs
vLLM.
"""

from __future__ import annotations

import logging
import os

PLAIN_LOGGING_ENV = "VLLM_ASCEND_PD_PLAIN_LOGGING"


def init_logger(name: str) -> logging.Logger:
    if os.environ.get(PLAIN_LOGGING_ENV, "") not in ("1", "true", "yes"):
        try:
            from vllm.logger import init_logger as _vllm_init_logger
        except Exception:  # ImportError, or a broken torch install
            pass
        else:
            return _vllm_init_logger(name)
    return logging.getLogger(name)

"""``vllm.general_plugins`` entry point: registers AscendSimpleConnector.

vLLM runs general plugins in every process (API server, engine core,
workers), so registration must be idempotent and cheap.
"""

from __future__ import annotations

CONNECTOR_NAME = "AscendSimpleConnector"
CONNECTOR_MODULE = "vllm_ascend_pd.connector.connector"
CONNECTOR_CLASS = "AscendSimpleConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm_ascend_pd.compat import check_vllm_version
    from vllm_ascend_pd.log import get_logger

    logger = get_logger(__name__)
    problem = check_vllm_version()
    if problem:
        logger.warning("vllm-ascend-pd: %s", problem)
    registry = getattr(KVConnectorFactory, "_registry", {})
    if CONNECTOR_NAME in registry:
        return
    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_CLASS)
    except ValueError:
        pass  # registered concurrently or by an older copy: either way usable

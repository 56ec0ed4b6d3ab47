"""xPyD prefill/decode disaggregation proxy for vLLM.

Entry points: :func:`vllm_ascend_pd.proxy.app.create_app`,
:class:`vllm_ascend_pd.proxy.config.ProxyConfig`,
:class:`vllm_ascend_pd.proxy.server.ProxyServer` and the
``p2p-disagg-proxy`` console script (:func:`vllm_ascend_pd.proxy.__main__.main`).
Nothing here imports vLLM or the KV connector.
"""

from vllm_ascend_pd.proxy.app import create_app
from vllm_ascend_pd.proxy.config import ConfigError, ProxyConfig

__all__ = ["create_app", "ProxyConfig", "ConfigError"]

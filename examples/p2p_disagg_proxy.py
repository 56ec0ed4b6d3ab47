"""Run the xPyD disaggregation proxy (same as the ``p2p-disagg-proxy`` command).

    python examples/p2p_disagg_proxy.py \
        --prefill 127.0.0.1:8100 --decode 127.0.0.1:8200 --port 8000

See docs/proxy.md for every flag.
"""

import sys

from vllm_ascend_pd.proxy.__main__ import main

if __name__ == "__main__":
    sys.exit(main())

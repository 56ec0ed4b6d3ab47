import sys

from vllm_ascend_pd.cli import main

sys.exit(main())

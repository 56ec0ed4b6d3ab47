"""vllm-ascend-pd: prefill/decode disaggregation for vLLM on Ascend NPUs.

Importing the package is cheap: vLLM, torch and NPU packages load only in
the modules that need them.
"""

__version__ = "0.1.0"

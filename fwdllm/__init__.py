"""fwdllm: federated fine-tuning of language models with forward gradients (inference only on devices)."""

__version__ = "0.1.0"

"""fwdllm: federated fine-tuning of language models with forward gradients (inference only on devices).

The Python API (``fwdllm.api``, loaded on first use): ``export_bundle``, ``run_simulation``,
``open_backend``, ``load_dataset``.
"""

__version__ = "0.1.0"

API = ("export_bundle", "run_simulation", "open_backend", "load_dataset")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from fwdllm import api

        return getattr(api, name)
    raise AttributeError(f"module 'fwdllm' has no attribute {name!r}")

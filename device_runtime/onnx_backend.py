"""The ONNX Runtime backend: execution providers by name with a fallback order, IOBinding.

Options: ``providers`` (list of short names, default ``["auto"]``: every accelerator this
build has, best first, then CPU), ``provider_options`` ({short name: {key: value}}),
``threads`` (intra-op threads, default 1), ``optimization`` (disable|basic|extended|all,
default all), ``prefix_reuse``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fwdllm.device_runtime.backend import BackendError
from fwdllm.device_runtime.graph_backend import GraphBackend, check_io, check_theta_dim
from fwdllm.proto.manifest import GraphSpec
from fwdllm.proto.names import GraphFormat

log = logging.getLogger(__name__)

#: short name -> ONNX Runtime provider, in the order "auto" prefers them (CPU always last).
PROVIDERS = {
    "qnn": "QNNExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "cpu": "CPUExecutionProvider",
}

OPTIMIZATION = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

_NUMPY = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build has, in preference order."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in have]


def resolve_providers(requested: list[str] | None) -> list[str]:
    """Requested short names that this build has, in the order given, with CPU as the last resort."""
    have = available_providers()
    requested = [r.lower() for r in (requested or ["auto"])]
    unknown = [r for r in requested if r not in PROVIDERS and r != "auto"]
    if unknown:
        raise BackendError(f"unknown onnxruntime provider(s) {unknown}; choose from {list(PROVIDERS)} or auto")
    chosen: list[str] = []
    for r in requested:
        for name in have if r == "auto" else [r]:
            if name not in have:
                log.warning("onnxruntime provider %s is not in this build (it has %s); falling back", name, have)
            elif name not in chosen:
                chosen.append(name)
    if "cpu" not in chosen:
        chosen.append("cpu")
    return chosen


class OnnxBackend(GraphBackend):
    name = "onnxruntime"
    graph_format = GraphFormat.ONNX

    @classmethod
    def runtime_info(cls) -> dict[str, Any]:
        import onnxruntime

        return {"version": onnxruntime.__version__, "providers": available_providers()}

    @classmethod
    def cli_options(cls, args: Any) -> dict[str, Any]:
        return {"optimization": args.optimization, **({"providers": args.provider} if args.provider else {})}

    @classmethod
    def delegate_options(cls, threads: int, libraries: list[str]) -> list[tuple[str, dict[str, Any]]]:
        return [(p, {"providers": [p], "threads": threads}) for p in available_providers()]

    def __init__(self, bundle_dir, manifest, graph, options):
        import onnxruntime as ort

        self._ort = ort
        self.threads = int(options.get("threads", 1))
        level = options.get("optimization", "all")
        if level not in OPTIMIZATION:
            raise BackendError(f"unknown graph optimisation level {level!r}; choose from {list(OPTIMIZATION)}")
        self.optimization = level
        self.provider_names = resolve_providers(options.get("providers"))
        self._provider_options = options.get("provider_options", {})
        super().__init__(bundle_dir, manifest, graph, options)

    def _session_options(self):
        so = self._ort.SessionOptions()
        so.graph_optimization_level = getattr(self._ort.GraphOptimizationLevel, OPTIMIZATION[self.optimization])
        # XNNPACK runs its own thread pool; ORT's docs advise one ORT thread and no spinning with it.
        xnn = "xnnpack" in self.provider_names
        so.intra_op_num_threads = 1 if xnn else self.threads
        so.inter_op_num_threads = 1
        if xnn:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        return so

    def _provider_list(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for short in self.provider_names:
            opts = dict(self._provider_options.get(short, {}))
            if short == "xnnpack":
                opts.setdefault("intra_op_num_threads", str(self.threads))
            out.append((PROVIDERS[short], {k: str(v) for k, v in opts.items()}))
        return out

    def _load(self, spec: GraphSpec, path: Path):
        if not path.is_file():
            raise BackendError(f"graph file {path} is missing; copy the whole bundle folder again")
        try:
            session = self._ort.InferenceSession(
                str(path), sess_options=self._session_options(), providers=self._provider_list()
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/InvalidGraph types
            raise BackendError(
                f"onnxruntime cannot load {path.name}: it is corrupt, truncated or not an ONNX "
                f"graph ({str(exc).splitlines()[0][:200]}); copy or re-export the bundle"
            ) from exc
        inputs = {i.name: i for i in session.get_inputs()}
        check_io(spec, list(inputs), [o.name for o in session.get_outputs()], path, by_name=True)
        if "theta" in inputs:
            check_theta_dim(spec, inputs["theta"].shape, self.manifest.theta.dim, path)
        dtypes = {name: _NUMPY.get(i.type, np.float32) for name, i in inputs.items()}
        return session, dtypes

    def _run(self, handle, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session, dtypes = handle
        binding = session.io_binding()
        for name, value in feeds.items():
            # Bound in place when dtype and layout already match; astype copies only if they do not.
            binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=dtypes[name]))
        for out in spec.outputs:
            binding.bind_output(out.name, "cpu")
        session.run_with_iobinding(binding)
        return dict(zip((o.name for o in spec.outputs), binding.copy_outputs_to_cpu()))

    def info(self) -> dict[str, Any]:
        session = next(iter(self._handles.values()))[0]
        return {
            "backend": self.name,
            "version": self._ort.__version__,
            "providers": session.get_providers(),
            "threads": self.threads,
            "optimization": self.optimization,
            "delegated_share": None,  # ORT places nodes itself; nothing is delegated away from the CPU EP here
            **self.graph_info(),
        }

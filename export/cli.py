"""`fwdllm export`, `fwdllm inspect` and `fwdllm export-peft`."""

from __future__ import annotations

import argparse

from fwdllm.proto.names import GraphFormat, Precision, Task


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="turn a Hugging Face checkpoint + PEFT choice into a bundle (BUNDLE.md)",
        description="Export a model whose PEFT parameters θ are a graph input with a perturbation axis, "
        "validate every graph against PyTorch, and write a bundle.",
    )
    p.add_argument(
        "--model", required=True, help="Hugging Face checkpoint folder, or a shipped default: minilm | smollm2"
    )
    p.add_argument("--task", required=True, choices=list(Task))
    p.add_argument("--labels", type=int, help="number of classes (seq-cls)")
    p.add_argument(
        "--label-names",
        type=_csv,
        help="class names, comma-separated (seq-cls: sets --labels; causal-lm: the label words the model "
        "answers with after the prompt, each starting with a distinct token)",
    )
    p.add_argument(
        "--peft",
        default="lora",
        choices=["head", "bitfit", "adapter", "lora"],
        help="trainable parameters (default lora)",
    )
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument(
        "--lora-targets",
        type=_csv,
        default=[],
        help="Linear names, comma-separated (default: the architecture's query/value)",
    )
    p.add_argument("--adapter-reduction", type=int, default=16, help="adapter bottleneck = hidden / this (default 16)")
    p.add_argument(
        "--trainable-layers",
        default="all",
        help="head | top:K | all (default all); head or top:K also write prefix/suffix graphs",
    )
    p.add_argument(
        "--from-peft-adapter",
        metavar="DIR",
        help="start θ from an existing peft LoRA adapter folder (an export-peft classifier folder also gives its "
        "trained head and label names)",
    )
    p.add_argument(
        "--format", type=_csv, default=[GraphFormat.ONNX], help=f"{','.join(GraphFormat)} (default {GraphFormat.ONNX})"
    )
    p.add_argument("--precision", type=_csv, help=f"e.g. {','.join(Precision)}; each format takes those it supports")
    p.add_argument("--seq-len", type=int, default=64, help="sequence length (fixed in TFLite graphs; default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size fixed in TFLite graphs (default 8)")
    p.add_argument("--perturbations", type=int, default=8, help="θ rows P fixed in TFLite graphs (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial LoRA/adapter values")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.set_defaults(handler=_export)

    q = subparsers.add_parser("inspect", help="print a bundle's manifest for people")
    q.add_argument("bundle")
    q.add_argument("--json", action="store_true", help="the manifest as JSON")
    q.set_defaults(handler=_inspect)

    r = subparsers.add_parser(
        "export-peft",
        help="write a trained θ as a Hugging Face peft adapter or merged checkpoint",
    )
    r.add_argument("bundle")
    r.add_argument("--theta", required=True, help="θ safetensors (the bundle's layout), e.g. a coordinator checkpoint")
    r.add_argument("--out", required=True)
    r.add_argument("--merged", action="store_true", help="write a merged checkpoint instead of a peft adapter")
    r.add_argument(
        "--format",
        choices=["hf", "gguf"],
        default="hf",
        help="hf: a peft adapter or merged checkpoint (default); "
        "gguf: a llama.cpp LoRA adapter (decoder bundles with GGUF)",
    )
    r.add_argument(
        "--hub-id",
        help="the Hugging Face Hub repository you will upload OUT to (e.g. me/minilm-bbc): a classifier's LoRA "
        "adapter names it as its base model, so AutoPeftModelForSequenceClassification loads it by that name",
    )
    r.set_defaults(handler=_export_peft)

    i = subparsers.add_parser(
        "export-inference",
        help="fold a trained θ into an inference model: input_ids, attention_mask -> logits [batch, labels]",
        description="Write a deployable model with θ in its weights and the label names in its metadata: "
        "an ONNX folder as Optimum lays it out, a TFLite file, or a decoder's merged GGUF for llama.cpp.",
    )
    i.add_argument("bundle")
    i.add_argument("--theta", required=True, help="θ safetensors (the bundle's layout), e.g. a coordinator checkpoint")
    i.add_argument("--format", required=True, choices=[GraphFormat.ONNX, GraphFormat.TFLITE, GraphFormat.GGUF])
    i.add_argument("--precision", help="onnx: fp32 | int8; tflite: fp32 | fp16 | int8; gguf: f16 | q8_0 | q4_0")
    i.add_argument("--batch-size", type=int, default=1, help="batch size fixed in the TFLite graph (default 1)")
    i.add_argument("--seq-len", type=int, help="sequence length fixed in the TFLite graph (default: the bundle's)")
    i.add_argument("--out", required=True)
    i.set_defaults(handler=_export_inference)


def _export(args: argparse.Namespace) -> int:
    """Libraries (torch, torchao, transformers, litert-torch, the quantizer) print while they load and convert,
    on stdout and stderr and from C++: all of it goes to the command's log file, the bundle summary to stdout."""
    from pathlib import Path

    from fwdllm.console import library_output_to_log

    with library_output_to_log():
        from fwdllm.export.pipeline import ExportRequest, export
        from fwdllm.export.plan import PeftOptions

        req = ExportRequest(
            model=args.model,
            task=args.task,
            out=Path(args.out),
            formats=args.format,
            precisions=args.precision,
            num_labels=args.labels,
            label_names=args.label_names,
            peft=PeftOptions(
                method=args.peft,
                trainable_layers=args.trainable_layers,
                lora_r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_targets=args.lora_targets,
                adapter_reduction=args.adapter_reduction,
                from_peft_adapter=args.from_peft_adapter,
                seed=args.seed,
            ),
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            perturbations=args.perturbations,
        )
        manifest = export(req)
    from fwdllm.export.inspect_bundle import describe

    print(describe(manifest, Path(args.out)))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fwdllm.export.inspect_bundle import describe
    from fwdllm.proto.manifest import load_manifest

    manifest = load_manifest(Path(args.bundle))
    print(json.dumps(manifest.to_json(), indent=2) if args.json else describe(manifest, Path(args.bundle)))
    return 0


def _export_peft(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fwdllm.console import library_output_to_log
    from fwdllm.errors import UserError

    if args.merged and args.format == "gguf":
        raise UserError("--merged applies to --format hf; llama.cpp applies the gguf adapter with --lora")
    with library_output_to_log():  # torch, transformers and peft, as in `_export`
        from fwdllm.export.peft_out import export_peft

        if args.format == "gguf":
            from fwdllm.export.llama_adapter_out import export_llama_adapter

            written = export_llama_adapter(Path(args.bundle), Path(args.theta), Path(args.out))
        else:
            written = export_peft(
                Path(args.bundle), Path(args.theta), Path(args.out), merged=args.merged, hub_id=args.hub_id
            )
    print(f"wrote {', '.join(sorted(p.name for p in written))} to {args.out}")
    return 0


def _export_inference(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fwdllm.console import library_output_to_log
    from fwdllm.export.inference_graphs import check_request, export_inference

    check_request(args.format, args.precision)
    with library_output_to_log():  # torch, transformers and the converters, as in `_export`
        written, err = export_inference(
            Path(args.bundle),
            Path(args.theta),
            args.format,
            Path(args.out),
            args.precision,
            args.batch_size,
            args.seq_len,
        )
    checked = "" if err is None else f"; logits within {err:.2g} of the bundle's graph at θ"
    print(f"wrote {', '.join(p.name for p in written)} to {args.out}{checked}")
    return 0

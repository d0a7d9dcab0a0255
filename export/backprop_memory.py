"""The backprop reference of ``fwdllm bench``: PyTorch LoRA (r 8, query/value) + AdamW on a bundle's model.

A bench row's peak RSS is compared with what training the same model by backprop holds. This
needs torch, so it lives with the exporter and runs in its own process
(``python -m fwdllm.export.backprop_memory SPEC``, printing one JSON line); the device runtime
only starts that process and reads the line.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from fwdllm.device_runtime.bench import peak_rss_mb


def run_backprop(spec: dict[str, Any]) -> dict[str, Any]:
    """Three training steps on a batch of ``spec["batch"]`` rows: the median step time and the peak RSS."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from fwdllm.export.models import resolve
    from fwdllm.proto.manifest import load_manifest

    torch.set_num_threads(spec["threads"])
    manifest = load_manifest(Path(spec["bundle"]))
    folder, _ = resolve(manifest.model.source)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=manifest.model.num_labels or 2)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(1000, 20000, (spec["batch"], manifest.model.max_seq_len))
    labels = torch.zeros(spec["batch"], dtype=torch.long)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append((time.perf_counter() - t) * 1000)
    return {"train_step_ms": statistics.median(times), "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    print(json.dumps(run_backprop(json.loads(sys.argv[1]))))

"""The top layers of a base GGUF as a model of their own, which llama.cpp runs from hidden states.

A label-word bundle trained on ``top:K`` leaves every layer below ``first_layer = L − K``
frozen, so those layers' output for an example never changes between perturbations.
llama.cpp cannot start a pass at a layer, but it can start one from embeddings
(``llama_batch.embd``), and a llama or qwen model adds nothing to its input embeddings before
the first layer. So the suffix is a GGUF of the base's architecture whose blocks are the base model's blocks
``first_layer … L−1`` renumbered from 0; fed the residual stream after layer
``first_layer − 1`` it computes what the base model computes above that point.

The tensors are copied byte for byte from the base file of the same precision, so the
suffix's arithmetic is the base model's: its label logits equal the uncut model's bit for
bit (``tests/test_llama_prefix_reuse.py``). Only the label words' rows of the output matrix
are kept and the vocabulary is llama.cpp's ``none`` type with one entry per label word: the
suffix returns the C label logits directly and never computes the other 49k. Devices
feed it hidden states, never tokens, so it needs no tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fwdllm.errors import UserError

#: The base layer the suffix's block 0 is, recorded in the file for readers that check it.
FIRST_LAYER_KEY = "fwdllm.suffix.first_layer"


def write_suffix(base: Path, out: Path, first_layer: int, label_ids: list[int]) -> Path:
    """Write the blocks ``first_layer`` and up of the GGUF ``base`` (and the label rows of its output) to ``out``."""
    import gguf

    T = gguf.GGUFValueType
    reader = gguf.GGUFReader(str(base))
    fields = reader.fields
    arch = str(fields["general.architecture"].contents())
    n_layer = int(fields[f"{arch}.block_count"].contents())
    vocab = int(fields[f"{arch}.vocab_size"].contents())
    if not 0 < first_layer < n_layer:
        raise UserError(f"a suffix GGUF needs 0 < first layer < {n_layer} layers, got {first_layer}")
    if not label_ids or min(label_ids) < 0 or max(label_ids) >= vocab:
        raise UserError(f"label token ids {label_ids} are not ids of this model's {vocab}-token vocabulary")
    rows = np.asarray(label_ids, dtype=np.int64)

    writer = gguf.GGUFWriter(str(out), arch)
    replaced = {f"{arch}.block_count": n_layer - first_layer, f"{arch}.vocab_size": len(label_ids)}
    for key, field in fields.items():
        if key.startswith(("GGUF.", "tokenizer.")) or key == "general.architecture":
            continue
        if key in replaced:
            writer.add_uint32(key, replaced[key])
        else:
            writer.add_key_value(
                key, field.contents(), field.types[0], field.types[-1] if field.types[0] == T.ARRAY else None
            )
    writer.add_string("tokenizer.ggml.model", "none")
    writer.add_uint32(FIRST_LAYER_KEY, first_layer)
    for tensor in reader.tensors:
        name, data = tensor.name, np.asarray(tensor.data)
        if name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            if int(layer) < first_layer:
                continue
            name = f"blk.{int(layer) - first_layer}.{rest}"
        elif name in ("token_embd.weight", "output.weight"):
            # One row per token in every type: quantized rows are whole blocks, so slicing keeps them intact.
            data = data[rows]
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out

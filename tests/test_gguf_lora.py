"""The θ → LoRA adapter GGUF mapping, checked against transformers' and gguf-py's own code (no model)."""

import gguf
import numpy as np
import pytest
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from fwdllm.errors import UserError
from fwdllm.export.gguf import export_gguf
from fwdllm.proto.gguf_lora import LoraAdapterWriter, gguf_lora_name, lora_alpha, rope_permute
from fwdllm.proto.manifest import BundleError, PeftInfo, ThetaLayout

N_HEAD, N_HEAD_KV, HIDDEN, KV, R = 4, 2, 32, 16, 3


def _layout(layers=2):
    shapes = []
    for i in range(layers):
        for proj, out in (("q_proj", HIDDEN), ("k_proj", KV), ("v_proj", KV)):
            base = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            shapes += [(f"{base}.lora_A.default.weight", (R, HIDDEN)), (f"{base}.lora_B.default.weight", (out, R))]
    return ThetaLayout.from_shapes(shapes)


@pytest.mark.parametrize("n_head", [N_HEAD, N_HEAD_KV])
def test_rope_permute_is_inverted_by_transformers_gguf_loader(n_head):
    w = np.random.default_rng(0).normal(size=(HIDDEN if n_head == N_HEAD else KV, 5)).astype(np.float32)
    back = LlamaTensorProcessor()._reverse_permute_weights(rope_permute(w, n_head), n_head)
    np.testing.assert_array_equal(back, w)
    assert not np.array_equal(rope_permute(w, n_head), w)


def test_names_map_to_llama_cpp_adapter_tensors():
    assert (
        gguf_lora_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight")
        == "blk.3.attn_q.weight.lora_a"
    )
    assert gguf_lora_name("model.layers.12.mlp.down_proj.lora_B.weight") == "blk.12.ffn_down.weight.lora_b"
    with pytest.raises(BundleError, match="--peft lora"):
        gguf_lora_name("model.layers.0.self_attn.q_proj.bias")
    assert lora_alpha({"lora_alpha": 16}) == lora_alpha({"alpha": 16.0}) == 16.0
    with pytest.raises(BundleError, match="lora_alpha"):
        lora_alpha({"r": 8})


def test_adapter_file_has_llama_cpp_layout_and_rewrites_equal_fresh_writes(tmp_path):
    layout = _layout()
    rng = np.random.default_rng(1)
    first, second = (rng.normal(size=layout.dim).astype(np.float32) for _ in range(2))
    writer = LoraAdapterWriter(layout, 16.0, N_HEAD, N_HEAD_KV)
    writer.write(tmp_path / "a.gguf", first)
    writer.write(tmp_path / "a.gguf", second)  # the fast path: bytes patched into the cached image
    LoraAdapterWriter(layout, 16.0, N_HEAD, N_HEAD_KV).write(tmp_path / "b.gguf", second)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()

    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 16.0
    tensors = {t.name: t for t in reader.tensors}
    split = layout.split(second)
    q_a = tensors["blk.1.attn_q.weight.lora_a"]
    assert list(q_a.shape) == [HIDDEN, R]  # ggml ne: (in, r)
    np.testing.assert_array_equal(
        q_a.data, split["base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"]
    )
    k_b = tensors["blk.0.attn_k.weight.lora_b"]
    assert list(k_b.shape) == [R, KV]  # ggml ne: (r, out)
    expected = rope_permute(split["base_model.model.model.layers.0.self_attn.k_proj.lora_B.default.weight"], N_HEAD_KV)
    np.testing.assert_array_equal(k_b.data, expected)
    v_b = split["base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"]
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight.lora_b"].data, v_b)  # v is not rotated


def test_adapter_needs_both_matrices():
    layout = ThetaLayout.from_shapes([("model.layers.0.self_attn.q_proj.lora_A.weight", (R, HIDDEN))])
    with pytest.raises(BundleError, match="without their partner"):
        LoraAdapterWriter(layout, 16.0, N_HEAD, N_HEAD_KV)


def test_export_rejects_what_gguf_cannot_carry(tmp_path):
    from transformers import BertConfig, LlamaConfig

    class Model:
        def __init__(self, config):
            self.config = config

    layout = _layout()
    theta = np.zeros(layout.dim, np.float32)
    lora = PeftInfo("lora", "all", {"lora_alpha": 16})
    with pytest.raises(UserError, match="--peft lora"):
        export_gguf(Model(LlamaConfig()), layout, theta, PeftInfo("bitfit", "all"), tmp_path)
    with pytest.raises(UserError, match="supports llama, qwen2, qwen3 decoders; this model is .bert."):
        export_gguf(Model(BertConfig()), layout, theta, lora, tmp_path)
    with pytest.raises(UserError, match="q4_0"):
        export_gguf(Model(LlamaConfig()), layout, theta, lora, tmp_path, precisions=("q5_k",))
    assert not list(tmp_path.iterdir())

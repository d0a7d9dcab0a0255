"""Qwen2 / Qwen2.5 and Qwen3 decoders: Llama's layout, so the shared decoder walk runs them.

What differs lives inside HF's own layers, which the stages call: Qwen2's q/k/v projections
carry biases (BitFit trains those, and gives o_proj and the MLP new zero ones); Qwen3 normalises
queries and keys per head (q_norm/k_norm RMSNorms, frozen: they are not LayerNorms). Checkpoints
that enable ``use_sliding_window`` get sliding-window masks on the layers HF slides. Small
Qwen models tie the LM head to the embeddings; HF keeps them tied on load.
"""

from fwdllm.export.arch_llama import DecoderSpec

SPEC = DecoderSpec(
    name="qwen",
    model_types=("qwen2", "qwen3"),
    embeddings="model.embed_tokens",
    layers="model.layers",
    attention_output="self_attn.o_proj",
    ffn_output="mlp.down_proj",
    lora_targets=("q_proj", "v_proj"),
    hf_prefix="model",
    causal=True,
)

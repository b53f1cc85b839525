"""A MiniMax-M3 text config with the released attention shapes (64 / 4 heads, head dim
128, index 4 x 128, blocks of 128, top-16, partial RoPE 0.5, QK-norm) and small everything
else (hidden 1024, small MoE): what the benchmarks and the FP8 study build with random
weights."""
from __future__ import annotations


def model_config(layer_types, hidden: int = 1024):
    from transformers.models.minimax_m3_vl import MiniMaxM3VLTextConfig
    n = len(layer_types)
    return MiniMaxM3VLTextConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=256, num_hidden_layers=n,
        num_attention_heads=64, num_key_value_heads=4, head_dim=128,
        dense_intermediate_size=512, shared_intermediate_size=256, num_local_experts=4,
        num_experts_per_tok=2, index_n_heads=4, index_head_dim=128, index_block_size=128,
        index_topk_blocks=16, index_local_blocks=1, layer_types=list(layer_types),
        mlp_layer_types=["dense"] + ["sparse"] * (n - 1),
        rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                         "partial_rotary_factor": 0.5},
        max_position_embeddings=1 << 21, bos_token_id=1, eos_token_id=2)

"""Write a random-weight DeepSeek-V2-Lite-shaped checkpoint for CPU benchmarks.

    python3 benches/make_synthetic.py OUT_DIR [--layers 6] [--hidden 768]

Uses transformers' own DeepseekV2Config / DeepseekV2ForCausalLM (versions as in
tests/fixtures/requirements.txt) and saves with save_pretrained; weights are N(0, 1/fan_in)
so activations stay O(1). Not committed: a few hundred MB, made on demand.
"""

import argparse

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    config = DeepseekV2Config(
        vocab_size=32000,
        hidden_size=a.hidden,
        intermediate_size=4 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=12,
        num_key_value_heads=12,
        q_lora_rank=None,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=a.experts,
        n_shared_experts=2,
        num_experts_per_tok=4,
        moe_intermediate_size=a.hidden // 2,
        first_k_dense_replace=1,
        topk_method="greedy",
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    model.save_pretrained(a.out, safe_serialization=True)
    print(f"wrote {a.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()

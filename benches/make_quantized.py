"""Write a DeepSeek-V2-Lite-shaped checkpoint of random weights in a shipped format, to
measure resident bytes and load-time peak RSS of `moe` (README, "Quantized checkpoints").

    python3 benches/make_quantized.py OUT_DIR --format fp8|int4|bf16 [--layers 8]

fp8: every decoder linear float8_e4m3fn + f32 weight_scale_inv over 128x128 blocks (as
DeepSeek-V3 ships); int4: routed experts compressed-tensors pack-quantized, groups of 32,
bf16 scales (as Kimi K2.5 ships); bf16: plain. Embeddings, norms, routers, lm_head: bf16.
One shard per layer, Hub names. Random values only (a memory measurement, not a model).
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = Path(__file__).resolve().parent.parent / "models/configs/deepseek-v2-lite/config.json"


def linear(name, n, k, fmt, out, quantized):
    if fmt == "bf16" or not quantized:
        out[f"{name}.weight"] = (torch.randn(n, k) / k**0.5).to(torch.bfloat16)
    elif fmt == "fp8":
        bits = torch.randint(0, 256, (n, k), dtype=torch.uint8)
        bits[(bits & 0x7F) == 0x7F] &= 0xF0  # no NaN
        out[f"{name}.weight"] = bits.view(torch.float8_e4m3fn)
        out[f"{name}.weight_scale_inv"] = torch.full((-(-n // 128), -(-k // 128)), 1 / k**0.5)
    else:
        out[f"{name}.weight_packed"] = torch.randint(-2**31, 2**31 - 1, (n, -(-k // 8)), dtype=torch.int32)
        out[f"{name}.weight_scale"] = torch.full((n, k // 32), 0.2 / k**0.5, dtype=torch.bfloat16)
        out[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--format", choices=["fp8", "int4", "bf16"], required=True)
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()
    cfg = json.loads(CONFIG.read_text())
    cfg["num_hidden_layers"] = a.layers
    if a.format == "fp8":
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}
    elif a.format == "int4":
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
                "num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True,
                "dynamic": False, "actorder": None}}},
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]}
    dense_q = a.format != "int4"  # INT4 packs the routed experts only, as Kimi ships
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    h, heads, r = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_lora_rank"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    weight_map, total = {}, 0
    torch.manual_seed(0)

    def shard(name, tensors):
        nonlocal total
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for t_name, t in tensors.items():
            weight_map[t_name] = name
            total += t.numel() * t.element_size()

    shard("embed.safetensors", {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], h).to(torch.bfloat16) * 0.02,
                                "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                                "lm_head.weight": (torch.randn(cfg["vocab_size"], h) / h**0.5).to(torch.bfloat16)})
    for layer in range(a.layers):
        p, t = f"model.layers.{layer}", {}
        t[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[f"{p}.self_attn.kv_a_layernorm.weight"] = torch.ones(r, dtype=torch.bfloat16)
        linear(f"{p}.self_attn.q_proj", heads * (nope + rope), h, a.format, t, dense_q)
        linear(f"{p}.self_attn.kv_a_proj_with_mqa", r + rope, h, a.format, t, dense_q)
        linear(f"{p}.self_attn.kv_b_proj", heads * (nope + v), r, a.format, t, dense_q)
        linear(f"{p}.self_attn.o_proj", h, heads * v, a.format, t, dense_q)
        if layer < cfg["first_k_dense_replace"]:
            i = cfg["intermediate_size"]
            for n_, k_, name in [(i, h, "gate_proj"), (i, h, "up_proj"), (h, i, "down_proj")]:
                linear(f"{p}.mlp.{name}", n_, k_, a.format, t, dense_q)
        else:
            i, e = cfg["moe_intermediate_size"], cfg["n_routed_experts"]
            t[f"{p}.mlp.gate.weight"] = (torch.randn(e, h) / h**0.5).to(torch.bfloat16)
            s = i * cfg["n_shared_experts"]
            for n_, k_, name in [(s, h, "gate_proj"), (s, h, "up_proj"), (h, s, "down_proj")]:
                linear(f"{p}.mlp.shared_experts.{name}", n_, k_, a.format, t, dense_q)
            for x in range(e):
                for n_, k_, name in [(i, h, "gate_proj"), (i, h, "up_proj"), (h, i, "down_proj")]:
                    linear(f"{p}.mlp.experts.{x}.{name}", n_, k_, a.format, t, True)
        shard(f"layer-{layer:03}.safetensors", t)
        print(f"layer {layer}: {total / 2**30:.2f} GiB so far", flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}))
    print(f"{out}: {total / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()

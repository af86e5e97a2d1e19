"""Write a random-weight DeepSeek-V2-family checkpoint for CPU benchmarks.

    python3 benches/make_synthetic.py OUT_DIR [--layers 6] [--hidden 768]
    python3 benches/make_synthetic.py OUT_DIR --config models/configs/deepseek-v2-lite/config.json \
        --layers 4 --tokenizer DIR

The first form is a small DeepSeek-V2-Lite-shaped model (219M parameters). `--config` takes a
released model's real config.json instead (all its widths), keeping the first `--layers`
layers; `--tokenizer DIR` copies DIR's tokenizer.json and tokenizer_config.json beside the
weights, which llama.cpp's converter needs (benches/llama_cpp_compare.py).

`--dtype bf16 --device cuda` builds the weights in bf16 on the GPU (the whole 27-layer
V2-Lite is 31 GB: seconds there, where f32 on the host would need 63 GB of RAM); the GPU
bundle's phase 2 writes its checkpoint this way once and runs moe-engine and transformers
on it. `--check` validates the arguments and exits before importing torch (the CPU test of
the bundle's commands runs it).

Uses transformers' own DeepseekV2Config / DeepseekV2ForCausalLM (versions as in
tests/fixtures/requirements.txt) and saves with save_pretrained; weights are N(0, 1/fan_in)
so activations stay O(1). Not committed: hundreds of MB to GBs, made on demand.
"""

import argparse
import json
import shutil
from pathlib import Path



def small_config(a: argparse.Namespace):
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
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


def released_config(path: str, layers: int):
    from transformers import DeepseekV2Config

    raw = json.loads(Path(path).read_text())
    raw["num_hidden_layers"] = layers
    for key in ("architectures", "auto_map", "torch_dtype", "dtype", "transformers_version"):
        raw.pop(key, None)
    return DeepseekV2Config(**raw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--config", help="a released DeepSeek-V2-family config.json to take the widths from")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--tokenizer", help="directory with tokenizer.json and tokenizer_config.json to copy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="weights' dtype (default f32)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the weights are drawn")
    ap.add_argument("--check", action="store_true", help="validate the arguments and exit")
    a = ap.parse_args()
    if a.layers < 1:
        ap.error(f"--layers must be >= 1, got {a.layers}")
    if a.config and not Path(a.config).is_file():
        ap.error(f"--config {a.config}: no such file")
    if a.tokenizer and not (Path(a.tokenizer) / "tokenizer.json").is_file():
        ap.error(f"--tokenizer {a.tokenizer}: no tokenizer.json there")
    if a.check:
        print(f"make_synthetic: arguments ok ({a.out})")
        return
    import torch
    from transformers import DeepseekV2ForCausalLM

    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    torch.manual_seed(a.seed)
    config = released_config(a.config, a.layers) if a.config else small_config(a)
    torch.set_default_dtype(torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    with torch.device(a.device):
        model = DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    model.save_pretrained(a.out, safe_serialization=True)
    if a.tokenizer:
        shutil.copy(Path(a.tokenizer) / "tokenizer.json", Path(a.out) / "tokenizer.json")
        tok_config = json.loads((Path(a.tokenizer) / "tokenizer_config.json").read_text())
        # Some dumps spell special tokens as {"__type": "AddedToken", "content": ...}; keep the text.
        for key, value in tok_config.items():
            if isinstance(value, dict) and value.get("__type") == "AddedToken":
                tok_config[key] = value["content"]
        (Path(a.out) / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    print(f"wrote {a.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()

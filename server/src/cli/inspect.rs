//! `moe inspect`: what a checkpoint is, from its config (and router choice), without weights.

use anyhow::Context;
use clap::Args;
use moe_models::config::{AttentionConfig, QkNorm, ScoringFunc};
use moe_models::inspect::{model_sizes, rank_weight_bytes, weight_bytes};
use moe_models::layers::moe::router::build_router;
use moe_models::ModelConfig;

use super::ModelArgs;

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    // A local directory needs only its config.json (weights may be absent).
    let local_config = std::path::Path::new(&args.model.model).join("config.json");
    let (model_dir, cfg) = if let Some(name) = moe_models::synthetic::synthetic_name(&args.model.model) {
        let cfg = args.model.synthetic(name)?;
        (std::path::PathBuf::from(&args.model.model), cfg)
    } else if local_config.is_file() {
        let cfg =
            ModelConfig::from_file(&local_config).with_context(|| format!("reading {}", local_config.display()))?;
        (std::path::PathBuf::from(&args.model.model), cfg)
    } else {
        let (files, cfg) = args.model.resolve()?;
        (files.dir, cfg)
    };
    let dtype = args.model.dtype()?;
    let sizes = model_sizes(&cfg);
    let weights = weight_bytes(&cfg, dtype.size_in_bytes() as u64);
    let layout = args.model.layout()?;
    layout
        .check(&cfg)
        .map_err(|e| anyhow::anyhow!("--tensor-parallel-size / --expert-parallel-size: {e}"))?;
    let per_rank = (!layout.is_single()).then(|| rank_weight_bytes(&cfg, layout, dtype.size_in_bytes() as u64));
    let router = match &cfg.moe {
        Some(m) => Some(build_router(m, args.model.router()?.as_ref())?.describe()),
        None => None,
    };
    let spec = cfg.kv_cache_spec();
    let kv_bytes = cfg.kv_bytes_per_token(dtype);
    let mha_bytes = sizes.mha_values_per_token_per_layer * cfg.num_hidden_layers * dtype.size_in_bytes();
    let attention = describe_attention(&cfg.attention);
    if args.json {
        let v = serde_json::json!({
            "model": model_dir,
            "architecture": cfg.architecture,
            "family": cfg.family,
            "dtype": args.model.dtype,
            "saved_dtype": cfg.saved_dtype,
            "quantization": cfg.quantization.as_ref().map(|q| q.describe()),
            "weights": weights,
            "parallel": per_rank.map(|bytes| serde_json::json!({
                "tensor_parallel_size": layout.tensor_parallel(),
                "expert_parallel_size": layout.expert_parallel(),
                "weight_bytes_per_rank": bytes,
            })),
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "attention_heads": cfg.attention.num_heads(),
            "attention": attention_json(&cfg.attention),
            "experts": cfg.moe.as_ref().map(|m| serde_json::json!({
                "routed": m.n_routed_experts, "shared": m.n_shared_experts, "per_token": m.num_experts_per_tok,
                "intermediate": m.moe_intermediate_size,
            })),
            "router": router,
            "sizes": sizes,
            "kv_cache_spec": spec,
            "kv_bytes_per_token": kv_bytes,
            "mha_kv_bytes_per_token": mha_bytes,
            "kv_tokens_per_gib": (1u64 << 30) / kv_bytes.max(1) as u64,
            "rope": { "theta": cfg.rope.theta, "yarn_factor": cfg.rope.yarn.as_ref().map(|y| y.factor) },
            "max_position_embeddings": cfg.max_position_embeddings,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model:         {}", model_dir.display());
    println!("architecture:  {} (family {})", cfg.architecture, cfg.family);
    println!(
        "dtype:         {} (saved as {}{})",
        args.model.dtype,
        cfg.saved_dtype.as_deref().unwrap_or("?"),
        cfg.quantization
            .as_ref()
            .map_or(String::new(), |q| format!(", quantized: {}", q.describe()))
    );
    println!(
        "weights:       {} resident ({} of {} parameters quantized as {}; the rest in {})",
        human_bytes(weights.resident_bytes),
        human(weights.quantized_params),
        human(sizes.total_params),
        weights.format,
        args.model.dtype
    );
    if let Some(bytes) = per_rank {
        println!(
            "per rank:      {} of weights on each of {} ranks ({}; estimated from the config)",
            human_bytes(bytes),
            layout.ranks(),
            layout.describe()
        );
    }
    println!(
        "parameters:    {} total, {} active per token ({} embedding)",
        human(sizes.total_params),
        human(sizes.active_params_per_token),
        human(sizes.embedding_params)
    );
    println!(
        "layers:        {} ({} dense, {} MoE), hidden {}, vocab {}",
        cfg.num_hidden_layers, sizes.dense_layers, sizes.moe_layers, cfg.hidden_size, cfg.vocab_size
    );
    println!("attention:     {attention}");
    if let Some(d) = cfg.mla().and_then(|m| m.sparse.as_ref()) {
        println!(
            "sparse attn:   DSA indexer, {} heads x {}, each query attends to its top {} positions ({} RoPE); own indexer in {} of {} layers",
            d.index_n_heads,
            d.index_head_dim,
            d.index_topk,
            if d.rope_interleaved { "interleaved" } else { "half-split" },
            d.indexer_layers(),
            cfg.num_hidden_layers
        );
    }
    match &cfg.rope.yarn {
        Some(y) => println!(
            "rope:          theta {}, YaRN factor {} over {} positions (max {})",
            cfg.rope.theta, y.factor, y.original_max_position_embeddings, cfg.max_position_embeddings
        ),
        None => println!(
            "rope:          theta {}, max positions {}",
            cfg.rope.theta, cfg.max_position_embeddings
        ),
    }
    if let Some(m) = &cfg.moe {
        println!(
            "experts:       {} routed ({} per token, width {}), {} shared; checkpoint routing {} with {}",
            m.n_routed_experts,
            m.num_experts_per_tok,
            m.moe_intermediate_size,
            m.n_shared_experts,
            m.topk_method.name(),
            match m.scoring_func {
                ScoringFunc::Softmax => "softmax",
                ScoringFunc::Sigmoid => "sigmoid",
            }
        );
    }
    if let Some(r) = router {
        println!("router:        {r}");
    }
    println!(
        "KV cache:      {} bytes per token ({}: {} values x {} layers in {}); plain MHA would need {} ({:.1}x)",
        kv_bytes,
        spec.describe(),
        sizes.kv_values_per_token_per_layer,
        cfg.num_hidden_layers,
        args.model.dtype,
        mha_bytes,
        mha_bytes as f64 / kv_bytes.max(1) as f64
    );
    println!(
        "               {} tokens of history per GiB of cache ({} with plain MHA)",
        (1u64 << 30) / kv_bytes.max(1) as u64,
        (1u64 << 30) / mha_bytes.max(1) as u64
    );
    Ok(())
}

/// One line about the attention, e.g. `MLA, 128 heads, q_lora_rank 1536, ...`.
fn describe_attention(a: &AttentionConfig) -> String {
    match a {
        AttentionConfig::Mla(m) => format!(
            "MLA, {} heads, q_lora_rank {}, kv_lora_rank {}, qk {}+{} (nope+rope), v {}",
            m.num_heads,
            m.q_lora_rank.map_or("none".to_string(), |r| r.to_string()),
            m.kv_lora_rank,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim
        ),
        AttentionConfig::Gqa(g) => format!(
            "GQA, {} heads over {} kv heads, head_dim {} ({} rotated){}{}",
            g.num_heads,
            g.num_kv_heads,
            g.head_dim,
            g.rotary_dim,
            match g.qk_norm {
                QkNorm::None => "",
                QkNorm::PerHead => ", per-head QK-norm",
                QkNorm::Whole => ", QK-norm over all heads",
            },
            if g.qkv_bias { ", q/k/v biases" } else { "" }
        ),
    }
}

fn attention_json(a: &AttentionConfig) -> serde_json::Value {
    match a {
        AttentionConfig::Mla(m) => serde_json::json!({
            "kind": "mla", "heads": m.num_heads, "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim,
        }),
        AttentionConfig::Gqa(g) => serde_json::json!({
            "kind": "gqa", "heads": g.num_heads, "kv_heads": g.num_kv_heads, "head_dim": g.head_dim,
            "rotary_dim": g.rotary_dim, "qkv_bias": g.qkv_bias,
            "qk_norm": match g.qk_norm { QkNorm::None => "none", QkNorm::PerHead => "per_head", QkNorm::Whole => "whole" },
        }),
    }
}

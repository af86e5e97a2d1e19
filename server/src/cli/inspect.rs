//! `moe inspect`: what a checkpoint is, from its config (and router choice), without weights.

use anyhow::Context;
use clap::Args;
use moe_models::config::{ScoringFunc, TopkMethod};
use moe_models::inspect::model_sizes;
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

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    // A local directory needs only its config.json (weights may be absent).
    let local_config = std::path::Path::new(&args.model.model).join("config.json");
    let (model_dir, cfg) = if let Some(name) = moe_models::synthetic::synthetic_name(&args.model.model) {
        let cfg = moe_models::synthetic::synthetic_config(name, args.model.num_layers)?;
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
    let router = match &cfg.moe {
        Some(m) => Some(build_router(m, cfg.architecture, args.model.router()?.as_ref())?.describe()),
        None => None,
    };
    let kv_bytes = sizes.latent_values_per_token_per_layer * cfg.num_hidden_layers * dtype.size_in_bytes();
    let mha_bytes = sizes.mha_values_per_token_per_layer * cfg.num_hidden_layers * dtype.size_in_bytes();
    if args.json {
        let v = serde_json::json!({
            "model": model_dir,
            "architecture": cfg.architecture.hf_name(),
            "dtype": args.model.dtype,
            "saved_dtype": cfg.saved_dtype,
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "attention_heads": cfg.num_attention_heads,
            "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank,
            "experts": cfg.moe.as_ref().map(|m| serde_json::json!({
                "routed": m.n_routed_experts, "shared": m.n_shared_experts, "per_token": m.num_experts_per_tok,
                "intermediate": m.moe_intermediate_size,
            })),
            "router": router,
            "sizes": sizes,
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
    println!("architecture:  {}", cfg.architecture.hf_name());
    println!(
        "dtype:         {} (saved as {})",
        args.model.dtype,
        cfg.saved_dtype.as_deref().unwrap_or("?")
    );
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
    println!(
        "attention:     MLA, {} heads, q_lora_rank {}, kv_lora_rank {}, qk {}+{} (nope+rope), v {}",
        cfg.num_attention_heads,
        cfg.q_lora_rank.map_or("none".to_string(), |r| r.to_string()),
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim
    );
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
            match m.topk_method {
                TopkMethod::Greedy => "greedy",
                TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
                TopkMethod::NoauxTc => "noaux_tc",
            },
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
        "KV cache:      {} bytes per token ({} values x {} layers in {}); plain MHA would need {} ({:.1}x)",
        kv_bytes,
        sizes.latent_values_per_token_per_layer,
        cfg.num_hidden_layers,
        args.model.dtype,
        mha_bytes,
        mha_bytes as f64 / kv_bytes as f64
    );
    println!(
        "               {} tokens of history per GiB of cache ({} with plain MHA)",
        (1u64 << 30) / kv_bytes.max(1) as u64,
        (1u64 << 30) / mha_bytes.max(1) as u64
    );
    Ok(())
}

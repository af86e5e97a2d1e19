//! The family-neutral model configuration and the small configs the shared layers take
//! (attention, MoE, RoPE), with the tensor-name tables that say where a family keeps them.
//!
//! Owns [`ModelConfig`]; it does not touch weights. A family's parser (in its folder, picked
//! by [`crate::registry`] from `architectures[0]`, then `model_type`) reads every field that
//! changes the math into these types; a missing required field or an unsupported value is an
//! error naming the field. Shared layers see only the small configs, never a family.

pub mod common;
pub mod fields;
pub mod quant;
pub mod rope;

use std::path::Path;

use serde_json::Value;

pub use quant::{ModuleQuant, QuantConfig};
pub use rope::{yarn_mscale, RopeConfig, RopeDefaults, YarnScaling};

use crate::error::{ModelError, Result};
use crate::kv_cache::{IndexKeys, KvCacheSpec};

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
}

/// How the top-k experts are chosen from the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// Plain top-k over all experts.
    Greedy,
    /// Keep the `topk_group` groups with the highest max score, then top-k inside them.
    GroupLimitedGreedy,
    /// Add the correction bias for choosing, keep the groups with the highest sum of their two
    /// best biased scores, top-k inside them; weights come from the unbiased scores.
    NoauxTc,
}

impl TopkMethod {
    pub fn name(self) -> &'static str {
        match self {
            TopkMethod::Greedy => "greedy",
            TopkMethod::GroupLimitedGreedy => "group_limited_greedy",
            TopkMethod::NoauxTc => "noaux_tc",
        }
    }
}

/// The names of one expert's three projections (`{experts}.{e}.{name}.weight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertProjNames {
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

impl ExpertProjNames {
    /// `gate_proj` / `up_proj` / `down_proj` (DeepSeek, Qwen, GLM).
    pub const LLAMA: ExpertProjNames = ExpertProjNames {
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
    };
    /// `w1` (gate) / `w3` (up) / `w2` (down) (Mixtral, MiniMax).
    pub const MIXTRAL: ExpertProjNames = ExpertProjNames {
        gate: "w1",
        up: "w3",
        down: "w2",
    };
}

/// Where a family keeps the MoE block's tensors, relative to the decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeNames {
    /// The block: `mlp` (DeepSeek, Qwen, GLM) or `block_sparse_moe` (Mixtral, MiniMax).
    pub block: &'static str,
    /// The routing correction bias relative to the block (`gate.e_score_correction_bias` or
    /// `e_score_correction_bias`), for families whose router may have one.
    pub correction_bias: Option<&'static str>,
    /// Say so when a router that expects a correction bias finds none (transformers then
    /// routes with zeros, which is legal but rarely intended).
    pub warn_missing_bias: bool,
    pub experts: ExpertProjNames,
    /// The shared experts' MLP relative to the block.
    pub shared_experts: &'static str,
}

/// Mixture-of-experts settings of the MoE layers.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    /// Shared experts every token visits, as one MLP of `n_shared_experts * moe_intermediate_size`.
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub n_group: usize,
    pub topk_group: usize,
    /// Divide the chosen weights by their sum (as the family's reference applies it).
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub names: MoeNames,
}

/// Multi-head latent attention (DeepSeek-V2 §2.1).
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    pub num_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Biases on `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj`.
    pub bias: bool,
    pub softmax_scale: f64,
    /// DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): each query attends only to the
    /// positions the lightning indexer picks.
    pub sparse: Option<DsaConfig>,
}

/// The lightning indexer of DeepSeek Sparse Attention (`self_attn.indexer.*`): per query,
/// `index_n_heads` heads of `index_head_dim` score every earlier position against one shared
/// key, and the `index_topk` best are attended to.
#[derive(Debug, Clone, PartialEq)]
pub struct DsaConfig {
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    /// The indexer rotates the first `qk_rope_head_dim` values of its q and k in interleaved
    /// pairs (GLM-5) or half-split pairs (DeepSeek-V3.2).
    pub rope_interleaved: bool,
    /// `[num_hidden_layers]`: the layer runs its own indexer (`false`: it reuses the
    /// selection of the layer before it, GLM-5's `"shared"` layers).
    pub own_indexer: Vec<bool>,
}

impl DsaConfig {
    /// Layers that run an indexer (and keep indexer keys).
    pub fn indexer_layers(&self) -> usize {
        self.own_indexer.iter().filter(|&&o| o).count()
    }
}

impl MlaConfig {
    /// `qk_nope_head_dim + qk_rope_head_dim`: the per-head query/key width before absorption.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim.saturating_add(self.qk_rope_head_dim)
    }
}

/// Where a GQA layer normalizes q and k (before RoPE), if at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// One RMSNorm over `head_dim`, shared by every head (Qwen3, GLM with `use_qk_norm`).
    PerHead,
    /// One RMSNorm over all heads' q (`num_heads * head_dim`) and one over all k (MiniMax-M2).
    Whole,
}

/// Grouped-query attention with a per-head K/V cache.
#[derive(Debug, Clone, PartialEq)]
pub struct GqaConfig {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The first `rotary_dim` values of each head rotate; the rest pass through.
    pub rotary_dim: usize,
    /// Biases on `q_proj`, `k_proj`, `v_proj`.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    pub softmax_scale: f64,
}

/// The attention every layer of a model uses.
#[derive(Debug, Clone, PartialEq)]
pub enum AttentionConfig {
    Mla(MlaConfig),
    Gqa(GqaConfig),
}

impl AttentionConfig {
    pub fn num_heads(&self) -> usize {
        match self {
            AttentionConfig::Mla(m) => m.num_heads,
            AttentionConfig::Gqa(g) => g.num_heads,
        }
    }

    /// Width of the rotated part of each head (what RoPE's frequencies are computed over).
    pub fn rope_dim(&self) -> usize {
        match self {
            AttentionConfig::Mla(m) => m.qk_rope_head_dim,
            AttentionConfig::Gqa(g) => g.rotary_dim,
        }
    }

    pub fn softmax_scale(&self) -> f64 {
        match self {
            AttentionConfig::Mla(m) => m.softmax_scale,
            AttentionConfig::Gqa(g) => g.softmax_scale,
        }
    }

    /// What one token of one layer keeps in the paged cache.
    pub fn kv_cache_spec(&self) -> KvCacheSpec {
        match self {
            AttentionConfig::Mla(m) => KvCacheSpec::Latent {
                dim: m.kv_lora_rank.saturating_add(m.qk_rope_head_dim),
                index_keys: m.sparse.as_ref().map(|d| IndexKeys {
                    dim: d.index_head_dim,
                    layers: d.indexer_layers(),
                }),
            },
            AttentionConfig::Gqa(g) => KvCacheSpec::PerHead {
                kv_heads: g.num_kv_heads,
                head_dim: g.head_dim,
                v_head_dim: g.head_dim,
            },
        }
    }

    /// Values per token and layer that plain multi-head attention (K and V of every query
    /// head) would cache, for comparison.
    pub fn mha_values_per_token(&self) -> usize {
        match self {
            AttentionConfig::Mla(m) => m.num_heads.saturating_mul(m.qk_head_dim().saturating_add(m.v_head_dim)),
            AttentionConfig::Gqa(g) => g.num_heads.saturating_mul(g.head_dim.saturating_mul(2)),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            AttentionConfig::Mla(_) => "MLA",
            AttentionConfig::Gqa(_) => "GQA",
        }
    }
}

/// Where a family keeps the decoder's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderNames {
    /// Prefix of the embedding, layers and final norm: `model` (most) or
    /// `language_model.model` (Kimi K2.5).
    pub model: &'static str,
    /// The output projection: `lm_head` or `language_model.lm_head`.
    pub lm_head: &'static str,
    /// Tensor-name prefixes the checkpoint ships but the text model never reads (a vision
    /// tower); loading says how many it skipped.
    pub skipped: &'static [&'static str],
}

impl DecoderNames {
    pub const HF: DecoderNames = DecoderNames {
        model: "model",
        lm_head: "lm_head",
        skipped: &[],
    };
}

/// A validated model configuration, whatever the family.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `architectures[0]` as config.json spells it (or the family's class for `model_type`).
    pub architecture: String,
    /// The registry family that parsed it (e.g. `deepseek`, `qwen3_moe`).
    pub family: &'static str,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention: AttentionConfig,
    pub rope: RopeConfig,
    /// Width of the dense SwiGLU MLP of non-MoE layers.
    pub intermediate_size: usize,
    /// Biases on the dense and shared-expert MLPs.
    pub mlp_bias: bool,
    pub moe: Option<MoeConfig>,
    /// `[num_hidden_layers]`: whether each decoder layer's MLP is a MoE block.
    pub moe_layers: Vec<bool>,
    pub names: DecoderNames,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint says it was saved in (`torch_dtype` or `dtype`), if any.
    pub saved_dtype: Option<String>,
    /// `quantization_config`, when the weights ship quantized (FP8 blocks or INT4 groups).
    pub quantization: Option<QuantConfig>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::ConfigSyntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_json(&value)
    }

    /// Validates a parsed config.json with the family its architecture names.
    pub fn from_json(value: &Value) -> Result<Self> {
        crate::registry::parse_config(value)
    }

    /// Whether decoder layer `layer` has a mixture-of-experts MLP (else a dense one).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe.is_some() && self.moe_layers.get(layer).copied().unwrap_or(false)
    }

    /// What one token of one layer keeps in the paged cache.
    pub fn kv_cache_spec(&self) -> KvCacheSpec {
        self.attention.kv_cache_spec()
    }

    /// `[num_hidden_layers]` (empty without DSA): which layers keep indexer keys.
    pub fn index_key_layers(&self) -> Vec<bool> {
        match &self.attention {
            AttentionConfig::Mla(MlaConfig { sparse: Some(d), .. }) => d.own_indexer.clone(),
            _ => Vec::new(),
        }
    }

    /// Cache bytes one token occupies across all layers in `dtype`.
    pub fn kv_bytes_per_token(&self, dtype: candle_core::DType) -> usize {
        self.kv_cache_spec().bytes_per_token(self.num_hidden_layers, dtype)
    }

    /// The MLA settings, for MLA models.
    pub fn mla(&self) -> Option<&MlaConfig> {
        match &self.attention {
            AttentionConfig::Mla(m) => Some(m),
            AttentionConfig::Gqa(_) => None,
        }
    }

    /// The GQA settings, for GQA models.
    pub fn gqa(&self) -> Option<&GqaConfig> {
        match &self.attention {
            AttentionConfig::Gqa(g) => Some(g),
            AttentionConfig::Mla(_) => None,
        }
    }

    /// Routed experts per MoE layer (0 for a dense model).
    pub fn num_experts(&self) -> usize {
        self.moe.as_ref().map_or(0, |m| m.n_routed_experts)
    }
}

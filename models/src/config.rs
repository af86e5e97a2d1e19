//! Parsing and validation of Hugging Face `config.json` for the DeepSeek MLA + MoE family.
//!
//! Owns the typed [`ModelConfig`]; it does not touch weights. Every field that changes the
//! math is read here; a missing required field or an unsupported value is an error naming the
//! field. Optional fields take the defaults of transformers' own config classes (listed in
//! [`Defaults`]) so a checkpoint means the same thing here as in the reference implementation.
//! Both spellings found in the wild are accepted: the Hub's (`rope_theta` + `rope_scaling`
//! with `type` or `rope_type`) and transformers 5's (`rope_parameters`).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

/// Architectures (the `architectures[0]` string of config.json) this crate can run.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"];

/// Upper bound for any single dimension in a config: larger values are taken as corrupt
/// before anything is allocated (the biggest real value, a 129k vocabulary, is far below).
const MAX_DIM: usize = 1 << 22;
/// Upper bound for layer, head and expert counts.
const MAX_COUNT: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    DeepseekV2,
    DeepseekV3,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::DeepseekV2 => "DeepseekV2ForCausalLM",
            Architecture::DeepseekV3 => "DeepseekV3ForCausalLM",
        }
    }
}

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

/// Mixture-of-experts settings; `None` in [`ModelConfig::moe`] means a dense model.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
}

/// YaRN context extension (arXiv:2309.00071) as DeepSeek configures it.
#[derive(Debug, Clone, PartialEq)]
pub struct YarnScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// Explicit multiplier of cos/sin; derived from the mscales when absent.
    pub attention_factor: Option<f64>,
    /// Round the correction range to whole dimensions (transformers' default: true).
    pub truncate: bool,
}

/// Rotary position embedding of the `qk_rope_head_dim` part of q and k.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub yarn: Option<YarnScaling>,
    /// Rotate interleaved pairs `(x0,x1),(x2,x3)..` (DeepSeek's layout) rather than halves.
    pub interleaved: bool,
}

/// A validated DeepSeek-family model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub rope: RopeConfig,
    pub moe: Option<MoeConfig>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint says it was saved in (`torch_dtype` or `dtype`), if any.
    pub saved_dtype: Option<String>,
}

/// Defaults of transformers' `DeepseekV2Config` / `DeepseekV3Config` for optional fields.
struct Defaults {
    first_k_dense_replace: usize,
    n_shared_experts: usize,
    routed_scaling_factor: f64,
    norm_topk_prob: bool,
    topk_method: &'static str,
    scoring_func: &'static str,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    max_position_embeddings: usize,
}

impl Defaults {
    fn of(arch: Architecture) -> Self {
        match arch {
            Architecture::DeepseekV2 => Defaults {
                first_k_dense_replace: 0,
                n_shared_experts: 2,
                routed_scaling_factor: 1.0,
                norm_topk_prob: false,
                topk_method: "greedy",
                scoring_func: "softmax",
                n_group: None,
                topk_group: None,
                max_position_embeddings: 2048,
            },
            Architecture::DeepseekV3 => Defaults {
                first_k_dense_replace: 3,
                n_shared_experts: 1,
                routed_scaling_factor: 2.5,
                norm_topk_prob: true,
                topk_method: "noaux_tc",
                scoring_func: "sigmoid",
                n_group: Some(8),
                topk_group: Some(4),
                max_position_embeddings: 4096,
            },
        }
    }
}

/// Typed access to the JSON object with errors that name the field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    arch: &'static str,
    prefix: &'static str,
}

impl<'a> Fields<'a> {
    fn name(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    /// The value, treating JSON `null` as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn unsupported(&self, key: &str, value: &Value, reason: &str) -> ModelError {
        ModelError::UnsupportedValue {
            field: self.name(key),
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    fn missing(&self, key: &str) -> ModelError {
        ModelError::MissingField {
            field: self.name(key),
            architecture: self.arch.to_string(),
        }
    }

    fn opt_usize(&self, key: &str, max: usize) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let n = v
            .as_u64()
            .ok_or_else(|| self.unsupported(key, v, "expected a non-negative integer"))?;
        if n as u128 > max as u128 {
            return Err(self.unsupported(key, v, &format!("larger than the limit {max}")));
        }
        Ok(Some(n as usize))
    }

    fn usize_req(&self, key: &str, max: usize) -> Result<usize> {
        let n = self.opt_usize(key, max)?.ok_or_else(|| self.missing(key))?;
        Ok(n)
    }

    fn positive(&self, key: &str, max: usize) -> Result<usize> {
        let n = self.usize_req(key, max)?;
        if n == 0 {
            return Err(self.unsupported(key, &Value::from(0), "must be positive"));
        }
        Ok(n)
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let x = v
            .as_f64()
            .ok_or_else(|| self.unsupported(key, v, "expected a number"))?;
        if !x.is_finite() {
            return Err(self.unsupported(key, v, "must be finite"));
        }
        Ok(Some(x))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_bool()
            .map(Some)
            .ok_or_else(|| self.unsupported(key, v, "expected true or false"))
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_str()
            .map(Some)
            .ok_or_else(|| self.unsupported(key, v, "expected a string"))
    }

    /// A token id field that may be an integer or a list of integers.
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let Some(v) = self.get(key) else { return Ok(vec![]) };
        let bad = || self.unsupported(key, v, "expected a token id or a list of token ids");
        match v {
            Value::Number(n) => Ok(vec![
                n.as_u64().filter(|&x| x <= u32::MAX as u64).ok_or_else(bad)? as u32
            ]),
            Value::Array(items) => items
                .iter()
                .map(|x| {
                    x.as_u64()
                        .filter(|&x| x <= u32::MAX as u64)
                        .map(|x| x as u32)
                        .ok_or_else(bad)
                })
                .collect(),
            _ => Err(bad()),
        }
    }
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

    /// Validates a parsed config.json.
    pub fn from_json(value: &Value) -> Result<Self> {
        let map = value.as_object().ok_or_else(|| ModelError::UnsupportedValue {
            field: "<root>".into(),
            value: type_name(value).into(),
            reason: "config.json must be a JSON object".into(),
        })?;
        let architecture = parse_architecture(map)?;
        let f = Fields {
            map,
            arch: architecture.hf_name(),
            prefix: "",
        };
        let d = Defaults::of(architecture);

        if let Some(q) = f.get("quantization_config") {
            let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("?");
            return Err(f.unsupported(
                "quantization_config",
                &Value::from(method),
                "quantized checkpoints are not supported yet; use a bf16/f16/f32 checkpoint",
            ));
        }
        if let Some(act) = f.opt_str("hidden_act")? {
            if act != "silu" {
                return Err(f.unsupported("hidden_act", &Value::from(act), "only \"silu\" is supported"));
            }
        }

        let hidden_size = f.positive("hidden_size", MAX_DIM)?;
        let num_attention_heads = f.positive("num_attention_heads", MAX_COUNT)?;
        if let Some(kv_heads) = f.opt_usize("num_key_value_heads", MAX_COUNT)? {
            if kv_heads != num_attention_heads {
                return Err(f.unsupported(
                    "num_key_value_heads",
                    &Value::from(kv_heads),
                    "MLA expands one latent into every head; it must equal num_attention_heads",
                ));
            }
        }
        if !f.map.contains_key("q_lora_rank") {
            return Err(f.missing("q_lora_rank"));
        }
        let q_lora_rank = f.opt_usize("q_lora_rank", MAX_DIM)?;
        if q_lora_rank == Some(0) {
            return Err(f.unsupported("q_lora_rank", &Value::from(0), "must be positive or null"));
        }
        let max_position_embeddings = f
            .opt_usize("max_position_embeddings", usize::MAX)?
            .unwrap_or(d.max_position_embeddings);
        if max_position_embeddings == 0 {
            return Err(f.unsupported("max_position_embeddings", &Value::from(0), "must be positive"));
        }
        let qk_rope_head_dim = f.positive("qk_rope_head_dim", MAX_DIM)?;
        if qk_rope_head_dim % 2 != 0 {
            return Err(f.unsupported(
                "qk_rope_head_dim",
                &Value::from(qk_rope_head_dim),
                "rotary dimensions come in pairs; must be even",
            ));
        }
        let rms_norm_eps = f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
        if rms_norm_eps <= 0.0 {
            return Err(f.unsupported("rms_norm_eps", &Value::from(rms_norm_eps), "must be positive"));
        }

        let num_hidden_layers = f.positive("num_hidden_layers", MAX_COUNT)?;
        let config = ModelConfig {
            architecture,
            vocab_size: f.positive("vocab_size", MAX_DIM)?,
            hidden_size,
            intermediate_size: f.positive("intermediate_size", MAX_DIM)?,
            num_hidden_layers,
            num_attention_heads,
            q_lora_rank,
            kv_lora_rank: f.positive("kv_lora_rank", MAX_DIM)?,
            qk_nope_head_dim: f.positive("qk_nope_head_dim", MAX_DIM)?,
            qk_rope_head_dim,
            v_head_dim: f.positive("v_head_dim", MAX_DIM)?,
            max_position_embeddings,
            rms_norm_eps,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: f.opt_bool("attention_bias")?.unwrap_or(false),
            // DeepseekV2Config inherits `mlp_bias` (dense and shared-expert MLPs); V3's MLPs
            // never have biases, whatever the file says.
            mlp_bias: architecture == Architecture::DeepseekV2 && f.opt_bool("mlp_bias")?.unwrap_or(false),
            rope: parse_rope(&f, architecture, max_position_embeddings)?,
            moe: parse_moe(&f, &d)?,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
            saved_dtype: match f.opt_str("torch_dtype")? {
                Some(s) => Some(s.to_string()),
                None => f.opt_str("dtype")?.map(str::to_string),
            },
        };
        Ok(config)
    }

    /// `qk_nope_head_dim + qk_rope_head_dim`: the per-head query/key width before absorption.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values per token and layer in the latent KV cache: `c_kv` plus the rotated `k_pe`.
    pub fn latent_cache_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Whether decoder layer `layer` has a mixture-of-experts MLP (else a dense one).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        match &self.moe {
            Some(m) => layer >= m.first_k_dense_replace && layer.is_multiple_of(m.moe_layer_freq),
            None => false,
        }
    }

    /// Softmax scale of attention: `qk_head_dim^-1/2`, times `yarn_mscale(factor,
    /// mscale_all_dim)^2` when YaRN sets `mscale_all_dim` (as transformers does).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope.yarn {
            Some(y) => match y.mscale_all_dim {
                Some(m) if m != 0.0 => {
                    let s = yarn_mscale(y.factor, m);
                    base * s * s
                }
                _ => base,
            },
            None => base,
        }
    }
}

/// YaRN's magnitude correction `0.1 * mscale * ln(scale) + 1` (1 when not extending).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_architecture(map: &Map<String, Value>) -> Result<Architecture> {
    let supported = SUPPORTED_ARCHITECTURES.join(", ");
    let archs = match map.get("architectures") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(other) if !other.is_null() => {
            return Err(ModelError::UnsupportedValue {
                field: "architectures".into(),
                value: other.to_string(),
                reason: "expected a non-empty list of architecture names".into(),
            })
        }
        _ => {
            // Fall back on model_type, which transformers also uses to pick the class.
            return match map.get("model_type").and_then(Value::as_str) {
                Some("deepseek_v2") => Ok(Architecture::DeepseekV2),
                Some("deepseek_v3") => Ok(Architecture::DeepseekV3),
                Some(other) => Err(ModelError::UnknownArchitecture {
                    found: format!("model_type {other}"),
                    supported,
                }),
                None => Err(ModelError::MissingField {
                    field: "architectures".into(),
                    architecture: "any model".into(),
                }),
            };
        }
    };
    let name = archs[0].as_str().unwrap_or("");
    match name {
        "DeepseekV2ForCausalLM" => Ok(Architecture::DeepseekV2),
        "DeepseekV3ForCausalLM" => Ok(Architecture::DeepseekV3),
        other => Err(ModelError::UnknownArchitecture {
            found: other.to_string(),
            supported,
        }),
    }
}

/// Reads the rotary settings from either `rope_parameters` (transformers 5) or
/// `rope_theta` + `rope_scaling` (the Hub's configs). In a transformers 5 DeepSeek config the
/// top-level `head_dim` is the rotary width (it equals `qk_rope_head_dim`), so it is not read.
fn parse_rope(f: &Fields<'_>, architecture: Architecture, max_position_embeddings: usize) -> Result<RopeConfig> {
    // V2 always rotates interleaved pairs; only V3 reads `rope_interleave`.
    let interleaved = match architecture {
        Architecture::DeepseekV2 => true,
        Architecture::DeepseekV3 => f.opt_bool("rope_interleave")?.unwrap_or(true),
    };
    let (params_key, params) = match (f.get("rope_parameters"), f.get("rope_scaling")) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, Some(s)) => ("rope_scaling", Some(s)),
        (None, None) => ("rope_scaling", None),
    };
    let params = match params {
        Some(Value::Object(m)) => Some(m),
        Some(other) => return Err(f.unsupported(params_key, other, "expected an object")),
        None => None,
    };
    let prefix: &'static str = if params_key == "rope_parameters" {
        "rope_parameters."
    } else {
        "rope_scaling."
    };
    let inner = params.map(|map| Fields {
        map,
        arch: f.arch,
        prefix,
    });
    let nested_theta = inner.as_ref().map(|p| p.opt_f64("rope_theta")).transpose()?.flatten();
    let theta = match nested_theta {
        Some(t) => t,
        None => f.opt_f64("rope_theta")?.unwrap_or(10000.0),
    };
    if theta <= 1.0 {
        let field = if nested_theta.is_some() {
            format!("{prefix}rope_theta")
        } else {
            "rope_theta".into()
        };
        return Err(ModelError::UnsupportedValue {
            field,
            value: theta.to_string(),
            reason: "must be greater than 1".into(),
        });
    }
    let Some(p) = inner else {
        return Ok(RopeConfig {
            theta,
            yarn: None,
            interleaved,
        });
    };
    let rope_type = match p.opt_str("rope_type")? {
        Some(t) => t,
        None => p.opt_str("type")?.unwrap_or("default"),
    };
    if let Some(prf) = p.opt_f64("partial_rotary_factor")? {
        if prf != 1.0 {
            return Err(p.unsupported("partial_rotary_factor", &Value::from(prf), "only 1.0 is supported"));
        }
    }
    let yarn = match rope_type {
        "default" => None,
        "yarn" => {
            let original = p
                .opt_usize("original_max_position_embeddings", usize::MAX)?
                .unwrap_or(max_position_embeddings);
            if original == 0 {
                return Err(p.unsupported("original_max_position_embeddings", &Value::from(0), "must be positive"));
            }
            let factor = p
                .opt_f64("factor")?
                .unwrap_or(max_position_embeddings as f64 / original as f64);
            if factor <= 0.0 {
                return Err(p.unsupported("factor", &Value::from(factor), "must be positive"));
            }
            Some(YarnScaling {
                factor,
                original_max_position_embeddings: original,
                // transformers treats 0/absent as the paper's defaults (`or 32`, `or 1`).
                beta_fast: p.opt_f64("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0),
                beta_slow: p.opt_f64("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0),
                mscale: p.opt_f64("mscale")?,
                mscale_all_dim: p.opt_f64("mscale_all_dim")?,
                attention_factor: p.opt_f64("attention_factor")?,
                truncate: p.opt_bool("truncate")?.unwrap_or(true),
            })
        }
        other => {
            let field = if p.get("rope_type").is_some() {
                "rope_type"
            } else {
                "type"
            };
            return Err(p.unsupported(field, &Value::from(other), "supported rope types: default, yarn"));
        }
    };
    Ok(RopeConfig {
        theta,
        yarn,
        interleaved,
    })
}

fn parse_moe(f: &Fields<'_>, d: &Defaults) -> Result<Option<MoeConfig>> {
    let Some(n_routed_experts) = f.opt_usize("n_routed_experts", MAX_COUNT)? else {
        return Ok(None);
    };
    if n_routed_experts == 0 {
        return Err(f.unsupported("n_routed_experts", &Value::from(0), "must be positive or null"));
    }
    let num_experts_per_tok = f.positive("num_experts_per_tok", MAX_COUNT)?;
    if num_experts_per_tok > n_routed_experts {
        return Err(f.unsupported(
            "num_experts_per_tok",
            &Value::from(num_experts_per_tok),
            &format!("more than n_routed_experts ({n_routed_experts})"),
        ));
    }
    let topk_method = match f.opt_str("topk_method")?.unwrap_or(d.topk_method) {
        "greedy" => TopkMethod::Greedy,
        "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
        "noaux_tc" => TopkMethod::NoauxTc,
        other => {
            return Err(f.unsupported(
                "topk_method",
                &Value::from(other),
                "supported: greedy, group_limited_greedy, noaux_tc",
            ))
        }
    };
    let scoring_func = match f.opt_str("scoring_func")?.unwrap_or(d.scoring_func) {
        "softmax" => ScoringFunc::Softmax,
        "sigmoid" => ScoringFunc::Sigmoid,
        other => return Err(f.unsupported("scoring_func", &Value::from(other), "supported: softmax, sigmoid")),
    };
    let grouped = topk_method != TopkMethod::Greedy;
    let n_group = f.opt_usize("n_group", MAX_COUNT)?.or(d.n_group).unwrap_or(1);
    let topk_group = f
        .opt_usize("topk_group", MAX_COUNT)?
        .or(d.topk_group)
        .unwrap_or(n_group);
    if grouped {
        if n_group == 0 || n_routed_experts % n_group != 0 {
            return Err(f.unsupported(
                "n_group",
                &Value::from(n_group),
                &format!("must divide n_routed_experts ({n_routed_experts})"),
            ));
        }
        if topk_group == 0 || topk_group > n_group {
            return Err(f.unsupported("topk_group", &Value::from(topk_group), "must be in 1..=n_group"));
        }
        let per_group = n_routed_experts / n_group;
        if topk_method == TopkMethod::NoauxTc && per_group < 2 {
            return Err(f.unsupported(
                "n_group",
                &Value::from(n_group),
                "noaux_tc scores a group by its two best experts; groups need at least 2 experts",
            ));
        }
        if topk_group * per_group < num_experts_per_tok {
            return Err(f.unsupported(
                "topk_group",
                &Value::from(topk_group),
                "the kept groups hold fewer experts than num_experts_per_tok",
            ));
        }
    }
    let moe_layer_freq = f.opt_usize("moe_layer_freq", MAX_COUNT)?.unwrap_or(1);
    if moe_layer_freq == 0 {
        return Err(f.unsupported("moe_layer_freq", &Value::from(0), "must be positive"));
    }
    let first_k_dense_replace = f
        .opt_usize("first_k_dense_replace", MAX_COUNT)?
        .unwrap_or(d.first_k_dense_replace);
    let routed_scaling_factor = f.opt_f64("routed_scaling_factor")?.unwrap_or(d.routed_scaling_factor);
    Ok(Some(MoeConfig {
        n_routed_experts,
        n_shared_experts: f
            .opt_usize("n_shared_experts", MAX_COUNT)?
            .unwrap_or(d.n_shared_experts),
        num_experts_per_tok,
        moe_intermediate_size: f.positive("moe_intermediate_size", MAX_DIM)?,
        first_k_dense_replace,
        moe_layer_freq,
        topk_method,
        scoring_func,
        n_group: if grouped { n_group } else { 1 },
        topk_group: if grouped { topk_group } else { 1 },
        norm_topk_prob: f.opt_bool("norm_topk_prob")?.unwrap_or(d.norm_topk_prob),
        routed_scaling_factor,
    }))
}

#[cfg(test)]
mod tests;

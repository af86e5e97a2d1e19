//! Fields every family reads the same way (sizes, norms, token ids, the saved dtype), the
//! checks every family applies (no quantized weights yet, SiLU MLPs, routing that can be
//! satisfied), and the assembly of a [`ModelConfig`] from a family's parts.

use serde_json::Value;

use super::fields::{Fields, MAX_COUNT, MAX_DIM};
use super::quant::QuantConfig;
use super::rope::{parse_rope, RopeDefaults};
use super::{AttentionConfig, DecoderNames, GqaConfig, ModelConfig, MoeConfig, QkNorm, RopeConfig, TopkMethod};
use crate::error::Result;

/// Defaults of a family's config class for the common optional fields.
#[derive(Debug, Clone, Copy)]
pub struct CommonDefaults {
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// The config class's `bos_token_id` / `eos_token_id` when the file has none.
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// The fields every decoder config has.
#[derive(Debug, Clone)]
pub struct CommonFields {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub saved_dtype: Option<String>,
    pub quantization: Option<QuantConfig>,
}

/// The family-specific parts of a [`ModelConfig`].
pub struct FamilyParts {
    pub family: &'static str,
    pub architecture: String,
    pub attention: AttentionConfig,
    pub rope: RopeConfig,
    pub intermediate_size: usize,
    pub mlp_bias: bool,
    pub moe: Option<MoeConfig>,
    /// `[num_hidden_layers]`: which layers are MoE (ignored without `moe`).
    pub moe_layers: Vec<bool>,
    pub names: DecoderNames,
}

impl CommonFields {
    /// Reads the common fields of `f`, refusing what no family supports yet.
    pub fn read(f: &Fields<'_>, d: CommonDefaults) -> Result<Self> {
        check_hidden_act(f)?;
        let max_position_embeddings = f
            .opt_usize("max_position_embeddings", usize::MAX)?
            .unwrap_or(d.max_position_embeddings);
        if max_position_embeddings == 0 {
            return Err(f.unsupported("max_position_embeddings", &Value::from(0), "must be positive"));
        }
        let rms_norm_eps = f.opt_f64("rms_norm_eps")?.unwrap_or(d.rms_norm_eps);
        if rms_norm_eps <= 0.0 {
            return Err(f.unsupported("rms_norm_eps", &Value::from(rms_norm_eps), "must be positive"));
        }
        Ok(CommonFields {
            vocab_size: f.positive("vocab_size", MAX_DIM)?,
            hidden_size: f.positive("hidden_size", MAX_DIM)?,
            num_hidden_layers: f.positive("num_hidden_layers", MAX_COUNT)?,
            max_position_embeddings,
            rms_norm_eps,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", d.tie_word_embeddings)?,
            bos_token_id: match f.has_key("bos_token_id") {
                true => f.token_ids("bos_token_id")?.first().copied(),
                false => d.bos_token_id,
            },
            eos_token_ids: match f.has_key("eos_token_id") {
                true => f.token_ids("eos_token_id")?,
                false => d.eos_token_id.into_iter().collect(),
            },
            saved_dtype: saved_dtype(f)?,
            quantization: quant_method(f)?,
        })
    }

    /// The full config.
    pub fn build(self, parts: FamilyParts) -> ModelConfig {
        ModelConfig {
            architecture: parts.architecture,
            family: parts.family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            attention: parts.attention,
            rope: parts.rope,
            intermediate_size: parts.intermediate_size,
            mlp_bias: parts.mlp_bias,
            moe_layers: if parts.moe.is_some() {
                parts.moe_layers
            } else {
                vec![false; self.num_hidden_layers]
            },
            moe: parts.moe,
            names: parts.names,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_ids,
            saved_dtype: self.saved_dtype,
            quantization: self.quantization,
        }
    }
}

/// The dtype `f` says the weights were saved in (`torch_dtype`, else `dtype`).
pub fn saved_dtype(f: &Fields<'_>) -> Result<Option<String>> {
    Ok(match f.opt_str("torch_dtype")? {
        Some(s) => Some(s.to_string()),
        None => f.opt_str("dtype")?.map(str::to_string),
    })
}

/// The checkpoint's `quantization_config`, validated (see [`super::quant`]).
pub fn quant_method(f: &Fields<'_>) -> Result<Option<QuantConfig>> {
    super::quant::parse(f)
}

/// Non-SiLU MLPs are refused with the field named.
fn check_hidden_act(f: &Fields<'_>) -> Result<()> {
    if let Some(act) = f.opt_str("hidden_act")? {
        if act != "silu" {
            return Err(f.unsupported("hidden_act", &Value::from(act), "only \"silu\" is supported"));
        }
    }
    Ok(())
}

/// Errors unless the rotary part of each head is the whole head (MLA families rotate a
/// separate `qk_rope_head_dim` part instead).
pub fn require_full_rotary(f: &Fields<'_>, rope: &RopeConfig) -> Result<()> {
    if rope.partial_rotary_factor != 1.0 {
        return Err(f.unsupported(
            "partial_rotary_factor",
            &Value::from(rope.partial_rotary_factor),
            "only 1.0 is supported for this architecture",
        ));
    }
    Ok(())
}

/// Checks that `top_k` experts out of `experts` can be chosen under the grouping: groups
/// divide the experts, the kept groups hold at least `top_k`, and `noaux_tc` groups have the
/// two experts it scores a group by. `top_k_key`/`experts_key` are the family's field names.
#[allow(clippy::too_many_arguments)]
pub fn check_routing(
    f: &Fields<'_>,
    experts_key: &str,
    experts: usize,
    top_k_key: &str,
    top_k: usize,
    method: TopkMethod,
    n_group: usize,
    topk_group: usize,
) -> Result<()> {
    if experts == 0 {
        return Err(f.unsupported(experts_key, &Value::from(0), "must be positive"));
    }
    if top_k == 0 {
        return Err(f.unsupported(top_k_key, &Value::from(0), "must be positive"));
    }
    if top_k > experts {
        return Err(f.unsupported(
            top_k_key,
            &Value::from(top_k),
            &format!("more than {experts_key} ({experts})"),
        ));
    }
    if method == TopkMethod::Greedy {
        return Ok(());
    }
    if n_group == 0 || !experts.is_multiple_of(n_group) {
        return Err(f.unsupported(
            "n_group",
            &Value::from(n_group),
            &format!("must divide {experts_key} ({experts})"),
        ));
    }
    if topk_group == 0 || topk_group > n_group {
        return Err(f.unsupported("topk_group", &Value::from(topk_group), "must be in 1..=n_group"));
    }
    let per_group = experts / n_group;
    if method == TopkMethod::NoauxTc && per_group < 2 {
        // With one group the fault is the expert count (families without groups say so).
        let (key, value) = if n_group == 1 {
            (experts_key, experts)
        } else {
            ("n_group", n_group)
        };
        return Err(f.unsupported(
            key,
            &Value::from(value),
            "noaux_tc scores a group by its two best experts; groups need at least 2 experts",
        ));
    }
    if topk_group * per_group < top_k {
        return Err(f.unsupported(
            "topk_group",
            &Value::from(topk_group),
            "the kept groups hold fewer experts than are chosen per token",
        ));
    }
    Ok(())
}

/// Errors unless a GQA shape is consistent: kv heads divide the query heads, the rotated
/// part fits the head and comes in pairs.
pub fn check_gqa_heads(
    f: &Fields<'_>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    rotary_key: &str,
) -> Result<()> {
    if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(f.unsupported(
            "num_key_value_heads",
            &Value::from(num_kv_heads),
            &format!("must divide num_attention_heads ({num_heads})"),
        ));
    }
    if rotary_dim == 0 || rotary_dim > head_dim || !rotary_dim.is_multiple_of(2) {
        return Err(f.unsupported(
            rotary_key,
            &Value::from(rotary_dim),
            &format!("the rotated part ({rotary_dim} of head_dim {head_dim}) must be even, positive and fit the head"),
        ));
    }
    Ok(())
}

/// The head layout of a GQA config: `num_attention_heads` (required), `num_key_value_heads`
/// (the class default when absent), `head_dim` (`hidden / heads` when absent, or the class
/// default when it has one). Returns `(heads, kv_heads, head_dim)`.
pub fn read_gqa_heads(
    f: &Fields<'_>,
    hidden: usize,
    default_kv_heads: usize,
    default_head_dim: Option<usize>,
) -> Result<(usize, usize, usize)> {
    let heads = f.positive("num_attention_heads", MAX_COUNT)?;
    let kv_heads = f.positive_or("num_key_value_heads", MAX_COUNT, default_kv_heads)?;
    let head_dim = match (f.opt_usize("head_dim", MAX_DIM)?, default_head_dim) {
        (Some(0), _) => return Err(f.unsupported("head_dim", &Value::from(0), "must be positive")),
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) => {
            if !hidden.is_multiple_of(heads) {
                return Err(f.missing("head_dim"));
            }
            hidden / heads
        }
    };
    Ok((heads, kv_heads, head_dim))
}

/// `int(head_dim * partial_rotary_factor)`, as transformers sizes the rotated part.
pub fn rotary_dim(head_dim: usize, rope: &RopeConfig) -> usize {
    (head_dim as f64 * rope.partial_rotary_factor) as usize
}

/// A GQA family's defaults and fixed choices for [`read_gqa`].
#[derive(Debug, Clone, Copy)]
pub struct GqaSpec {
    /// `num_key_value_heads` when absent.
    pub default_kv_heads: usize,
    /// `head_dim` when absent (`None`: `hidden / heads`).
    pub default_head_dim: Option<usize>,
    /// The config class's rope base and `partial_rotary_factor` defaults.
    pub default_theta: f64,
    pub default_partial_rotary_factor: f64,
    /// The family spells the rotated width as a top-level `rotary_dim` (MiniMax).
    pub reads_rotary_dim: bool,
    /// The family's RoPE rotates part of each head when the config says so (GLM, MiniMax);
    /// otherwise a `partial_rotary_factor` other than 1 is refused (Qwen3, Mixtral).
    pub partial_rotary: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: QkNorm,
}

/// The attention and rotary settings of a GQA config: heads, head width, the rotated part of
/// each head (half-split pairs), biases and QK-norm as the family fixes them, scale
/// `head_dim^-1/2`.
pub fn read_gqa(f: &Fields<'_>, common: &CommonFields, spec: GqaSpec) -> Result<(AttentionConfig, RopeConfig)> {
    let (heads, kv_heads, head_dim) =
        read_gqa_heads(f, common.hidden_size, spec.default_kv_heads, spec.default_head_dim)?;
    // MiniMax's Hub configs say `rotary_dim`; transformers 5 also writes it as
    // `rope_parameters.partial_rotary_factor`.
    let legacy_rotary = match spec.reads_rotary_dim {
        true => f.opt_usize("rotary_dim", MAX_DIM)?,
        false => None,
    };
    if let Some(r) = legacy_rotary {
        // Checked before it becomes a factor, so the message names the field as written.
        check_gqa_heads(f, heads, kv_heads, head_dim, r, "rotary_dim")?;
    }
    let rope = parse_rope(
        f,
        common.max_position_embeddings,
        RopeDefaults {
            theta: spec.default_theta,
            interleaved: false,
            partial_rotary_factor: legacy_rotary
                .map_or(spec.default_partial_rotary_factor, |r| r as f64 / head_dim as f64),
        },
    )?;
    if !spec.partial_rotary {
        require_full_rotary(f, &rope)?;
    }
    let rotary = match legacy_rotary {
        // transformers 5 writes both spellings; they must agree.
        Some(r) if (rope.partial_rotary_factor * head_dim as f64 - r as f64).abs() > 1e-6 => {
            return Err(f.unsupported(
                "rotary_dim",
                &Value::from(r),
                &format!(
                    "disagrees with partial_rotary_factor {} of head_dim {head_dim}",
                    rope.partial_rotary_factor
                ),
            ))
        }
        Some(r) => r,
        None => {
            let r = rotary_dim(head_dim, &rope);
            check_gqa_heads(f, heads, kv_heads, head_dim, r, "partial_rotary_factor")?;
            r
        }
    };
    let attention = AttentionConfig::Gqa(GqaConfig {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rotary_dim: rotary,
        qkv_bias: spec.qkv_bias,
        o_bias: spec.o_bias,
        qk_norm: spec.qk_norm,
        softmax_scale: (head_dim as f64).powf(-0.5),
    });
    Ok((attention, rope))
}

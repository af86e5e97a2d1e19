//! Rotary-embedding settings and their parsing from either spelling found in the wild: the
//! Hub's (`rope_theta` + `rope_scaling` with `type` or `rope_type`) and transformers 5's
//! (`rope_parameters`). Which dimensions rotate, and whether pairs are interleaved, is the
//! family's call; this only reads the frequencies.

use serde_json::Value;

use super::fields::Fields;
use crate::error::{ModelError, Result};

/// YaRN context extension (arXiv:2309.00071) as transformers configures it.
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

/// Rotary position embedding of the rotated part of q and k.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub yarn: Option<YarnScaling>,
    /// Rotate interleaved pairs `(x0,x1),(x2,x3)..` (DeepSeek's layout) rather than halves
    /// `(x[i], x[i + d/2])` (Llama's `rotate_half`).
    pub interleaved: bool,
    /// Fraction of each head that rotates (`partial_rotary_factor`, 1.0 when absent).
    pub partial_rotary_factor: f64,
}

/// YaRN's magnitude correction `0.1 * mscale * ln(scale) + 1` (1 when not extending).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

/// The family's defaults for [`parse_rope`].
#[derive(Debug, Clone, Copy)]
pub struct RopeDefaults {
    /// The config class's default base.
    pub theta: f64,
    /// The family's pair layout (not a config field for most families).
    pub interleaved: bool,
    /// `partial_rotary_factor` when the config has none (1.0; GLM-4.5 says 0.5).
    pub partial_rotary_factor: f64,
}

/// Reads the rotary settings of `f` (a root or `text_config` object).
pub fn parse_rope(f: &Fields<'_>, max_position_embeddings: usize, d: RopeDefaults) -> Result<RopeConfig> {
    let (default_theta, interleaved) = (d.theta, d.interleaved);
    // transformers reads `rope_scaling or rope_parameters`.
    let (params_key, params) = match (f.get("rope_scaling"), f.get("rope_parameters")) {
        (Some(s), _) => ("rope_scaling", Some(s)),
        (None, Some(p)) => ("rope_parameters", Some(p)),
        (None, None) => ("rope_scaling", None),
    };
    let params = match params {
        Some(Value::Object(m)) => Some(m),
        Some(other) => return Err(f.unsupported(params_key, other, "expected an object")),
        None => None,
    };
    let prefix = format!("{}{params_key}.", f.prefix);
    let inner = params.map(|map| Fields {
        map,
        arch: f.arch,
        prefix: &prefix,
    });
    let nested_theta = inner.as_ref().map(|p| p.opt_f64("rope_theta")).transpose()?.flatten();
    let theta = match nested_theta {
        Some(t) => t,
        None => f.opt_f64("rope_theta")?.unwrap_or(default_theta),
    };
    if theta <= 1.0 {
        let field = if nested_theta.is_some() {
            format!("{prefix}rope_theta")
        } else {
            f.name("rope_theta")
        };
        return Err(ModelError::UnsupportedValue {
            field,
            value: theta.to_string(),
            reason: "must be greater than 1".into(),
        });
    }
    let nested_partial = inner
        .as_ref()
        .map(|p| p.opt_f64("partial_rotary_factor"))
        .transpose()?
        .flatten();
    let (partial_key, partial) = match nested_partial {
        Some(x) => (format!("{prefix}partial_rotary_factor"), x),
        None => (
            f.name("partial_rotary_factor"),
            f.opt_f64("partial_rotary_factor")?.unwrap_or(d.partial_rotary_factor),
        ),
    };
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(ModelError::UnsupportedValue {
            field: partial_key,
            value: partial.to_string(),
            reason: "must be in (0, 1]".into(),
        });
    }
    let Some(p) = inner else {
        return Ok(RopeConfig {
            theta,
            yarn: None,
            interleaved,
            partial_rotary_factor: partial,
        });
    };
    let rope_type = match p.opt_str("rope_type")? {
        Some(t) => t,
        None => p.opt_str("type")?.unwrap_or("default"),
    };
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
        partial_rotary_factor: partial,
    })
}

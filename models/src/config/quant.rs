//! `quantization_config` of a checkpoint: which projections ship quantized and how.
//!
//! Owns [`QuantConfig`] (parsed and validated once, with errors naming the field) and the
//! module-name matching rules of the two formats: transformers' `modules_to_not_convert`
//! for FP8 and compressed-tensors' `targets` / `ignore` for INT4. It reads no tensors; the
//! loader asks [`QuantConfig::scheme_for`] about each projection it loads.

use regex::Regex;
use serde_json::Value;

use super::fields::{type_name, Fields};
use crate::error::{ModelError, Result};

/// The quantization a checkpoint declares.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantConfig {
    /// `quant_method: "fp8"`: float8 e4m3 `*.weight` with f32 `*.weight_scale_inv` over
    /// `[block_rows, block_cols]` blocks; linear layers not matched by `not_converted` may be
    /// quantized (the checkpoint's dtype says which are).
    Fp8 {
        block_rows: usize,
        block_cols: usize,
        not_converted: Vec<ModulePattern>,
    },
    /// `quant_method: "compressed-tensors"`, `format: "pack-quantized"`, symmetric 4-bit
    /// integer groups: `*.weight_packed` (int32), `*.weight_scale`, `*.weight_shape` for every
    /// linear layer a group targets and `ignore` does not exclude.
    Int4 {
        groups: Vec<Int4Group>,
        ignore: Vec<ModulePattern>,
    },
}

/// One `config_groups` entry of an INT4 checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Group {
    pub targets: Vec<ModulePattern>,
    pub group_size: usize,
}

/// How one projection is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleQuant {
    /// FP8 when its weight is stored as float8 (transformers leaves some linears, such as
    /// `lm_head`, in their own dtype without listing them).
    Fp8 {
        block_rows: usize,
        block_cols: usize,
    },
    Int4 {
        group_size: usize,
    },
}

/// A module name pattern in one of the two formats' matching rules.
#[derive(Debug, Clone)]
pub enum ModulePattern {
    /// transformers' `modules_to_not_convert` entry: the name starts with the pattern (read as
    /// a regex) up to a module boundary, or ends with it.
    NotConvert { raw: String, prefix: Option<Regex> },
    /// compressed-tensors' `re:` entry: the regex matches at the start of the name.
    Regex { raw: String, re: Regex },
    /// compressed-tensors' plain entry: the module name, or `Linear` (every linear layer; the
    /// only module class this engine quantizes). A name also matches at a module boundary at
    /// the end (`lm_head` matches `language_model.lm_head`): Kimi K2.5 ships `ignore:
    /// ["lm_head"]` for the multimodal model, whose output layer is `language_model.lm_head`.
    Exact(String),
}

impl PartialEq for ModulePattern {
    fn eq(&self, other: &Self) -> bool {
        self.raw() == other.raw() && std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

impl ModulePattern {
    /// The pattern as the config spells it.
    pub fn raw(&self) -> &str {
        match self {
            ModulePattern::NotConvert { raw, .. } | ModulePattern::Regex { raw, .. } | ModulePattern::Exact(raw) => raw,
        }
    }

    fn matches(&self, module: &str) -> bool {
        match self {
            ModulePattern::NotConvert { raw, prefix } => {
                module.ends_with(raw.as_str()) || prefix.as_ref().is_some_and(|re| re.is_match(module))
            }
            ModulePattern::Regex { re, .. } => re.is_match(module),
            ModulePattern::Exact(name) => {
                name == "Linear"
                    || name == module
                    || module
                        .strip_suffix(name.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            }
        }
    }
}

impl QuantConfig {
    /// How the linear layer `module` (a Hugging Face module name such as
    /// `model.layers.3.mlp.experts.7.gate_proj`) is stored; `None`: in plain floats.
    pub fn scheme_for(&self, module: &str) -> Option<ModuleQuant> {
        match self {
            QuantConfig::Fp8 {
                block_rows,
                block_cols,
                not_converted,
            } => (!not_converted.iter().any(|p| p.matches(module))).then_some(ModuleQuant::Fp8 {
                block_rows: *block_rows,
                block_cols: *block_cols,
            }),
            QuantConfig::Int4 { groups, ignore } => {
                if ignore.iter().any(|p| p.matches(module)) {
                    return None;
                }
                groups
                    .iter()
                    .find(|g| g.targets.iter().any(|p| p.matches(module)))
                    .map(|g| ModuleQuant::Int4 {
                        group_size: g.group_size,
                    })
            }
        }
    }

    /// `fp8` or `int4`, as `moe inspect` and `--quantization` name the formats.
    pub fn format_name(&self) -> &'static str {
        match self {
            QuantConfig::Fp8 { .. } => "fp8",
            QuantConfig::Int4 { .. } => "int4",
        }
    }

    /// One line for `moe inspect`.
    pub fn describe(&self) -> String {
        match self {
            QuantConfig::Fp8 {
                block_rows, block_cols, ..
            } => format!("fp8 e4m3, {block_rows}x{block_cols} block scales"),
            QuantConfig::Int4 { groups, .. } => {
                let sizes: Vec<String> = groups.iter().map(|g| g.group_size.to_string()).collect();
                format!(
                    "int4 symmetric, groups of {} (compressed-tensors pack-quantized)",
                    sizes.join("/")
                )
            }
        }
    }

    /// The format `--quantization fp8|int4` gives a synthetic model: FP8 as DeepSeek-V3
    /// ships (128x128 blocks; routers and `lm_head` stay plain), INT4 as Kimi K2.5 ships
    /// (groups of 32, routed experts only).
    pub fn synthetic(format: &str) -> Option<Self> {
        let json = match format {
            "fp8" => serde_json::json!({
                "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]
            }),
            "int4" => serde_json::json!({
                "quant_method": "compressed-tensors", "format": "pack-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": null,
                    "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                                "symmetric": true, "dynamic": false, "actorder": null}}},
                "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                           "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
            }),
            _ => return None,
        };
        let root = serde_json::json!({ "quantization_config": json });
        let f = Fields::root(&root, "synthetic").ok()?;
        parse(&f).ok().flatten()
    }
}

/// Reads `quantization_config` of `f`, if present, refusing what the engine cannot run.
pub fn parse(f: &Fields<'_>) -> Result<Option<QuantConfig>> {
    let Some(q) = f.object("quantization_config", "quantization_config.")? else {
        return Ok(None);
    };
    let method = q.opt_str("quant_method")?.ok_or_else(|| q.missing("quant_method"))?;
    match method {
        "fp8" => parse_fp8(&q).map(Some),
        "compressed-tensors" => parse_int4(&q).map(Some),
        other => Err(q.unsupported(
            "quant_method",
            &Value::from(other),
            "supported: fp8 (block-scaled e4m3) and compressed-tensors (pack-quantized int4)",
        )),
    }
}

fn parse_fp8(q: &Fields<'_>) -> Result<QuantConfig> {
    if let Some(fmt) = q.opt_str("fmt")? {
        if !matches!(fmt, "e4m3" | "float8_e4m3fn") {
            return Err(q.unsupported("fmt", &Value::from(fmt), "only e4m3 FP8 weights are supported"));
        }
    }
    if let Some(scheme) = q.opt_str("activation_scheme")? {
        if scheme != "dynamic" {
            return Err(q.unsupported(
                "activation_scheme",
                &Value::from(scheme),
                "only dynamic activations (the weights alone are quantized) are supported",
            ));
        }
    }
    let block = q.usize_list("weight_block_size", 1 << 16)?;
    let [block_rows, block_cols] = block[..] else {
        return Err(match q.get("weight_block_size") {
            None => q.missing("weight_block_size"),
            Some(v) => q.unsupported("weight_block_size", v, "expected [rows, columns]"),
        });
    };
    if block_rows == 0 || block_cols == 0 {
        return Err(q.unsupported("weight_block_size", &Value::from(block), "block sides must be positive"));
    }
    let not_converted = string_list(q, "modules_to_not_convert")?
        .into_iter()
        .map(|raw| {
            // transformers: `re.match(f"(?:{key})(?:(?<=\.)|(?=\.|$))", name)`; without
            // look-around, a key that ends in '.' matches as a plain prefix regex, any other
            // must be followed by '.' or the end of the name.
            let tail = if raw.ends_with('.') { "" } else { r"(?:\.|$)" };
            let prefix = Regex::new(&format!("^(?:{raw}){tail}")).ok();
            ModulePattern::NotConvert { raw, prefix }
        })
        .collect();
    Ok(QuantConfig::Fp8 {
        block_rows,
        block_cols,
        not_converted,
    })
}

fn parse_int4(q: &Fields<'_>) -> Result<QuantConfig> {
    match q.opt_str("format")? {
        Some("pack-quantized") => {}
        Some(other) => {
            return Err(q.unsupported(
                "format",
                &Value::from(other),
                "only pack-quantized compressed-tensors checkpoints are supported",
            ))
        }
        None => return Err(q.missing("format")),
    }
    let groups_obj = q
        .object("config_groups", "quantization_config.config_groups.")?
        .ok_or_else(|| q.missing("config_groups"))?;
    let mut groups = Vec::new();
    for (name, value) in groups_obj.map {
        let prefix = format!("quantization_config.config_groups.{name}.");
        let Value::Object(map) = value else {
            return Err(groups_obj.unsupported(name, value, "expected an object"));
        };
        let g = Fields {
            map,
            arch: q.arch,
            prefix: &prefix,
        };
        if let Some(act) = g.get("input_activations") {
            return Err(g.unsupported("input_activations", act, "only weight-only INT4 (W4A16) is supported"));
        }
        let wprefix = format!("{prefix}weights.");
        let w = g.object("weights", &wprefix)?.ok_or_else(|| g.missing("weights"))?;
        let bits = w.usize_req("num_bits", 64)?;
        if bits != 4 {
            return Err(w.unsupported(
                "num_bits",
                &Value::from(bits),
                "only 4-bit integer weights are supported",
            ));
        }
        if let Some(t) = w.opt_str("type")? {
            if t != "int" {
                return Err(w.unsupported("type", &Value::from(t), "only integer weights are supported"));
            }
        }
        match w.opt_str("strategy")? {
            Some("group") => {}
            Some(other) => {
                return Err(w.unsupported("strategy", &Value::from(other), "only group quantization is supported"))
            }
            None => return Err(w.missing("strategy")),
        }
        if !w.bool_or("symmetric", true)? {
            return Err(w.unsupported(
                "symmetric",
                &Value::from(false),
                "asymmetric INT4 (zero points) is not supported",
            ));
        }
        if w.bool_or("dynamic", false)? {
            return Err(w.unsupported("dynamic", &Value::from(true), "static weight scales are required"));
        }
        if let Some(order) = w.get("actorder") {
            return Err(w.unsupported("actorder", order, "activation-ordered groups (g_idx) are not supported"));
        }
        let group_size = w.positive("group_size", 1 << 20)?;
        let targets = string_list(&g, "targets")?
            .into_iter()
            .map(|t| compressed_tensors_pattern(&g, "targets", t))
            .collect::<Result<Vec<_>>>()?;
        if targets.is_empty() {
            return Err(g.missing("targets"));
        }
        groups.push(Int4Group { targets, group_size });
    }
    if groups.is_empty() {
        return Err(q.unsupported("config_groups", &Value::from("{}"), "no quantization group"));
    }
    let ignore = string_list(q, "ignore")?
        .into_iter()
        .map(|t| compressed_tensors_pattern(q, "ignore", t))
        .collect::<Result<Vec<_>>>()?;
    Ok(QuantConfig::Int4 { groups, ignore })
}

fn compressed_tensors_pattern(f: &Fields<'_>, key: &str, raw: String) -> Result<ModulePattern> {
    match raw.strip_prefix("re:") {
        Some(pattern) => {
            let re = Regex::new(&format!("^(?:{pattern})"))
                .map_err(|e| f.unsupported(key, &Value::from(raw.as_str()), &format!("not a regex: {e}")))?;
            Ok(ModulePattern::Regex { raw, re })
        }
        None => Ok(ModulePattern::Exact(raw)),
    }
}

fn string_list(f: &Fields<'_>, key: &str) -> Result<Vec<String>> {
    let Some(v) = f.get(key) else { return Ok(Vec::new()) };
    let bad = || ModelError::UnsupportedValue {
        field: f.name(key),
        value: type_name(v).into(),
        reason: "expected a list of module names".into(),
    };
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|s| s.as_str().map(str::to_string).ok_or_else(bad))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parsed(q: Value) -> Result<Option<QuantConfig>> {
        let root = json!({ "quantization_config": q });
        parse(&Fields::root(&root, "test").unwrap())
    }

    fn kimi() -> Value {
        let text = include_str!("../../configs/kimi-k2.5/config.json");
        let v: Value = serde_json::from_str(text).unwrap();
        v["text_config"]["quantization_config"].clone()
    }

    #[test]
    fn fp8_not_converted_follows_transformers_matching() {
        let minimax: Value = serde_json::from_str(include_str!("../../configs/minimax-m2.7/config.json")).unwrap();
        let q = parsed(minimax["quantization_config"].clone()).unwrap().unwrap();
        let fp8 = Some(ModuleQuant::Fp8 {
            block_rows: 128,
            block_cols: 128,
        });
        assert_eq!(q.scheme_for("model.layers.0.block_sparse_moe.experts.3.w1"), fp8);
        assert_eq!(q.scheme_for("model.layers.0.self_attn.q_proj"), fp8);
        assert_eq!(q.scheme_for("model.layers.0.block_sparse_moe.gate"), None);
        assert_eq!(q.scheme_for("lm_head"), None);
        // "gate" as a suffix or a bounded prefix, never inside `gate_proj`.
        let q = parsed(json!({"quant_method": "fp8", "weight_block_size": [128, 128],
                              "modules_to_not_convert": ["gate", "model.layers.1"]}))
        .unwrap()
        .unwrap();
        assert!(q.scheme_for("model.layers.0.mlp.experts.0.gate_proj").is_some());
        assert!(q.scheme_for("model.layers.1.mlp.down_proj").is_none());
        assert!(q.scheme_for("model.layers.11.mlp.down_proj").is_some());
    }

    #[test]
    fn kimi_quantizes_only_routed_experts() {
        let q = parsed(kimi()).unwrap().unwrap();
        let p = "language_model.model.layers.3";
        assert_eq!(
            q.scheme_for(&format!("{p}.mlp.experts.17.down_proj")),
            Some(ModuleQuant::Int4 { group_size: 32 })
        );
        for plain in ["self_attn.q_a_proj", "mlp.shared_experts.up_proj", "mlp.gate_proj"] {
            assert_eq!(q.scheme_for(&format!("{p}.{plain}")), None, "{plain}");
        }
        assert_eq!(q.scheme_for("language_model.lm_head"), None);
        assert_eq!(q.scheme_for("lm_head"), None);
        assert!(q.describe().contains("groups of 32"));
    }

    #[test]
    fn unsupported_settings_name_their_field() {
        let with = |path: &[&str], v: Value| {
            let mut q = kimi();
            let mut at = &mut q;
            for p in &path[..path.len() - 1] {
                at = &mut at[*p];
            }
            at[path[path.len() - 1]] = v;
            parsed(q).unwrap_err().to_string()
        };
        let field = |k: &'static str| vec!["config_groups", "group_0", "weights", k];
        assert!(
            with(&field("num_bits"), json!(8)).contains("quantization_config.config_groups.group_0.weights.num_bits")
        );
        assert!(with(&field("symmetric"), json!(false)).contains("weights.symmetric"));
        assert!(with(&field("strategy"), json!("channel")).contains("weights.strategy"));
        assert!(with(&["format"], json!("marlin-24")).contains("quantization_config.format"));
        let e = parsed(json!({"quant_method": "gptq"})).unwrap_err().to_string();
        assert!(e.contains("quantization_config.quant_method"), "{e}");
        let e = parsed(json!({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("quantization_config.fmt"), "{e}");
        let e = parsed(json!({"quant_method": "fp8"})).unwrap_err().to_string();
        assert!(e.contains("weight_block_size"), "{e}");
        assert!(parsed(json!("fp8")).is_err());
    }

    #[test]
    fn synthetic_formats_parse() {
        assert_eq!(QuantConfig::synthetic("fp8").unwrap().format_name(), "fp8");
        assert_eq!(QuantConfig::synthetic("int4").unwrap().format_name(), "int4");
        assert!(QuantConfig::synthetic("nf4").is_none());
    }
}

//! Typed reads of config.json fields whose errors name the field (with its nesting, e.g.
//! `rope_scaling.factor` or `text_config.hidden_size`) and the architecture that needs it.
//! Every family's parser reads its config through this; nothing here knows a family.

use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

/// Upper bound for any single dimension in a config: larger values are taken as corrupt
/// before anything is allocated (the biggest real value, a 163k vocabulary, is far below).
pub const MAX_DIM: usize = 1 << 22;
/// Upper bound for layer, head and expert counts.
pub const MAX_COUNT: usize = 1 << 16;

/// A JSON object of a config (the root, `text_config`, `rope_scaling`, ...).
#[derive(Clone, Copy)]
pub struct Fields<'a> {
    pub map: &'a Map<String, Value>,
    /// The architecture being parsed, for "required for X" messages.
    pub arch: &'a str,
    /// Prepended to every field name in messages (`""`, `"text_config."`, `"rope_scaling."`).
    pub prefix: &'a str,
}

impl<'a> Fields<'a> {
    /// The root object of a config.json.
    pub fn root(value: &'a Value, arch: &'a str) -> Result<Self> {
        let map = value.as_object().ok_or_else(|| ModelError::UnsupportedValue {
            field: "<root>".into(),
            value: type_name(value).into(),
            reason: "config.json must be a JSON object".into(),
        })?;
        Ok(Fields { map, arch, prefix: "" })
    }

    /// The nested object `key` (e.g. `text_config`), if present; `prefix` must be `key.`.
    pub fn object(&self, key: &str, prefix: &'a str) -> Result<Option<Fields<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Fields {
                map,
                arch: self.arch,
                prefix,
            })),
            Some(other) => Err(self.unsupported(key, other, "expected an object")),
        }
    }

    pub fn name(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    /// The value, treating JSON `null` as absent.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Whether the key is present at all (even as `null`).
    pub fn has_key(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub fn unsupported(&self, key: &str, value: &Value, reason: &str) -> ModelError {
        ModelError::UnsupportedValue {
            field: self.name(key),
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    pub fn missing(&self, key: &str) -> ModelError {
        ModelError::MissingField {
            field: self.name(key),
            architecture: self.arch.to_string(),
        }
    }

    pub fn opt_usize(&self, key: &str, max: usize) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let n = v
            .as_u64()
            .ok_or_else(|| self.unsupported(key, v, "expected a non-negative integer"))?;
        if n as u128 > max as u128 {
            return Err(self.unsupported(key, v, &format!("larger than the limit {max}")));
        }
        Ok(Some(n as usize))
    }

    pub fn usize_req(&self, key: &str, max: usize) -> Result<usize> {
        self.opt_usize(key, max)?.ok_or_else(|| self.missing(key))
    }

    pub fn positive(&self, key: &str, max: usize) -> Result<usize> {
        let n = self.usize_req(key, max)?;
        if n == 0 {
            return Err(self.unsupported(key, &Value::from(0), "must be positive"));
        }
        Ok(n)
    }

    /// An optional positive count, `default` when absent.
    pub fn positive_or(&self, key: &str, max: usize, default: usize) -> Result<usize> {
        match self.opt_usize(key, max)? {
            Some(0) => Err(self.unsupported(key, &Value::from(0), "must be positive")),
            Some(n) => Ok(n),
            None => Ok(default),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let x = v
            .as_f64()
            .ok_or_else(|| self.unsupported(key, v, "expected a number"))?;
        if !x.is_finite() {
            return Err(self.unsupported(key, v, "must be finite"));
        }
        Ok(Some(x))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_bool()
            .map(Some)
            .ok_or_else(|| self.unsupported(key, v, "expected true or false"))
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        Ok(self.opt_bool(key)?.unwrap_or(default))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        v.as_str()
            .map(Some)
            .ok_or_else(|| self.unsupported(key, v, "expected a string"))
    }

    /// A list of non-negative integers (e.g. Qwen3's `mlp_only_layers`); empty when absent.
    pub fn usize_list(&self, key: &str, max: usize) -> Result<Vec<usize>> {
        let Some(v) = self.get(key) else { return Ok(vec![]) };
        let bad = || self.unsupported(key, v, &format!("expected a list of integers up to {max}"));
        let items = v.as_array().ok_or_else(bad)?;
        items
            .iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&n| n as u128 <= max as u128)
                    .map(|n| n as usize)
                    .ok_or_else(bad)
            })
            .collect()
    }

    /// A token id field that may be an integer or a list of integers.
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
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

    /// Errors unless `key` is absent or one of `allowed` (string values).
    pub fn expect_str_in(&self, key: &str, allowed: &[&str]) -> Result<()> {
        if let Some(s) = self.opt_str(key)? {
            if !allowed.contains(&s) {
                let reason = format!("supported: {}", allowed.join(", "));
                return Err(self.unsupported(key, &Value::from(s), &reason));
            }
        }
        Ok(())
    }
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

//! Formats that spell each argument as a tagged key/value pair: GLM-4.5 and
//! later, MiniMax-M2 and Qwen3-Coder. A call is reported with its name as
//! soon as the name is complete and with its arguments, as one JSON object in
//! the model's order, when it closes. A value is a JSON string when the
//! tool's schema says `string` (or it is not valid JSON), else the JSON it spells.

use super::{CallProgress, SectionScan, ToolSchemas};

const TOOL_CALL_END: &str = "</tool_call>";

/// JSON text of one argument value.
fn typed_value(raw: &str, ty: Option<&str>) -> String {
    let as_string = || serde_json::Value::String(raw.to_owned()).to_string();
    if ty == Some("string") {
        return as_string();
    }
    match serde_json::from_str::<serde_json::Value>(raw.trim()) {
        Ok(v) => v.to_string(),
        Err(_) => as_string(),
    }
}

/// `{"k":v,...}` in the given order; a pair's own kind (`string` / `json`),
/// when the markup says it, wins over the schema's type.
fn json_object<'a>(
    tool: &str,
    pairs: impl IntoIterator<Item = (&'a str, &'a str, Option<&'static str>)>,
    schemas: &ToolSchemas,
) -> String {
    let mut out = String::from("{");
    for (i, (k, v, kind)) in pairs.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::Value::String(k.to_owned()).to_string());
        out.push(':');
        out.push_str(&typed_value(v, kind.or_else(|| schemas.param_type(tool, k))));
    }
    out.push('}');
    out
}

/// A value written on lines of its own (`<parameter=k>\nvalue\n</parameter>`)
/// loses the one newline on each side.
fn strip_one_newline(v: &str) -> &str {
    let v = v.strip_prefix('\n').unwrap_or(v);
    v.strip_suffix('\n').unwrap_or(v)
}

/// Pairs `<open_key>K</close_key> <open_value>V</close_value>` in `body`.
fn tagged_pairs(body: &str, key: (&str, &str), value: (&str, &str)) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = body;
    while let Some(k0) = rest.find(key.0) {
        let after_key = &rest[k0 + key.0.len()..];
        let Some(k1) = after_key.find(key.1) else { break };
        let k = after_key[..k1].trim().to_owned();
        let after = &after_key[k1 + key.1.len()..];
        let Some(v0) = after.find(value.0) else { break };
        let after_open = &after[v0 + value.0.len()..];
        let Some(v1) = after_open.find(value.1) else { break };
        pairs.push((k, after_open[..v1].to_owned()));
        rest = &after_open[v1 + value.1.len()..];
    }
    pairs
}

/// GLM: `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>`
/// (GLM-4.5 puts newlines between the parts; GLM-4.7 none).
pub(super) fn scan_glm(section: &str, schemas: &ToolSchemas, at_eof: bool) -> SectionScan {
    let mut scan = SectionScan::default();
    let end = section.find(TOOL_CALL_END);
    let inner = &section[..end.unwrap_or(section.len())];
    let complete = end.is_some() || at_eof;
    let name_end = inner.find(['<', '\n']);
    let name = inner[..name_end.unwrap_or(inner.len())].trim();
    if name.is_empty() || (name_end.is_none() && !complete) {
        scan.end = end.map(|e| e + TOOL_CALL_END.len());
        return scan;
    }
    let arguments = if complete {
        let pairs = tagged_pairs(inner, ("<arg_key>", "</arg_key>"), ("<arg_value>", "</arg_value>"));
        json_object(name, pairs.iter().map(|(k, v)| (k.as_str(), v.as_str(), None)), schemas)
    } else {
        String::new()
    };
    scan.calls.push(CallProgress {
        name: name.to_owned(),
        id: None,
        arguments,
        complete,
    });
    scan.end = end.map(|e| e + TOOL_CALL_END.len());
    scan
}

/// The tags of an invoke-style format (MiniMax-M2, DeepSeek's DSML, Qwen3-Coder).
struct InvokeTags {
    section_ends: &'static [&'static str],
    invoke: &'static str,
    invoke_end: &'static str,
    parameter: &'static str,
    parameter_end: &'static str,
}

const MINIMAX: InvokeTags = InvokeTags {
    section_ends: &["</minimax:tool_call>"],
    invoke: "<invoke name=",
    invoke_end: "</invoke>",
    parameter: "<parameter name=",
    parameter_end: "</parameter>",
};

const DSML: InvokeTags = InvokeTags {
    section_ends: &["</｜DSML｜function_calls>", "</｜DSML｜tool_calls>"],
    invoke: "<｜DSML｜invoke name=",
    invoke_end: "</｜DSML｜invoke>",
    parameter: "<｜DSML｜parameter name=",
    parameter_end: "</｜DSML｜parameter>",
};

/// MiniMax-M2: `<minimax:tool_call>` then `<invoke name="NAME"><parameter name="K">V</parameter></invoke>`
/// repeated, closed by `</minimax:tool_call>`.
pub(super) fn scan_minimax(section: &str, schemas: &ToolSchemas, at_eof: bool) -> SectionScan {
    scan_invokes(section, schemas, &MINIMAX, at_eof)
}

/// DeepSeek V3.2 / V4 (DSML): `<｜DSML｜function_calls>` (V4: `tool_calls`) then
/// `<｜DSML｜invoke name="NAME"><｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter></｜DSML｜invoke>`;
/// `string="true"` values are text as written, `"false"` ones JSON.
pub(super) fn scan_dsml(section: &str, schemas: &ToolSchemas, at_eof: bool) -> SectionScan {
    scan_invokes(section, schemas, &DSML, at_eof)
}

fn scan_invokes(section: &str, schemas: &ToolSchemas, tags: &InvokeTags, at_eof: bool) -> SectionScan {
    let mut scan = SectionScan::default();
    let end = tags
        .section_ends
        .iter()
        .filter_map(|e| section.find(e).map(|at| (at, e.len())))
        .min();
    let inner = &section[..end.map_or(section.len(), |(at, _)| at)];
    // A closed section ends its last invoke too.
    let closing = end.is_some() || at_eof;
    let mut rest = inner;
    while let Some(at) = rest.find(tags.invoke) {
        let after = &rest[at + tags.invoke.len()..];
        let Some(close) = after.find('>') else { break };
        let name = after[..close].trim().trim_matches(['"', '\'']).to_owned();
        let body = &after[close + 1..];
        let own_end = body.find(tags.invoke_end);
        let call_end = own_end.or(closing.then_some(body.len()));
        let arguments = match call_end {
            Some(e) => invoke_arguments(&name, &body[..e], schemas, tags),
            None => String::new(),
        };
        if name.is_empty() {
            break;
        }
        scan.calls.push(CallProgress {
            name,
            id: None,
            arguments,
            complete: call_end.is_some(),
        });
        match own_end {
            Some(e) => rest = &body[e + tags.invoke_end.len()..],
            None => break,
        }
    }
    scan.end = end.map(|(at, len)| at + len);
    scan
}

/// The parameters of one invoke as a JSON object. A parameter head is
/// `"K"` or `"K" string="true|false"`; the attribute, when there, decides
/// string or JSON over the schema.
fn invoke_arguments(tool: &str, body: &str, schemas: &ToolSchemas, tags: &InvokeTags) -> String {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut kinds: Vec<Option<&'static str>> = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.find(tags.parameter) {
        let after = &rest[at + tags.parameter.len()..];
        let Some(gt) = after.find('>') else { break };
        let head = &after[..gt];
        let (key, attrs) = match head.trim_start().strip_prefix('"').and_then(|h| h.split_once('"')) {
            Some((k, attrs)) => (k.to_owned(), attrs),
            None => (head.trim().trim_matches('\'').to_owned(), ""),
        };
        let kind = if attrs.contains("string=\"true\"") {
            Some("string")
        } else if attrs.contains("string=\"false\"") {
            Some("json")
        } else {
            None
        };
        let value_and_rest = &after[gt + 1..];
        let Some(close) = value_and_rest.find(tags.parameter_end) else {
            break;
        };
        pairs.push((key, strip_one_newline(&value_and_rest[..close]).to_owned()));
        kinds.push(kind);
        rest = &value_and_rest[close + tags.parameter_end.len()..];
    }
    json_object(
        tool,
        pairs
            .iter()
            .zip(kinds)
            .map(|((k, v), kind)| (k.as_str(), v.as_str(), kind)),
        schemas,
    )
}

const QWEN3_CODER: InvokeTags = InvokeTags {
    section_ends: &[TOOL_CALL_END],
    invoke: "<function=",
    invoke_end: "</function>",
    parameter: "<parameter=",
    parameter_end: "</parameter>",
};

/// Qwen3-Coder: `<tool_call><function=NAME><parameter=K>\nV\n</parameter></function></tool_call>`.
pub(super) fn scan_qwen3_coder(section: &str, schemas: &ToolSchemas, at_eof: bool) -> SectionScan {
    scan_invokes(section, schemas, &QWEN3_CODER, at_eof)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_follow_the_schema_type() {
        assert_eq!(typed_value("5", Some("string")), "\"5\"");
        assert_eq!(typed_value("5", Some("integer")), "5");
        assert_eq!(typed_value(" [1, 2] ", None), "[1,2]");
        assert_eq!(typed_value("Paris", Some("integer")), "\"Paris\"");
        assert_eq!(typed_value("a \"q\"\n", None), "\"a \\\"q\\\"\\n\"");
    }

    #[test]
    fn glm_pairs_keep_the_model_order() {
        let s = tagged_pairs(
            "f<arg_key>z</arg_key><arg_value>1</arg_value>\n<arg_key>a</arg_key>\n<arg_value>x</arg_value>",
            ("<arg_key>", "</arg_key>"),
            ("<arg_value>", "</arg_value>"),
        );
        assert_eq!(s, vec![("z".into(), "1".into()), ("a".into(), "x".into())]);
    }
}

//! Chat templates: loads a model's Hugging Face Jinja chat template and renders OpenAI chat messages into the prompt text.
//!
//! The template comes from `chat_template.jinja` in the model directory, or
//! else from the `chat_template` field of `tokenizer_config.json` (a string,
//! or Hugging Face's list form `[{"name": "default", "template": "..."}]`),
//! or else from a processor-style `chat_template.json`.
//!
//! Rendering follows what `transformers`' `apply_chat_template` does: the
//! template is compiled with `trim_blocks` and `lstrip_blocks` on, the context
//! holds `messages`, `add_generation_prompt`, `tools` and `documents` (both
//! `none`), `bos_token` and `eos_token` (left undefined when the model has
//! none), and the globals `raise_exception(msg)` and `strftime_now(fmt)`.
//! Python-style methods (`str.strip()`, `dict.items()` ...) come from
//! `minijinja_contrib::pycompat`, `tojson` behaves like transformers' (no HTML
//! escaping, `ensure_ascii=False`, `indent`, `separators`, `sort_keys`), and
//! undefined values are as lenient as Jinja2's default `Undefined`. No loader
//! is installed, so `{% include %}` / `{% import %}` cannot read files.
//!
//! A template comes with the checkpoint, which may be hostile: rendering runs
//! on a fuel budget ([`RENDER_FUEL`] instructions) so a template that loops
//! forever fails with an error instead of hanging a server thread, and
//! minijinja bounds recursion, `range` and string/list repetition itself.
//! Memory is not bounded: a template that doubles a string in a loop
//! (`{% set ns.s = ns.s ~ ns.s %}` forty times) exhausts it in few
//! instructions, so only serve templates you would run as code.
//!
//! The rendered text normally begins with the BOS token already (as the
//! template writes it), so callers should tokenize it without adding special
//! tokens again — the same as `apply_chat_template(..., tokenize=True)`.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};
use serde::{Deserialize, Deserializer, Serialize};

/// Name under which the template is stored in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Template instructions one render may execute. The real DeepSeek-V3 template spends
/// roughly a hundred per message, so this allows conversations far beyond any request
/// body we accept, while a runaway template stops within about a second.
pub const RENDER_FUEL: u64 = 50_000_000;

/// Roles `render` accepts.
const VALID_ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer"];

/// One OpenAI chat message.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    /// A string or a list of content parts; a missing or `null` content is an
    /// empty string.
    #[serde(default, deserialize_with = "content_or_null")]
    pub content: MessageContent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with plain-text content and no name.
    #[allow(dead_code)]
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: MessageContent::Text(content.into()),
            name: None,
        }
    }
}

/// OpenAI message content: a string, or a list of parts such as
/// `[{"type": "text", "text": "..."}]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl Default for MessageContent {
    fn default() -> Self {
        MessageContent::Text(String::new())
    }
}

impl From<String> for MessageContent {
    fn from(s: String) -> Self {
        MessageContent::Text(s)
    }
}

impl From<&str> for MessageContent {
    fn from(s: &str) -> Self {
        MessageContent::Text(s.to_owned())
    }
}

/// One part of a list-form content. Only `"type": "text"` parts can be
/// rendered; other fields (`image_url`, ...) are kept in `extra`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ContentPart {
    /// A `{"type": "text", "text": ...}` part.
    #[allow(dead_code)]
    pub fn text(text: impl Into<String>) -> Self {
        ContentPart {
            kind: "text".to_owned(),
            text: Some(text.into()),
            extra: serde_json::Map::new(),
        }
    }
}

impl MessageContent {
    /// The content as the plain string handed to templates: text parts are
    /// concatenated as they are (no separator); any other part type is an
    /// error.
    pub fn to_text(&self) -> Result<String, ChatTemplateError> {
        match self {
            MessageContent::Text(s) => Ok(s.clone()),
            MessageContent::Parts(parts) => {
                let mut out = String::new();
                for part in parts {
                    if part.kind != "text" {
                        return Err(ChatTemplateError::InvalidMessage(format!(
                            "unsupported content part type {:?} (only \"text\" parts are supported)",
                            part.kind
                        )));
                    }
                    match &part.text {
                        Some(t) => out.push_str(t),
                        None => {
                            return Err(ChatTemplateError::InvalidMessage(
                                "content part of type \"text\" has no \"text\" field".to_owned(),
                            ))
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

fn content_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<MessageContent, D::Error> {
    Ok(Option::<MessageContent>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The model directory has no usable chat template (or cannot be read).
    #[error("no chat template: {0}")]
    Missing(String),
    /// The template (or the config holding it) does not parse.
    #[error("chat template syntax error: {0}")]
    Syntax(String),
    /// Rendering failed, including the template calling `raise_exception`
    /// (the message is then exactly what the template passed).
    #[error("chat template error: {0}")]
    Render(String),
    /// The request's messages are unacceptable (none, unknown role, non-text
    /// content part).
    #[error("invalid chat message: {0}")]
    InvalidMessage(String),
}

/// A compiled chat template plus the special tokens it gets.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Loads the template of the model in `dir`.
    ///
    /// Looks for `chat_template.jinja` (wins), then the `chat_template` field
    /// of `tokenizer_config.json` (a string, or a list of
    /// `{"name", "template"}` from which `"default"` is picked), then
    /// `chat_template.json`. `bos_token` / `eos_token` come from
    /// `tokenizer_config.json` (a plain string or an `AddedToken` object).
    ///
    /// `Ok(None)`: the directory ships no chat template at all.
    /// `Err(Missing)`: the directory or a file cannot be read, or a list-form
    /// template has no `"default"` entry. `Err(Syntax)`: a config file is not
    /// valid JSON or the template does not compile.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, ChatTemplateError> {
        if !dir.is_dir() {
            return Err(ChatTemplateError::Missing(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?;

        let (bos_token, eos_token) = match &config {
            Some(cfg) => (
                special_token(cfg, "bos_token", &config_path)?,
                special_token(cfg, "eos_token", &config_path)?,
            ),
            None => (None, None),
        };

        let jinja_path = dir.join("chat_template.jinja");
        let template = if jinja_path.is_file() {
            Some(
                std::fs::read_to_string(&jinja_path)
                    .map_err(|e| ChatTemplateError::Missing(format!("cannot read {}: {e}", jinja_path.display())))?,
            )
        } else {
            let from_config = match &config {
                Some(cfg) => template_from_field(cfg.get("chat_template"), &config_path)?,
                None => None,
            };
            match from_config {
                Some(t) => Some(t),
                None => {
                    let json_path = dir.join("chat_template.json");
                    match read_json_if_exists(&json_path)? {
                        Some(v) => template_from_field(v.get("chat_template"), &json_path)?,
                        None => None,
                    }
                }
            }
        };

        match template {
            Some(t) => Self::new(&t, bos_token, eos_token).map(Some),
            None => Ok(None),
        }
    }

    /// Compiles `template` (Jinja source) with the given special tokens.
    pub fn new(
        template: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| ChatTemplateError::Syntax(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(RENDER_FUEL));
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, template.to_owned())
            .map_err(|e| ChatTemplateError::Syntax(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source: template.to_owned(),
            bos_token,
            eos_token,
        })
    }

    /// The template's Jinja source.
    #[allow(dead_code)]
    pub fn source(&self) -> &str {
        &self.source
    }

    #[allow(dead_code)]
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    #[allow(dead_code)]
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders `messages` into prompt text. With `add_generation_prompt` the
    /// template appends the assistant-turn header, as in Hugging Face.
    ///
    /// Requires at least one message, every role among
    /// system/user/assistant/tool/developer, and text-only content; otherwise
    /// `InvalidMessage`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatTemplateError> {
        if messages.is_empty() {
            return Err(ChatTemplateError::InvalidMessage(
                "messages must contain at least one message".to_owned(),
            ));
        }
        let mut rendered_messages = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            if !VALID_ROLES.contains(&m.role.as_str()) {
                return Err(ChatTemplateError::InvalidMessage(format!(
                    "messages[{i}]: unknown role {:?} (expected one of {})",
                    m.role,
                    VALID_ROLES.join(", ")
                )));
            }
            let content = m.content.to_text().map_err(|e| match e {
                ChatTemplateError::InvalidMessage(msg) => {
                    ChatTemplateError::InvalidMessage(format!("messages[{i}]: {msg}"))
                }
                other => other,
            })?;
            let mut fields = vec![
                ("role", Value::from(m.role.as_str())),
                ("content", Value::from(content)),
            ];
            if let Some(name) = &m.name {
                fields.push(("name", Value::from(name.as_str())));
            }
            rendered_messages.push(Value::from_object(OrderedMap(fields)));
        }

        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from(rendered_messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        if let Some(b) = &self.bos_token {
            ctx.push(("bos_token", Value::from(b.as_str())));
        }
        if let Some(e) = &self.eos_token {
            ctx.push(("eos_token", Value::from(e.as_str())));
        }
        let ctx = Value::from(ctx.into_iter().collect::<std::collections::BTreeMap<&str, Value>>());

        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Render(describe(&e)))?;
        tmpl.render(ctx).map_err(|e| match raised_message(&e) {
            Some(msg) => ChatTemplateError::Render(msg),
            None => ChatTemplateError::Render(describe(&e)),
        })
    }
}

// ---------------------------------------------------------------------------
// Loading helpers

fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>, ChatTemplateError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ChatTemplateError::Missing(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ChatTemplateError::Syntax(format!("{}: {e}", path.display())))
}

/// `bos_token` / `eos_token`: a string, an `AddedToken` object
/// (`{"__type": "AddedToken", "content": ...}`), or null/absent.
fn special_token(cfg: &serde_json::Value, key: &str, path: &Path) -> Result<Option<String>, ChatTemplateError> {
    match cfg.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Object(o)) => match o.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(ChatTemplateError::Syntax(format!(
                "{}: {key} object has no string \"content\"",
                path.display()
            ))),
        },
        Some(other) => Err(ChatTemplateError::Syntax(format!(
            "{}: {key} must be a string or an AddedToken object, got {other}",
            path.display()
        ))),
    }
}

/// The `chat_template` field: a string, or a list of `{"name", "template"}`
/// from which the `"default"` entry is taken.
fn template_from_field(field: Option<&serde_json::Value>, path: &Path) -> Result<Option<String>, ChatTemplateError> {
    match field {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(entries)) => {
            let mut names = Vec::new();
            for entry in entries {
                let name = entry.get("name").and_then(|n| n.as_str());
                let template = entry.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_owned())),
                    (Some(n), Some(_)) => names.push(n.to_owned()),
                    _ => {
                        return Err(ChatTemplateError::Syntax(format!(
                            "{}: chat_template list entries need string \"name\" and \"template\"",
                            path.display()
                        )))
                    }
                }
            }
            Err(ChatTemplateError::Missing(format!(
                "{}: chat_template list has no \"default\" entry (has: {})",
                path.display(),
                names.join(", ")
            )))
        }
        Some(other) => Err(ChatTemplateError::Syntax(format!(
            "{}: chat_template must be a string or a list, got {other}",
            path.display()
        ))),
    }
}

// ---------------------------------------------------------------------------
// Template globals and filters

/// A map that iterates in insertion order (like a Python dict), so
/// `message.items()` and `message | tojson` list `role` before `content`.
#[derive(Debug)]
struct OrderedMap(Vec<(&'static str, Value)>);

impl Object for OrderedMap {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let keys: Vec<Value> = self.0.iter().map(|(k, _)| Value::from(*k)).collect();
        Enumerator::Iter(Box::new(keys.into_iter()))
    }
}

/// Marks an error raised by the template's own `raise_exception(msg)`.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(RaisedException(msg)))
}

/// The message of a `raise_exception` call somewhere in `err`'s chain.
fn raised_message(err: &Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<RaisedException>() {
            return Some(r.0.clone());
        }
        cur = e.source();
    }
    None
}

/// An error with its source chain on one line.
fn describe(err: &Error) -> String {
    let mut out = err.to_string();
    let mut cur = std::error::Error::source(err);
    while let Some(e) = cur {
        let _ = write!(out, ": {e}");
        cur = e.source();
    }
    out
}

/// `strftime_now(fmt)`: the current UTC time formatted with a subset of
/// strftime (`%Y %y %m %d %e %j %H %I %M %S %p %b %h %B %a %A %F %T %D %%`);
/// other directives are copied through as written.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_time(secs, &fmt)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// (year, month 1-12, day 1-31) of a count of days since 1970-01-01, in the
/// proleptic Gregorian calendar (eras of 400 years = 146097 days).
fn civil_date(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year, March-based
    let mp = (5 * doy + 2) / 153; // month, March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn format_time(unix_secs: i64, fmt: &str) -> String {
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_date(days);
    let (hour, minute, second) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUMULATIVE[month as usize - 1] + day + u32::from(month > 2 && is_leap(year));
    let month_name = MONTHS[month as usize - 1];
    let day_name = WEEKDAYS[weekday];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match d {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:>2}"),
            'j' => write!(out, "{yday:03}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{hour12:02}"),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'b' | 'h' => write!(out, "{}", &month_name[..3]),
            'B' => write!(out, "{month_name}"),
            'a' => write!(out, "{}", &day_name[..3]),
            'A' => write!(out, "{day_name}"),
            'F' => write!(out, "{year}-{month:02}-{day:02}"),
            'T' => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            'D' => write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

/// `tojson` as transformers defines it (Python `json.dumps`): no HTML
/// escaping, `ensure_ascii=False` by default, optional `indent` (a number or
/// a string; also accepted positionally), `separators` (a pair of strings)
/// and `sort_keys`.
fn tojson(value: Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) => Some(v),
        None => indent,
    };
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_owned())
            } else if let Some(n) = v.as_i64() {
                Some(" ".repeat(n.max(0) as usize))
            } else {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        }
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() => {
            let a = v.get_item_by_index(0)?;
            let b = v.get_item_by_index(1)?;
            match (a.as_str(), b.as_str()) {
                (Some(a), Some(b)) => (a.to_owned(), b.to_owned()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    kwargs.assert_all_used()?;
    let opts = JsonOpts {
        indent,
        ensure_ascii,
        sort_keys,
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    write_json(&mut out, &value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    ensure_ascii: bool,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

fn write_newline(out: &mut String, opts: &JsonOpts, level: usize) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn write_json(out: &mut String, v: &Value, opts: &JsonOpts, level: usize) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, v),
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                write_newline(out, opts, level + 1);
                write_json(out, item, opts, level + 1)?;
            }
            write_newline(out, opts, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in v.try_iter()? {
                let item = v.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
                    ValueKind::None | ValueKind::Undefined => "null".to_owned(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_owned(),
                    ValueKind::Number => {
                        let mut s = String::new();
                        write_number(&mut s, &key);
                        s
                    }
                    _ => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            "tojson: map keys must be strings, numbers, booleans or none",
                        ))
                    }
                };
                entries.push((key, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                write_newline(out, opts, level + 1);
                write_json_str(out, key, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, item, opts, level + 1)?;
            }
            write_newline(out, opts, level);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a value of kind {}", v.kind()),
            ))
        }
    }
    Ok(())
}

/// Numbers as Python prints them: integers plainly, floats with a `.0` when
/// whole, `NaN` / `Infinity` / `-Infinity` for non-finite floats.
fn write_number(out: &mut String, v: &Value) {
    if v.is_integer() {
        let _ = write!(out, "{v}");
        return;
    }
    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
    if f.is_nan() {
        out.push_str("NaN");
    } else if f.is_infinite() {
        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
    } else if f.fract() == 0.0 && f.abs() < 1e16 {
        let _ = write!(out, "{f:.1}");
    } else {
        let _ = write!(out, "{f}");
    }
}

fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests;

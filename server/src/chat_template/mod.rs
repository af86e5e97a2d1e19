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
//! A namespace may only be used through its attributes (`namespace_guard`):
//! stored in a value, it could hold itself, and that cycle leaks and
//! overflows the stack when printed. Memory is not bounded: a template that
//! doubles a string in a loop (`{% set ns.s = ns.s ~ ns.s %}` forty times)
//! exhausts it in few instructions, so only serve templates you would run as
//! code.
//!
//! The rendered text normally begins with the BOS token already (as the
//! template writes it), so callers should tokenize it without adding special
//! tokens again — the same as `apply_chat_template(..., tokenize=True)`.

mod filters;
mod messages;
mod namespace_guard;
#[cfg(test)]
mod real_templates;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, Value};
use minijinja::{Environment, UndefinedBehavior};

#[cfg(test)]
use filters::format_time;
use filters::{describe, is_iterable, raise_exception, raised_message, strftime_now, tojson};
#[cfg(test)]
use messages::VALID_ROLES;
pub use messages::{ArgumentsForm, ChatMessage, ContentPart, FunctionCall, MessageContent, ToolCall};

/// Name under which the template is stored in its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Template instructions one render may execute. The real DeepSeek-V3 template spends
/// roughly a hundred per message, so this allows conversations far beyond any request
/// body we accept, while a runaway template stops within about a second.
pub const RENDER_FUEL: u64 = 50_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The model directory has no usable chat template (or cannot be read).
    #[error("no chat template: {0}")]
    Missing(String),
    /// The template (or the config holding it) does not parse.
    #[error("chat template syntax error: {0}")]
    Syntax(String),
    /// The template could build a value that minijinja cannot render safely (see
    /// `namespace_guard`).
    #[error("chat template refused: {0}")]
    Refused(String),
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
    arguments_form: ArgumentsForm,
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
        env.add_test("iterable", is_iterable);
        env.add_template_owned(TEMPLATE_NAME, template.to_owned())
            .map_err(|e| ChatTemplateError::Syntax(describe(&e)))?;
        namespace_guard::check_namespaces(template, env.syntax().clone()).map_err(ChatTemplateError::Refused)?;
        let mut template = ChatTemplate {
            env,
            source: template.to_owned(),
            bos_token,
            eos_token,
            arguments_form: ArgumentsForm::Mapping,
        };
        template.arguments_form = template.probe_arguments_form();
        Ok(template)
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

    /// How this template wants tool-call arguments (decided once, by
    /// rendering a probe call both ways).
    pub fn arguments_form(&self) -> ArgumentsForm {
        self.arguments_form
    }

    /// Renders `messages` into prompt text, with no tools and no extra
    /// variables. With `add_generation_prompt` the template appends the
    /// assistant-turn header, as in Hugging Face.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatTemplateError> {
        self.render_with(
            messages,
            &RenderOptions {
                add_generation_prompt,
                ..RenderOptions::default()
            },
        )
    }

    /// Renders `messages` as `apply_chat_template(messages, tools=...,
    /// add_generation_prompt=..., **kwargs)` does.
    ///
    /// Requires at least one message, every role among
    /// system/user/assistant/tool/developer, content on every message but an
    /// assistant's that calls tools, text-only content, and tool messages that
    /// answer an earlier call; otherwise `InvalidMessage`.
    pub fn render_with(&self, messages: &[ChatMessage], opts: &RenderOptions) -> Result<String, ChatTemplateError> {
        messages::validate(messages)?;
        self.render_unchecked(messages, opts, self.arguments_form)
    }

    fn render_unchecked(
        &self,
        messages: &[ChatMessage],
        opts: &RenderOptions,
        form: ArgumentsForm,
    ) -> Result<String, ChatTemplateError> {
        let rendered_messages = messages
            .iter()
            .enumerate()
            .map(|(i, m)| messages::template_value(i, m, form))
            .collect::<Result<Vec<Value>, _>>()?;

        let mut ctx = std::collections::BTreeMap::new();
        if let Some(kwargs) = opts.kwargs {
            for (k, v) in kwargs {
                ctx.insert(k.as_str(), messages::json_value(v));
            }
        }
        let tools = match opts.tools {
            Some(t) => Value::from(t.iter().map(messages::json_value).collect::<Vec<_>>()),
            None => Value::from(()),
        };
        ctx.insert("messages", Value::from(rendered_messages));
        ctx.insert("add_generation_prompt", Value::from(opts.add_generation_prompt));
        ctx.insert("tools", tools);
        ctx.insert("documents", Value::from(()));
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token", Value::from(b.as_str()));
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token", Value::from(e.as_str()));
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Render(describe(&e)))?;
        tmpl.render(Value::from(ctx)).map_err(|e| match raised_message(&e) {
            Some(msg) => ChatTemplateError::Render(msg),
            None => ChatTemplateError::Render(describe(&e)),
        })
    }

    /// Renders a user turn and an assistant tool call with mapping arguments;
    /// a template that fails on that but takes the string wants `Text`.
    fn probe_arguments_form(&self) -> ArgumentsForm {
        let probe: Vec<ChatMessage> = serde_json::from_value(serde_json::json!([
            {"role": "user", "content": "probe"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "probe", "arguments": "{\"a\": 1}"}}]}
        ]))
        .expect("the probe conversation is well-formed");
        let opts = RenderOptions::default();
        let mapping = self.render_unchecked(&probe, &opts, ArgumentsForm::Mapping);
        let text = self.render_unchecked(&probe, &opts, ArgumentsForm::Text);
        match (mapping, text) {
            (Err(_), Ok(_)) => ArgumentsForm::Text,
            _ => ArgumentsForm::Mapping,
        }
    }
}

/// What a render gets besides the messages.
#[derive(Debug, Default, Clone, Copy)]
pub struct RenderOptions<'a> {
    pub add_generation_prompt: bool,
    /// OpenAI-form tool definitions (`[{"type": "function", "function": {...}}]`).
    pub tools: Option<&'a [serde_json::Value]>,
    /// `chat_template_kwargs`: extra template variables (`enable_thinking`, `thinking`, ...).
    pub kwargs: Option<&'a serde_json::Map<String, serde_json::Value>>,
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

//! A load-time check that a chat template cannot build a reference cycle out of `namespace()`
//! objects. minijinja's values are reference counted and a namespace is its only mutable value,
//! so `{% set ns.me = ns %}` makes a namespace hold itself: the cycle is never freed, and
//! printing or serializing it (`{{ ns }}`, `ns|tojson`) recurses until the stack overflows,
//! which aborts the whole server. Jinja2 would raise a `RecursionError` instead.
//!
//! The rule checked is what real templates do: a namespace is created only as the whole of
//! `{% set NAME = namespace(...) %}` (its arguments mentioning no namespace) and used only
//! through its attributes or items (`NAME.x`, `NAME['x']`, `{% set NAME.x = ... %}`), and the
//! name `namespace` appears nowhere else (not as a value to call later). Then no namespace
//! value can reach anything but its own name, so none can be stored in another. The template
//! is read with minijinja's own lexer, so raw blocks, comments, strings and nested braces are
//! split exactly as rendering splits them.

use minijinja::machinery::{tokenize, Token};
use minijinja::syntax::SyntaxConfig;

/// One `{{ }}` or `{% %}` tag: its tokens and the line it starts on (1-based).
struct Tag<'a> {
    tokens: Vec<Token<'a>>,
    line: usize,
    statement: bool,
}

/// Checks `source` (lexed with `syntax`) against the rule above; the error names the line and
/// the offending use. A source that does not lex passes: compiling it reports the error.
pub fn check_namespaces(source: &str, syntax: SyntaxConfig) -> Result<(), String> {
    let Some(tags) = tags(source, syntax) else {
        return Ok(());
    };
    // Names bound by `{% set NAME = namespace(...) %}`.
    let mut names: Vec<&str> = Vec::new();
    for tag in &tags {
        if let Some(name) = declared_namespace(tag) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    for tag in &tags {
        let declared = declared_namespace(tag);
        for (i, token) in tag.tokens.iter().enumerate() {
            let Token::Ident(name) = *token else { continue };
            let prev = i.checked_sub(1).map(|p| &tag.tokens[p]);
            let next = tag.tokens.get(i + 1);
            if matches!(prev, Some(Token::Dot)) {
                continue; // an attribute that happens to share the name (`tool.namespace`)
            }
            if name == "namespace" {
                if declared.is_none() || i != 3 {
                    return Err(format!(
                        "line {}: `namespace` may only appear as the whole value of `{{% set NAME = namespace(...) %}}`",
                        tag.line
                    ));
                }
                continue;
            }
            if !names.contains(&name) {
                continue;
            }
            let through_member = matches!(next, Some(Token::Dot | Token::BracketOpen));
            let is_declaration = declared == Some(name) && i == 1;
            let keyword_argument =
                matches!(next, Some(Token::Assign)) && matches!(prev, Some(Token::ParenOpen | Token::Comma));
            if !(through_member || is_declaration || keyword_argument) {
                return Err(format!(
                    "line {}: namespace `{name}` is used as a value; use it only through its attributes \
                     (`{name}.x`): a namespace stored in a value can make a reference cycle that \
                     crashes rendering",
                    tag.line
                ));
            }
        }
    }
    Ok(())
}

/// `NAME` when `tag` is exactly `{% set NAME = namespace(...) %}` (the call's closing
/// parenthesis the tag's last token).
fn declared_namespace<'a>(tag: &Tag<'a>) -> Option<&'a str> {
    let [Token::Ident("set"), Token::Ident(name), Token::Assign, Token::Ident("namespace"), Token::ParenOpen, rest @ ..] =
        tag.tokens.as_slice()
    else {
        return None;
    };
    if !tag.statement {
        return None;
    }
    let mut depth = 1usize;
    for (i, t) in rest.iter().enumerate() {
        match t {
            Token::ParenOpen => depth += 1,
            Token::ParenClose => {
                depth -= 1;
                if depth == 0 {
                    return (i + 1 == rest.len()).then_some(*name);
                }
            }
            _ => {}
        }
    }
    None
}

/// The code tags of `source` as minijinja's lexer splits them; `None` if it does not lex.
fn tags(source: &str, syntax: SyntaxConfig) -> Option<Vec<Tag<'_>>> {
    let mut out = Vec::new();
    let mut open: Option<Tag<'_>> = None;
    for item in tokenize(source, false, syntax) {
        let (token, span) = item.ok()?;
        match token {
            Token::VariableStart | Token::BlockStart => {
                open = Some(Tag {
                    tokens: Vec::new(),
                    line: span.start_line as usize,
                    statement: matches!(token, Token::BlockStart),
                });
            }
            Token::VariableEnd | Token::BlockEnd => out.extend(open.take()),
            Token::TemplateData(_) => {}
            other => {
                if let Some(tag) = open.as_mut() {
                    tag.tokens.push(other);
                }
            }
        }
    }
    out.extend(open);
    Some(out)
}

#[cfg(test)]
mod tests {
    use minijinja::syntax::SyntaxConfig;

    fn check_namespaces(source: &str) -> Result<(), String> {
        super::check_namespaces(source, SyntaxConfig::default())
    }

    #[test]
    fn attribute_use_of_namespaces_passes() {
        for ok in [
            "{% set ns = namespace(n=0, last=none) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
            "{%- set ns = namespace(found=false) -%}{%- if ns['found'] == true %}x{% endif %}",
            "{{ tool.namespace }}{{ render_tool_namespace('f', tools) }}{% set namespace_name = 'x' %}",
            "{# {{ ns }} #}{% set ns = namespace() %}{{ 'ns' }}{% raw %}{{ ns }}{% endraw %}",
            "{% set ns = namespace() %}{{ f(ns=1) }}",
            "{% set ns = namespace(a={'b': {'c': 1}}) %}{{ {'a': {'b': ns.a}} }}",
            "no code at all { here",
        ] {
            assert_eq!(check_namespaces(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn namespaces_as_values_are_refused_with_the_line() {
        for (bad, line) in [
            (
                "{% set ns = namespace(n=0) %}\n{% for m in messages %}{% set ns.n = ns %}{% endfor %}",
                2,
            ),
            ("{% set ns = namespace() %}{{ ns }}", 1),
            ("{% set ns = namespace() %}\n\n{% set ns.list = [1, ns] %}", 3),
            ("{% set ns = namespace() %}{% set other = ns %}", 1),
            ("{% set ns = namespace() %}{{ ns|tojson }}", 1),
            ("{% set ns = namespace() %}{% set b = namespace(inner=ns) %}", 1),
            (
                "{% set ns = namespace() %}{% macro f(a) %}{% set ns.x = a %}{% endmacro %}{{ f(ns) }}",
                1,
            ),
            // `}}` inside braces does not end the tag, and a `{#` in a string opens no comment.
            (
                "{% set ns = namespace() %}{{ {'a': {'b': 1}} ~ '{#' }}{% set ns.me = ns %}{{ ns }}",
                1,
            ),
            // Raw blocks end at their `endraw`, whatever they hold.
            (
                "{% set ns = namespace() %}{% raw %}{#{% endraw %}{% set ns.me = ns %}{{ ns }}",
                1,
            ),
        ] {
            let err = check_namespaces(bad).unwrap_err();
            assert!(err.starts_with(&format!("line {line}: namespace `ns`")), "{bad}: {err}");
        }
        for bad in [
            "{% set ns = namespace() %}{% set ns.inner = namespace() %}{% set x = ns.inner %}{% set x.y = ns.inner %}",
            "{% set l = [namespace()] %}",
            "{% set a = namespace(b=namespace()) %}",
            "{{ namespace() }}",
            // The function as a value, called later.
            "{% set mk = namespace %}{% set a = mk() %}{% set a.me = a %}{{ a }}",
            "{% set a = (namespace)() %}{% set a.me = a %}",
            "{% set ns = namespace() if true else 0 %}",
            // A declaration is the whole tag: not a tuple holding the namespace.
            "{% set ns = namespace(), 0 %}{% set a = ns[0] %}{% set a.me = a %}{{ a }}",
        ] {
            let err = check_namespaces(bad).unwrap_err();
            assert!(err.contains("`namespace` may only appear"), "{bad}: {err}");
        }
    }
}

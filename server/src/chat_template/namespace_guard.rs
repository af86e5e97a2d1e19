//! A load-time check that a chat template cannot build a reference cycle out of `namespace()`
//! objects. minijinja's values are reference counted and a namespace is its only mutable value,
//! so `{% set ns.me = ns %}` makes a namespace hold itself: the cycle is never freed, and
//! printing or serializing it (`{{ ns }}`, `ns|tojson`) recurses until the stack overflows,
//! which aborts the whole server. Jinja2 would raise a `RecursionError` instead.
//!
//! The rule checked is what real templates do anyway: a namespace is created only as
//! `{% set NAME = namespace(...) %}` (its arguments mentioning no namespace) and used only
//! through its attributes or items (`NAME.x`, `NAME['x']`, `{% set NAME.x = ... %}`). Then
//! no namespace value can reach anything but its own name, so none can be stored in another.
//! The scan is lexical: code inside `{{ }}` and `{% %}`, strings and comments skipped.

/// One lexical token of template code.
#[derive(Debug, Clone, PartialEq)]
enum Token<'a> {
    Name(&'a str),
    /// A string or number literal (its text is irrelevant here).
    Literal,
    Punct(char),
    /// `==`, `!=`, `<=`, `>=` (so a lone `=` is an assignment or keyword argument).
    Compare,
}

/// One `{{ }}` or `{% %}` tag: its tokens and the line it starts on (1-based).
struct Tag<'a> {
    tokens: Vec<Token<'a>>,
    line: usize,
    statement: bool,
}

/// Checks `source` against the rule above; the error names the line and the offending use.
pub fn check_namespaces(source: &str) -> Result<(), String> {
    let tags = tags(source);
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
            let Token::Name(name) = *token else { continue };
            let prev = i.checked_sub(1).map(|p| &tag.tokens[p]);
            let next = tag.tokens.get(i + 1);
            if prev == Some(&Token::Punct('.')) {
                continue; // an attribute that happens to share the name (`tool.namespace`)
            }
            if name == "namespace" && next == Some(&Token::Punct('(')) {
                if declared.is_none() || i != 3 {
                    return Err(format!(
                        "line {}: `namespace(...)` may only be the whole value of `{{% set NAME = namespace(...) %}}`",
                        tag.line
                    ));
                }
                continue;
            }
            if !names.contains(&name) {
                continue;
            }
            let through_member = matches!(next, Some(Token::Punct('.' | '[')));
            let is_declaration = declared == Some(name) && i == 1;
            let keyword_argument = next == Some(&Token::Punct('=')) && matches!(prev, Some(Token::Punct('(' | ',')));
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

/// `NAME` when `tag` is `{% set NAME = namespace(...) %}`.
fn declared_namespace<'a>(tag: &Tag<'a>) -> Option<&'a str> {
    match tag.tokens.as_slice() {
        [Token::Name("set"), Token::Name(name), Token::Punct('='), Token::Name("namespace"), Token::Punct('('), ..]
            if tag.statement =>
        {
            Some(name)
        }
        _ => None,
    }
}

/// The code tags of `source`, in order; `{% raw %}` blocks and `{# #}` comments skipped.
fn tags(source: &str) -> Vec<Tag<'_>> {
    let bytes = source.as_bytes();
    let mut out = Vec::new();
    let mut at = 0;
    let mut in_raw = false;
    while let Some(offset) = source[at..].find('{') {
        let start = at + offset;
        let kind = bytes.get(start + 1).copied();
        let close = match kind {
            Some(b'{') => "}}",
            Some(b'%') => "%}",
            Some(b'#') => {
                at = source[start..].find("#}").map_or(source.len(), |e| start + e + 2);
                continue;
            }
            _ => {
                at = start + 1;
                continue;
            }
        };
        let (tokens, end) = lex(source, start + 2, close);
        let statement = kind == Some(b'%');
        if in_raw {
            if statement && tokens.first() == Some(&Token::Name("endraw")) {
                in_raw = false;
            }
        } else if statement && tokens.first() == Some(&Token::Name("raw")) {
            in_raw = true;
        } else {
            let line = 1 + source[..start].matches('\n').count();
            out.push(Tag {
                tokens,
                line,
                statement,
            });
        }
        at = end;
    }
    out
}

/// Tokens from `from` up to the tag's `close` (outside string literals); returns them and the
/// offset past the close (the end of `source` when the tag is never closed).
fn lex<'a>(source: &'a str, from: usize, close: &str) -> (Vec<Token<'a>>, usize) {
    let bytes = source.as_bytes();
    let mut tokens = Vec::new();
    let mut i = from;
    while i < bytes.len() {
        if source[i..].starts_with(close) {
            return (tokens, i + close.len());
        }
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let end = source[i..]
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .map_or(source.len(), |e| i + e);
            tokens.push(Token::Name(&source[i..end]));
            i = end;
        } else if c.is_ascii_digit() {
            let end = source[i..]
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                .map_or(source.len(), |e| i + e);
            tokens.push(Token::Literal);
            i = end;
        } else if c == b'\'' || c == b'"' {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != c {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            tokens.push(Token::Literal);
            i = (j + 1).min(bytes.len());
        } else if matches!(c, b'=' | b'!' | b'<' | b'>') && bytes.get(i + 1) == Some(&b'=') {
            tokens.push(Token::Compare);
            i += 2;
        } else if c.is_ascii_whitespace() || matches!(c, b'-' | b'+') && tokens.is_empty() {
            i += 1; // whitespace, or the `-` / `+` of `{%-` / `{%+`
        } else {
            // Any other character (multi-byte ones included) is punctuation here.
            let ch = source[i..].chars().next().unwrap_or(' ');
            tokens.push(Token::Punct(ch));
            i += ch.len_utf8();
        }
    }
    (tokens, bytes.len())
}

#[cfg(test)]
mod tests {
    use super::check_namespaces;

    #[test]
    fn attribute_use_of_namespaces_passes() {
        for ok in [
            "{% set ns = namespace(n=0, last=none) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
            "{%- set ns = namespace(found=false) -%}{%- if ns['found'] == true %}x{% endif %}",
            "{{ tool.namespace }}{{ render_tool_namespace('f', tools) }}{% set namespace_name = 'x' %}",
            "{# {{ ns }} #}{% set ns = namespace() %}{{ 'ns' }}{% raw %}{{ ns }}{% endraw %}",
            "{% set ns = namespace() %}{{ f(ns=1) }}",
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
        ] {
            let err = check_namespaces(bad).unwrap_err();
            assert!(err.starts_with(&format!("line {line}: namespace `ns`")), "{bad}: {err}");
        }
        for bad in [
            "{% set ns = namespace() %}{% set ns.inner = namespace() %}{% set x = ns.inner %}{% set x.y = ns.inner %}",
            "{% set l = [namespace()] %}",
            "{% set a = namespace(b=namespace()) %}",
            "{{ namespace() }}",
        ] {
            let err = check_namespaces(bad).unwrap_err();
            assert!(err.contains("`namespace(...)` may only be"), "{bad}: {err}");
        }
    }
}

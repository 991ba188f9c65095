//! Text around the token ids: the model's chat template (minijinja), and the
//! incremental detokenizer that streams UTF-8-safe chunks and cuts the output
//! at a stop sequence.

use crate::api::{ChatMessage, InferenceError};

/// Renders `messages` with the model's Jinja chat template, with
/// `add_generation_prompt = true` (the assistant's turn is opened), and
/// `tools` (a JSON array in OpenAI's shape) given to the template when it
/// uses them, else described by [`tools_prompt`] in the system message.
pub(crate) fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    tools: Option<&str>,
    (bos, eos): (&str, &str),
) -> Result<String, InferenceError> {
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let bad = |e: minijinja::Error| InferenceError::InvalidParams(format!("chat template: {e}"));
    env.add_template("chat", template).map_err(bad)?;
    let template = env.get_template("chat").map_err(bad)?;
    let tools = tools.map(parse_tools).transpose()?;
    // Copied only when the fallback prompt goes into them.
    let mut messages = std::borrow::Cow::Borrowed(messages);
    let tools = match tools {
        Some(t) if !template.undeclared_variables(false).contains("tools") => {
            let prompt = tools_prompt(&t);
            let messages = messages.to_mut();
            match messages.first_mut() {
                Some(m) if m.role == "system" => m.content = format!("{}\n\n{prompt}", m.content),
                _ => messages.insert(
                    0,
                    ChatMessage {
                        role: "system".into(),
                        content: prompt,
                    },
                ),
            }
            None
        }
        t => t,
    };
    let msgs: Vec<minijinja::Value> = messages
        .iter()
        .map(|m| {
            minijinja::context! { role => m.role.clone(), content => m.content.clone() }
        })
        .collect();
    template
        .render(minijinja::context! {
            messages => msgs,
            tools => tools.map(minijinja::Value::from_serialize),
            add_generation_prompt => true,
            bos_token => bos,
            eos_token => eos,
        })
        .map_err(bad)
}

/// `tools` as JSON, refused unless it is a list of functions with names.
fn parse_tools(tools: &str) -> Result<Vec<serde_json::Value>, InferenceError> {
    let bad = |m: String| InferenceError::InvalidParams(format!("tools: {m}"));
    let list: Vec<serde_json::Value> =
        serde_json::from_str(tools).map_err(|e| bad(format!("not a JSON array: {e}")))?;
    for (i, t) in list.iter().enumerate() {
        if t["type"] != "function" || !t["function"]["name"].is_string() {
            return Err(bad(format!(
                "tool {i} is not {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
            )));
        }
    }
    Ok(list)
}

/// The system message that describes `tools` to a model whose chat
/// template knows nothing of tools, and asks for each call in the
/// `<tool_call>` form most tool-trained models use.
fn tools_prompt(tools: &[serde_json::Value]) -> String {
    let mut p = String::from(
        "You can call the following tools. Each is described by one JSON object per line:\n",
    );
    for t in tools {
        p.push_str(&t["function"].to_string());
        p.push('\n');
    }
    p.push_str(
        "To call tools, reply with nothing but one line per call, each of the form\n\
         <tool_call>{\"name\": \"<tool name>\", \"arguments\": <the arguments as a JSON object>}</tool_call>\n\
         Otherwise, answer normally.",
    );
    p
}

/// The bytes a token stands for: `<0xHH>` byte-fallback pieces, the
/// byte-level alphabet of GPT-2-style tokenizers mapped back to bytes, else
/// the piece's text with SentencePiece's `▁` as a space.
pub(crate) fn token_bytes(tok: &tokenizers::Tokenizer, id: u32) -> Vec<u8> {
    let Some(piece) = tok.id_to_token(id) else {
        return Vec::new();
    };
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>'))
        && let Ok(b) = u8::from_str_radix(hex, 16)
    {
        return vec![b];
    }
    let table = byte_level_table();
    match piece.chars().map(|c| table.get(&c).copied()).collect() {
        Some(bytes) => bytes,
        None => piece.replace('\u{2581}', " ").into_bytes(),
    }
}

/// GPT-2's byte-level alphabet, from character back to byte: printable
/// Latin-1 stands for itself, the other bytes for U+0100 onwards.
fn byte_level_table() -> &'static std::collections::HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<char, u8>> =
        std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut next = 0x100u32;
        (0..=255u8)
            .map(|b| {
                let c = if printable(b) {
                    char::from(b)
                } else {
                    next += 1;
                    char::from_u32(next - 1).expect("a valid char")
                };
                (c, b)
            })
            .collect()
    })
}

/// The output text of one request, built token by token: it hands out only
/// text that is complete UTF-8 and cannot be the start of a stop sequence.
///
/// Each token decodes a short window, not the whole output (which made a
/// token's cost grow with the output): `tokens[prefix..]` against
/// `tokens[prefix..read]`, the already-decoded tokens giving the new ones
/// their context (leading spaces, merged bytes), as Hugging Face's
/// streamers do.
pub(crate) struct Detokenizer {
    tokens: Vec<u32>,
    /// Decoded text of `tokens[..read]`.
    text: String,
    prefix: usize,
    read: usize,
    /// Bytes of `text` already handed out.
    sent: usize,
    stop: Vec<String>,
}

/// What one more token did to the output.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    /// Text to hand out now (possibly empty).
    Text(String),
    /// A stop sequence appeared: the text before it still to hand out.
    Stopped(String),
}

impl Detokenizer {
    pub(crate) fn new(stop: Vec<String>) -> Self {
        Detokenizer {
            tokens: Vec::new(),
            text: String::new(),
            prefix: 0,
            read: 0,
            sent: 0,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    fn decode(tok: &tokenizers::Tokenizer, ids: &[u32]) -> String {
        tok.decode(ids, true).unwrap_or_default()
    }

    /// Decodes the tokens after `read` into `text`; unless `force`, waits
    /// while they end in an incomplete character.
    fn advance(&mut self, tok: &tokenizers::Tokenizer, force: bool) {
        if self.read == self.tokens.len() {
            return;
        }
        let window = Self::decode(tok, &self.tokens[self.prefix..]);
        if window.ends_with('\u{FFFD}') && !force {
            return;
        }
        let before = Self::decode(tok, &self.tokens[self.prefix..self.read]);
        match window.strip_prefix(before.as_str()) {
            Some(new) => self.text.push_str(new),
            // The window changed its own start: decode it all once.
            None => self.text = Self::decode(tok, &self.tokens),
        }
        self.prefix = self.read;
        self.read = self.tokens.len();
    }

    pub(crate) fn push(&mut self, tok: &tokenizers::Tokenizer, token: u32) -> Step {
        self.tokens.push(token);
        self.advance(tok, false);
        let full = &self.text;
        // A stop sequence that ends in the new text.
        let search_from = self
            .sent
            .saturating_sub(self.stop.iter().map(|s| s.len()).max().unwrap_or(0));
        let mut cut: Option<usize> = None;
        for s in &self.stop {
            let mut from = search_from;
            while !full.is_char_boundary(from) {
                from -= 1;
            }
            if let Some(p) = full[from..].find(s.as_str()) {
                let at = from + p;
                cut = Some(cut.map_or(at, |c: usize| c.min(at)));
            }
        }
        if let Some(at) = cut {
            let out = full
                .get(self.sent..at.max(self.sent))
                .unwrap_or_default()
                .to_string();
            self.sent = at.max(self.sent);
            return Step::Stopped(out);
        }
        // Hold back a possible stop prefix.
        let end = full.len();
        let mut hold_from = end;
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && full[..end].ends_with(&s[..k]) {
                    hold_from = hold_from.min(end - k);
                    break;
                }
            }
        }
        let end = hold_from;
        if end <= self.sent {
            return Step::Text(String::new());
        }
        match full.get(self.sent..end) {
            Some(t) => {
                let t = t.to_string();
                self.sent = end;
                Step::Text(t)
            }
            None => Step::Text(String::new()),
        }
    }

    /// The text still held back, at the end of generation.
    pub(crate) fn flush(&mut self, tok: &tokenizers::Tokenizer) -> String {
        self.advance(tok, true);
        let out = self.text.get(self.sent..).unwrap_or_default().to_string();
        self.sent = self.text.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    /// Words joined by spaces (no decoder), enough to exercise the hold-back.
    fn words() -> tokenizers::Tokenizer {
        tokenizers::Tokenizer::from_str(
            r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":null,"model":{"type":"WordLevel",
            "vocab":{"a":0,"b":1,"c":2,"[UNK]":3},"unk_token":"[UNK]"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_stop_sequence_cuts_the_text_and_its_prefix_is_held_back() {
        let tok = words();
        let mut d = Detokenizer::new(vec!["b c".into(), String::new()]);
        assert_eq!(d.push(&tok, 0), Step::Text("a".into()));
        // "a b" ends with "b", which may start "b c": only " " goes out.
        assert_eq!(d.push(&tok, 1), Step::Text(" ".into()));
        assert_eq!(d.push(&tok, 2), Step::Stopped(String::new()));
    }

    #[test]
    fn a_held_prefix_that_does_not_become_a_stop_is_released() {
        let tok = words();
        let mut d = Detokenizer::new(vec!["b c".into()]);
        assert_eq!(d.push(&tok, 1), Step::Text(String::new()));
        assert_eq!(d.push(&tok, 0), Step::Text("b a".into()));
        assert_eq!(d.push(&tok, 1), Step::Text(" ".into()));
        assert_eq!(d.flush(&tok), "b");
    }

    #[test]
    fn chat_templates_render_with_the_generation_prompt() {
        let msgs = [ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }];
        let t = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m.content }}\
                 {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        assert_eq!(
            render_chat(t, &msgs, None, ("<s>", "</s>")).unwrap(),
            "<s><user>hi<assistant>"
        );
        let bad = "{{ raise_exception('no system role') }}";
        assert!(matches!(
            render_chat(bad, &msgs, None, ("", "")),
            Err(InferenceError::InvalidParams(e)) if e.contains("no system role")
        ));
        assert!(render_chat("{% for %}", &msgs, None, ("", "")).is_err());
    }

    #[test]
    fn tools_go_to_a_template_that_uses_them_else_into_the_system_message() {
        let tools = r#"[{"type": "function", "function": {"name": "now", "parameters": {}}}]"#;
        let user = ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        };
        let plain = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}";
        let with_tools =
            "{% if tools %}{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% endif %}";
        assert_eq!(
            render_chat(
                with_tools,
                std::slice::from_ref(&user),
                Some(tools),
                ("", "")
            )
            .unwrap(),
            "[now]"
        );
        let out = render_chat(plain, std::slice::from_ref(&user), Some(tools), ("", "")).unwrap();
        let (system, rest) = out.split_once("\n<user>").unwrap();
        assert!(
            system.starts_with("<system>You can call the following tools."),
            "{out}"
        );
        assert!(
            system.contains(r#"{"name":"now","parameters":{}}"#),
            "{out}"
        );
        assert!(system.contains("<tool_call>"), "{out}");
        assert_eq!(rest, "hi\n");
        // A system message of the caller's keeps its text, first.
        let sys = ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
        };
        let out = render_chat(plain, &[sys, user], Some(tools), ("", "")).unwrap();
        assert!(
            out.starts_with("<system>Be brief.\n\nYou can call"),
            "{out}"
        );
        for (bad, says) in [
            ("{", "not a JSON array"),
            (r#"[{"type": "function"}]"#, "tool 0"),
            (
                r#"[{"type": "retrieval", "function": {"name": "x"}}]"#,
                "tool 0",
            ),
        ] {
            match render_chat(plain, &[], Some(bad), ("", "")) {
                Err(InferenceError::InvalidParams(m)) => assert!(m.contains(says), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }
}

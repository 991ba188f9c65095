//! Tool calling: `tools`, `tool_choice` and `parallel_tool_calls` checked,
//! the grammar that forces a call, and the model's output split into text
//! and calls.
//!
//! The host hands the tools to the model (its chat template, or a system
//! message asking for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
//! per call, the form most tool-trained models use); `required` and a named
//! function constrain the output to such calls, with each function's
//! `parameters` as the schema of its arguments, so they always parse;
//! `auto` finds the calls in whatever the model wrote.

use crate::error::ApiError;
use serde_json::{Value, json};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// The tools of a request the model may call.
pub struct Tools {
    /// The `tools` array as given (checked).
    pub list: Vec<Value>,
    pub choice: Choice,
    /// More than one call per answer.
    pub parallel: bool,
}

/// `tool_choice`, once `none` is taken out (the tools are then not offered).
#[derive(Debug, PartialEq)]
pub enum Choice {
    Auto,
    Required,
    Named(String),
}

impl Tools {
    /// Checks `tools`, `tool_choice` and `parallel_tool_calls`; `None` when
    /// there are no tools or the choice is `none`.
    pub fn parse(
        tools: Option<Value>,
        choice: Option<Value>,
        parallel: Option<bool>,
    ) -> Result<Option<Tools>, ApiError> {
        let list = match tools {
            None => Vec::new(),
            Some(Value::Array(list)) => list,
            Some(_) => return Err(ApiError::invalid("tools", "expected an array of tools")),
        };
        for (i, t) in list.iter().enumerate() {
            check_tool(i, t)?;
        }
        let names: Vec<&str> = list
            .iter()
            .filter_map(|t| t["function"]["name"].as_str())
            .collect();
        if let Some(dup) = names
            .iter()
            .enumerate()
            .find_map(|(i, n)| names[..i].contains(n).then_some(n))
        {
            return Err(ApiError::invalid(
                "tools",
                format!("two tools are named {dup:?}"),
            ));
        }
        let choice = match choice {
            None if list.is_empty() => return Ok(None),
            None => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => return Ok(None),
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                _ => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!("expected none, auto, required or a named function, got {s:?}"),
                    ));
                }
            },
            Some(v) => match (v["type"].as_str(), v["function"]["name"].as_str()) {
                (Some("function"), Some(name)) if names.contains(&name) => {
                    Choice::Named(name.to_owned())
                }
                (Some("function"), Some(name)) => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!("tool_choice names {name:?}, which is not in tools"),
                    ));
                }
                _ => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        "expected {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    ));
                }
            },
        };
        if list.is_empty() {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice is only allowed when tools are given",
            ));
        }
        Ok(Some(Tools {
            list,
            choice,
            parallel: parallel.unwrap_or(true),
        }))
    }

    /// The Lark grammar that forces calls (`required`: one of the tools, or
    /// several with `parallel`; a named function: that one), or `None` for
    /// `auto`.
    pub fn grammar(&self) -> Option<String> {
        let schemas: Vec<Value> = self
            .list
            .iter()
            .filter(|t| match &self.choice {
                Choice::Auto => false,
                Choice::Required => true,
                Choice::Named(n) => t["function"]["name"] == n.as_str(),
            })
            .map(|t| {
                let f = &t["function"];
                let arguments = match &f["parameters"] {
                    Value::Null => json!({"type": "object"}),
                    p => p.clone(),
                };
                json!({
                    "type": "object",
                    "properties": {"name": {"const": f["name"]}, "arguments": arguments},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        if schemas.is_empty() {
            return None;
        }
        // One layout and no free whitespace, as the host's JSON schemas.
        let call = json!({
            "anyOf": schemas,
            "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
        });
        let start = match self.choice == Choice::Required && self.parallel {
            true => "start: call (\"\\n\" call)*",
            false => "start: call",
        };
        Some(format!(
            "{start}\ncall: \"{OPEN}\" %json {call} \"{CLOSE}\"\n"
        ))
    }

    /// The `tools` array for the host.
    pub fn json(&self) -> String {
        Value::from(self.list.clone()).to_string()
    }
}

fn check_tool(i: usize, t: &Value) -> Result<(), ApiError> {
    let param = |p: &str| format!("tools[{i}]{p}");
    if t["type"] != "function" {
        return Err(ApiError::invalid(
            param(".type"),
            "only tools of type \"function\" are supported",
        ));
    }
    let f = &t["function"];
    let Some(name) = f["name"].as_str() else {
        return Err(ApiError::missing(param(".function.name")));
    };
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(ApiError::invalid(
            param(".function.name"),
            "a function name is 1 to 64 letters, digits, underscores or dashes",
        ));
    }
    match &f["parameters"] {
        Value::Null | Value::Object(_) => Ok(()),
        _ => Err(ApiError::invalid(
            param(".function.parameters"),
            "expected a JSON Schema object",
        )),
    }
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments, as the JSON text OpenAI's `arguments` holds.
    pub arguments: String,
}

impl Call {
    /// `{"id", "type", "function": {"name", "arguments"}}`.
    pub fn object(&self) -> Value {
        json!({
            "id": format!("call_{}", crate::random_hex()),
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// What the output holds, piece by piece.
#[derive(Debug, PartialEq)]
pub enum Piece {
    Text(String),
    Call(Call),
}

/// Splits the output, as it streams, into text and calls: text is handed
/// out at once except what may be the start of `<tool_call>`; a call when
/// its `</tool_call>` arrives. A call that does not parse, or names no
/// tool, stays text.
pub struct Splitter {
    /// The tools' names.
    names: Vec<String>,
    buf: String,
    in_call: bool,
    /// Blanks after a call are not text.
    after_call: bool,
}

impl Splitter {
    pub fn new(tools: &Tools) -> Self {
        Splitter {
            names: tools
                .list
                .iter()
                .filter_map(|t| t["function"]["name"].as_str().map(str::to_owned))
                .collect(),
            buf: String::new(),
            in_call: false,
            after_call: false,
        }
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.buf.find(CLOSE) else {
                    break;
                };
                let block: String = self.buf.drain(..end + CLOSE.len()).collect();
                match self.parse(&block[OPEN.len()..end]) {
                    Some(call) => {
                        out.push(Piece::Call(call));
                        self.after_call = true;
                    }
                    None => self.text(block, &mut out),
                }
                self.in_call = false;
            } else if let Some(at) = self.buf.find(OPEN) {
                let before: String = self.buf.drain(..at).collect();
                self.text(before.trim_end().to_owned(), &mut out);
                self.in_call = true;
            } else {
                // Hold back a tail that may start `<tool_call>`.
                let keep = (1..OPEN.len().min(self.buf.len() + 1))
                    .rev()
                    .find(|&n| {
                        self.buf.is_char_boundary(self.buf.len() - n)
                            && OPEN.starts_with(&self.buf[self.buf.len() - n..])
                    })
                    .unwrap_or(0);
                let text: String = self.buf.drain(..self.buf.len() - keep).collect();
                self.text(text, &mut out);
                break;
            }
        }
        out
    }

    /// The end of the output: what is held back is text.
    pub fn finish(mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        self.text(rest, &mut out);
        out
    }

    fn text(&mut self, text: String, out: &mut Vec<Piece>) {
        let text = match self.after_call {
            true => text.trim_start().to_owned(),
            false => text,
        };
        if !text.is_empty() {
            self.after_call = false;
            out.push(Piece::Text(text));
        }
    }

    fn parse(&self, inner: &str) -> Option<Call> {
        let v: Value = serde_json::from_str(inner.trim()).ok()?;
        let name = v["name"]
            .as_str()
            .filter(|n| self.names.iter().any(|k| k == n))?;
        let arguments = match &v["arguments"] {
            Value::Null => "{}".to_owned(),
            // Some models write the arguments as a JSON string.
            Value::String(s) if serde_json::from_str::<Value>(s).is_ok_and(|a| a.is_object()) => {
                s.clone()
            }
            a @ Value::Object(_) => a.to_string(),
            _ => return None,
        };
        Some(Call {
            name: name.to_owned(),
            arguments,
        })
    }
}

/// An assistant message's `tool_calls` as the text the model would have
/// written for them (its turn in the history).
pub fn calls_text(param: &str, calls: Vec<Value>) -> Result<String, ApiError> {
    let lines = calls
        .into_iter()
        .enumerate()
        .map(|(j, c)| {
            let param = format!("{param}[{j}]");
            let f = &c["function"];
            let (Some(name), Some(arguments)) = (f["name"].as_str(), f["arguments"].as_str())
            else {
                return Err(ApiError::invalid(
                    param,
                    "expected {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}",
                ));
            };
            let arguments: Value = serde_json::from_str(arguments)
                .unwrap_or_else(|_| Value::from(arguments));
            Ok(format!(
                "{OPEN}{}{CLOSE}",
                json!({"name": name, "arguments": arguments})
            ))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(lines.join("\n"))
}

//! `POST /v1/embeddings`: `input` (a string or a list of strings) embedded
//! with the model's final hidden state of each input's last token,
//! L2-normalised (`slinfer:llm`'s `embed`), as floats or base64
//! (little-endian f32), optionally cut to `dimensions` and normalised again.

use base64::Engine as _;
use serde_json::{Value, json};
use slinfer_sdk::Response;
use slinfer_sdk::llm;

use crate::error::ApiError;

/// The most inputs per request (OpenAI's limit is higher; the host's
/// `embed` takes this many at once).
const MAX_INPUTS: usize = 256;

pub fn create(body: &[u8]) -> Result<Response, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_body(format!(
            "We could not parse the JSON body of your request ({e})."
        ))
    })?;
    let Value::Object(mut map) = value else {
        return Err(ApiError::bad_body(
            "The request body must be a JSON object.",
        ));
    };
    let mut take = |k: &str| map.remove(k).filter(|v| !v.is_null());
    let model = match take("model") {
        Some(Value::String(m)) => m,
        Some(_) => return Err(ApiError::invalid("model", "expected a string")),
        None => return Err(ApiError::missing("model")),
    };
    let inputs = inputs(take("input").ok_or_else(|| ApiError::missing("input"))?)?;
    let base64 = match take("encoding_format") {
        None => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(v) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("expected float or base64, got {v}"),
            ));
        }
    };
    let dimensions = match take("dimensions") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(d) if d >= 1 => Some(d as usize),
            _ => {
                return Err(ApiError::invalid(
                    "dimensions",
                    format!("expected a positive integer, got {v}"),
                ));
            }
        },
    };
    take("user");
    if let Some(key) = map.keys().next() {
        return Err(ApiError::unknown(key.clone()));
    }
    if !crate::catalog().contains(&model) {
        return Err(ApiError::model_not_found(&model));
    }
    let embeddings = llm::embed(&model, &inputs).map_err(|e| ApiError::from_llm(e, "input"))?;
    let mut tokens = 0;
    let data = embeddings
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            tokens += e.tokens;
            let values = cut(e.values, dimensions)?;
            let embedding = match base64 {
                true => {
                    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    Value::from(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
                false => Value::from(values),
            };
            Ok(json!({"object": "embedding", "index": i, "embedding": embedding}))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    Ok(Response::json(200, body.to_string()))
}

/// A string, or a non-empty list of strings; none empty.
fn inputs(v: Value) -> Result<Vec<String>, ApiError> {
    let list = match v {
        Value::String(s) => vec![s],
        Value::Array(items) if !items.is_empty() && items.len() <= MAX_INPUTS => items
            .into_iter()
            .map(|s| match s {
                Value::String(s) => Ok(s),
                // Token ids (integers, or lists of them) are OpenAI's too.
                _ => Err(ApiError::invalid(
                    "input",
                    "expected strings (token ids are not supported)",
                )),
            })
            .collect::<Result<_, _>>()?,
        Value::Array(_) => {
            return Err(ApiError::invalid(
                "input",
                format!("expected 1 to {MAX_INPUTS} inputs"),
            ));
        }
        _ => {
            return Err(ApiError::invalid(
                "input",
                "expected a string or an array of strings",
            ));
        }
    };
    if list.iter().any(String::is_empty) {
        return Err(ApiError::invalid("input", "inputs must not be empty"));
    }
    Ok(list)
}

/// The first `dimensions` values, normalised again; all of them if `None`.
fn cut(mut values: Vec<f32>, dimensions: Option<usize>) -> Result<Vec<f32>, ApiError> {
    let Some(d) = dimensions else {
        return Ok(values);
    };
    if d > values.len() {
        return Err(ApiError::invalid(
            "dimensions",
            format!("this model's embeddings have {} dimensions", values.len()),
        ));
    }
    values.truncate(d);
    let norm = values.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        values.iter_mut().for_each(|x| *x /= norm);
    }
    Ok(values)
}

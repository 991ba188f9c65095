//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`
//! with the HTTP status the official clients map to their exception classes.

use serde_json::{Value, json};
use slinfer_sdk::Response;
use slinfer_sdk::llm::LlmError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: u16,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
    retry_after_s: Option<u32>,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// The same error, pointing at `param`.
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 400: a request that is not JSON, or not an object.
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    /// 400: `param` has a value we cannot use.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
            .param(param)
            .code("invalid_value")
    }

    /// 400: a required parameter is missing.
    pub fn missing(param: impl Into<String>) -> Self {
        let param = param.into();
        Self::new(
            400,
            "invalid_request_error",
            format!("Missing required parameter: '{param}'."),
        )
        .param(param)
        .code("missing_required_parameter")
    }

    /// 400: a parameter slinfer does not implement, set to something other
    /// than its neutral value.
    pub fn unsupported(param: impl Into<String>) -> Self {
        let param = param.into();
        Self::new(
            400,
            "invalid_request_error",
            format!("Unsupported parameter: '{param}' is not supported by this server."),
        )
        .param(param)
        .code("unsupported_parameter")
    }

    /// 400: a parameter the API does not know.
    pub fn unknown(param: impl Into<String>) -> Self {
        let param = param.into();
        Self::new(
            400,
            "invalid_request_error",
            format!("Unrecognized request argument supplied: {param}"),
        )
        .param(param)
        .code("unknown_parameter")
    }

    /// 404: a model this API does not serve.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .param("model")
        .code("model_not_found")
    }

    /// 404: no such route.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            format!("Invalid URL ({method} {path})"),
        )
    }

    /// 500: the engine failed.
    pub fn engine(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", message).code("engine_error")
    }

    /// A failure of `slinfer:llm`; `prompt_param` names what held the prompt
    /// (`messages` or `prompt`).
    pub fn from_llm(e: LlmError, prompt_param: &str) -> Self {
        let message = e.message();
        match e {
            LlmError::ModelNotAllowed(_) => Self::new(403, "permission_error", message)
                .param("model")
                .code("model_not_allowed"),
            LlmError::ModelNotFound(_) => Self::new(404, "invalid_request_error", message)
                .param("model")
                .code("model_not_found"),
            LlmError::PromptTooLong(_) => Self::new(400, "invalid_request_error", message)
                .param(prompt_param)
                .code("context_length_exceeded"),
            LlmError::InvalidParams(_) => {
                Self::new(400, "invalid_request_error", message).code("invalid_value")
            }
            LlmError::Overloaded(ms) => ApiError {
                retry_after_s: Some(ms.div_ceil(1000).max(1)),
                ..Self::new(429, "rate_limit_error", message).code("overloaded")
            },
            LlmError::DeadlineMissed => {
                Self::new(504, "server_error", message).code("deadline_missed")
            }
            LlmError::EngineError(_) => Self::engine(message),
            LlmError::Unavailable(u) => ApiError {
                retry_after_s: Some(u.retry_after_ms.div_ceil(1000).max(1)),
                ..Self::new(503, "server_error", message).code("unavailable")
            },
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }

    /// The whole answer.
    pub fn response(&self) -> Response {
        let resp = Response::json(self.status, self.body().to_string());
        match self.retry_after_s {
            Some(s) => resp.header("retry-after", s.to_string()),
            None => resp,
        }
    }
}

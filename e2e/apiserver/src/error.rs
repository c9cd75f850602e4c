//! Errors: the kube-apiserver-shaped `Status` answers ([`ApiError`]) and the server's own start-up and
//! storage failures ([`ServerError`]).
//!
//! Messages follow kube-apiserver's wording, because clients (kubectl, kube-rs, tests) show or match them:
//! `configmaps "x" not found`, `Operation cannot be fulfilled on ...`, `Kind.group "x" is invalid: ...`.

use serde_json::{Value, json};

/// One cause of a `422 Invalid` (kube-apiserver's `StatusCause`): a field path, a reason such as
/// `FieldValueInvalid`, and the field-level message (without the path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// Machine-readable reason, e.g. `FieldValueRequired`.
    pub reason: String,
    /// The message without the field path, e.g. `Required value`.
    pub message: String,
    /// The field path, e.g. `spec.members[0].name`.
    pub field: String,
}

impl Cause {
    /// The cause as kube-apiserver prints it inside a message: `field: message`.
    pub fn display(&self) -> String {
        if self.field.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.field, self.message)
        }
    }
}

/// An answer that is not a success: rendered as a `meta/v1 Status` with its HTTP code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `Status.reason`, e.g. `NotFound`.
    pub reason: &'static str,
    /// `Status.message`.
    pub message: String,
    /// `Status.details`, when there is one.
    pub details: Option<Value>,
    /// Seconds a client should wait before retrying (429, 500 from the fault hooks).
    pub retry_after: Option<u64>,
}

/// The name a resource goes by in messages: `configmaps` for the core group, `leases.coordination.k8s.io`
/// otherwise.
pub fn qualified_resource(group: &str, plural: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}

/// A string quoted as Go's `%q` quotes it (kube-apiserver's `Invalid value: "…"`): printable characters
/// as they are, `\a \b \f \n \r \t \v`, other ASCII controls as `\x07`, other unprintable characters
/// (format characters such as a zero-width space, separators other than the space) as `\u200b`.
pub fn go_quote(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\u{7}' => quoted.push_str("\\a"),
            '\u{8}' => quoted.push_str("\\b"),
            '\u{c}' => quoted.push_str("\\f"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            '\u{b}' => quoted.push_str("\\v"),
            ' '..='~' => quoted.push(c),
            c if c.is_ascii() => quoted.push_str(&format!("\\x{:02x}", c as u32)),
            c if go_printable(c) => quoted.push(c),
            c if (c as u32) < 0x10000 => quoted.push_str(&format!("\\u{:04x}", c as u32)),
            c => quoted.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    quoted.push('"');
    quoted
}

/// Go's `unicode.IsPrint` for a non-ASCII character: letters, marks, numbers, punctuation and symbols.
/// Rust's debug escaping leaves exactly those alone (after a letter, where a combining mark is not
/// escaped), except the separators, which Go does not print either.
fn go_printable(c: char) -> bool {
    let shown = format!("a{c}");
    !c.is_whitespace() && shown.escape_debug().to_string() == shown
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    fn with_details(mut self, group: &str, kind: &str, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": group, "kind": kind}));
        self
    }

    /// 404: the named object does not exist.
    pub fn not_found(group: &str, plural: &str, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!(
                "{} {} not found",
                qualified_resource(group, plural),
                go_quote(name)
            ),
        )
        .with_details(group, plural, name)
    }

    /// 404: no such resource type or path.
    pub fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .with_details("", "", "")
    }

    /// 409: create of an object that already exists.
    pub fn already_exists(group: &str, plural: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!(
                "{} {} already exists",
                qualified_resource(group, plural),
                go_quote(name)
            ),
        )
        .with_details(group, plural, name)
    }

    /// 409: a stale resourceVersion or a failed precondition.
    pub fn conflict(group: &str, plural: &str, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {}: {why}",
                qualified_resource(group, plural),
                go_quote(name)
            ),
        )
        .with_details(group, plural, name)
    }

    /// 409: the usual stale-resourceVersion conflict.
    pub fn stale(group: &str, plural: &str, name: &str) -> Self {
        Self::conflict(
            group,
            plural,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 409: server-side apply conflicts, one cause per (manager, field); the manager as kube-apiserver
    /// prints it (`"name"`, then ` with subresource "status"` and ` using v1` for an Update manager), the
    /// fields grouped by manager when there are several.
    pub fn apply_conflicts(
        group: &str,
        plural: &str,
        name: &str,
        conflicts: &[(String, String)],
    ) -> Self {
        let message = if let [(manager, field)] = conflicts {
            format!("Apply failed with 1 conflict: conflict with {manager}: {field}")
        } else {
            let mut by_manager: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
            for (manager, field) in conflicts {
                by_manager.entry(manager).or_default().push(field);
            }
            let lines: Vec<String> = by_manager
                .iter()
                .flat_map(|(manager, fields)| {
                    std::iter::once(format!("conflicts with {manager}:"))
                        .chain(fields.iter().map(|field| format!("- {field}")))
                })
                .collect();
            format!(
                "Apply failed with {} conflicts: {}",
                conflicts.len(),
                lines.join("\n")
            )
        };
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(manager, field)| {
                json!({"type": "FieldManagerConflict", "reason": "FieldManagerConflict",
                       "message": format!("conflict with {manager}"), "field": field})
            })
            .collect();
        let mut err = Self::new(409, "Conflict", message);
        err.details = Some(json!({"name": name, "group": group, "kind": plural, "causes": causes}));
        err
    }

    /// 413: a request body over kube-apiserver's limit (3 MiB).
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit}"),
        )
    }

    /// 500 without a reason, as kube-apiserver passes on etcd's refusal of a value over its request
    /// limit (1.5 MiB).
    pub fn etcd_too_large() -> Self {
        Self::new(500, "", "etcdserver: request is too large")
    }

    /// 410: a watch or list from a resourceVersion older than the kept history.
    pub fn gone(requested: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// 422: the object fails validation. `kind` and `group` name the type as `Kind.group`.
    pub fn invalid(kind: &str, group: &str, name: &str, causes: &[Cause]) -> Self {
        let what = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let shown: Vec<String> = causes.iter().map(Cause::display).collect();
        let list = if shown.len() == 1 {
            shown[0].clone()
        } else {
            format!("[{}]", shown.join(", "))
        };
        let mut err = Self::new(
            422,
            "Invalid",
            format!("{what} {} is invalid: {list}", go_quote(name)),
        );
        let causes: Vec<Value> = causes
            .iter()
            .map(|c| json!({"reason": c.reason, "type": c.reason, "message": c.message, "field": c.field}))
            .collect();
        err.details = Some(json!({"name": name, "group": group, "kind": kind, "causes": causes}));
        err
    }

    /// 422 without field causes: a patch that cannot be applied.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    /// 400: a request the server cannot make sense of.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 405: a verb the resource does not support.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    /// 415: a patch type the server does not know.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {content_type}"
            ),
        )
    }

    /// 415: a body encoding the server does not read (protobuf, CBOR): clients retry with JSON.
    pub fn unsupported_body(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml; got {content_type}"
            ),
        )
    }

    /// 500: something went wrong inside the server (or a fault hook says so).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// 403: RBAC does not allow the request ([`crate::authz`]).
    pub fn forbidden(attributes: &crate::authz::Attributes, user: &str) -> Self {
        let kind = attributes.resource.clone();
        let name = attributes.name.clone().unwrap_or_default();
        Self::new(403, "Forbidden", attributes.forbidden_message(user)).with_details(
            &attributes.group,
            &kind,
            &name,
        )
    }

    /// 429: the fault hook's "too many requests".
    pub fn too_many_requests() -> Self {
        let mut err = Self::new(
            429,
            "TooManyRequests",
            "the server has received too many requests and has asked us to try again later (injected fault)",
        );
        err.retry_after = Some(1);
        err
    }

    /// The `meta/v1 Status` object for this error.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let (Some(details), Some(obj)) = (&self.details, status.as_object_mut()) {
            obj.insert("details".into(), details.clone());
        }
        if self.reason.is_empty()
            && let Some(obj) = status.as_object_mut()
        {
            obj.remove("reason");
        }
        status
    }
}

/// Failures of the server itself (binding, the data directory), as opposed to answers to requests.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address tried.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The data directory could not be read or written.
    #[error("data directory {path}: {source}")]
    Storage {
        /// The file concerned.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A record in the data directory could not be understood.
    #[error("data directory {path}, line {line}: {message}")]
    Corrupt {
        /// The file concerned.
        path: std::path::PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        message: String,
    },
    /// The kubeconfig could not be built or written.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// The server was asked to do something that needs it running (or stopped).
    #[error("{0}")]
    State(&'static str),
}

#[cfg(test)]
mod tests {
    use super::go_quote;

    #[test]
    fn values_are_quoted_as_go_quotes_them() {
        // What kube-apiserver answered for these values (`Invalid value: …`), character for character.
        assert_eq!(go_quote("postgres\u{7}wal"), r#""postgres\awal""#);
        assert_eq!(go_quote("postgres\0wal"), r#""postgres\x00wal""#);
        assert_eq!(go_quote("orders\u{200b}db"), r#""orders\u200bdb""#);
        assert_eq!(go_quote("postgres-w\u{430}l"), "\"postgres-w\u{430}l\"");
        assert_eq!(go_quote("say \"hi\"\\\n"), r#""say \"hi\"\\\n""#);
        assert_eq!(go_quote("e\u{301}\u{a0}\u{1b}"), "\"e\u{301}\\u00a0\\x1b\"");
    }
}

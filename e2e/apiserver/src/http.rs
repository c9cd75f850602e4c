//! HTTP/1.1: routes a request to health, version, discovery, OpenAPI, a resource verb or a watch, applies the
//! fault hooks, and writes JSON answers (errors as `meta/v1 Status`, with `Warning` and `Retry-After`
//! headers where due).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::Value;

use crate::api::{self, Call, Query, Target};
use crate::authz::{Attributes, AuditEntry, AuditLog, Identity};
use crate::error::ApiError;
use crate::faults::Faults;
use crate::store::Store;
use crate::{discovery, openapi};

/// kube-apiserver's limit on a request body (`--max-request-bytes`' default for JSON: 3 MiB).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// The body type of every answer.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What a running server's connections share.
#[derive(Debug)]
pub struct Shared {
    /// The objects.
    pub store: Arc<Store>,
    /// The fault switches.
    pub faults: Arc<Faults>,
    /// `host:port`, for `/api`'s server address.
    pub address: String,
    /// Whether RBAC is enforced ([`crate::authz`]).
    pub authorize: bool,
    /// Every resource request, and whether RBAC allows it.
    pub audit: Arc<AuditLog>,
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json_response(code: u16, body: &Value, warnings: &[String]) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json");
    for w in warnings {
        builder = builder.header("Warning", format!("299 - {w:?}"));
    }
    builder
        .body(full(bytes))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

fn error_response(err: &ApiError) -> Response<Body> {
    let mut resp = json_response(err.code, &err.to_status(), &[]);
    if let Some(secs) = err.retry_after
        && let Ok(v) = header::HeaderValue::from_str(&secs.to_string())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

fn text(code: u16, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::OK))
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// Answers one request.
pub async fn serve(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let exempt = matches!(path.as_str(), "/healthz" | "/livez" | "/readyz");
    if let Some(code) = shared.faults.before_request(exempt).await {
        let err = if code == 429 {
            ApiError::too_many_requests()
        } else {
            ApiError::internal("injected fault: internal error")
        };
        return Ok(error_response(&err));
    }
    let method = req.method().clone();
    tracing::debug!(%method, uri = %req.uri(), "request");
    Ok(match route(&shared, req).await {
        Ok(resp) => resp,
        Err(err) => {
            tracing::debug!(%method, %path, code = err.code, message = %err.message, "refused");
            error_response(&err)
        }
    })
}

/// Records the request in the audit log and, when RBAC is enforced, refuses what it does not allow.
fn authorize<B>(
    shared: &Shared,
    req: &Request<B>,
    target: &Target,
    watch: bool,
) -> Result<(), ApiError> {
    let Some(attributes) = Attributes::of(req.method().as_str(), target, watch) else {
        return Ok(());
    };
    let identity = Identity::from_authorization(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    let allowed = crate::authz::is_allowed(&shared.store.lock(), &identity, &attributes);
    let refusal =
        (shared.authorize && !allowed).then(|| ApiError::forbidden(&attributes, &identity.user));
    shared.audit.record(AuditEntry {
        user: identity.user,
        attributes,
        allowed,
    });
    refusal.map_or(Ok(()), Err)
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let query = Query::parse(req.uri().query());
    let method = req.method().clone();
    if method == Method::GET {
        match path.as_str() {
            "/healthz" | "/livez" | "/readyz" => return Ok(text(200, "ok")),
            "/version" => return Ok(json_response(200, &discovery::version(), &[])),
            "/api" => {
                return Ok(json_response(
                    200,
                    &discovery::core_versions(&shared.address),
                    &[],
                ));
            }
            "/apis" => {
                let list = discovery::group_list(&shared.store.lock().registry);
                return Ok(json_response(200, &list, &[]));
            }
            // kubectl before 1.28 needs an OpenAPI v2 document for apply, and only reads it as
            // protobuf: an empty message is a valid (empty) gnostic Document.
            "/openapi/v2" => {
                return Response::builder()
                    .status(StatusCode::OK)
                    .header(
                        header::CONTENT_TYPE,
                        "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                    )
                    .body(full(Bytes::new()))
                    .map_err(|e| ApiError::internal(e.to_string()));
            }
            "/openapi/v3" => {
                let inner = shared.store.lock();
                let doc = openapi::root(&inner.registry, &format!("{:016X}", inner.rv()));
                return Ok(json_response(200, &doc, &[]));
            }
            _ => {}
        }
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let doc = match segs.as_slice() {
            ["api", version] => Some(discovery::resource_list(
                &shared.store.lock().registry,
                "",
                version,
            )),
            ["apis", group] => Some(discovery::group(&shared.store.lock().registry, group)),
            ["apis", group, version] => Some(discovery::resource_list(
                &shared.store.lock().registry,
                group,
                version,
            )),
            ["openapi", "v3", "api", version] => Some(openapi::group_version(
                &shared.store.lock().registry,
                "",
                version,
            )),
            ["openapi", "v3", "apis", group, version] => Some(openapi::group_version(
                &shared.store.lock().registry,
                group,
                version,
            )),
            _ => None,
        };
        if let Some(doc) = doc {
            return doc
                .map(|d| json_response(200, &d, &[]))
                .ok_or_else(ApiError::no_route);
        }
    }
    let target = Target::parse(&path).ok_or_else(ApiError::no_route)?;
    authorize(shared, &req, &target, query.flag("watch"))?;
    if method == Method::GET && target.name.is_none() && query.flag("watch") {
        shared.faults.before_watch().await;
        let accept = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let drops = shared.faults.watch_drops();
        let lines = crate::watch::start(&shared.store, &target, &query, &accept, drops)?;
        let stream = futures::stream::unfold(lines, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let body = StreamBody::new(stream).boxed_unsync();
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|e| ApiError::internal(e.to_string()));
    }
    let header_str = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let content_type = header_str(header::CONTENT_TYPE);
    let user_agent = header_str(header::USER_AGENT);
    let accept = header_str(header::ACCEPT);
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?
        .to_bytes();
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::too_large(MAX_BODY_BYTES));
    }
    let now = crate::now();
    let call = Call {
        method: method.as_str(),
        target: &target,
        query: &query,
        body: &body,
        content_type: &content_type,
        user_agent: &user_agent,
        accept: &accept,
        now: &now,
    };
    let outcome = {
        let mut inner = shared.store.lock();
        api::handle(&mut inner, &call)?
    };
    Ok(json_response(
        outcome.code,
        &outcome.body,
        &outcome.warnings,
    ))
}

//! Cross-cutting request handling: metrics and the access log by route
//! pattern, the request id sent back as `X-Request-Id`, the request span,
//! and the body deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use actix_web::{Error, HttpMessage, web};
use futures_util::Stream;
use tracing::Span;
use tracing_actix_web::{RequestId, RootSpanBuilder};

use super::client::TrustedProxies;

use crate::service::Service;

/// Labels use the matched route pattern, never the raw path, and a fixed
/// set of methods, so no request can create new series.
pub async fn record_metrics(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    let service = req.app_data::<web::Data<Service>>().cloned();
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let res = next.call(req).await?;
    let elapsed = started.elapsed();
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".into());
    // The access log: one line per request, inside its span (request id,
    // client address). 5xx answers are also logged, with their cause, where
    // they arise.
    tracing::info!(
        method,
        route = %route,
        status = res.status().as_u16(),
        duration_ms = elapsed.as_secs_f64() * 1e3,
        "request"
    );
    if let Some(service) = service {
        let status = res.status().as_u16().to_string();
        let m = &service.metrics;
        m.http_requests
            .with_label_values(&[method, &route, &status])
            .inc();
        m.http_duration
            .with_label_values(&[method, &route])
            .observe(elapsed.as_secs_f64());
    }
    Ok(res)
}

/// The request's id: the caller's `X-Request-Id` when it is a sane one
/// (so a trace spans the caller's logs and ours), else generated here.
#[derive(Debug, Clone)]
pub struct RequestIdValue(pub String);

/// An incoming request id is taken only if short and plain: it goes into
/// every log line and back into a response header.
fn valid_request_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'=')
        })
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`),
/// when it is well formed and not all zeros.
fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    (hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && hex(flags, 2))
    .then_some(trace)
}

pub async fn request_id_header(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let id = req
        .extensions()
        .get::<RequestIdValue>()
        .map(|r| r.0.clone());
    let mut res = next.call(req).await?;
    if let Some(id) = id.and_then(|s| HeaderValue::from_str(&s).ok()) {
        res.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), id);
    }
    Ok(res)
}

/// How long a client has to send a request's body once its headers are in
/// (app data). Headers have the same deadline, through actix-web's
/// `client_request_timeout`.
#[derive(Debug, Clone, Copy)]
pub struct RequestDeadline(pub Duration);

/// Cuts off a body that is not received whole in time: a client sending one
/// byte every few seconds must not hold a connection (and a file
/// descriptor) for ever. The handler reading the body gets a timed-out
/// payload error (408, connection closed); a handler that never reads it
/// answers as usual.
pub async fn body_deadline(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    if let Some(d) = req.app_data::<web::Data<RequestDeadline>>() {
        let deadline = tokio::time::Instant::now() + d.0;
        let payload = req.take_payload();
        req.set_payload(Payload::Stream {
            payload: Box::pin(DeadlinePayload {
                inner: payload,
                timer: Box::pin(tokio::time::sleep_until(deadline)),
            }),
        });
    }
    next.call(req).await
}

struct DeadlinePayload<S> {
    inner: S,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Stream for DeadlinePayload<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(item) = Pin::new(&mut self.inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request body not received in time",
            ))))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The request span: tracing-actix-web's, with the client address taken as
/// the throttle takes it (never from a spoofable `X-Forwarded-For`), and no
/// WARN event per 4xx (a client must not control the log's volume at WARN):
/// every request gets one access-log line at INFO from [`record_metrics`].
pub struct RootSpan;

impl RootSpanBuilder for RootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let client = request
            .app_data::<web::Data<TrustedProxies>>()
            .zip(request.peer_addr())
            .map(|(t, peer)| t.client(peer.ip(), request.headers()).to_string())
            .or_else(|| request.peer_addr().map(|p| p.ip().to_string()))
            .unwrap_or_default();
        let request_id = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|s| valid_request_id(s))
            .map(str::to_owned)
            .or_else(|| {
                request
                    .extensions()
                    .get::<RequestId>()
                    .map(|r| r.to_string())
            })
            .unwrap_or_default();
        request
            .extensions_mut()
            .insert(RequestIdValue(request_id.clone()));
        let trace = request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(trace_id)
            .map(str::to_owned);
        if !crate::otel::enabled() {
            // As ever: no tracing exported, nothing more to do per request.
            return tracing::info_span!(
                "request",
                request_id = %request_id,
                trace_id = %trace.as_deref().unwrap_or(""),
                client_ip = %client,
                method = %request.method(),
                route = tracing::field::Empty,
                status = tracing::field::Empty,
            );
        }
        // Exported: named "METHOD /route", as OpenTelemetry's HTTP
        // conventions name server spans.
        let route = request.match_pattern();
        let span = tracing::info_span!(
            "request",
            request_id = %request_id,
            trace_id = tracing::field::Empty,
            client_ip = %client,
            method = %request.method(),
            route = route.as_deref().unwrap_or("unmatched"),
            status = tracing::field::Empty,
            otel.kind = "server",
            otel.name = %format_args!(
                "{} {}",
                request.method(),
                route.as_deref().unwrap_or("unmatched")
            ),
            otel.status_code = tracing::field::Empty,
        );
        // The caller's span (W3C traceparent) is this one's parent; the log
        // lines carry the trace id, the caller's or the one begun here.
        let trace = crate::otel::link_request(&span, request.headers()).or(trace);
        span.record("trace_id", trace.as_deref().unwrap_or(""));
        span
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        let status = match outcome {
            Ok(res) => res.status(),
            Err(e) => e.as_response_error().status_code(),
        };
        span.record("status", status.as_u16());
        if status.is_server_error() && crate::otel::enabled() {
            span.record("otel.status_code", "ERROR");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_and_traceparents_are_taken_only_when_sane() {
        assert!(valid_request_id("3f2a9c1e-req_42"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id(&"a".repeat(129)));
        assert!(!valid_request_id("evil\nline"));
        assert!(!valid_request_id("a b"));
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            trace_id("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id("garbage"), None);
    }
}

//! Traces over OpenTelemetry (OTLP, http/protobuf), only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set. Unset, nothing is built: no exporter, no extra layer, and the
//! debug-level backend spans stay disabled at their call sites.
//!
//! The standard variables apply: `OTEL_SERVICE_NAME` (default `cohort`),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_PROTOCOL` (only
//! `http/protobuf`), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
//! `OTEL_BSP_*` (batching), `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_SDK_DISABLED`.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// Set once tracing is exported; read per request (one relaxed load).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (the OTel layer is installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Whether the environment asks for traces to be exported.
pub fn configured() -> bool {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let exporter_none = env("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none");
    !disabled
        && !exporter_none
        && (env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some())
}

/// Flushes the spans still queued when dropped (at exit).
pub struct Guard(Option<SdkTracerProvider>);

impl Guard {
    pub fn none() -> Self {
        Self(None)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("cohort: flushing traces failed: {e}");
        }
    }
}

/// Builds the exporter and the provider; the caller installs the layer.
pub fn provider() -> Result<(SdkTracerProvider, Guard), String> {
    if let Some(p) =
        env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or(env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        && p != "http/protobuf"
    {
        return Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={p} is not supported: cohort exports traces over \
             http/protobuf (the collector's port 4318); unset it or set it to http/protobuf"
        ));
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| format!("cannot build the OTLP trace exporter: {e}"))?;
    let mut resource = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    if env("OTEL_SERVICE_NAME").is_none()
        && !env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="))
    {
        resource = resource.with_service_name("cohort");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    ENABLED.store(true, Ordering::Relaxed);
    Ok((provider.clone(), Guard(Some(provider))))
}

/// The tracer spans are exported with.
pub fn tracer(provider: &SdkTracerProvider) -> opentelemetry_sdk::trace::Tracer {
    provider.tracer("cohort")
}

/// Request headers, as the W3C trace-context propagator reads them.
struct Headers<'a>(&'a actix_web::http::header::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` (a request's) the child of the caller's span named in its
/// `traceparent` header, if any, and returns the trace id it belongs to.
/// Only when tracing is exported.
pub fn link_request(
    span: &tracing::Span,
    headers: &actix_web::http::header::HeaderMap,
) -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if !enabled() {
        return None;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

//! Request metrics, the access log and the process metrics of `/metrics`.
//!
//! [`observe`] wraps every request: it counts it in
//! `modelpress_http_requests_total{method, route, status}`, records its
//! duration (until the response head is ready; a download's body streams
//! after) in `modelpress_http_request_duration_seconds`, and writes one
//! access-log line at `info` with the method, route, status, duration, body
//! bytes (when known before streaming) and request id. `route` is the
//! route's template (`/v1/jobs/{id}`), filled in by [`record_route`] once
//! the router has matched; requests no route matched count as `unmatched`,
//! so the label's values stay few whatever paths clients send.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::HttpBody;
use axum::extract::{MatchedPath, Request};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;

pub const REQUESTS: &str = "modelpress_http_requests_total";
pub const DURATION: &str = "modelpress_http_request_duration_seconds";
/// Upper bounds of the request duration histogram's buckets, in seconds.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Registers the help texts of the request metrics.
pub fn describe() {
    metrics::describe_counter!(
        REQUESTS,
        "HTTP requests answered, by method, route template and status"
    );
    metrics::describe_histogram!(
        DURATION,
        metrics::Unit::Seconds,
        "Time from a request's arrival to its response head, by method, route template and status"
    );
}

/// Where [`record_route`] leaves the matched route for [`observe`].
#[derive(Clone, Default)]
struct RouteSlot(Arc<OnceLock<String>>);

/// Counts, times and logs a request. Runs outside the router.
pub async fn observe(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let slot = RouteSlot::default();
    req.extensions_mut().insert(slot.clone());
    let resp = next.run(req).await;
    let elapsed = started.elapsed();
    let route = slot.0.get().map_or("unmatched", String::as_str);
    let status = resp.status().as_u16();
    let bytes = resp.body().size_hint().exact().or_else(|| {
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    });
    let labels = [
        ("method", method.to_string()),
        ("route", route.to_string()),
        ("status", status.to_string()),
    ];
    metrics::counter!(REQUESTS, &labels).increment(1);
    metrics::histogram!(DURATION, &labels).record(elapsed.as_secs_f64());
    tracing::info!(
        target: "modelpress::access",
        method = %method,
        route = %route,
        status,
        duration_ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3,
        bytes,
        request_id = %request_id,
        "request"
    );
    resp
}

/// Records the template of the route the router matched. Runs as a route
/// layer, after routing.
pub async fn record_route(req: Request, next: Next) -> Response {
    if let (Some(slot), Some(path)) = (
        req.extensions().get::<RouteSlot>(),
        req.extensions().get::<MatchedPath>(),
    ) {
        let _ = slot.0.set(path.as_str().to_string());
    }
    next.run(req).await
}

/// The method as a label: the standard ones by name, anything else as
/// `other`, so that clients cannot grow the label's values.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// The process's CPU time, resident memory and open file descriptors in
/// Prometheus text, read from `/proc/self` at each scrape. Empty where
/// `/proc` is not there.
pub fn process_metrics() -> String {
    use std::fmt::Write;
    let mut text = String::new();
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // Fields after the command name, which is in parentheses and may hold
    // spaces: utime and stime are the 12th and 13th, rss the 22nd.
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if let (Some(user), Some(system), true) = (field(11), field(12), ticks > 0) {
        let seconds = (user + system) as f64 / ticks as f64;
        text.push_str(
            "# HELP process_cpu_seconds_total User and system CPU time spent, in seconds.\n",
        );
        text.push_str("# TYPE process_cpu_seconds_total counter\n");
        let _ = writeln!(text, "process_cpu_seconds_total {seconds}");
    }
    if let (Some(pages), true) = (field(21), page > 0) {
        text.push_str("# HELP process_resident_memory_bytes Resident memory size, in bytes.\n");
        text.push_str("# TYPE process_resident_memory_bytes gauge\n");
        let _ = writeln!(
            text,
            "process_resident_memory_bytes {}",
            pages * page as u64
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The directory being read holds one descriptor of its own.
        let open = dir.count().saturating_sub(1);
        text.push_str("# HELP process_open_fds Open file descriptors.\n");
        text.push_str("# TYPE process_open_fds gauge\n");
        let _ = writeln!(text, "process_open_fds {open}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn process_metrics_read_cpu_memory_and_descriptors() {
        let text = process_metrics();
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
                .parse()
                .unwrap()
        };
        assert!(value("process_cpu_seconds_total") >= 0.0);
        // A test binary holds more than a megabyte resident and has at
        // least stdin, stdout and stderr open.
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }
}

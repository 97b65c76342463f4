use crate::helpers::spawn_app;

/// The committed document is what the code generates; after an API change,
/// regenerate it with `cargo run -- openapi > openapi/openapi.json`.
#[test]
fn the_committed_openapi_document_matches_the_code() {
    let generated = modelpress::api::openapi().to_pretty_json().unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed.trim_end() == generated.trim_end(),
        "openapi/openapi.json is stale: run `cargo run -- openapi > openapi/openapi.json` and commit it\n{}",
        line_diff(&committed, &generated)
    );
}

/// The lines around the first place `committed` and `generated` differ, as
/// `-` (committed) and `+` (generated) lines with their line numbers.
fn line_diff(committed: &str, generated: &str) -> String {
    const CONTEXT: usize = 4;
    let old: Vec<&str> = committed.trim_end().lines().collect();
    let new: Vec<&str> = generated.trim_end().lines().collect();
    let Some(first) = (0..old.len().max(new.len())).find(|&i| old.get(i) != new.get(i)) else {
        return String::new();
    };
    // The end of the differing stretch, counted back from the end of both.
    let common_tail = old[first..]
        .iter()
        .rev()
        .zip(new[first..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let (old_end, new_end) = (old.len() - common_tail, new.len() - common_tail);
    let mut out = String::new();
    let before = first.saturating_sub(CONTEXT);
    for (i, line) in old.iter().enumerate().take(first).skip(before) {
        out += &format!("  {:>5} {line}\n", i + 1);
    }
    for (i, line) in old
        .iter()
        .enumerate()
        .take(old_end.min(first + 40))
        .skip(first)
    {
        out += &format!("- {:>5} {line}\n", i + 1);
    }
    for (i, line) in new
        .iter()
        .enumerate()
        .take(new_end.min(first + 40))
        .skip(first)
    {
        out += &format!("+ {:>5} {line}\n", i + 1);
    }
    for (i, line) in old.iter().enumerate().skip(old_end).take(CONTEXT) {
        out += &format!("  {:>5} {line}\n", i + 1);
    }
    out
}

#[test]
fn a_stale_document_is_shown_as_the_lines_that_differ() {
    let committed = "{\n  \"a\": 1,\n  \"b\": 2,\n  \"c\": 3\n}\n";
    let generated = "{\n  \"a\": 1,\n  \"b\": 20,\n  \"c\": 3\n}";
    let diff = line_diff(committed, generated);
    assert!(diff.contains("-     3   \"b\": 2,"), "{diff}");
    assert!(diff.contains("+     3   \"b\": 20,"), "{diff}");
    assert!(diff.contains("      4   \"c\": 3"), "{diff}");
    assert_eq!(line_diff(committed, committed), "");
}

/// What other tools fetch: the binary's own `modelpress openapi` output is
/// the committed document, byte for byte.
#[test]
fn modelpress_openapi_prints_the_committed_document() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelpress"))
        .arg("openapi")
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    let committed = std::fs::read(path).expect("openapi/openapi.json is committed");
    assert!(
        out.stdout == committed,
        "openapi/openapi.json differs from `modelpress openapi`: run `cargo run -- openapi > openapi/openapi.json` and commit it\n{}",
        line_diff(
            &String::from_utf8_lossy(&committed),
            &String::from_utf8_lossy(&out.stdout)
        )
    );
}

#[test]
fn every_route_is_documented_with_the_error_shape() {
    let doc: serde_json::Value = serde_json::to_value(modelpress::api::openapi()).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/v1/models",
        "/v1/models/{id}",
        "/v1/models/{id}/tensors",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/report",
        "/v1/jobs/{id}/artifacts/{name}",
        "/v1/presets",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(paths.contains_key(p), "{p} is documented");
    }
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    assert!(doc["components"]["schemas"]["JobView"].is_object());
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    // The optional bearer key is declared on /v1 operations only.
    assert_eq!(
        doc["paths"]["/v1/jobs"]["post"]["security"][0],
        serde_json::json!({"api_key": []})
    );
    assert!(doc["paths"]["/healthz"]["get"]["security"].is_null());
    assert_eq!(
        doc["components"]["securitySchemes"]["api_key"]["scheme"],
        "bearer"
    );
}

#[tokio::test]
async fn the_docs_page_and_document_are_served_without_outside_assets() {
    let app = spawn_app().await;
    let doc = app.get_json("/openapi.json").await;
    assert_eq!(
        doc,
        serde_json::to_value(modelpress::api::openapi()).unwrap()
    );
    let page = app.get("/docs/").await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    for line in html.lines() {
        let refs_outside =
            (line.contains("src=") || line.contains("href=")) && line.contains("http");
        assert!(!refs_outside, "outside asset: {line}");
    }
    let init = app
        .get("/docs/swagger-initializer.js")
        .await
        .text()
        .await
        .unwrap();
    assert!(init.contains("/openapi.json"), "{init}");
    assert!(
        init.replace(' ', "").contains("\"validatorUrl\":\"none\""),
        "{init}"
    );
    let bundle = app.get("/docs/swagger-ui-bundle.js").await;
    assert_eq!(bundle.status(), 200);
}

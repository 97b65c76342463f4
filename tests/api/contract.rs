//! The OpenAPI document says what the server does: every response has a
//! description, errors have the error schema, and the statuses and
//! parameter bounds are the ones the server enforces.

use serde_json::Value;

fn document() -> Value {
    serde_json::to_value(modelpress::api::openapi()).unwrap()
}

fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            out.push((path.clone(), method.clone(), op.clone()));
        }
    }
    out
}

#[test]
fn every_response_has_a_description_and_errors_have_the_error_schema() {
    let doc = document();
    for (path, method, op) in operations(&doc) {
        let responses = op["responses"].as_object().unwrap();
        for (status, r) in responses {
            let what = format!("{method} {path} {status}");
            assert!(
                r["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{what} has a description"
            );
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(
                    r["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{what} answers with the error shape"
                );
            }
        }
        assert!(
            responses.contains_key("500"),
            "{method} {path} documents 500"
        );
        if path.starts_with("/v1/") {
            assert!(
                responses.contains_key("401"),
                "{method} {path} documents 401"
            );
        }
    }
}

#[test]
fn statuses_content_types_and_bounds_match_the_server() {
    let doc = document();
    let op = |path: &str, method: &str| doc["paths"][path][method].clone();
    let statuses = |path: &str, method: &str| -> Vec<String> {
        op(path, method)["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    for s in ["201", "400", "401", "413", "500", "507"] {
        assert!(
            statuses("/v1/models", "post").contains(&s.to_string()),
            "upload {s}"
        );
    }
    for s in [
        "202", "400", "401", "409", "413", "415", "422", "500", "507",
    ] {
        assert!(
            statuses("/v1/jobs", "post").contains(&s.to_string()),
            "create job {s}"
        );
    }
    for (path, method) in [
        ("/v1/models/{id}", "get"),
        ("/v1/models/{id}", "delete"),
        ("/v1/jobs/{id}", "get"),
        ("/v1/jobs/{id}/cancel", "post"),
        ("/v1/jobs/{id}/artifacts/{name}", "get"),
    ] {
        assert!(
            statuses(path, method).contains(&"404".to_string()),
            "{method} {path} 404"
        );
    }
    // JSON artifacts are served as JSON.
    let download = op("/v1/jobs/{id}/artifacts/{name}", "get");
    let content = download["responses"]["200"]["content"].as_object().unwrap();
    assert!(content.contains_key("application/json"));
    assert!(content.contains_key("application/octet-stream"));
    // `limit` is 1..=200 as the server checks it; `cursor` is an id.
    for path in ["/v1/models", "/v1/jobs"] {
        let params = op(path, "get")["parameters"].as_array().unwrap().clone();
        let limit = params.iter().find(|p| p["name"] == "limit").unwrap();
        assert_eq!(limit["schema"]["minimum"], 1, "{path} limit");
        assert_eq!(limit["schema"]["maximum"], 200, "{path} limit");
        let cursor = params.iter().find(|p| p["name"] == "cursor").unwrap();
        assert!(
            cursor["schema"]["pattern"].as_str().is_some(),
            "{path} cursor"
        );
    }
}

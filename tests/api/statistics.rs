//! Calibration statistics through the service: uploaded for a model,
//! checked against it, named by jobs that run calibrated stages, and
//! deleted with care.

use std::collections::HashMap;

use safetensors::tensor::TensorView;
use safetensors::Dtype as StDtype;
use serde_json::{json, Value};

use crate::common::{gaussian, Rng, T};
use crate::helpers::*;

const D: usize = 128;

/// Two linear layers with 128 input columns each, and a bias.
fn model_tensors(seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    vec![
        gaussian("fc1.weight", &[64, D], 0.05, &mut rng),
        gaussian("fc1.bias", &[64], 0.01, &mut rng),
        gaussian("fc2.weight", &[32, D], 0.05, &mut rng),
    ]
}

type Arrays = Vec<(String, Vec<usize>, Vec<f32>)>;

/// `in_sum2`, `counts` and `xtx` of `n` random correlated inputs of width
/// `d`, summed in f64.
fn arrays_of(weight: &str, d: usize, n: usize, rng: &mut Rng) -> Arrays {
    let mut xtx = vec![0.0f64; d * d];
    let mut row = vec![0.0f32; d];
    for _ in 0..n {
        let common = rng.gaussian();
        for v in row.iter_mut() {
            *v = rng.gaussian() + 0.5 * common;
        }
        for i in 0..d {
            for j in 0..d {
                xtx[i * d + j] += f64::from(row[i]) * f64::from(row[j]);
            }
        }
    }
    let in_sum2 = (0..d).map(|j| xtx[j * d + j] as f32).collect();
    vec![
        (format!("{weight}.in_sum2"), vec![d], in_sum2),
        (format!("{weight}.counts"), vec![1], vec![n as f32]),
        (
            format!("{weight}.xtx"),
            vec![d, d],
            xtx.into_iter().map(|v| v as f32).collect(),
        ),
    ]
}

/// Statistics of both layers of [`model_tensors`], with `xtx`.
fn good_arrays() -> Arrays {
    let mut rng = Rng::new(7);
    let mut out = arrays_of("fc1.weight", D, 256, &mut rng);
    out.extend(arrays_of("fc2.weight", D, 256, &mut rng));
    out
}

/// A statistics file of `arrays` with `metadata`, as bytes.
fn file_with(arrays: &Arrays, metadata: &[(&str, &str)]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = arrays
        .iter()
        .map(|a| a.2.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = arrays
        .iter()
        .zip(&bytes)
        .map(|(a, b)| {
            (
                a.0.clone(),
                TensorView::new(StDtype::F32, a.1.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

fn stats_file(arrays: &Arrays) -> Vec<u8> {
    file_with(arrays, &[("modelpress.stats", "1")])
}

impl TestApp {
    async fn post_statistics(&self, model_id: &str, bytes: Vec<u8>) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/v1/models/{model_id}/statistics")))
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .unwrap()
    }

    async fn upload_statistics(&self, model_id: &str, bytes: Vec<u8>) -> Value {
        let resp = self.post_statistics(model_id, bytes).await;
        let status = resp.status();
        let location = resp
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_string());
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 201, "statistics upload: {body}");
        assert_eq!(
            location.as_deref(),
            Some(
                format!(
                    "/v1/models/{model_id}/statistics/{}",
                    body["id"].as_str().unwrap()
                )
                .as_str()
            )
        );
        body
    }

    /// Rows of the `statistics` table, read from the database.
    async fn statistics_rows(&self) -> i64 {
        self.count_rows("SELECT COUNT(*) FROM statistics").await
    }
}

#[tokio::test]
async fn uploaded_statistics_run_a_calibrated_preset_and_the_report_records_them() {
    let app = spawn_app().await;
    let model = app.upload_model(safetensors_bytes(&model_tensors(1))).await;
    let model_id = model["id"].as_str().unwrap();

    // Without statistics the calibrated preset is refused, naming what is
    // missing.
    let resp = app
        .post_job(&json!({"model_id": model_id, "preset": "int4-g128-gptq"}))
        .await;
    let message = assert_error(resp, 422, "invalid_pipeline").await;
    assert!(
        message.contains("xtx") && message.contains("fc1.weight"),
        "{message}"
    );

    let bytes = stats_file(&good_arrays());
    let sha = sha256_hex(&bytes);
    let stats = app.upload_statistics(model_id, bytes.clone()).await;
    assert_eq!(stats["sha256"], sha.as_str());
    assert_eq!(stats["bytes"], bytes.len() as u64);
    assert_eq!(stats["model_id"], model_id);
    assert_eq!(stats["tensors"], json!(["fc1.weight", "fc2.weight"]));
    assert_eq!(stats["has_xtx"], true);
    assert_eq!(stats["tokens"], 256.0);
    assert!(stats["created_at"].as_str().unwrap().ends_with('Z'));
    let sid = stats["id"].as_str().unwrap();

    let listed = app
        .get_json(&format!("/v1/models/{model_id}/statistics"))
        .await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed["items"][0]["id"], sid);
    let one = app
        .get_json(&format!("/v1/models/{model_id}/statistics/{sid}"))
        .await;
    assert_eq!(one, stats);

    let resp = app
        .post_job(&json!({
            "model_id": model_id,
            "preset": "int4-g128-gptq",
            "statistics": sid,
            "output": {"format": "dense"},
        }))
        .await;
    assert_eq!(resp.status(), 202);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["statistics"], sid);
    let job = app.wait_succeeded(job["id"].as_str().unwrap()).await;
    assert_eq!(job["statistics"], sid);

    let report = app
        .get_json(&format!("/v1/jobs/{}/report", job["id"].as_str().unwrap()))
        .await;
    assert_eq!(report["statistics_sha256"], sha.as_str(), "{report}");
    for name in ["fc1.weight", "fc2.weight"] {
        let t = report["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap();
        let e = t["output_error"].as_f64().unwrap();
        assert!(e > 0.0 && e < 0.1, "{name}: output_error {e}");
    }
    // The same content uploaded again is a second record of one blob.
    let blobs = app.blob_count();
    let again = app.upload_statistics(model_id, bytes).await;
    assert_ne!(again["id"], stats["id"]);
    assert_eq!(app.blob_count(), blobs);
    assert!(app.tmp_entries().is_empty(), "{:?}", app.tmp_entries());
}

#[tokio::test]
async fn bad_statistics_are_refused_naming_the_tensor_and_leave_nothing_behind() {
    let app = spawn_app_with(&["--max-upload-bytes", "200000"]).await;
    let model = app.upload_model(safetensors_bytes(&model_tensors(2))).await;
    let model_id = model["id"].as_str().unwrap();
    let blobs = app.blob_count();

    let with = |edit: &dyn Fn(&mut Arrays)| {
        let mut a = good_arrays();
        edit(&mut a);
        a
    };
    let find = |a: &Arrays, name: &str| a.iter().position(|t| t.0 == name).unwrap();
    let cases: Vec<(&str, Vec<u8>, u16, &str, &str)> = vec![
        (
            "wrong d_in",
            stats_file(&with(&|a| {
                a.retain(|t| !t.0.starts_with("fc2"));
                let mut rng = Rng::new(3);
                a.extend(arrays_of("fc2.weight", 64, 16, &mut rng));
            })),
            422,
            "invalid_statistics",
            "`fc2.weight` have 64 input columns, but the tensor has 128",
        ),
        (
            "unknown tensor",
            stats_file(&with(&|a| {
                a.push(("fc1.weight.mean".into(), vec![D], vec![0.0; D]))
            })),
            422,
            "invalid_statistics",
            "`fc1.weight.mean`",
        ),
        (
            "a weight not in the model",
            stats_file(&with(&|a| {
                let mut rng = Rng::new(4);
                a.extend(arrays_of("fc3.weight", D, 16, &mut rng));
            })),
            422,
            "invalid_statistics",
            "`fc3.weight`, which is not a tensor of the model",
        ),
        (
            "a value not finite",
            stats_file(&with(&|a| {
                let i = find(a, "fc1.weight.in_sum2");
                a[i].2[5] = f32::NAN;
            })),
            422,
            "invalid_statistics",
            "`fc1.weight`",
        ),
        (
            "xtx not symmetric",
            stats_file(&with(&|a| {
                let i = find(a, "fc2.weight.xtx");
                a[i].2[1] += 1000.0;
            })),
            422,
            "invalid_statistics",
            "`fc2.weight`",
        ),
        (
            "counts 0",
            stats_file(&with(&|a| {
                let i = find(a, "fc1.weight.counts");
                a[i].2[0] = 0.0;
            })),
            422,
            "invalid_statistics",
            "`fc1.weight`",
        ),
        (
            "not marked as statistics",
            file_with(&good_arrays(), &[]),
            422,
            "invalid_statistics",
            "modelpress.stats",
        ),
        (
            "a truncated header",
            stats_file(&good_arrays())[..40].to_vec(),
            400,
            "invalid_safetensors",
            "",
        ),
        (
            "over the size limit",
            {
                let mut a = good_arrays();
                let mut rng = Rng::new(5);
                a.extend(arrays_of("fc1.bias", 256, 4, &mut rng));
                stats_file(&a)
            },
            413,
            "payload_too_large",
            "",
        ),
    ];
    for (what, bytes, status, code, needle) in cases {
        let resp = app.post_statistics(model_id, bytes).await;
        let message = assert_error(resp, status, code).await;
        assert!(message.contains(needle), "{what}: {message}");
        assert!(
            !message.contains(app.data_dir.to_str().unwrap()),
            "{what}: a server path in {message}"
        );
        assert!(
            app.tmp_entries().is_empty(),
            "{what}: {:?}",
            app.tmp_entries()
        );
        assert_eq!(app.blob_count(), blobs, "{what}: blobs");
        assert_eq!(app.statistics_rows().await, 0, "{what}: rows");
    }
    // Streamed past the limit without a declared length: refused as well.
    let big = {
        let mut a = good_arrays();
        let mut rng = Rng::new(6);
        a.extend(arrays_of("fc1.bias", 256, 4, &mut rng));
        stats_file(&a)
    };
    let stream = futures_util::stream::iter(
        big.chunks(8192)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let resp = app
        .client
        .post(app.url(&format!("/v1/models/{model_id}/statistics")))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_error(resp, 413, "payload_too_large").await;
    eventually("the refused stream's directory is removed", || {
        app.tmp_entries().is_empty()
    })
    .await;
    assert_eq!(app.blob_count(), blobs);
    assert_eq!(app.statistics_rows().await, 0);

    // A model that does not exist.
    let missing = "01900000-0000-7000-8000-000000000000";
    let resp = app
        .post_statistics(missing, stats_file(&good_arrays()))
        .await;
    assert_error(resp, 404, "not_found").await;
    let resp = app.get(&format!("/v1/models/{missing}/statistics")).await;
    assert_error(resp, 404, "not_found").await;
    let resp = app
        .get(&format!("/v1/models/{model_id}/statistics/{missing}"))
        .await;
    assert_error(resp, 404, "not_found").await;
    assert!(app.tmp_entries().is_empty());
}

#[tokio::test]
async fn statistics_in_use_are_not_deleted_and_a_job_takes_only_its_models_statistics() {
    let app = spawn_app_with(&["--tensor-delay-ms", "400"]).await;
    let a = app.upload_model(safetensors_bytes(&model_tensors(3))).await;
    let b = app.upload_model(safetensors_bytes(&model_tensors(4))).await;
    let (a, b) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let stats = app.upload_statistics(a, stats_file(&good_arrays())).await;
    let sid = stats["id"].as_str().unwrap();

    // Statistics of another model, or none of that id: refused as a
    // missing model is, 422.
    let resp = app
        .post_job(&json!({"model_id": b, "preset": "int4-g128-gptq", "statistics": sid}))
        .await;
    let message = assert_error(resp, 422, "statistics_not_found").await;
    assert!(message.contains(sid), "{message}");
    let resp = app
        .post_job(&json!({"model_id": a, "preset": "int4-g128-gptq", "statistics": "nope"}))
        .await;
    assert_error(resp, 422, "statistics_not_found").await;
    // Statistics without `xtx` do not serve gptq.
    let no_xtx: Arrays = good_arrays()
        .into_iter()
        .filter(|t| !t.0.ends_with(".xtx"))
        .collect();
    let partial = app.upload_statistics(a, stats_file(&no_xtx)).await;
    assert_eq!(partial["has_xtx"], false);
    let resp = app
        .post_job(&json!({"model_id": a, "preset": "int4-g128-gptq", "statistics": partial["id"]}))
        .await;
    let message = assert_error(resp, 422, "invalid_pipeline").await;
    assert!(message.contains("`xtx`"), "{message}");

    let job = app
        .post_job(&json!({"model_id": a, "preset": "int4-g128-gptq", "statistics": sid}))
        .await;
    assert_eq!(job.status(), 202);
    let job: Value = job.json().await.unwrap();
    let job_id = job["id"].as_str().unwrap();
    let path = format!("/v1/models/{a}/statistics/{sid}");
    assert_error(app.delete(&path).await, 409, "statistics_in_use").await;
    app.post(&format!("/v1/jobs/{job_id}/cancel")).await;
    app.wait_finished(job_id).await;

    let blobs = app.blob_count();
    assert_eq!(app.delete(&path).await.status(), 204);
    assert_error(app.get(&path).await, 404, "not_found").await;
    assert_error(app.delete(&path).await, 404, "not_found").await;
    assert_eq!(
        app.blob_count(),
        blobs - 1,
        "the statistics' blob is removed"
    );
    // The finished job still names them.
    assert_eq!(app.job(job_id).await["statistics"], sid);
}

#[tokio::test]
async fn deleting_a_model_deletes_its_statistics() {
    let app = spawn_app().await;
    let model = app.upload_model(safetensors_bytes(&model_tensors(5))).await;
    let id = model["id"].as_str().unwrap();
    let stats = app.upload_statistics(id, stats_file(&good_arrays())).await;
    assert_eq!(app.blob_count(), 2);
    assert_eq!(app.delete(&format!("/v1/models/{id}")).await.status(), 204);
    assert_eq!(app.blob_count(), 0);
    assert_eq!(app.statistics_rows().await, 0);
    let path = format!(
        "/v1/models/{id}/statistics/{}",
        stats["id"].as_str().unwrap()
    );
    assert_error(app.get(&path).await, 404, "not_found").await;
}

use std::fs;

use futures_util::TryStreamExt;

use super::s3::{S3Location, PART_BYTES};
use super::*;

#[path = "../../tests/common/s3.rs"]
mod s3_server;
use s3_server::S3Server;

/// A file under the store's `tmp/`, sealed: its path and sha256.
fn sealed(tmp: &TmpDir, name: &str, bytes: &[u8]) -> (PathBuf, String) {
    let f = tmp.path().join(name);
    fs::write(&f, bytes).unwrap();
    let (sha, len) = seal_file(&f).unwrap();
    assert_eq!(len, bytes.len() as u64);
    (f, sha)
}

fn on_bucket(server: &S3Server, prefix: &str, cache_bytes: u64) -> Location {
    Location::S3(S3Location {
        bucket: s3_server::BUCKET.into(),
        prefix: prefix.into(),
        endpoint: Some(server.endpoint()),
        access_key_id: Some(s3_server::ACCESS_KEY.into()),
        secret_access_key: Some(s3_server::SECRET_KEY.into()),
        cache_bytes,
    })
}

async fn read_all(blobs: &Blobs, sha: &str, range: Option<std::ops::Range<u64>>) -> Vec<u8> {
    let read = blobs.read(sha, range).await.unwrap();
    let chunks: Vec<bytes::Bytes> = read.stream.try_collect().await.unwrap();
    chunks.concat()
}

/// Bytes that differ from one position to the next, so that a part out of
/// place would show.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 4099) as u8).collect()
}

#[tokio::test]
async fn a_committed_file_is_stored_once_under_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::open(dir.path(), &Location::Local(dir.path().join("blobs"))).unwrap();
    let mut shas = Vec::new();
    for _ in 0..2 {
        let tmp = blobs.tmp_dir("t").unwrap();
        let (f, sha) = sealed(&tmp, "x", b"hello");
        shas.push((sha.clone(), blobs.commit(&f, &sha).await.unwrap()));
    }
    assert_eq!(shas[0].0, shas[1].0);
    assert!(shas[0].1 && !shas[1].1, "the second copy is not stored");
    assert_eq!(blobs.list().await.unwrap(), vec![shas[0].0.clone()]);
    assert_eq!(fs::read_dir(blobs.tmp_root()).unwrap().count(), 0);
    assert_eq!(read_all(&blobs, &shas[0].0, Some(1..4)).await, b"ell");
}

#[test]
fn opening_clears_what_a_dead_process_left_in_tmp() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("tmp/upload-x")).unwrap();
    fs::write(dir.path().join("tmp/upload-x/half"), b"..").unwrap();
    let blobs = Blobs::open(dir.path(), &Location::Local(dir.path().join("blobs"))).unwrap();
    assert_eq!(fs::read_dir(blobs.tmp_root()).unwrap().count(), 0);
}

#[tokio::test]
async fn in_a_bucket_a_blob_committed_twice_is_stored_once_and_listed_and_removed() {
    let server = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::open(dir.path(), &on_bucket(&server, "team/a", 1 << 30)).unwrap();
    let mut added = Vec::new();
    for _ in 0..2 {
        let tmp = blobs.tmp_dir("t").unwrap();
        let (f, sha) = sealed(&tmp, "x", b"hello bucket");
        added.push(blobs.commit(&f, &sha).await.unwrap());
        assert!(!f.exists(), "the committed file left tmp/");
    }
    // In a bucket a commit cannot tell a staged object from one stored
    // before, and says it may have added it; stored once all the same.
    assert_eq!(added, vec![true, true]);
    let sha = hex::encode(Sha256::digest(b"hello bucket"));
    let key = format!("team/a/blobs/{}/{sha}", &sha[..2]);
    assert_eq!(fs::read(server.object_file(&key)).unwrap(), b"hello bucket");
    assert_eq!(server.objects().len(), 1, "{:?}", server.objects());
    // The uploaded file was kept as the cached copy.
    assert_eq!(
        fs::read(dir.path().join("cache").join(&sha)).unwrap(),
        b"hello bucket"
    );
    assert_eq!(blobs.list().await.unwrap(), vec![sha.clone()]);
    assert_eq!(read_all(&blobs, &sha, Some(6..12)).await, b"bucket");
    assert_eq!(read_all(&blobs, &sha, None).await, b"hello bucket");

    blobs.remove(&sha).await;
    assert!(blobs.list().await.unwrap().is_empty());
    assert!(!server.object_file(&key).exists());
    assert!(!dir.path().join("cache").join(&sha).exists());
    let e = blobs.read(&sha, None).await.err().unwrap();
    assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
}

#[tokio::test]
async fn a_file_larger_than_a_part_goes_up_in_parts_and_comes_back_whole() {
    let server = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::open(dir.path(), &on_bucket(&server, "", 1 << 30)).unwrap();
    let content = pattern(PART_BYTES * 2 + 12345);
    let tmp = blobs.tmp_dir("t").unwrap();
    let (f, sha) = sealed(&tmp, "big", &content);
    assert!(blobs.commit(&f, &sha).await.unwrap());
    let stored = fs::read(server.object_file(&format!("blobs/{}/{sha}", &sha[..2]))).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&stored)), sha);

    // A second process (no cache) fetches it, checked, and links it.
    let other = tempfile::tempdir().unwrap();
    let fresh = Blobs::open(other.path(), &on_bucket(&server, "", 1 << 30)).unwrap();
    let job = fresh.tmp_dir("job").unwrap();
    fresh
        .checkout(&[("model.safetensors", &sha)], job.path())
        .await
        .unwrap();
    let linked = job.path().join("model.safetensors");
    assert_eq!(fs::read(&linked).unwrap(), content);
    let cached = other.path().join("cache").join(&sha);
    assert!(
        !fs::symlink_metadata(&linked)
            .unwrap()
            .file_type()
            .is_symlink(),
        "a hard link, not a symbolic one"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(&linked).unwrap().ino(),
        fs::metadata(&cached).unwrap().ino()
    );
    let start = PART_BYTES as u64 - 10;
    assert_eq!(
        read_all(&fresh, &sha, Some(start..start + 20)).await,
        &content[start as usize..start as usize + 20]
    );
    assert_eq!(
        fs::read_dir(fresh.tmp_root()).unwrap().count(),
        1,
        "only the job's directory"
    );
}

#[tokio::test]
async fn a_corrupt_object_is_refused_at_checkout_and_nothing_is_cached() {
    let server = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::open(dir.path(), &on_bucket(&server, "p", 0)).unwrap();
    let tmp = blobs.tmp_dir("t").unwrap();
    let (f, sha) = sealed(&tmp, "x", &pattern(1000));
    blobs.commit(&f, &sha).await.unwrap();
    // Evicted at once (a bound of 0), so the next checkout fetches it.
    assert_eq!(fs::read_dir(dir.path().join("cache")).unwrap().count(), 0);
    let object = server.object_file(&format!("p/blobs/{}/{sha}", &sha[..2]));
    let mut bytes = fs::read(&object).unwrap();
    bytes[500] ^= 1;
    fs::write(&object, bytes).unwrap();

    let job = blobs.tmp_dir("job").unwrap();
    let e = blobs
        .checkout(&[("w.safetensors", &sha)], job.path())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("corrupt"), "{e}");
    assert_eq!(fs::read_dir(dir.path().join("cache")).unwrap().count(), 0);
    assert!(!job.path().join("w.safetensors").exists());
    let tmp_names: Vec<_> = fs::read_dir(blobs.tmp_root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        tmp_names.iter().all(|n| !n.starts_with("fetch-")),
        "no partial download left: {tmp_names:?}"
    );

    // A blob that is not in the bucket at all.
    let e = blobs
        .checkout(&[("gone.safetensors", &"0".repeat(64))], job.path())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(e.to_string().contains("gone.safetensors"), "{e}");
}

#[tokio::test]
async fn eviction_keeps_the_cache_in_bounds_and_files_jobs_use() {
    let server = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Room for two blobs of 1000 bytes, not three.
    let blobs = Blobs::open(dir.path(), &on_bucket(&server, "", 2500)).unwrap();
    let cache = dir.path().join("cache");
    let mut shas = Vec::new();
    for i in 0..4u8 {
        let tmp = blobs.tmp_dir("t").unwrap();
        let (f, sha) = sealed(&tmp, "x", &[i; 1000]);
        blobs.commit(&f, &sha).await.unwrap();
        shas.push(sha);
        // Distinct modification times, oldest first.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let cached = |sha: &str| cache.join(sha).exists();
    assert!(
        !cached(&shas[0]) && !cached(&shas[1]),
        "the oldest were evicted"
    );
    assert!(cached(&shas[2]) && cached(&shas[3]));

    // A job links blob 0 (fetched again) and holds it; blobs 1 and 2 are
    // checked out after it, which pushes the cache over its bound.
    let job = blobs.tmp_dir("job").unwrap();
    blobs
        .checkout(&[("a", &shas[0])], job.path())
        .await
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let later = blobs.tmp_dir("job").unwrap();
    blobs
        .checkout(&[("b", &shas[1]), ("c", &shas[2])], later.path())
        .await
        .unwrap();
    drop(later);
    // Blob 0 is the least recently used but linked from a running job: it
    // stays, and so does its content in the job's directory.
    assert!(cached(&shas[0]));
    assert_eq!(fs::read(job.path().join("a")).unwrap(), vec![0u8; 1000]);
    blobs.checkout(&[], job.path()).await.unwrap();
    let held: u64 = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        held <= 2500 + 1000,
        "only a job's file beyond the bound: {held}"
    );
    // Once the job is done, its blob can go, least recently used first.
    drop(job);
    assert_eq!(cache::evict(&cache, 1000).unwrap(), 1000);
    assert!(!cached(&shas[0]) && cached(&shas[2]));
}

#[tokio::test]
async fn concurrent_checkouts_of_one_blob_each_get_it_whole() {
    let server = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let blobs = Arc::new(Blobs::open(dir.path(), &on_bucket(&server, "", 0)).unwrap());
    let content = pattern(3 << 20);
    let tmp = blobs.tmp_dir("t").unwrap();
    let (f, sha) = sealed(&tmp, "x", &content);
    blobs.commit(&f, &sha).await.unwrap();
    let jobs: Vec<TmpDir> = (0..4).map(|_| blobs.tmp_dir("job").unwrap()).collect();
    let runs = jobs.iter().map(|j| {
        let (blobs, sha, path) = (blobs.clone(), sha.clone(), j.path().to_path_buf());
        async move { blobs.checkout(&[("m", &sha)], &path).await }
    });
    for r in futures_util::future::join_all(runs).await {
        r.unwrap();
    }
    for j in &jobs {
        assert_eq!(fs::read(j.path().join("m")).unwrap(), content);
    }
}

#[tokio::test]
async fn a_bucket_that_does_not_answer_is_a_storage_fault() {
    let server = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::open(dir.path(), &on_bucket(&server, "", 1 << 20)).unwrap();
    blobs.check_writable().await.unwrap();
    server.stop();
    let e = blobs.check_writable().await.unwrap_err();
    assert_eq!(
        StorageFault::of_io(&e),
        Some(StorageFault::Unavailable),
        "{e}"
    );
    let tmp = blobs.tmp_dir("t").unwrap();
    let (f, sha) = sealed(&tmp, "x", b"later");
    let e = blobs.commit(&f, &sha).await.unwrap_err();
    assert_eq!(
        StorageFault::find(&e),
        Some(StorageFault::Unavailable),
        "{e}"
    );
    server.restart().await;
    blobs.check_writable().await.unwrap();
    assert!(blobs.commit(&f, &sha).await.unwrap());
}

#[test]
fn bucket_urls_are_read_strictly() {
    let l = S3Location::parse("s3://my-bucket/a/b/").unwrap();
    assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("my-bucket", "a/b"));
    assert_eq!(S3Location::parse("s3://my-bucket").unwrap().prefix, "");
    for bad in [
        "s3://",
        "s3://B/x",
        "s3://ab/x",
        "s3://b_c/x",
        "s3://bucket/a/../b",
        "http://x/y",
    ] {
        assert!(S3Location::parse(bad).is_err(), "{bad}");
    }
}

#[tokio::test]
async fn a_staged_object_swept_before_the_commit_is_uploaded_again() {
    let server = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::open(dir.path(), &on_bucket(&server, "p", 1 << 30)).unwrap();
    let tmp = blobs.tmp_dir("t").unwrap();
    let (f, sha) = sealed(&tmp, "x", b"staged, then swept");
    let key = format!("p/blobs/{}/{sha}", &sha[..2]);
    // Staged outside the lock: uploaded, the local file still there.
    blobs.stage(&f, &sha).await.unwrap();
    assert!(server.object_file(&key).exists());
    assert!(f.exists());
    // Another process's sweep removes the object nothing refers to yet.
    let other = tempfile::tempdir().unwrap();
    let sweeper = Blobs::open(other.path(), &on_bucket(&server, "p", 1 << 30)).unwrap();
    sweeper.remove(&sha).await;
    assert!(!server.object_file(&key).exists());
    // The commit, under the lock, finds it gone and stores it again.
    assert!(blobs.commit(&f, &sha).await.unwrap());
    assert_eq!(
        fs::read(server.object_file(&key)).unwrap(),
        b"staged, then swept"
    );
    assert!(!f.exists(), "the committed file left tmp/");
}

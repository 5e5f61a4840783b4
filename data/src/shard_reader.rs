//! Streams one WebDataset shard from object storage into samples.
//!
//! The shard is read with one streaming GET; the bytes go straight into the incremental tar
//! parser, so memory use is one sample, not one shard. When the byte stream breaks part-way
//! (connection reset, timeout) the read resumes with a ranged GET from the first byte not yet
//! parsed, pinned to the object's ETag so a shard rewritten meanwhile is never stitched
//! together from two versions. Retries back off exponentially; the failure count resets
//! whenever a resumed read makes progress, so a long shard on a flaky link still finishes.
//!
//! Samples that are structurally bad (no image, caption not UTF-8, cut off by a truncated or
//! corrupt archive) are counted in [`ShardStats::bad`] and never reach the callback.

use crate::sample::{count_bad, BadSampleCounts, BadSampleReason, Sample};
use crate::tar_stream::TarStreamParser;
use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use contrail_common::storage::{resolve, StoreLocation};
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::{GetOptions, GetRange, GetResult, GetResultPayload};
use std::future::Future;
use std::ops::ControlFlow;
use std::time::Duration;

/// What happened while reading one shard.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardStats {
    /// Samples handed to the callback.
    pub samples: u64,
    /// Samples skipped, by [`BadSampleReason::as_str`].
    pub bad: BadSampleCounts,
    /// Bytes of the shard read (across all requests).
    pub bytes: u64,
    /// Ranged GETs issued to resume after the stream broke.
    pub resumes: u32,
}

/// Retry policy for [`read_shard_with`].
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Consecutive failed attempts tolerated (opening, or resuming without progress).
    pub retries: u32,
    /// Wait before the first retry; doubled each further consecutive failure.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl ReadOptions {
    pub fn with_retries(retries: u32) -> Self {
        Self {
            retries,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u32 << failures.saturating_sub(1).min(16);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Checks the members a training sample needs. Image decoding is the decode stage's job; this
/// only looks at which members exist and whether the caption is text.
pub fn classify(sample: &Sample) -> Result<(), BadSampleReason> {
    if sample.image().is_none() {
        return Err(BadSampleReason::MissingImage);
    }
    if let Some(Err(_)) = sample.caption() {
        return Err(BadSampleReason::InvalidCaption);
    }
    Ok(())
}

/// Reads the shard at `url` (any URL [`resolve`] accepts), calling `on_sample` for every good
/// sample in archive order. `on_sample` returns `ControlFlow::Break(())` to stop early (the
/// rest of the shard is not downloaded). Returns an error naming the URL when the shard cannot
/// be opened, or when the stream keeps failing after `retries` consecutive attempts; samples
/// delivered before such a failure stay delivered.
pub async fn read_shard<F, Fut>(
    url: &str,
    s3_endpoint: &str,
    retries: u32,
    on_sample: F,
) -> Result<ShardStats>
where
    F: FnMut(Sample) -> Fut,
    Fut: Future<Output = ControlFlow<()>>,
{
    let loc = resolve(url, s3_endpoint).with_context(|| format!("resolving shard URL {url}"))?;
    read_shard_with(&loc, &ReadOptions::with_retries(retries), on_sample).await
}

/// [`read_shard`] on an already resolved location, with an explicit retry policy.
pub async fn read_shard_with<F, Fut>(
    loc: &StoreLocation,
    opts: &ReadOptions,
    mut on_sample: F,
) -> Result<ShardStats>
where
    F: FnMut(Sample) -> Fut,
    Fut: Future<Output = ControlFlow<()>>,
{
    let url = loc.url.as_str();
    let mut stats = ShardStats::default();
    let mut parser = TarStreamParser::new(url);
    let mut ready: Vec<Sample> = Vec::new();
    let mut offset: u64 = 0;
    // Object size and ETag from the first response; later requests must match them.
    let mut object: Option<(u64, Option<String>)> = None;
    let mut failures: u32 = 0;

    'request: loop {
        let get = GetOptions {
            range: (offset > 0).then_some(GetRange::Offset(offset)),
            if_match: object.as_ref().and_then(|(_, etag)| etag.clone()),
            ..Default::default()
        };
        let result = match loc.store.get_opts(&loc.path, get).await {
            Ok(r) => r,
            Err(e) if !is_retryable(&e) => {
                return Err(fatal_error(e, url, offset));
            }
            Err(e) => {
                failures += 1;
                if failures > opts.retries {
                    return Err(anyhow!(e).context(format!(
                        "opening shard {url} at byte {offset} failed {failures} times in a row"
                    )));
                }
                tracing::warn!(shard = url, offset, attempt = failures, error = %e, "shard GET failed; retrying");
                tokio::time::sleep(opts.backoff(failures)).await;
                continue 'request;
            }
        };
        let size = result.meta.size;
        if object.is_none() {
            object = Some((size, result.meta.e_tag.clone()));
        }
        if result.range.start != offset {
            return Err(anyhow!(
                "object store returned bytes from {} instead of {offset} for shard {url}",
                result.range.start
            ));
        }
        let mut stream = byte_stream(result);
        let interrupted: object_store::Error = loop {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    if !chunk.is_empty() {
                        failures = 0;
                    }
                    offset += chunk.len() as u64;
                    stats.bytes += chunk.len() as u64;
                    let parsed = parser.push(&chunk, &mut ready);
                    if deliver(&mut ready, &mut stats, &mut on_sample)
                        .await
                        .is_break()
                    {
                        return Ok(stats);
                    }
                    if let Err(e) = parsed {
                        tracing::warn!(error = %e, "skipping the rest of a corrupt shard");
                        count_bad(&mut stats.bad, BadSampleReason::TruncatedTar);
                        return Ok(stats);
                    }
                    if parser.is_done() {
                        // End-of-archive marker seen: the rest is record padding.
                        return Ok(stats);
                    }
                }
                Some(Err(e)) if !is_retryable(&e) => return Err(fatal_error(e, url, offset)),
                // Every byte arrived before the error: there is nothing left to resume.
                Some(Err(_)) if offset >= size => break 'request,
                Some(Err(e)) => break e,
                None if offset < size => {
                    break object_store::Error::Generic {
                        store: "contrail",
                        source: format!("stream ended at byte {offset} of {size}").into(),
                    }
                }
                None => break 'request,
            }
        };
        failures += 1;
        if failures > opts.retries {
            return Err(anyhow!(interrupted).context(format!(
                "reading shard {url} broke at byte {offset} of {size}, {failures} times in a row; \
                 {} samples were delivered before",
                stats.samples
            )));
        }
        tracing::warn!(shard = url, offset, attempt = failures, error = %interrupted, "shard stream broke; resuming with a ranged GET");
        stats.resumes += 1;
        tokio::time::sleep(opts.backoff(failures)).await;
    }

    // The stream ended before the end-of-archive marker.
    if let Err(e) = parser.finish() {
        tracing::warn!(error = %e, "shard is truncated");
        count_bad(&mut stats.bad, BadSampleReason::TruncatedTar);
    }
    Ok(stats)
}

/// Local files come back as an open file, which `GetResult::into_stream` reads 8 KiB at a time
/// with one blocking task per piece (~0.5 GB/s); 1 MiB pieces cut that overhead.
fn byte_stream(result: GetResult) -> BoxStream<'static, object_store::Result<Bytes>> {
    const FILE_CHUNK: u64 = 1 << 20;
    let range = result.range.clone();
    let (file, path) = match result.payload {
        GetResultPayload::File(file, path) => (file, path),
        GetResultPayload::Stream(s) => return s,
    };
    let io_error = |path: &std::path::Path, e: std::io::Error| object_store::Error::Generic {
        store: "LocalFileSystem",
        source: format!("reading {}: {e}", path.display()).into(),
    };
    futures::stream::try_unfold(
        (file, path, range.start),
        move |(mut file, path, pos)| async move {
            if pos >= range.end {
                return Ok(None);
            }
            let want = (range.end - pos).min(FILE_CHUNK) as usize;
            let (file, path, chunk) = tokio::task::spawn_blocking(move || {
                use std::io::{Read, Seek, SeekFrom};
                let mut buf = vec![0u8; want];
                let mut got = 0;
                let read = file.seek(SeekFrom::Start(pos)).and_then(|_| {
                    while got < want {
                        match file.read(&mut buf[got..])? {
                            0 => break,
                            n => got += n,
                        }
                    }
                    Ok(())
                });
                buf.truncate(got);
                (file, path, read.map(|()| buf))
            })
            .await
            .map_err(|e| object_store::Error::JoinError { source: e })?;
            let chunk = chunk.map_err(|e| io_error(&path, e))?;
            if chunk.is_empty() {
                return Err(io_error(
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "file shrank while reading",
                    ),
                ));
            }
            let next = pos + chunk.len() as u64;
            Ok(Some((Bytes::from(chunk), (file, path, next))))
        },
    )
    .boxed()
}

async fn deliver<F, Fut>(
    ready: &mut Vec<Sample>,
    stats: &mut ShardStats,
    on_sample: &mut F,
) -> ControlFlow<()>
where
    F: FnMut(Sample) -> Fut,
    Fut: Future<Output = ControlFlow<()>>,
{
    let mut drained = ready.drain(..);
    for sample in drained.by_ref() {
        if let Err(reason) = classify(&sample) {
            tracing::debug!(shard = %sample.shard, key = %sample.key, reason = reason.as_str(), "skipping bad sample");
            count_bad(&mut stats.bad, reason);
            continue;
        }
        stats.samples += 1;
        on_sample(sample).await?;
    }
    ControlFlow::Continue(())
}

/// Errors that another attempt cannot fix.
fn is_retryable(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    !matches!(
        e,
        E::NotFound { .. }
            | E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::NotImplemented
            | E::Precondition { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::UnknownConfigurationKey { .. }
    )
}

fn fatal_error(e: object_store::Error, url: &str, offset: u64) -> anyhow::Error {
    let what = match &e {
        object_store::Error::NotFound { .. } => format!("shard {url} does not exist"),
        object_store::Error::Precondition { .. } => {
            format!("shard {url} changed while it was being read (ETag mismatch at byte {offset})")
        }
        _ => format!("reading shard {url} at byte {offset}"),
    };
    anyhow!(e).context(what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tar_stream::TarBuilder;
    use async_trait::async_trait;
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{
        ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions,
        PutPayload, PutResult,
    };
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    /// An in-memory store that streams GET bodies in 1000-byte chunks and breaks the first
    /// `failures` responses after `fail_after` bytes each.
    #[derive(Debug)]
    struct FlakyStore {
        inner: InMemory,
        fail_after: u64,
        failures: AtomicU32,
        ranges: Mutex<Vec<Option<GetRange>>>,
    }

    impl std::fmt::Display for FlakyStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "FlakyStore")
        }
    }

    #[async_trait]
    impl ObjectStore for FlakyStore {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.ranges.lock().unwrap().push(options.range.clone());
            let mut result = self.inner.get_opts(location, options).await?;
            let fail = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let body = result.bytes_take().await?;
            let cut = if fail {
                (self.fail_after as usize).min(body.len())
            } else {
                body.len()
            };
            // Deliver in small pieces, as a network stream would, then the error if failing.
            let mut items: Vec<object_store::Result<Bytes>> = Vec::new();
            let mut at = 0;
            while at < cut {
                let end = (at + 1000).min(cut);
                items.push(Ok(body.slice(at..end)));
                at = end;
            }
            if fail {
                items.push(Err(object_store::Error::Generic {
                    store: "FlakyStore",
                    source: "connection reset".into(),
                }));
            }
            result.payload = GetResultPayload::Stream(futures::stream::iter(items).boxed());
            Ok(result)
        }
        async fn delete(&self, location: &Path) -> object_store::Result<()> {
            self.inner.delete(location).await
        }
        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.inner.copy(from, to).await
        }
        async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.inner.copy_if_not_exists(from, to).await
        }
    }

    trait TakeBytes {
        async fn bytes_take(&mut self) -> object_store::Result<Bytes>;
    }

    impl TakeBytes for GetResult {
        /// Reads the body, leaving an empty stream behind (the payload is replaced anyway).
        async fn bytes_take(&mut self) -> object_store::Result<Bytes> {
            let payload = std::mem::replace(
                &mut self.payload,
                GetResultPayload::Stream(futures::stream::empty().boxed()),
            );
            let GetResultPayload::Stream(mut s) = payload else {
                unreachable!("InMemory always streams");
            };
            let mut all = Vec::new();
            while let Some(chunk) = s.next().await {
                all.extend_from_slice(&chunk?);
            }
            Ok(all.into())
        }
    }

    /// A shard of `n` samples with distinct pseudo-random image bytes of varying size.
    fn shard(n: usize) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
        let mut b = TarBuilder::new();
        let mut originals = Vec::new();
        let mut x: u32 = 12345;
        for i in 0..n {
            let len = 900 + (i * 777) % 5000;
            let img: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (x >> 16) as u8
                })
                .collect();
            let key = format!("sample{i:04}");
            b.append(&format!("{key}.jpg"), &img);
            b.append(&format!("{key}.txt"), format!("caption {i}").as_bytes());
            originals.push((key, img));
        }
        (b.finish(), originals)
    }

    async fn flaky_location(
        data: Vec<u8>,
        fail_after: u64,
        failures: u32,
    ) -> (StoreLocation, Arc<FlakyStore>) {
        let store = Arc::new(FlakyStore {
            inner: InMemory::new(),
            fail_after,
            failures: AtomicU32::new(failures),
            ranges: Mutex::new(Vec::new()),
        });
        let path = Path::from("shards/flaky-000000.tar");
        store.put(&path, PutPayload::from(data)).await.unwrap();
        let loc = StoreLocation {
            store: store.clone(),
            path,
            url: "memory://flaky/shards/flaky-000000.tar".into(),
        };
        (loc, store)
    }

    fn fast_retries(retries: u32) -> ReadOptions {
        ReadOptions {
            retries,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
        }
    }

    #[tokio::test]
    async fn broken_streams_resume_from_the_last_byte_read() {
        let (data, originals) = shard(20);
        let total = data.len() as u64;
        let (loc, store) = flaky_location(data, 7_000, 5).await;
        let mut got = Vec::new();
        let stats = read_shard_with(&loc, &fast_retries(2), |s| {
            got.push((s.key.clone(), s.members["jpg"].to_vec()));
            async { ControlFlow::Continue(()) }
        })
        .await
        .unwrap();
        assert_eq!(got, originals);
        assert_eq!(stats.samples, 20);
        assert!(stats.bad.is_empty(), "{:?}", stats.bad);
        assert_eq!(stats.resumes, 5);
        let ranges = store.ranges.lock().unwrap().clone();
        let expected: Vec<Option<GetRange>> = std::iter::once(None)
            .chain((1..=5).map(|i| Some(GetRange::Offset(i * 7_000))))
            .collect();
        assert_eq!(ranges, expected);
        // Reading stops at the end-of-archive marker, so no byte is read twice.
        assert!(stats.bytes <= total, "{} > {total}", stats.bytes);
    }

    #[tokio::test]
    async fn a_stream_that_never_progresses_gives_up_naming_the_shard() {
        let (data, _) = shard(3);
        let (loc, store) = flaky_location(data, 0, 100).await;
        let err = read_shard_with(&loc, &fast_retries(3), |_| async {
            ControlFlow::Continue(())
        })
        .await
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("memory://flaky/shards/flaky-000000.tar"),
            "{msg}"
        );
        assert!(msg.contains("connection reset"), "{msg}");
        assert_eq!(
            store.ranges.lock().unwrap().len(),
            4,
            "one try plus three retries"
        );
    }

    #[tokio::test]
    async fn an_error_after_the_last_byte_needs_no_further_request() {
        let mut b = TarBuilder::new();
        b.append("a.jpg", b"1");
        b.append("b.jpg", b"2");
        // No end-of-archive marker, so the parser still wants bytes when the stream breaks.
        let data = b.into_inner();
        let len = data.len() as u64;
        let (loc, store) = flaky_location(data, len, 1).await;
        let mut keys = Vec::new();
        let stats = read_shard_with(&loc, &fast_retries(3), |s| {
            keys.push(s.key);
            async { ControlFlow::Continue(()) }
        })
        .await
        .unwrap();
        assert_eq!(keys, ["a"]);
        assert_eq!(stats.bad.get("truncated_tar"), Some(&1));
        assert_eq!(store.ranges.lock().unwrap().len(), 1);
        assert_eq!(stats.resumes, 0);
    }

    #[tokio::test]
    async fn a_missing_shard_fails_at_once_with_its_url() {
        let url = "memory://shard-reader-test/missing-000000.tar";
        let err = read_shard(url, "", 5, |_| async { ControlFlow::Continue(()) })
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(url) && msg.contains("does not exist"), "{msg}");
    }

    #[tokio::test]
    async fn break_stops_reading() {
        let (data, _) = shard(50);
        let total = data.len() as u64;
        let (loc, _) = flaky_location(data, 0, 0).await;
        let mut n = 0;
        let stats = read_shard_with(&loc, &fast_retries(0), |_| {
            n += 1;
            let stop = n == 3;
            async move {
                if stop {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(stats.samples, 3);
        assert!(stats.bytes < total);
    }

    #[tokio::test]
    async fn local_files_stream_across_read_chunks() {
        let (data, originals) = shard(400);
        assert!(data.len() > 1 << 20, "spans more than one 1 MiB file read");
        let path = std::env::temp_dir().join(format!("contrail-shard-{}.tar", std::process::id()));
        std::fs::write(&path, &data).unwrap();
        let mut got = Vec::new();
        let stats = read_shard(path.to_str().unwrap(), "", 0, |s| {
            got.push((s.key.clone(), s.members["jpg"].to_vec()));
            async { ControlFlow::Continue(()) }
        })
        .await;
        std::fs::remove_file(&path).ok();
        assert_eq!(stats.unwrap().samples, 400);
        assert_eq!(got, originals);
    }

    #[test]
    fn classify_checks_image_and_caption() {
        let mut s = Sample {
            key: "k".into(),
            ..Default::default()
        };
        s.members.insert("txt".into(), Bytes::from_static(b"ok"));
        assert_eq!(classify(&s), Err(BadSampleReason::MissingImage));
        s.members
            .insert("png".into(), Bytes::from_static(b"\x89PNG"));
        assert_eq!(classify(&s), Ok(()));
        s.members
            .insert("txt".into(), Bytes::from_static(b"\xff\xfe"));
        assert_eq!(classify(&s), Err(BadSampleReason::InvalidCaption));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let o = ReadOptions::with_retries(3);
        assert_eq!(o.backoff(1), Duration::from_millis(200));
        assert_eq!(o.backoff(3), Duration::from_millis(800));
        assert_eq!(o.backoff(40), Duration::from_secs(10));
    }
}

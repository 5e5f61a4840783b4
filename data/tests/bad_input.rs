//! Broken shards: every good sample must still arrive, every bad one must be counted under its
//! reason, and nothing may panic.

use contrail_common::storage::resolve;
use contrail_data::shard_reader::{read_shard, ShardStats};
use contrail_data::tar_stream::TarBuilder;
use contrail_data::Sample;
use object_store::PutPayload;
use std::collections::BTreeMap;
use std::ops::ControlFlow;

/// Distinct bytes per key, so a sample stitched from the wrong members would be noticed.
fn image_bytes(key: &str) -> Vec<u8> {
    let mut out = b"\xff\xd8\xff\xe0".to_vec();
    out.extend(key.bytes().cycle().take(600 + key.len() * 37));
    out
}

fn good_sample(b: &mut TarBuilder, key: &str) {
    b.append(&format!("{key}.jpg"), &image_bytes(key));
    b.append(
        &format!("{key}.txt"),
        format!("caption of {key}").as_bytes(),
    );
    b.append(&format!("{key}.cls"), b"3");
}

async fn read(name: &str, data: Vec<u8>) -> (Vec<Sample>, ShardStats) {
    let url = format!("memory://bad-input-test/{name}.tar");
    let loc = resolve(&url, "").unwrap();
    loc.store
        .put(&loc.path, PutPayload::from(data))
        .await
        .unwrap();
    let mut got = Vec::new();
    let stats = read_shard(&url, "", 0, |s| {
        got.push(s);
        async { ControlFlow::Continue(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{url}: a damaged shard is not an I/O error: {e:#}"));
    assert_eq!(stats.samples, got.len() as u64);
    (got, stats)
}

fn keys(samples: &[Sample]) -> Vec<&str> {
    samples.iter().map(|s| s.key.as_str()).collect()
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn assert_intact(samples: &[Sample]) {
    for s in samples {
        assert_eq!(
            s.members["jpg"].as_ref(),
            image_bytes(&s.key).as_slice(),
            "{}",
            s.key
        );
        assert_eq!(
            s.members["txt"].as_ref(),
            format!("caption of {}", s.key).as_bytes()
        );
    }
}

#[tokio::test]
async fn missing_image_and_invalid_caption_are_counted_and_skipped() {
    let mut b = TarBuilder::new();
    good_sample(&mut b, "a");
    b.append("no_image.txt", b"a caption without a picture");
    b.append("no_image.cls", b"1");
    good_sample(&mut b, "b");
    b.append("bad_caption.jpg", &image_bytes("bad_caption"));
    b.append("bad_caption.txt", b"caf\xe9 in latin-1");
    good_sample(&mut b, "c");
    let (got, stats) = read("classify", b.finish()).await;
    assert_eq!(keys(&got), ["a", "b", "c"]);
    assert_intact(&got);
    assert_eq!(
        stats.bad,
        counts(&[("invalid_caption", 1), ("missing_image", 1)])
    );
}

#[tokio::test]
async fn truncated_shard_keeps_the_samples_before_the_cut() {
    let mut b = TarBuilder::new();
    for key in ["s0", "s1", "s2"] {
        good_sample(&mut b, key);
    }
    let before_s3 = b.len();
    good_sample(&mut b, "s3");
    let mut data = b.into_inner();
    // Cut 300 bytes into s3's image data (its header is 512 bytes).
    data.truncate(before_s3 + 512 + 300);
    let (got, stats) = read("truncated", data).await;
    assert_eq!(keys(&got), ["s0", "s1", "s2"]);
    assert_intact(&got);
    assert_eq!(stats.bad, counts(&[("truncated_tar", 1)]));
}

#[tokio::test]
async fn corrupt_header_checksum_stops_the_shard_without_losing_earlier_samples() {
    let mut b = TarBuilder::new();
    good_sample(&mut b, "s0");
    good_sample(&mut b, "s1");
    // s1.txt and s1.cls take one header and one data block each.
    let s1_txt_header = b.len() - 2 * 1024;
    good_sample(&mut b, "s2");
    let mut data = b.finish();
    // A flipped bit in s1.txt's name: the checksum no longer matches.
    data[s1_txt_header + 1] ^= 0x01;
    let (got, stats) = read("checksum", data).await;
    // s1 may have been missing members, so it is dropped with the rest.
    assert_eq!(keys(&got), ["s0"]);
    assert_intact(&got);
    assert_eq!(stats.bad, counts(&[("truncated_tar", 1)]));
}

#[tokio::test]
async fn not_a_tar_at_all() {
    let garbage: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
    let (got, stats) = read("garbage", garbage).await;
    assert!(got.is_empty());
    assert_eq!(stats.bad, counts(&[("truncated_tar", 1)]));
    let (got, stats) = read("empty", Vec::new()).await;
    assert!(got.is_empty());
    assert!(stats.bad.is_empty());
}

#[tokio::test]
async fn every_cut_point_delivers_an_intact_prefix() {
    let all = ["k0", "k1", "k2", "k3"];
    let mut b = TarBuilder::new();
    for key in all {
        good_sample(&mut b, key);
    }
    let data = b.finish();
    for cut in (0..data.len()).step_by(97) {
        let (got, stats) = read(&format!("cut-{cut}"), data[..cut].to_vec()).await;
        assert_intact(&got);
        assert_eq!(keys(&got), all[..got.len()], "cut at {cut}");
        let truncated = stats.bad.get("truncated_tar").copied().unwrap_or(0);
        if got.len() < all.len() && cut > 0 {
            assert_eq!(truncated, 1, "cut at {cut}: {:?}", stats.bad);
        }
    }
}

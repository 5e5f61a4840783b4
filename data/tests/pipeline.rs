//! The epoch pipeline end to end on in-memory samples: batching, bad-sample accounting per
//! shard, ordering and determinism across thread counts, and back-pressure.

use bytes::Bytes;
use contrail_common::config::DataConfig;
use contrail_data::pipeline::{Batch, EpochPipeline, PipelineInput, PipelineOptions, ShardReport};
use contrail_data::{BadSampleCounts, Sample};
use image::{ExtendedColorType, ImageEncoder};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SIZE: u32 = 16;

fn pixels(w: u32, h: u32, seed: u32) -> Vec<u8> {
    (0..w * h)
        .flat_map(|i| {
            let (x, y) = (i % w, i / w);
            [
                (x * 9 + seed) as u8,
                (y * 5 + seed * 3) as u8,
                ((x ^ y) * 3) as u8,
            ]
        })
        .collect()
}

fn jpeg(w: u32, h: u32, seed: u32) -> Bytes {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .write_image(&pixels(w, h, seed), w, h, ExtendedColorType::Rgb8)
        .unwrap();
    out.into()
}

fn png(w: u32, h: u32, seed: u32) -> Bytes {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&pixels(w, h, seed), w, h, ExtendedColorType::Rgb8)
        .unwrap();
    out.into()
}

fn sample(shard: &str, key: &str, members: &[(&str, Bytes)]) -> PipelineInput {
    PipelineInput::Sample(Sample {
        key: key.into(),
        shard: shard.into(),
        members: members
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    })
}

fn good(shard: &str, i: u32) -> PipelineInput {
    sample(
        shard,
        &format!("{i:06}"),
        &[
            ("jpg", jpeg(40, 30, i)),
            ("cls", Bytes::from(format!("{}", i % 7))),
            ("txt", Bytes::from(format!("caption {i}"))),
        ],
    )
}

fn end(shard: &str, reader_bad: &[(&str, u64)]) -> PipelineInput {
    PipelineInput::ShardEnd {
        shard: shard.into(),
        reader_bad: reader_bad
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
    }
}

fn data_cfg(threads: usize, prefetch: usize) -> DataConfig {
    DataConfig {
        image_size: SIZE,
        decode_threads: threads,
        prefetch_batches: prefetch,
        // 48×48: the 64×64 image below is a "bomb", the 40×30 ones are fine.
        max_image_pixels: 48 * 48,
        ..DataConfig::default()
    }
}

fn opts(micro_batch: usize, seed: u64) -> PipelineOptions {
    PipelineOptions {
        micro_batch,
        seed,
        rank: 0,
        epoch: 3,
    }
}

/// Two shards with good samples and one of every bad kind; returns inputs and the good keys
/// in input order.
fn mixed_epoch() -> (Vec<PipelineInput>, Vec<String>) {
    let mut inputs = Vec::new();
    let mut keys = Vec::new();
    for i in 0..10 {
        if i == 3 {
            inputs.push(sample(
                "s0",
                "no-image",
                &[("txt", Bytes::from_static(b"hi"))],
            ));
            let mut truncated = jpeg(40, 30, 99).to_vec();
            truncated.truncate(truncated.len() / 2);
            inputs.push(sample("s0", "corrupt", &[("jpg", truncated.into())]));
            inputs.push(sample("s0", "bomb", &[("jpg", jpeg(64, 64, 1))]));
            inputs.push(sample(
                "s0",
                "bad-caption",
                &[
                    ("jpg", jpeg(40, 30, 2)),
                    ("txt", Bytes::from_static(&[0xff, 0xfe, 0x41])),
                ],
            ));
        }
        inputs.push(good("s0", i));
        keys.push(format!("{i:06}"));
    }
    inputs.push(end("s0", &[]));
    for i in 100..107 {
        inputs.push(good("s1", i));
        keys.push(format!("{i:06}"));
    }
    // PNG stored under .jpg still decodes (format is sniffed); no cls/txt → -1 and "".
    inputs.push(sample("s1", "png-as-jpg", &[("jpg", png(30, 20, 5))]));
    keys.push("png-as-jpg".into());
    inputs.push(sample(
        "s1",
        "garbage",
        &[("webp", Bytes::from_static(b"RIFF....WEBPnope"))],
    ));
    inputs.push(end("s1", &[("truncated_tar", 2)]));
    (inputs, keys)
}

fn collect(p: EpochPipeline) -> (Vec<Batch>, Vec<ShardReport>, EpochPipeline) {
    let batches: Vec<Batch> = std::iter::from_fn(|| p.next_batch()).collect();
    let reports: Vec<ShardReport> = p.shard_reports().try_iter().collect();
    (batches, reports, p)
}

fn counts(pairs: &[(&str, u64)]) -> BadSampleCounts {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn batches_skip_and_count_bad_samples_per_shard() {
    let (inputs, keys) = mixed_epoch();
    let p = EpochPipeline::spawn(inputs, &data_cfg(3, 2), opts(4, 7));
    let (batches, reports, p) = collect(p);

    let lens: Vec<usize> = batches.iter().map(|b| b.len).collect();
    assert_eq!(
        lens,
        vec![4, 4, 4, 4, 2],
        "18 good samples in micro-batches of 4"
    );
    let view = 3 * (SIZE * SIZE) as usize;
    for b in &batches {
        assert_eq!(b.view1.len(), b.len * view);
        assert_eq!(b.view2.len(), b.len * view);
        assert_eq!(
            (b.keys.len(), b.class_ids.len(), b.captions.len()),
            (b.len, b.len, b.len)
        );
        assert!(b.view1.iter().chain(&b.view2).all(|v| v.is_finite()));
        assert_ne!(b.view1, b.view2, "the two views must differ");
    }
    // Every good key exactly once, in input order.
    let got: Vec<String> = batches.iter().flat_map(|b| b.keys.clone()).collect();
    assert_eq!(got, keys);
    let first = &batches[0];
    assert_eq!(first.class_ids, vec![0, 1, 2, 3]);
    assert_eq!(first.captions[2], "caption 2");
    let last = &batches[4];
    assert_eq!(last.keys[1], "png-as-jpg");
    assert_eq!((last.class_ids[1], last.captions[1].as_str()), (-1, ""));

    assert_eq!(
        reports,
        vec![
            ShardReport {
                shard: "s0".into(),
                good: 10,
                bad: counts(&[
                    ("corrupt_image", 1),
                    ("decompression_bomb", 1),
                    ("invalid_caption", 1),
                    ("missing_image", 1),
                ]),
            },
            ShardReport {
                shard: "s1".into(),
                good: 8,
                bad: counts(&[("corrupt_image", 1), ("truncated_tar", 2)]),
            },
        ]
    );
    let stats = p.stats();
    assert_eq!(stats.good, 18);
    assert_eq!(
        stats.bad,
        counts(&[
            ("corrupt_image", 2),
            ("decompression_bomb", 1),
            ("invalid_caption", 1),
            ("missing_image", 1),
            ("truncated_tar", 2),
        ])
    );
}

#[test]
fn output_is_identical_across_thread_counts_and_depends_on_seed() {
    let run = |threads, seed| {
        let p = EpochPipeline::spawn(mixed_epoch().0, &data_cfg(threads, 1), opts(5, seed));
        collect(p).0
    };
    let one = run(1, 7);
    let four = run(4, 7);
    assert_eq!(one, four, "batches must not depend on thread timing");
    let other = run(2, 8);
    assert_eq!(
        one.iter().map(|b| &b.keys).collect::<Vec<_>>(),
        other.iter().map(|b| &b.keys).collect::<Vec<_>>()
    );
    assert_ne!(
        one[0].view1, other[0].view1,
        "a different seed must change the views"
    );
}

#[test]
fn empty_source_ends_immediately() {
    let p = EpochPipeline::spawn(Vec::new(), &data_cfg(2, 2), opts(4, 0));
    let (batches, reports, p) = collect(p);
    assert!(batches.is_empty() && reports.is_empty());
    assert_eq!(p.stats().good, 0);
}

/// An iterator of good samples that counts how many were pulled.
fn counted_source(n: u32, pulled: Arc<AtomicUsize>) -> impl Iterator<Item = PipelineInput> + Send {
    let shared = jpeg(40, 30, 1);
    (0..n).map(move |i| {
        pulled.fetch_add(1, Ordering::SeqCst);
        sample("s", &format!("{i:06}"), &[("jpg", shared.clone())])
    })
}

/// The counter's value once it has not moved for three consecutive 150 ms looks (generous,
/// so that a loaded CI machine descheduling the threads does not look like a stall).
fn wait_until_stable(counter: &AtomicUsize) -> usize {
    let (mut last, mut same) = (usize::MAX, 0);
    loop {
        std::thread::sleep(Duration::from_millis(150));
        let now = counter.load(Ordering::SeqCst);
        same = if now == last { same + 1 } else { 0 };
        if same == 3 {
            return now;
        }
        last = now;
    }
}

#[test]
fn producer_blocks_when_batches_are_not_taken() {
    let total = 300;
    let pulled = Arc::new(AtomicUsize::new(0));
    let (threads, prefetch, micro) = (2, 2, 3);
    let p = EpochPipeline::spawn(
        counted_source(total, Arc::clone(&pulled)),
        &data_cfg(threads, prefetch),
        opts(micro, 0),
    );
    let stalled = wait_until_stable(&pulled);
    // Queued batches + the batch the assembler is blocked on + the in-flight window
    // (4 × threads + 2 buffers) + the sample the dispatcher waits to hand out.
    let bound = prefetch * micro + micro + (4 * threads + 2) + 1;
    assert!(
        stalled <= bound,
        "pulled {stalled} samples without any consumer (bound {bound})"
    );
    assert!(
        stalled >= prefetch * micro,
        "the prefetch queue should fill ({stalled})"
    );

    let first = p.next_batch().expect("a batch");
    assert_eq!(first.keys, vec!["000000", "000001", "000002"]);
    let after_one = wait_until_stable(&pulled);
    assert!(
        after_one > stalled && after_one <= bound + micro,
        "{stalled} → {after_one}"
    );

    let rest: usize = std::iter::from_fn(|| p.next_batch()).map(|b| b.len).sum();
    assert_eq!(first.len + rest, total as usize);
    assert_eq!(pulled.load(Ordering::SeqCst), total as usize);
}

#[test]
fn dropping_the_pipeline_stops_pulling_from_the_source() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let p = EpochPipeline::spawn(
        counted_source(10_000, Arc::clone(&pulled)),
        &data_cfg(2, 1),
        opts(2, 0),
    );
    assert_eq!(p.next_batch().map(|b| b.len), Some(2));
    drop(p);
    let stopped = wait_until_stable(&pulled);
    assert!(
        stopped < 100,
        "the source kept being drained after drop: {stopped}"
    );
}

#[test]
fn reports_are_sent_in_shard_order_even_when_shards_are_empty_or_all_bad() {
    let inputs = vec![
        end("empty", &[("truncated_tar", 1)]),
        sample("all-bad", "x", &[("txt", Bytes::from_static(b"no image"))]),
        end("all-bad", &[]),
        good("ok", 1),
        end("ok", &[]),
    ];
    let (batches, reports, _) = collect(EpochPipeline::spawn(inputs, &data_cfg(2, 2), opts(8, 0)));
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].len, 1);
    let summary: BTreeMap<String, (u64, u64)> = reports
        .iter()
        .map(|r| (r.shard.clone(), (r.good, r.bad.values().sum())))
        .collect();
    assert_eq!(
        reports.iter().map(|r| r.shard.as_str()).collect::<Vec<_>>(),
        ["empty", "all-bad", "ok"]
    );
    assert_eq!(summary["empty"], (0, 1));
    assert_eq!(summary["all-bad"], (0, 1));
    assert_eq!(summary["ok"], (1, 0));
}

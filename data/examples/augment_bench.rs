//! One-core throughput of JPEG decode + SimCLR two-view augmentation (the data pipeline's hot
//! path), for `bench/data_pipeline/run.sh`, which runs the torchvision reference on the same
//! files in the same invocation.
//!
//!   augment_bench <dir of .jpg files> [--size 224] [--seconds 4] [--rounds 3]
//!
//! Prints one line per round and `IMAGES_PER_S=<best round>` for the script.

use contrail_common::config::AugmentConfig;
use contrail_common::shards::SplitMix64;
use contrail_data::augment::Augmenter;
use contrail_data::decode::decode_rgb;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args.first().ok_or_else(|| {
        anyhow::anyhow!(
            "usage: augment_bench <dir of .jpg files> [--size N] [--seconds S] [--rounds R]"
        )
    })?;
    let flag = |name: &str, default: f64| -> anyhow::Result<f64> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(args
                .get(i + 1)
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?
                .parse()?),
            None => Ok(default),
        }
    };
    let size = flag("--size", 224.0)? as u32;
    let seconds = flag("--seconds", 4.0)?;
    let rounds = flag("--rounds", 3.0)? as usize;

    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    files.sort();
    let images: Vec<Vec<u8>> = files.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    anyhow::ensure!(!images.is_empty(), "no .jpg files in {dir}");

    let cfg = AugmentConfig::default();
    let mut aug = Augmenter::new(&cfg, size);
    let (mut v1, mut v2) = (vec![0.0f32; aug.view_len()], vec![0.0f32; aug.view_len()]);
    let mut rng = SplitMix64::new(0);
    let mut checksum = 0.0f64;
    let mut one = |i: usize, rng: &mut SplitMix64| -> anyhow::Result<()> {
        let img = decode_rgb(&images[i % images.len()], 64 << 20)?;
        aug.two_views(&img, rng, &mut v1, &mut v2)?;
        checksum += f64::from(v1[i % v1.len()] + v2[0]);
        Ok(())
    };
    for i in 0..images.len() {
        one(i, &mut rng)?; // warm-up: page in buffers and caches
    }
    let mut best = 0.0f64;
    for round in 0..rounds {
        let start = Instant::now();
        let mut n = 0usize;
        while start.elapsed() < Duration::from_secs_f64(seconds) {
            one(n, &mut rng)?;
            n += 1;
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        println!("round {round}: {n} images in {:.2}s = {rate:.1} images/s (decode + 2 views at {size}x{size})", start.elapsed().as_secs_f64());
        best = best.max(rate);
    }
    eprintln!("checksum {checksum:.3}");
    println!("IMAGES_PER_S={best:.1}");
    Ok(())
}

//! Start-up time (issue #6 item 7): from spawning `framematch serve` until gRPC health reports
//! SERVING, with N frames in the embedded store, and the server's RSS per frame once serving.
//!
//! ```text
//! cargo bench --bench startup -- [--sizes 1M,10M] [--engine mih] [--runs 3]
//! ```
//!
//! The store is written once per N to `bench/data/store-N` through `framematch::store::Store` (the
//! API the AddReference path commits through), with the reference hashes of `bench/dataset.rs`
//! in references of 1,000 frames; a `complete` marker file makes later runs reuse it. Each run
//! spawns the real release binary on loopback port 0, reads the printed address, and polls
//! `grpc.health.v1.Health/Check` every 2 ms. Figures are medians over `--runs`.

#![allow(clippy::print_stdout, missing_docs)]

#[path = "dataset.rs"]
mod dataset;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use framematch::model::{Actor, Category, FrameSignal, NewReference, Visibility};
use framematch::store::{NewBank, Store};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn parse_size(text: &str) -> usize {
    let lower = text.trim().to_ascii_lowercase();
    let (digits, factor) = match lower.strip_suffix('k') {
        Some(d) => (d.to_string(), 1_000),
        None => match lower.strip_suffix('m') {
            Some(d) => (d.to_string(), 1_000_000),
            None => (lower.clone(), 1),
        },
    };
    digits.parse::<usize>().expect("size") * factor
}

async fn write_store(dir: &Path, n: usize) {
    let marker = dir.join("complete");
    if marker.exists() {
        return;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).expect("remove partial store");
    }
    let ds = dataset::dataset(n);
    let started = Instant::now();
    let store = Store::open_embedded(dir).await.expect("open store");
    let org = store.default_org().await.expect("default org");
    let bank = store
        .create_bank(
            NewBank {
                name: "bench".into(),
                category: Category::GraphicViolence,
                owner: org,
                visibility: Visibility::Private,
                description: "issue #6 start-up benchmark".into(),
                embedding_spaces: Vec::new(),
            },
            Actor::system(org),
        )
        .await
        .expect("create bank");
    let frames = dataset::indexed_frames(&ds);
    for (r, chunk) in frames.chunks(dataset::FRAMES_PER_REFERENCE).enumerate() {
        let frames: Vec<FrameSignal> = chunk.iter().map(|f| f.frame).collect();
        store
            .add_reference(
                NewReference {
                    bank: bank.id,
                    external_id: format!("bench-{r}"),
                    note: String::new(),
                    added_by: org,
                    frames,
                    embeddings: Vec::new(),
                },
                Actor::system(org),
            )
            .await
            .expect("add reference");
        if r % 1000 == 999 {
            eprintln!(
                "  store-{n}: {} frames written ({:.0} s)",
                (r + 1) * dataset::FRAMES_PER_REFERENCE,
                started.elapsed().as_secs_f64()
            );
        }
    }
    drop(store);
    std::fs::write(&marker, b"").expect("write marker");
    eprintln!(
        "store-{n}: written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// One start: (seconds to the address line, seconds to SERVING, server RSS at SERVING).
async fn start_once(dir: &Path, engine: &str) -> (f64, f64, u64) {
    let binary = env!("CARGO_BIN_EXE_framematch");
    let help = Command::new(binary)
        .args(["serve", "--help"])
        .output()
        .expect("run framematch serve --help");
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--index-engine".into(),
        engine.into(),
    ];
    if String::from_utf8_lossy(&help.stdout).contains("--metrics-listen") {
        args.extend(["--metrics-listen".into(), "127.0.0.1:0".into()]);
    }
    let started = Instant::now();
    let mut child = Command::new(binary)
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn framematch serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read address line");
    // Keep draining stdout: the server writes more lines (the metrics address), and a closed pipe
    // would make it exit.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let listening = started.elapsed().as_secs_f64();
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let url = format!("http://{address}");
    let channel = loop {
        if let Ok(channel) = tonic::transport::Channel::from_shared(url.clone())
            .expect("url")
            .connect()
            .await
        {
            break channel;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "cannot connect to {url}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let mut health = HealthClient::new(channel);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status);
        if status.is_ok_and(|s| s == ServingStatus::Serving as i32) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not SERVING after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let serving = started.elapsed().as_secs_f64();
    let rss = rss_bytes(child.id());
    let _ = child.kill();
    let _ = child.wait();
    (listening, serving, rss)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let mut sizes = vec![1_000_000];
    let mut engine = "mih".to_string();
    let mut runs = 3;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--sizes" => {
                sizes = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(parse_size)
                    .collect();
            }
            "--engine" => engine = args.next().unwrap_or(engine),
            "--runs" => runs = args.next().and_then(|r| r.parse().ok()).unwrap_or(3).max(1),
            _ => {}
        }
    }
    let mut rows = Vec::new();
    for n in sizes {
        let dir = dataset::data_dir().join(format!("store-{n}"));
        write_store(&dir, n).await;
        let store_bytes: u64 = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        let mut listening = Vec::new();
        let mut serving = Vec::new();
        let mut rss = Vec::new();
        for _ in 0..runs {
            let (l, s, r) = start_once(&dir, &engine).await;
            eprintln!("  {n} frames, {engine}: listening {l:.3} s, SERVING {s:.3} s");
            listening.push(l);
            serving.push(s);
            rss.push(r as f64);
        }
        rows.push((
            n,
            median(listening),
            median(serving),
            median(rss),
            store_bytes,
        ));
    }
    println!("\nStart-up of `framematch serve --index-engine {engine}` (medians of {runs}):\n");
    println!(
        "| frames in store | store MiB | address printed s | SERVING s | server RSS at SERVING, bytes/frame |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for (n, l, s, r, bytes) in rows {
        println!(
            "| {n} | {:.0} | {l:.3} | {s:.2} | {:.0} |",
            bytes as f64 / (1024.0 * 1024.0),
            r / n as f64
        );
    }
}

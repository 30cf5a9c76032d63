//! `framematch match`, `scan` and `bench`: matching images and videos against the server, and
//! the load generator.

use super::*;

/// `framematch bench …`
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Concurrent MatchVideo streams, each on its own connection.
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Frames per stream.
    #[arg(long, default_value_t = 1000)]
    pub frames_per_stream: u32,
    /// Frames per second per stream; default: as fast as the answers come.
    #[arg(long, value_name = "FPS")]
    pub rate: Option<f64>,
    /// Send 1280x720 JPEG frames for the server to hash instead of precomputed hashes.
    #[arg(long)]
    pub jpeg_720p: bool,
    /// Pictures for the 720p JPEG frames (centre 16:9 crop, scaled, encoded once); default: four
    /// synthetic frames.
    #[arg(long = "image", value_name = "FILE")]
    pub images: Vec<PathBuf>,
    /// Send the `--image` files' bytes as they are (any size and format the server reads: decode
    /// bombs, 1080p JPEGs), instead of 720p JPEGs made from them.
    #[arg(long, requires = "images")]
    pub send_as_is: bool,
    /// Hashes to send, as raw 32-byte records (e.g. bench/data/queries.u8); default: seeded random
    /// hashes, which match nothing.
    #[arg(long, value_name = "FILE")]
    pub hashes: Option<PathBuf>,
    /// Keep opening streams until this many seconds have passed.
    #[arg(long, value_name = "S")]
    pub duration_s: Option<f64>,
    /// Most unanswered frames per stream.
    #[arg(long, default_value_t = 4)]
    pub max_in_flight: usize,
    /// The server's process id, to report its CPU time per frame (from /proc/PID/stat).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `framematch scan …`
#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Only search these banks (repeatable); default: all.
    #[arg(long = "bank")]
    pub banks: Vec<String>,
    /// Send each selected frame as a JPEG for the server to hash, instead of hashing locally.
    /// This is also what happens when a bank in scope declares embedding spaces, so that the
    /// server computes the frames' vectors (it embeds one frame per its
    /// --embedding-interval-ms, one per second by default).
    #[arg(long)]
    pub send_images: bool,
    /// Also match rotated and mirrored versions of the frames.
    #[arg(long)]
    pub dihedral: bool,
    /// Send one frame every this many seconds of video (vPDQ sampling).
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub seconds_per_hash: f64,
    /// Temporal rule: an in-order run of matching frames this long matches on its own, in
    /// milliseconds; 0 turns it off (default: the server's).
    #[arg(long, value_name = "N")]
    pub min_run_ms: Option<u32>,
    /// Percentage rule: share of the upload's frames that must match (default: the server's, 80).
    #[arg(long, value_name = "P")]
    pub query_threshold: Option<f64>,
    /// Percentage rule: share of the reference's frames that must be matched (default: the
    /// server's, 0).
    #[arg(long, value_name = "P")]
    pub reference_threshold: Option<f64>,
    /// Largest Hamming distance counted as a frame match (default: the server's, normally 31).
    #[arg(long)]
    pub max_distance: Option<u32>,
    /// Video files.
    #[arg(required = true)]
    pub videos: Vec<PathBuf>,
}

/// `framematch match`: returns whether anything matched.
///
/// # Errors
/// File, connection and RPC failures.
pub async fn match_files(
    files: &[PathBuf],
    banks: Vec<String>,
    max_distance: Option<u32>,
    dihedral: bool,
    server: &ClientOptions,
) -> Result<bool, Error> {
    let mut client = pb::matcher_client::MatcherClient::new(client::connect(server).await?);
    let options = pb::MatchOptions {
        banks,
        max_distance,
        dihedral,
        ..Default::default()
    };
    let mut matched = false;
    for path in files {
        let bytes = read_file(path)?;
        let result = client
            .match_image(pb::MatchImageRequest {
                options: Some(options.clone()),
                frame: Some(image_frame(bytes)),
            })
            .await
            .map_err(|s| rpc_error(format!("matching {}", path.display()), s))?
            .into_inner()
            .result
            .unwrap_or_default();
        if result.low_quality {
            eprintln!(
                "framematch: {}: quality {} is below the minimum; it cannot match",
                path.display(),
                result.quality
            );
        }
        for m in result.matches {
            matched = true;
            let source = m.source.unwrap_or_default();
            // An embedding match has no distance: its column says `space=score` instead.
            let closeness = if m.signal == pb::Signal::Embedding as i32 {
                format!("{}={:.3}", m.space, m.score)
            } else {
                m.distance.to_string()
            };
            crate::outln!(
                "{}\t{}\t{}\t{closeness}",
                path.display(),
                source.reference_id,
                source.bank,
            );
        }
    }
    Ok(matched)
}

/// JPEG quality of frames sent with `scan --send-images`: high enough that the server's hash is
/// within a few bits of the local one.
pub(super) const SCAN_JPEG_QUALITY: u8 = 90;

/// The last final verdict per reference, in the order references were first finalised.
#[derive(Default)]
pub(super) struct FinalVerdicts {
    order: Vec<i64>,
    latest: HashMap<i64, pb::Verdict>,
}

impl FinalVerdicts {
    fn record(&mut self, verdict: pb::Verdict) {
        // Servers that predate streaming verdicts send only closing verdicts, without a status.
        let final_or_closing = matches!(
            pb::VerdictStatus::try_from(verdict.status),
            Ok(pb::VerdictStatus::Final | pb::VerdictStatus::Unspecified)
        );
        if !final_or_closing {
            return;
        }
        let id = verdict.source.as_ref().map_or(0, |s| s.reference_id);
        if self.latest.insert(id, verdict).is_none() {
            self.order.push(id);
        }
    }

    fn into_verdicts(mut self) -> Vec<pb::Verdict> {
        self.order
            .iter()
            .filter_map(|id| self.latest.remove(id))
            .collect()
    }
}

/// `framematch scan`: scans each video in turn, printing its verdict lines. A video that fails
/// is reported on stderr and the rest go on.
///
/// Exit code: 2 when any video failed (or the server could not be reached), else 1 when any
/// final verdict is a match, else 0.
pub async fn scan(args: &ScanArgs, server: &ClientOptions) -> ExitCode {
    let channel = match client::connect(server).await {
        Ok(channel) => channel,
        Err(error) => {
            eprintln!("framematch: {error}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    // Frames go as JPEGs when asked, or when the server is to compute their vectors.
    let send_images = args.send_images
        || match banks_declare_spaces(channel.clone(), &args.banks).await {
            Ok(declared) => declared,
            Err(error) => {
                eprintln!("framematch: {error}");
                return ExitCode::from(EXIT_ERROR);
            }
        };
    let mut client = pb::matcher_client::MatcherClient::new(channel);
    let mut matched = false;
    let mut failed = false;
    for path in &args.videos {
        match scan_video(&mut client, path, args, send_images).await {
            Ok(verdicts) => {
                for verdict in verdicts {
                    matched |= verdict.is_match;
                    let source = verdict.source.unwrap_or_default();
                    crate::outln!(
                        "{}\t{}\t{}\t{:.2}\t{:.2}\t{}",
                        path.display(),
                        source.reference_id,
                        source.bank,
                        verdict.query_match_pct,
                        verdict.reference_match_pct,
                        if verdict.is_match {
                            "match"
                        } else {
                            "no-match"
                        }
                    );
                }
            }
            Err(error) => {
                eprintln!("framematch: {error}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(EXIT_ERROR)
    } else if matched {
        ExitCode::from(EXIT_MATCHED)
    } else {
        ExitCode::SUCCESS
    }
}

/// One video's MatchVideo stream; returns its final verdicts.
pub(super) async fn scan_video(
    client: &mut pb::matcher_client::MatcherClient<Connection>,
    path: &Path,
    args: &ScanArgs,
    send_images: bool,
) -> Result<Vec<pb::Verdict>, Error> {
    let sampling = SamplingOptions {
        seconds_per_hash: args.seconds_per_hash,
        every_frame: false,
    };
    let options = pb::MatchOptions {
        banks: args.banks.clone(),
        max_distance: args.max_distance,
        dihedral: args.dihedral,
        query_match_threshold_pct: args.query_threshold,
        reference_match_threshold_pct: args.reference_threshold,
        min_run_ms: args.min_run_ms,
        ..Default::default()
    };
    let context = format!("scanning {}", path.display());
    if send_images {
        return scan_images(client, path, sampling, options, &context).await;
    }
    // Hashing locally first costs little more than decoding (ffmpeg decodes every frame either
    // way), and gives the exact frame count, so the server can finalise verdicts at the last
    // frame (expected_frame_count).
    let owned = path.to_path_buf();
    let dihedral = args.dihedral;
    let hashed = tokio::task::spawn_blocking(move || hash_video_file(&owned, sampling, dihedral))
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
    let count = u32::try_from(hashed.frames.len()).ok();
    let options = pb::MatchOptions {
        expected_frame_count: count,
        ..options
    };
    let requests: Vec<pb::MatchRequest> = hashed
        .frames
        .iter()
        .enumerate()
        .map(|(i, frame)| pb::MatchRequest {
            options: (i == 0).then(|| options.clone()),
            frame: Some(pb::Frame {
                embeddings: Vec::new(),
                frame_index: u32::try_from(frame.frame_index).unwrap_or(u32::MAX),
                timestamp_ms: timestamp_ms(frame.timestamp_s),
                signal: Some(pb::frame::Signal::Pdq(video_signal(frame, dihedral))),
            }),
        })
        .collect();
    if requests.is_empty() {
        return Err(Error::NoFrames {
            path: path.to_path_buf(),
        });
    }
    collect_verdicts(client, tokio_stream::iter(requests), &context).await
}

/// `--send-images`: frames are decoded, JPEG-encoded and sent as they come, so memory stays at a
/// few frames whatever the video's length. The count is not known up front.
pub(super) async fn scan_images(
    client: &mut pb::matcher_client::MatcherClient<Connection>,
    path: &Path,
    sampling: SamplingOptions,
    options: pb::MatchOptions,
    context: &str,
) -> Result<Vec<pb::Verdict>, Error> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::MatchRequest>(4);
    let owned = path.to_path_buf();
    let producer = tokio::task::spawn_blocking(move || -> Result<u64, Error> {
        let mut options = Some(options);
        let mut sent = 0;
        for_each_jpeg_frame(&owned, sampling, |frame| {
            let request = pb::MatchRequest {
                options: options.take(),
                frame: Some(frame),
            };
            // A failed send: the stream is gone; its status says why.
            let open = tx.blocking_send(request).is_ok();
            sent += u64::from(open);
            open
        })?;
        Ok(sent)
    });
    let verdicts = collect_verdicts(
        client,
        tokio_stream::wrappers::ReceiverStream::new(rx),
        context,
    )
    .await;
    let sent = producer.await.map_err(|e| Error::Task(e.to_string()))??;
    if sent == 0 {
        return Err(Error::NoFrames {
            path: path.to_path_buf(),
        });
    }
    verdicts
}

/// Runs one MatchVideo stream to its end and keeps the final verdicts.
pub(super) async fn collect_verdicts(
    client: &mut pb::matcher_client::MatcherClient<Connection>,
    requests: impl tokio_stream::Stream<Item = pb::MatchRequest> + Send + 'static,
    context: &str,
) -> Result<Vec<pb::Verdict>, Error> {
    let mut responses = client
        .match_video(requests)
        .await
        .map_err(|s| rpc_error(context, s))?
        .into_inner();
    let mut verdicts = FinalVerdicts::default();
    while let Some(response) = responses
        .message()
        .await
        .map_err(|s| rpc_error(context, s))?
    {
        match response.result {
            Some(pb::match_response::Result::Verdict(verdict)) => verdicts.record(verdict),
            Some(pb::match_response::Result::Summary(_)) => break,
            Some(pb::match_response::Result::Frame(_)) | None => {}
        }
    }
    Ok(verdicts.into_verdicts())
}

/// `framematch bench`: builds the payload, runs the load and prints the report.
///
/// # Errors
/// [`Error::Loadgen`] for bad settings or unreadable inputs, [`Error::Usage`] for a bad duration.
pub async fn bench(args: BenchArgs, server: &ClientOptions) -> Result<(), Error> {
    use crate::loadgen::{self, LoadConfig, Payload};
    let payload = if args.send_as_is {
        let frames = args
            .images
            .iter()
            .map(|path| {
                std::fs::read(path).map_err(|source| Error::Read {
                    path: path.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Payload::Jpeg(frames)
    } else if args.jpeg_720p {
        let images = args.images.clone();
        let frames = tokio::task::spawn_blocking(move || loadgen::jpeg_720p_frames(&images))
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
        Payload::Jpeg(frames)
    } else {
        match &args.hashes {
            Some(path) => Payload::Hashes(loadgen::read_hashes(path)?),
            None => Payload::Hashes(loadgen::random_hashes(4096, 6)),
        }
    };
    let duration = match args.duration_s {
        Some(s) if s.is_finite() && s > 0.0 => Some(std::time::Duration::from_secs_f64(s)),
        Some(s) => return Err(Error::Usage(format!("--duration-s {s}: must be positive"))),
        None => None,
    };
    let config = LoadConfig {
        client: server.clone(),
        streams: args.streams,
        frames_per_stream: args.frames_per_stream,
        rate: args.rate,
        duration,
        max_in_flight: args.max_in_flight,
        payload,
        server_pid: args.server_pid,
    };
    let report = loadgen::run(&config).await?;
    if args.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| Error::Task(e.to_string()))?
        );
    } else {
        crate::outln!("{}", report.to_markdown());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(id: i64, status: pb::VerdictStatus, is_match: bool) -> pb::Verdict {
        pb::Verdict {
            source: Some(pb::ReferenceSource {
                reference_id: id,
                ..Default::default()
            }),
            is_match,
            status: status as i32,
            ..Default::default()
        }
    }

    #[test]
    fn only_the_last_final_verdict_per_reference_is_kept() {
        let mut verdicts = FinalVerdicts::default();
        verdicts.record(verdict(7, pb::VerdictStatus::Provisional, true));
        verdicts.record(verdict(3, pb::VerdictStatus::Final, false));
        verdicts.record(verdict(7, pb::VerdictStatus::Final, false));
        verdicts.record(verdict(3, pb::VerdictStatus::Final, true));
        let kept: Vec<(i64, bool)> = verdicts
            .into_verdicts()
            .iter()
            .map(|v| (v.source.as_ref().map_or(0, |s| s.reference_id), v.is_match))
            .collect();
        assert_eq!(kept, vec![(3, true), (7, false)]);
    }
}

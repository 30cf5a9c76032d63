//! `framematch hash` and `framematch vpdq-match`: local hashing of images and videos (PDQ, vPDQ,
//! an embedding model), no server.

use super::*;

/// Which video frames are hashed (vPDQ's sampling, shared/PDQ.md §2.1).
#[derive(Debug, Clone, Copy, Args)]
pub struct SamplingArgs {
    /// Hash one frame every this many seconds of video: every `(int)(S × fps)`-th frame, as
    /// vPDQ does; 0 hashes every frame.
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub seconds_per_hash: f64,
    /// Hash every frame (vpdq-hash-video's default; same as --seconds-per-hash 0).
    #[arg(long)]
    pub every_frame: bool,
}

impl SamplingArgs {
    /// As [`SamplingOptions`].
    pub fn options(&self) -> SamplingOptions {
        SamplingOptions {
            seconds_per_hash: self.seconds_per_hash,
            every_frame: self.every_frame,
        }
    }
}

/// `framematch hash …`
#[derive(Debug, Args)]
pub struct HashArgs {
    /// Also print the seven other dihedral variants (rot90, rot180, rot270, flipx, flipy,
    /// flipplus1, flipminus1): after the path for an image, after the timestamp for a video frame.
    #[arg(long)]
    pub dihedral: bool,
    /// Which video frames to hash.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print videos as HMA's JSON array of `"pdq_hex,quality,timestamp"` strings instead.
    #[arg(long)]
    pub json: bool,
    /// Print embedding descriptors instead of PDQ hashes, computed by `--embedding-model`
    /// exactly as the server does: one JSON object per line (JSON Lines) for each image and each
    /// sampled video frame, `{"path", "space", "frame_index", "timestamp_ms", "content_area",
    /// "values"}`, with a second line (`content_area` true) for the picture inside its borders
    /// when it has letterbox or pillarbox bars. `values` is the L2-normalised vector.
    #[arg(long)]
    pub embedding: bool,
    /// The model `--embedding` runs.
    #[command(flatten)]
    pub model: EmbeddingArgs,
    /// Image files (JPEG, PNG, WebP, GIF, BMP) or videos (anything ffmpeg decodes). With several
    /// files, each video's lines follow a `# path` line.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// `framematch vpdq-match …`
#[derive(Debug, Args)]
pub struct VpdqMatchArgs {
    /// The query: a vPDQ file (reference text or HMA JSON) or a video.
    pub query: PathBuf,
    /// The video it is compared with: a vPDQ file or a video.
    pub compared: PathBuf,
    /// Match when at least this share of the query's frames match, in percent.
    #[arg(long, default_value_t = vpdq::DEFAULT_QUERY_THRESHOLD_PCT)]
    pub query_threshold: f64,
    /// ... and at least this share of the compared video's frames match, in percent.
    #[arg(long, default_value_t = vpdq::DEFAULT_COMPARED_THRESHOLD_PCT)]
    pub compared_threshold: f64,
    /// Frame distance tolerance in bits.
    #[arg(long, default_value_t = crate::hash::DEFAULT_MAX_DISTANCE)]
    pub max_distance: u32,
    /// Frames of lower quality are left out.
    #[arg(long, default_value_t = crate::hash::DEFAULT_MIN_QUALITY)]
    pub min_quality: u8,
    /// The C++ match-hashes-brute rules (no dedupe, distance strictly below --max-distance)
    /// instead of python-threatexchange's.
    #[arg(long)]
    pub cpp: bool,
    /// Which frames of a video argument are hashed.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Hashes a video with a progress bar over its decoded frames.
pub(super) fn hash_video_file(
    path: &Path,
    sampling: SamplingOptions,
    dihedral: bool,
) -> Result<video::HashedVideo, Error> {
    let options = HashOptions {
        sampling,
        dihedral,
        ..HashOptions::default()
    };
    let mut bar: Option<ProgressBar> = None;
    let result = video::hash_video(path, &options, |info, decoded| {
        bar.get_or_insert_with(|| progress_bar(info.frame_count, &path.display().to_string()))
            .set_position(decoded);
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(result?)
}

/// Reads a vPDQ file, or hashes a video, into a vPDQ hash.
pub(super) fn load_vpdq(path: &Path, sampling: SamplingOptions) -> Result<Vpdq, Error> {
    if sniff(path)? == FileKind::Text {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        return Vpdq::parse(&text).map_err(|source| Error::Vpdq {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(hash_video_file(path, sampling, false)?.to_vpdq())
}

/// `framematch hash`: hashes each file locally, printing a line per image and a vPDQ block per
/// video. A file that fails is reported on stderr and the rest go on; the exit code is 2 if any
/// failed.
pub fn hash_files(args: &HashArgs) -> ExitCode {
    if args.embedding {
        return embed_files(args);
    }
    let limits = DecodeLimits::default();
    let sampling = args.sampling.options();
    let several = args.files.len() > 1;
    let mut failed = false;
    for path in &args.files {
        let result = sniff(path).and_then(|kind| match kind {
            FileKind::Image => hash_image_file(path, &limits, args.dihedral),
            FileKind::Text | FileKind::Media => {
                let hashed = hash_video_file(path, sampling, args.dihedral)?;
                Ok(video_text(path, &hashed, args, several))
            }
        });
        match result {
            Ok(text) => super::print_text(&text),
            Err(error) => {
                eprintln!("framematch: {error}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    }
}

// === hash --embedding ===

/// One line of `hash --embedding`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct EmbeddingLine {
    /// The file.
    pub path: String,
    /// The model's embedding space.
    pub space: String,
    /// 0 for an image; the frame's index in decoder order for a video.
    pub frame_index: u64,
    /// 0 for an image; the frame's time for a video (vPDQ's `frame_index / fps`), rounded.
    pub timestamp_ms: u64,
    /// Whether this is the vector of the picture inside its borders.
    pub content_area: bool,
    /// The L2-normalised vector.
    pub values: Vec<f32>,
}

/// `hash --embedding`: loads the model once, then prints each file's lines. A file that fails is
/// reported on stderr and the rest go on; exit 2 if any failed, 64 for a bad model flag.
pub(super) fn embed_files(args: &HashArgs) -> ExitCode {
    let config = match args.model.model_config(crate::embed::DEFAULT_THRESHOLD, 1) {
        Ok(Some(config)) => config,
        Ok(None) => {
            eprintln!(
                "framematch: --embedding needs --embedding-model (or FRAMEMATCH_EMBEDDING_MODEL); \
                 run `eval \"$(.ci/fetch-models)\"` (README \"Embedding model\")"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(error) => {
            eprintln!("framematch: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let model: std::sync::Arc<dyn crate::embed::SpaceModel> =
        match crate::embed::OnnxModel::open(&config) {
            Ok(model) => std::sync::Arc::new(model),
            Err(error) => {
                eprintln!("framematch: {error}");
                return ExitCode::from(EXIT_ERROR);
            }
        };
    let sampling = args.sampling.options();
    let mut failed = false;
    let mut stdout = std::io::stdout().lock();
    for path in &args.files {
        let mut emit = |frame_index: u64, timestamp_ms: u64, picture: &image::RgbImage| {
            embedding_lines(path, &model, frame_index, timestamp_ms, picture)
                .map(|text| stdout.write_all(text.as_bytes()).is_ok())
        };
        let result = sniff(path).and_then(|kind| match kind {
            FileKind::Image => {
                let bytes = read_file(path)?;
                let picture = pdq::decode_image(&bytes, &DecodeLimits::default())
                    .map_err(|source| Error::Hash {
                        path: path.to_path_buf(),
                        source,
                    })?
                    .to_rgb8();
                emit(0, 0, &picture).map(|_| ())
            }
            FileKind::Text | FileKind::Media => {
                let mut reader = FrameReader::open(&Tools::default(), path, &sampling)?;
                let (width, height) = (reader.info().width, reader.info().height);
                let mut rgb = Vec::new();
                while let Some(position) = reader.next_frame(&mut rgb)? {
                    let picture =
                        image::RgbImage::from_raw(width, height, std::mem::take(&mut rgb))
                            .ok_or_else(|| Error::Embed {
                                path: path.to_path_buf(),
                                reason: format!("frame {} is short", position.frame_index),
                            })?;
                    let open = emit(
                        position.frame_index,
                        timestamp_ms(position.timestamp_s),
                        &picture,
                    )?;
                    rgb = picture.into_raw();
                    if !open {
                        // A closed pipe (`| head`): the reader has what it wanted.
                        return Ok(());
                    }
                }
                Ok(())
            }
        });
        if let Err(error) = result {
            eprintln!("framematch: {error}");
            failed = true;
        }
    }
    if failed {
        ExitCode::from(EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    }
}

/// The lines of one picture: its vector, and its content area's when it has borders.
pub(super) fn embedding_lines(
    path: &Path,
    model: &std::sync::Arc<dyn crate::embed::SpaceModel>,
    frame_index: u64,
    timestamp_ms: u64,
    picture: &image::RgbImage,
) -> Result<String, Error> {
    let area =
        crate::hash::border::content_area(picture.width(), picture.height(), picture.as_raw());
    let (vectors, _) = crate::api::embedding::embed_picture(
        std::slice::from_ref(model),
        picture,
        area,
        &crate::embed::Windows::none(),
    )
    .map_err(|e| Error::Embed {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = String::new();
    for vector in vectors {
        let line = EmbeddingLine {
            path: path.display().to_string(),
            space: vector.space.to_string(),
            frame_index,
            timestamp_ms,
            content_area: vector.content_area,
            values: vector.vector,
        };
        out.push_str(&serde_json::to_string(&line).map_err(|e| Error::Task(e.to_string()))?);
        out.push('\n');
    }
    Ok(out)
}

pub(super) fn hash_image_file(
    path: &Path,
    limits: &DecodeLimits,
    dihedral: bool,
) -> Result<String, Error> {
    let bytes = read_file(path)?;
    let output = pdq::hash_image_bytes(&bytes, limits).map_err(|source| Error::Hash {
        path: path.to_path_buf(),
        source,
    })?;
    let mut line = format!("{},{},{}", output.hash(), output.quality(), path.display());
    if dihedral {
        for variant in Dihedral::ALL.into_iter().skip(1) {
            line.push(',');
            line.push_str(&output.variant(variant).to_hex());
        }
    }
    line.push('\n');
    Ok(line)
}

/// A video's vPDQ lines (the reference text form, with the dihedral variants appended when asked:
/// the reference reader ignores fields after the 4th), or its HMA JSON.
pub(super) fn video_text(
    path: &Path,
    hashed: &video::HashedVideo,
    args: &HashArgs,
    several: bool,
) -> String {
    let mut out = String::new();
    if several {
        out.push_str(&format!("# {}\n", path.display()));
    }
    let vpdq = hashed.to_vpdq();
    if args.json {
        out.push_str(&vpdq.to_json());
        out.push('\n');
        return out;
    }
    for (feature, frame) in vpdq.features.iter().zip(&hashed.frames) {
        out.push_str(&vpdq::text_line(feature));
        if let Some(variants) = frame.variants.filter(|_| args.dihedral) {
            for variant in variants.iter().skip(1) {
                out.push(',');
                out.push_str(&variant.to_hex());
            }
        }
        out.push('\n');
    }
    out
}

/// `framematch vpdq-match`: returns whether the two match.
///
/// # Errors
/// [`Error::Read`], [`Error::Vpdq`] for a malformed vPDQ file, [`Error::Video`] for a video that
/// cannot be hashed.
pub fn vpdq_match(args: &VpdqMatchArgs) -> Result<bool, Error> {
    let sampling = args.sampling.options();
    let query = load_vpdq(&args.query, sampling)?;
    let compared = load_vpdq(&args.compared, sampling)?;
    let config = MatchConfig {
        quality_tolerance: args.min_quality,
        distance_tolerance: args.max_distance,
        semantics: if args.cpp {
            Semantics::Cpp
        } else {
            Semantics::Pytx
        },
    };
    let result = vpdq::match_brute(&query.features, &compared.features, &config);
    let is_match = result.is_match(args.query_threshold, args.compared_threshold);
    crate::outln!(
        "{:.2}\t{:.2}\t{is_match}",
        result.query_match_pct,
        result.compared_match_pct
    );
    Ok(is_match)
}

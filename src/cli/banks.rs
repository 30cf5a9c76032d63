//! `framematch bank` and `framematch ref`: banks and their references on the server.

use super::*;

/// `framematch bank …`
#[derive(Debug, Subcommand)]
pub enum BankCommand {
    /// Create a bank; prints `id<TAB>name`.
    Create {
        /// Bank name: 1-128 characters of A-Z a-z 0-9 _ . -
        name: String,
        /// suicide_self_harm, graphic_violence, terrorism or other.
        #[arg(long)]
        category: Category,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// Who else may see it: private (default), shared (with `--share-with`) or public.
        #[arg(long, default_value = "private")]
        visibility: VisibilityArg,
        /// An organisation to share it with (repeatable; with `--visibility shared`).
        #[arg(long = "share-with")]
        share_with: Vec<String>,
        /// Owning organisation (admin keys only; default: the key's organisation).
        #[arg(long)]
        owner: Option<String>,
        /// An embedding space the bank holds beside PDQ (repeatable):
        /// `SPACE[:THRESHOLD[:DIM[:METRIC]]]`, e.g. `sscd`, `sscd:0.8`, `mine:0.9:256:dot`.
        /// Unset parts take the server's model of that name, else threshold 0.39, dimension 512
        /// and metric cosine.
        #[arg(long = "embedding", value_name = "SPACE[:THRESHOLD[:DIM[:METRIC]]]")]
        embeddings: Vec<EmbeddingArg>,
    },
    /// Change who may see a bank; prints the bank as `list` does.
    Share {
        /// Bank name.
        name: String,
        /// private, shared (with `--share-with`) or public.
        #[arg(long)]
        visibility: VisibilityArg,
        /// An organisation to share it with (repeatable; with `--visibility shared`).
        #[arg(long = "share-with")]
        share_with: Vec<String>,
    },
    /// List the banks the key may see:
    /// `id<TAB>name<TAB>category<TAB>owner<TAB>visibility<TAB>shared_with<TAB>spaces`
    /// (`shared_with` comma-separated, shown only to the bank's owner and admins; `spaces` the
    /// embedding spaces as `name:threshold:dimension:metric`, comma-separated).
    List,
}

/// `--embedding SPACE[:THRESHOLD[:DIM[:METRIC]]]`: an embedding space for `bank create`. Unset
/// parts are sent as 0 / unspecified, which the server fills in.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingArg {
    /// The space's name.
    pub name: String,
    /// 0: the server's default.
    pub threshold: f32,
    /// 0: the server's model's, or 512.
    pub dimension: u32,
    /// Unset: the server's model's, or cosine.
    pub metric: Option<crate::model::Metric>,
}

impl std::str::FromStr for EmbeddingArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.split(':');
        let name = parts.next().unwrap_or_default().to_string();
        if name.is_empty() {
            return Err(format!(
                "{text:?} names no space; expected SPACE[:THRESHOLD[:DIM[:METRIC]]]"
            ));
        }
        let threshold = match parts.next() {
            None | Some("") => 0.0,
            Some(t) => t
                .parse::<f32>()
                .map_err(|e| format!("threshold {t:?} of {name:?}: {e}"))?,
        };
        let dimension = match parts.next() {
            None | Some("") => 0,
            Some(d) => d
                .parse::<u32>()
                .map_err(|e| format!("dimension {d:?} of {name:?}: {e}"))?,
        };
        let metric = match parts.next() {
            None | Some("") => None,
            Some(m) => Some(m.parse().map_err(|e| format!("{e}"))?),
        };
        if let Some(extra) = parts.next() {
            return Err(format!(
                "{text:?} has an extra part {extra:?}; expected SPACE[:THRESHOLD[:DIM[:METRIC]]]"
            ));
        }
        Ok(Self {
            name,
            threshold,
            dimension,
            metric,
        })
    }
}

impl EmbeddingArg {
    fn to_pb(&self) -> pb::EmbeddingSpace {
        pb::EmbeddingSpace {
            name: self.name.clone(),
            dimension: self.dimension,
            metric: match self.metric {
                None => pb::EmbeddingMetric::Unspecified,
                Some(crate::model::Metric::Cosine) => pb::EmbeddingMetric::Cosine,
                Some(crate::model::Metric::Dot) => pb::EmbeddingMetric::Dot,
            } as i32,
            threshold: self.threshold,
            index: String::new(),
        }
    }
}

/// A bank visibility on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum VisibilityArg {
    /// Only the owning organisation.
    Private,
    /// The owner and the organisations named with `--share-with`.
    Shared,
    /// Every organisation.
    Public,
}

impl VisibilityArg {
    fn to_pb(self) -> pb::Visibility {
        match self {
            VisibilityArg::Private => pb::Visibility::Private,
            VisibilityArg::Shared => pb::Visibility::Shared,
            VisibilityArg::Public => pb::Visibility::Public,
        }
    }
}

/// `framematch ref …`
#[derive(Debug, Subcommand)]
pub enum RefCommand {
    /// Add one reference per file to a bank; prints `reference_id<TAB>path`. Images are sent as
    /// they are; videos are hashed here (vPDQ) and sent as hashes, or, when the bank declares
    /// embedding spaces, their sampled frames are sent as JPEGs for the server to hash and embed;
    /// vPDQ files (reference text or HMA JSON) are sent as they hash.
    Add {
        /// Target bank.
        bank: String,
        /// Images, videos or vPDQ files; each becomes its own reference.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Which video frames to hash.
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Free text stored with every reference added.
        #[arg(long, default_value = "")]
        note: String,
        /// Your own id for the content (only with a single file).
        #[arg(long, default_value = "")]
        external_id: String,
    },
    /// Withdraw a reference so it never matches again.
    Withdraw {
        /// Reference id.
        id: i64,
        /// Why (required).
        #[arg(long)]
        reason: String,
    },
    /// Show a reference.
    Get {
        /// Reference id.
        id: i64,
    },
}

/// `framematch bank …`
///
/// # Errors
/// Connection and RPC failures.
pub async fn bank(command: BankCommand, server: &ClientOptions) -> Result<(), Error> {
    let mut client = pb::banks_client::BanksClient::new(client::connect(server).await?);
    match command {
        BankCommand::Create {
            name,
            category,
            description,
            visibility,
            share_with,
            owner,
            embeddings,
        } => {
            let bank = client
                .create_bank(pb::CreateBankRequest {
                    embedding_spaces: embeddings.iter().map(EmbeddingArg::to_pb).collect(),
                    name: name.clone(),
                    category: crate::api::convert::category_to_pb(category) as i32,
                    description,
                    visibility: visibility.to_pb() as i32,
                    shared_with: share_with,
                    owner: owner.unwrap_or_default(),
                })
                .await
                .map_err(|s| rpc_error(format!("creating bank {name}"), s))?
                .into_inner();
            crate::outln!("{}\t{}", bank.id, bank.name);
        }
        BankCommand::Share {
            name,
            visibility,
            share_with,
        } => {
            let bank = client
                .update_bank(pb::UpdateBankRequest {
                    bank: name.clone(),
                    visibility: visibility.to_pb() as i32,
                    shared_with: share_with,
                })
                .await
                .map_err(|s| rpc_error(format!("changing who may see bank {name}"), s))?
                .into_inner();
            crate::outln!("{}", bank_line(&bank));
        }
        BankCommand::List => {
            let banks = client
                .list_banks(pb::ListBanksRequest {})
                .await
                .map_err(|s| rpc_error("listing banks", s))?
                .into_inner()
                .banks;
            for bank in banks {
                crate::outln!("{}", bank_line(&bank));
            }
        }
    }
    Ok(())
}

pub(super) fn bank_line(bank: &pb::Bank) -> String {
    let visibility = match pb::Visibility::try_from(bank.visibility) {
        Ok(pb::Visibility::Private) => "private",
        Ok(pb::Visibility::Shared) => "shared",
        Ok(pb::Visibility::Public) => "public",
        Ok(pb::Visibility::Unspecified) | Err(_) => "unspecified",
    };
    let spaces: Vec<String> = bank
        .embedding_spaces
        .iter()
        .map(|s| {
            let metric = match pb::EmbeddingMetric::try_from(s.metric) {
                Ok(pb::EmbeddingMetric::Cosine) => "cosine",
                Ok(pb::EmbeddingMetric::Dot) => "dot",
                Ok(pb::EmbeddingMetric::Unspecified) | Err(_) => "unspecified",
            };
            format!("{}:{}:{}:{metric}", s.name, s.threshold, s.dimension)
        })
        .collect();
    // The index settings contain commas: one `name:settings` per space, space-separated.
    let indexes: Vec<String> = bank
        .embedding_spaces
        .iter()
        .map(|s| format!("{}:{}", s.name, s.index))
        .collect();
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        bank.id,
        bank.name,
        category_name(bank.category),
        bank.owner,
        visibility,
        bank.shared_with.join(","),
        spaces.join(","),
        indexes.join(" ")
    )
}

pub(super) fn category_name(value: i32) -> &'static str {
    crate::api::convert::category_from_pb(value).map_or("unspecified", Category::as_str)
}

/// `framematch ref …`
///
/// # Errors
/// File, connection and RPC failures.
pub async fn reference(command: RefCommand, server: &ClientOptions) -> Result<(), Error> {
    let mut client = pb::banks_client::BanksClient::new(client::connect(server).await?);
    match command {
        RefCommand::Add {
            bank,
            files,
            sampling,
            note,
            external_id,
        } => {
            if !external_id.is_empty() && files.len() > 1 {
                return Err(Error::Usage(
                    "--external-id names one reference; give a single file with it".into(),
                ));
            }
            let pixels =
                banks_declare_spaces(client::connect(server).await?, std::slice::from_ref(&bank))
                    .await?;
            for path in files {
                let header = pb::AddReferenceRequest {
                    item: Some(pb::add_reference_request::Item::Header(
                        pb::ReferenceHeader {
                            bank: bank.clone(),
                            external_id: external_id.clone(),
                            note: note.clone(),
                        },
                    )),
                };
                let context = format!("adding {}", path.display());
                let added = if pixels && sniff(&path)? == FileKind::Media {
                    add_video_pixels(&mut client, header, &path, sampling.options(), &context)
                        .await?
                } else {
                    let frames = reference_frames(&path, sampling.options()).await?;
                    let mut messages = vec![header];
                    messages.extend(frames.into_iter().map(|frame| pb::AddReferenceRequest {
                        item: Some(pb::add_reference_request::Item::Frame(frame)),
                    }));
                    client
                        .add_reference(tokio_stream::iter(messages))
                        .await
                        .map_err(|s| rpc_error(context, s))?
                        .into_inner()
                };
                let id = added.reference.map_or(0, |r| r.id);
                crate::outln!("{id}\t{}", path.display());
            }
        }
        RefCommand::Withdraw { id, reason } => {
            let reference = client
                .withdraw_reference(pb::WithdrawReferenceRequest {
                    reference_id: id,
                    reason,
                })
                .await
                .map_err(|s| rpc_error(format!("withdrawing reference {id}"), s))?
                .into_inner();
            crate::outln!(
                "{}\twithdrawn\t{}",
                reference.id,
                reference.withdrawn_reason
            );
        }
        RefCommand::Get { id } => {
            let r = client
                .get_reference(pb::GetReferenceRequest {
                    reference_id: id,
                    include_embeddings: false,
                })
                .await
                .map_err(|s| rpc_error(format!("reading reference {id}"), s))?
                .into_inner();
            let state = match pb::ReferenceState::try_from(r.state) {
                Ok(pb::ReferenceState::Withdrawn) => "withdrawn",
                Ok(pb::ReferenceState::Active) => "active",
                Ok(pb::ReferenceState::Unspecified) | Err(_) => "unknown",
            };
            crate::outln!("id\t{}", r.id);
            crate::outln!("bank\t{}", r.bank);
            crate::outln!("state\t{state}");
            crate::outln!("frames\t{}", r.frame_count);
            crate::outln!("external_id\t{}", r.external_id);
            crate::outln!("note\t{}", r.note);
            crate::outln!("added_by\t{}", r.added_by);
            crate::outln!("added_ms\t{}", r.added_ms);
            if !r.withdrawn_reason.is_empty() {
                crate::outln!("withdrawn_reason\t{}", r.withdrawn_reason);
                crate::outln!("withdrawn_ms\t{}", r.withdrawn_ms);
            }
        }
    }
    Ok(())
}

/// Whether any bank in scope (`banks`, or every bank the key sees when empty) declares an
/// embedding space: then frames go to the server as pixels, so it computes their vectors. A
/// server too old to say, or a listing the key may not read, counts as no.
pub(super) async fn banks_declare_spaces(
    channel: Connection,
    banks: &[String],
) -> Result<bool, Error> {
    let mut banks_client = pb::banks_client::BanksClient::new(channel);
    let listed = match banks_client.list_banks(pb::ListBanksRequest {}).await {
        Ok(response) => response.into_inner().banks,
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unimplemented
            ) =>
        {
            return Ok(false);
        }
        Err(status) => return Err(rpc_error("listing banks", status)),
    };
    Ok(listed
        .iter()
        .filter(|bank| banks.is_empty() || banks.contains(&bank.name))
        .any(|bank| !bank.embedding_spaces.is_empty()))
}

/// A video reference for a bank with embedding spaces: its sampled frames decoded, JPEG-encoded
/// and streamed as they come (memory stays at a few frames), for the server to hash and embed.
pub(super) async fn add_video_pixels(
    client: &mut pb::banks_client::BanksClient<Connection>,
    header: pb::AddReferenceRequest,
    path: &Path,
    sampling: SamplingOptions,
    context: &str,
) -> Result<pb::AddReferenceResponse, Error> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AddReferenceRequest>(4);
    let owned = path.to_path_buf();
    let producer = tokio::task::spawn_blocking(move || -> Result<u64, Error> {
        if tx.blocking_send(header).is_err() {
            return Ok(0);
        }
        let mut sent = 0;
        for_each_jpeg_frame(&owned, sampling, |frame| {
            let request = pb::AddReferenceRequest {
                item: Some(pb::add_reference_request::Item::Frame(frame)),
            };
            let open = tx.blocking_send(request).is_ok();
            sent += u64::from(open);
            open
        })?;
        Ok(sent)
    });
    let added = client
        .add_reference(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| rpc_error(context, s));
    let sent = producer.await.map_err(|e| Error::Task(e.to_string()))??;
    if sent == 0 {
        return Err(Error::NoFrames {
            path: path.to_path_buf(),
        });
    }
    Ok(added?.into_inner())
}

/// Decodes `path`'s sampled frames and hands each to `send` as a JPEG frame with its index and
/// time, with a progress bar; stops early when `send` returns false (the stream is gone).
pub(super) fn for_each_jpeg_frame(
    path: &Path,
    sampling: SamplingOptions,
    mut send: impl FnMut(pb::Frame) -> bool,
) -> Result<(), Error> {
    let mut reader = FrameReader::open(&Tools::default(), path, &sampling)?;
    let expected = reader.info().frame_count.map(|n| reader.selected_count(n));
    let (width, height) = (reader.info().width, reader.info().height);
    let bar = progress_bar(expected, &path.display().to_string());
    let mut rgb = Vec::new();
    while let Some(position) = reader.next_frame(&mut rgb)? {
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, SCAN_JPEG_QUALITY)
            .encode(&rgb, width, height, image::ExtendedColorType::Rgb8)
            .map_err(|source| Error::Encode {
                path: path.to_path_buf(),
                frame_index: position.frame_index,
                source,
            })?;
        let frame = pb::Frame {
            embeddings: Vec::new(),
            frame_index: u32::try_from(position.frame_index).unwrap_or(u32::MAX),
            timestamp_ms: timestamp_ms(position.timestamp_s),
            signal: Some(pb::frame::Signal::Image(jpeg)),
        };
        if !send(frame) {
            break;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

/// The frames of one reference file: an image as its bytes, a vPDQ file's hashes, or a video
/// hashed here (on the blocking pool) and sent as hashes with their index and time.
pub(super) async fn reference_frames(
    path: &Path,
    sampling: SamplingOptions,
) -> Result<Vec<pb::Frame>, Error> {
    let vpdq = match sniff(path)? {
        FileKind::Image => return Ok(vec![image_frame(read_file(path)?)]),
        FileKind::Text => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.to_path_buf(),
                source,
            })?;
            Vpdq::parse(&text).map_err(|source| Error::Vpdq {
                path: path.to_path_buf(),
                source,
            })?
        }
        FileKind::Media => {
            let owned = path.to_path_buf();
            let hashed =
                tokio::task::spawn_blocking(move || hash_video_file(&owned, sampling, false))
                    .await
                    .map_err(|e| Error::Task(e.to_string()))??;
            // Straight from the frames, not via the vPDQ form, so that content-area hashes of
            // frames with bars travel too.
            return Ok(hashed
                .frames
                .iter()
                .map(|frame| pb::Frame {
                    embeddings: Vec::new(),
                    frame_index: u32::try_from(frame.frame_index).unwrap_or(u32::MAX),
                    timestamp_ms: timestamp_ms(frame.timestamp_s),
                    signal: Some(pb::frame::Signal::Pdq(video_signal(frame, false))),
                })
                .collect());
        }
    };
    Ok(vpdq
        .features
        .iter()
        .map(|f| pb::Frame {
            embeddings: Vec::new(),
            frame_index: u32::try_from(f.frame_number).unwrap_or(u32::MAX),
            timestamp_ms: f.timestamp_ms(),
            signal: Some(pb::frame::Signal::Pdq(pdq_signal(&f.hash, f.quality, None))),
        })
        .collect())
}

/// A hashed video frame as a precomputed signal: its hash, and its content-area hash when it has
/// borders; with `dihedral`, the variants of both.
pub(super) fn video_signal(frame: &crate::video::VideoFrame, dihedral: bool) -> pb::PdqSignal {
    let variants = |v: &Option<[crate::hash::PdqHash; 8]>| v.filter(|_| dihedral);
    let mut signal = pdq_signal(
        &frame.hash,
        frame.quality,
        variants(&frame.variants).as_ref(),
    );
    signal.content = frame.content.map(|c| {
        Box::new(pdq_signal(
            &c.hash,
            c.quality,
            variants(&c.variants).as_ref(),
        ))
    });
    signal
}

/// A precomputed hash, with the 7 other dihedral variants when given all 8.
pub(super) fn pdq_signal(
    hash: &crate::hash::PdqHash,
    quality: u8,
    variants: Option<&[crate::hash::PdqHash; 8]>,
) -> pb::PdqSignal {
    pb::PdqSignal {
        hash: hash.as_bytes().to_vec(),
        quality: u32::from(quality),
        // The proto's order, rot90 … flipminus1, is Dihedral::ALL without the original.
        variants: variants.map_or_else(Vec::new, |all| {
            all.iter().skip(1).map(|v| v.as_bytes().to_vec()).collect()
        }),
        content: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_flags_parse_each_optional_part() {
        let parse = |text: &str| text.parse::<EmbeddingArg>();
        assert_eq!(
            parse("sscd"),
            Ok(EmbeddingArg {
                name: "sscd".into(),
                threshold: 0.0,
                dimension: 0,
                metric: None,
            })
        );
        assert_eq!(
            parse("mine:0.9:256:dot"),
            Ok(EmbeddingArg {
                name: "mine".into(),
                threshold: 0.9,
                dimension: 256,
                metric: Some(crate::model::Metric::Dot),
            })
        );
        assert_eq!(
            parse("s::64").map(|a| (a.threshold, a.dimension)),
            Ok((0.0, 64))
        );
        assert!(parse("").is_err());
        assert!(parse("s:high").is_err_and(|e| e.contains("threshold \"high\"")));
        assert!(parse("s:0.5:64:l2").is_err_and(|e| e.contains("unknown embedding metric")));
        assert!(parse("s:0.5:64:dot:x").is_err_and(|e| e.contains("extra part")));
    }
}

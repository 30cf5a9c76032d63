//! `framematch export` and `framematch import`: a bank's references to and from hash-list files
//! (issue #4, part 6), over the same gRPC API as every client command.
//!
//! Export streams `Banks.ExportBank` into a [`formats::Writer`] one reference at a time, so a
//! bank of any size passes through in bounded memory; a file is written under a `.partial` name
//! and renamed once complete, so a failed export never leaves a truncated file behind. Import
//! reads and checks the whole file first (a malformed line stops it before anything is sent),
//! then adds each item as one reference through `Banks.AddReference`, in file order.
//!
//! Output: import prints `imported N references (M frames), skipped K` on stdout; skip reasons
//! (`FILE:LINE: skipped: …` on import, `reference ID: skipped: …` on export) and export's
//! summary go to stderr, export's data to stdout or `-o FILE`.

#![allow(clippy::print_stdout)]

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::client::{self, ClientOptions};
use clap::Args;

use crate::cli::{self, Error};
use crate::formats::{self, Format, Item, Written};
use crate::hash::PdqHash;
use crate::model::{FrameEmbedding, FrameSignal};
use crate::pb;

/// `framematch export …`
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The bank to export.
    pub bank: String,
    /// `pdq` (images only), `csv` (python-threatexchange), `vpdq` (text, one block per
    /// reference) or `vpdq-json` (one JSON object per line).
    #[arg(long, default_value = "csv")]
    pub format: Format,
    /// Also export withdrawn references (marked as such; import skips them).
    #[arg(long)]
    pub include_withdrawn: bool,
    /// Write here instead of stdout.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
}

/// `framematch import …`
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The bank to add the references to; it must exist.
    pub bank: String,
    /// The hash-list file.
    pub file: PathBuf,
    /// `pdq`, `csv`, `vpdq` or `vpdq-json`; default: told from the file's first lines.
    #[arg(long)]
    pub format: Option<Format>,
}

/// The one place these commands connect.
async fn banks_client(
    server: &ClientOptions,
) -> Result<pb::banks_client::BanksClient<client::Connection>, Error> {
    Ok(pb::banks_client::BanksClient::new(
        client::connect(server).await?,
    ))
}

// === export ===

/// `framematch export`.
///
/// # Errors
/// Connection and RPC failures (NOT_FOUND for an unknown bank), a reference the server sent
/// malformed, and output failures.
pub async fn export(args: ExportArgs, server: &ClientOptions) -> Result<(), Error> {
    let mut client = banks_client(server).await?;
    let context = || format!("exporting bank {}", args.bank);
    let mut stream = client
        .export_bank(pb::ExportBankRequest {
            bank: args.bank.clone(),
            include_withdrawn: args.include_withdrawn,
        })
        .await
        .map_err(|s| cli::rpc_error(context(), s))?
        .into_inner();
    let banks = client
        .list_banks(pb::ListBanksRequest {})
        .await
        .map_err(|s| cli::rpc_error(context(), s))?
        .into_inner()
        .banks;
    let category = banks
        .iter()
        .find(|b| b.name == args.bank)
        .and_then(|b| crate::api::convert::category_from_pb(b.category).ok())
        .ok_or_else(|| Error::BadExport {
            reference: 0,
            reason: format!("bank {:?} is not listed with a category", args.bank),
        })?;

    let output = Output::create(args.output.as_deref())?;
    let write_error = |source| Error::Write {
        path: output.name(),
        source,
    };
    let mut writer = formats::Writer::new(args.format, &args.bank, category, output.writer()?)
        .map_err(write_error)?;
    let (mut wrote, mut frames, mut skipped) = (0u64, 0u64, 0u64);
    while let Some(exported) = stream
        .message()
        .await
        .map_err(|s| cli::rpc_error(context(), s))?
    {
        let (id, item) = item_from_pb(exported)?;
        match writer.write(&item).map_err(write_error)? {
            Written::Wrote => {
                wrote += 1;
                frames += item.frames.len() as u64;
                if !item.embeddings.is_empty() && args.format != Format::VpdqJson {
                    eprintln!(
                        "reference {id}: its {} vectors are not written: the {} format holds PDQ only (use vpdq-json)",
                        item.embeddings.len(),
                        args.format
                    );
                }
            }
            Written::Skipped(reason) => {
                skipped += 1;
                eprintln!("reference {id}: skipped: {reason}");
            }
        }
    }
    writer.finish().map_err(write_error)?;
    output.commit()?;
    eprintln!("exported {wrote} references ({frames} frames), skipped {skipped}");
    Ok(())
}

/// A reference as the server exported it, checked.
fn item_from_pb(exported: pb::ExportedReference) -> Result<(i64, Item), Error> {
    let reference = exported.reference.ok_or(Error::BadExport {
        reference: 0,
        reason: "an exported reference without its reference".to_string(),
    })?;
    let bad = |reason: String| Error::BadExport {
        reference: reference.id,
        reason,
    };
    let embeddings = exported
        .frames
        .iter()
        .flat_map(|f| {
            f.embeddings.iter().map(|e| FrameEmbedding {
                frame_index: f.frame_index,
                timestamp_ms: f.timestamp_ms,
                space: e.space.clone(),
                vector: e.values.clone(),
            })
        })
        .collect();
    let frames = exported
        .frames
        .iter()
        // A frame without a hash carries vectors only.
        .filter(|f| !f.pdq.is_empty())
        .map(|f| {
            Ok(FrameSignal {
                frame_index: f.frame_index,
                timestamp_ms: f.timestamp_ms,
                hash: PdqHash::try_from_slice(&f.pdq).map_err(|e| bad(e.to_string()))?,
                quality: u8::try_from(f.quality)
                    .ok()
                    .filter(|q| *q <= 100)
                    .ok_or_else(|| bad(format!("quality {} is over 100", f.quality)))?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let withdrawn = (reference.state == pb::ReferenceState::Withdrawn as i32)
        .then(|| reference.withdrawn_reason.clone());
    Ok((
        reference.id,
        Item {
            external_id: reference.external_id,
            note: reference.note,
            withdrawn,
            frames,
            embeddings,
        },
    ))
}

/// The AddReference frames of an imported reference: each PDQ frame with the vectors of its
/// frame index (on the first frame of an index stored twice, the picture and its content area),
/// then a frame without a hash for each frame index that has vectors only.
fn frames_to_send(signals: Vec<FrameSignal>, embeddings: Vec<FrameEmbedding>) -> Vec<pb::Frame> {
    let mut frames: Vec<pb::Frame> = signals
        .into_iter()
        .map(|f| pb::Frame {
            embeddings: Vec::new(),
            frame_index: f.frame_index,
            timestamp_ms: f.timestamp_ms,
            signal: Some(pb::frame::Signal::Pdq(pb::PdqSignal {
                hash: f.hash.as_bytes().to_vec(),
                quality: u32::from(f.quality),
                variants: Vec::new(),
                content: None,
            })),
        })
        .collect();
    let mut first: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for (position, frame) in frames.iter().enumerate() {
        first.entry(frame.frame_index).or_insert(position);
    }
    for e in embeddings {
        let vector = pb::Embedding {
            space: e.space,
            values: e.vector,
        };
        match first.get(&e.frame_index).and_then(|&p| frames.get_mut(p)) {
            Some(frame) => frame.embeddings.push(vector),
            None => frames.push(pb::Frame {
                embeddings: vec![vector],
                frame_index: e.frame_index,
                timestamp_ms: e.timestamp_ms,
                signal: None,
            }),
        }
    }
    frames
}

/// Where an export goes: stdout, or a file written under a `.partial` name until complete.
enum Output {
    Stdout,
    File { path: PathBuf, partial: PathBuf },
}

impl Output {
    fn create(path: Option<&Path>) -> Result<Self, Error> {
        Ok(match path {
            None => Output::Stdout,
            Some(path) => {
                let mut partial = path.as_os_str().to_owned();
                partial.push(".partial");
                Output::File {
                    path: path.to_path_buf(),
                    partial: PathBuf::from(partial),
                }
            }
        })
    }

    fn name(&self) -> PathBuf {
        match self {
            Output::Stdout => PathBuf::from("<stdout>"),
            Output::File { path, .. } => path.clone(),
        }
    }

    fn writer(&self) -> Result<Box<dyn Write + Send>, Error> {
        Ok(match self {
            Output::Stdout => Box::new(BufWriter::new(std::io::stdout())),
            Output::File { partial, .. } => {
                let file = std::fs::File::create(partial).map_err(|source| Error::Write {
                    path: partial.clone(),
                    source,
                })?;
                Box::new(BufWriter::new(file))
            }
        })
    }

    /// The file is complete: give it its name.
    fn commit(self) -> Result<(), Error> {
        match self {
            Output::Stdout => Ok(()),
            Output::File { path, partial } => {
                std::fs::rename(&partial, &path).map_err(|source| Error::Write { path, source })
            }
        }
    }
}

// === import ===

/// `framematch import`.
///
/// # Errors
/// An unreadable or malformed file (naming the line), connection failures, and the first
/// reference the server refuses (naming its line and how many were imported before it).
pub async fn import(args: ImportArgs, server: &ClientOptions) -> Result<(), Error> {
    let path = &args.file;
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.clone(),
        source,
    })?;
    let format_error = |source| Error::Format {
        path: path.clone(),
        source,
    };
    let format = match args.format {
        Some(format) => format,
        None => formats::sniff(&text).map_err(format_error)?,
    };
    let parsed = formats::parse(format, &text).map_err(format_error)?;
    for skip in &parsed.skipped {
        eprintln!("{}:{}: skipped: {}", path.display(), skip.line, skip.reason);
    }

    let mut client = banks_client(server).await?;
    let (mut imported, mut frames) = (0u64, 0u64);
    for located in parsed.items {
        let Item {
            external_id,
            note,
            frames: signals,
            embeddings,
            ..
        } = located.item;
        let to_send = frames_to_send(signals, embeddings);
        let header = pb::AddReferenceRequest {
            item: Some(pb::add_reference_request::Item::Header(
                pb::ReferenceHeader {
                    bank: args.bank.clone(),
                    external_id,
                    note,
                },
            )),
        };
        let messages = std::iter::once(header).chain(to_send.into_iter().map(|frame| {
            pb::AddReferenceRequest {
                item: Some(pb::add_reference_request::Item::Frame(frame)),
            }
        }));
        let added = client
            .add_reference(tokio_stream::iter(messages))
            .await
            .map_err(|s| {
                cli::rpc_error(
                    format!(
                        "{}:{}: adding the reference to bank {} (after {imported} imported)",
                        path.display(),
                        located.line,
                        args.bank
                    ),
                    s,
                )
            })?
            .into_inner();
        imported += 1;
        frames += u64::from(added.frames_stored);
    }
    crate::outln!(
        "imported {imported} references ({frames} frames), skipped {}",
        parsed.skipped.len()
    );
    Ok(())
}

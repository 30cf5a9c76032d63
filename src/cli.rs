//! The command line: `framematch serve`, local hashing, and client commands that talk to a
//! running server over gRPC.
//!
//! Client commands print tab-separated lines meant for scripts, and report failures on stderr.
//! Exit codes: 0 success (for `match`: nothing matched), 1 (`match` only) something matched,
//! 2 an error, 64 invalid server configuration.

#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tonic::transport::Channel;

use crate::config::ServeArgs;
use crate::hash::pdq::{self, DecodeLimits, Dihedral};
use crate::model::Category;
use crate::pb;

/// Exit code for errors.
pub const EXIT_ERROR: u8 = 2;
/// Exit code for `match` when something matched.
pub const EXIT_MATCHED: u8 = 1;
/// Exit code for invalid configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// framematch: keeps known violent videos from being published again, by matching perceptual
/// hashes of uploads against banks of known content.
#[derive(Debug, Parser)]
#[command(name = "framematch", version, about, long_about = None)]
pub struct Cli {
    /// URL of the framematch server (client commands).
    #[arg(
        long,
        global = true,
        env = "FRAMEMATCH_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC service on the embedded store.
    Serve(ServeArgs),
    /// Print the PDQ hash of image files: `pdq_hex,quality,path` per file.
    Hash {
        /// Also print the seven other dihedral variants (rot90, rot180, rot270, flipx, flipy,
        /// flipplus1, flipminus1) after the path.
        #[arg(long)]
        dihedral: bool,
        /// Image files (JPEG, PNG, WebP, GIF, BMP).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Manage banks.
    Bank {
        /// The bank command.
        #[command(subcommand)]
        command: BankCommand,
    },
    /// Manage references.
    Ref {
        /// The reference command.
        #[command(subcommand)]
        command: RefCommand,
    },
    /// Match image files: prints `path<TAB>reference_id<TAB>bank<TAB>distance` per match; exits 0
    /// when nothing matched, 1 when something matched, 2 on error.
    Match {
        /// Only search these banks (repeatable); default: all.
        #[arg(long = "bank")]
        banks: Vec<String>,
        /// Largest Hamming distance counted as a match (default: the server's, normally 31).
        #[arg(long)]
        max_distance: Option<u32>,
        /// Also match rotated and mirrored versions of each image.
        #[arg(long)]
        dihedral: bool,
        /// Image files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the server's counts.
    Stats,
}

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
    },
    /// List banks: `id<TAB>name<TAB>category<TAB>owner`.
    List,
}

/// `framematch ref …`
#[derive(Debug, Subcommand)]
pub enum RefCommand {
    /// Add one reference per image file to a bank; prints `reference_id<TAB>path`.
    Add {
        /// Target bank.
        bank: String,
        /// Image files; each becomes its own reference.
        #[arg(required = true)]
        files: Vec<PathBuf>,
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

/// Failure of a client command, printed as one line on stderr.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be hashed.
    #[error("cannot hash {path}: {source}")]
    Hash {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: pdq::Error,
    },
    /// The server could not be reached.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The server URL.
        url: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server URL is malformed.
    #[error("invalid server URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{context}: {code:?}: {message}")]
    Rpc {
        /// What was being done.
        context: String,
        /// The gRPC code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// Flags that do not fit together.
    #[error("{0}")]
    Usage(String),
}

fn rpc_error(context: impl Into<String>, status: tonic::Status) -> Error {
    Error::Rpc {
        context: context.into(),
        code: status.code(),
        message: status.message().to_string(),
    }
}

async fn connect(url: &str) -> Result<Channel, Error> {
    let endpoint = Channel::from_shared(url.to_string()).map_err(|e| Error::Url {
        url: url.into(),
        reason: e.to_string(),
    })?;
    endpoint.connect().await.map_err(|source| Error::Connect {
        url: url.into(),
        source,
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn image_frame(bytes: Vec<u8>) -> pb::Frame {
    pb::Frame {
        frame_index: 0,
        timestamp_ms: 0,
        signal: Some(pb::frame::Signal::Image(bytes)),
    }
}

/// `framematch hash`: hashes each file locally, printing a line per file. A file that fails is
/// reported on stderr and the rest go on; the exit code is 2 if any failed.
pub fn hash_files(files: &[PathBuf], dihedral: bool) -> ExitCode {
    let limits = DecodeLimits::default();
    let mut failed = false;
    for path in files {
        let result = read_file(path).and_then(|bytes| {
            pdq::hash_image_bytes(&bytes, &limits).map_err(|source| Error::Hash {
                path: path.clone(),
                source,
            })
        });
        match result {
            Ok(output) => {
                let mut line = format!("{},{},{}", output.hash(), output.quality(), path.display());
                if dihedral {
                    for variant in Dihedral::ALL.into_iter().skip(1) {
                        line.push(',');
                        line.push_str(&output.variant(variant).to_hex());
                    }
                }
                println!("{line}");
            }
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

/// `framematch bank …`
///
/// # Errors
/// Connection and RPC failures.
pub async fn bank(command: BankCommand, server: &str) -> Result<(), Error> {
    let mut client = pb::banks_client::BanksClient::new(connect(server).await?);
    match command {
        BankCommand::Create {
            name,
            category,
            description,
        } => {
            let bank = client
                .create_bank(pb::CreateBankRequest {
                    name: name.clone(),
                    category: crate::api::convert::category_to_pb(category) as i32,
                    description,
                })
                .await
                .map_err(|s| rpc_error(format!("creating bank {name}"), s))?
                .into_inner();
            println!("{}\t{}", bank.id, bank.name);
        }
        BankCommand::List => {
            let banks = client
                .list_banks(pb::ListBanksRequest {})
                .await
                .map_err(|s| rpc_error("listing banks", s))?
                .into_inner()
                .banks;
            for bank in banks {
                println!(
                    "{}\t{}\t{}\t{}",
                    bank.id,
                    bank.name,
                    category_name(bank.category),
                    bank.owner
                );
            }
        }
    }
    Ok(())
}

fn category_name(value: i32) -> &'static str {
    crate::api::convert::category_from_pb(value).map_or("unspecified", Category::as_str)
}

/// `framematch ref …`
///
/// # Errors
/// File, connection and RPC failures.
pub async fn reference(command: RefCommand, server: &str) -> Result<(), Error> {
    let mut client = pb::banks_client::BanksClient::new(connect(server).await?);
    match command {
        RefCommand::Add {
            bank,
            files,
            note,
            external_id,
        } => {
            if !external_id.is_empty() && files.len() > 1 {
                return Err(Error::Usage(
                    "--external-id names one reference; give a single file with it".into(),
                ));
            }
            for path in files {
                let bytes = read_file(&path)?;
                let messages = vec![
                    pb::AddReferenceRequest {
                        item: Some(pb::add_reference_request::Item::Header(
                            pb::ReferenceHeader {
                                bank: bank.clone(),
                                external_id: external_id.clone(),
                                note: note.clone(),
                            },
                        )),
                    },
                    pb::AddReferenceRequest {
                        item: Some(pb::add_reference_request::Item::Frame(image_frame(bytes))),
                    },
                ];
                let added = client
                    .add_reference(tokio_stream::iter(messages))
                    .await
                    .map_err(|s| rpc_error(format!("adding {}", path.display()), s))?
                    .into_inner();
                let id = added.reference.map_or(0, |r| r.id);
                println!("{id}\t{}", path.display());
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
            println!(
                "{}\twithdrawn\t{}",
                reference.id, reference.withdrawn_reason
            );
        }
        RefCommand::Get { id } => {
            let r = client
                .get_reference(pb::GetReferenceRequest { reference_id: id })
                .await
                .map_err(|s| rpc_error(format!("reading reference {id}"), s))?
                .into_inner();
            let state = match pb::ReferenceState::try_from(r.state) {
                Ok(pb::ReferenceState::Withdrawn) => "withdrawn",
                Ok(pb::ReferenceState::Active) => "active",
                Ok(pb::ReferenceState::Unspecified) | Err(_) => "unknown",
            };
            println!("id\t{}", r.id);
            println!("bank\t{}", r.bank);
            println!("state\t{state}");
            println!("frames\t{}", r.frame_count);
            println!("external_id\t{}", r.external_id);
            println!("note\t{}", r.note);
            println!("added_by\t{}", r.added_by);
            println!("added_ms\t{}", r.added_ms);
            if !r.withdrawn_reason.is_empty() {
                println!("withdrawn_reason\t{}", r.withdrawn_reason);
                println!("withdrawn_ms\t{}", r.withdrawn_ms);
            }
        }
    }
    Ok(())
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
    server: &str,
) -> Result<bool, Error> {
    let mut client = pb::matcher_client::MatcherClient::new(connect(server).await?);
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
            println!(
                "{}\t{}\t{}\t{}",
                path.display(),
                source.reference_id,
                source.bank,
                m.distance
            );
        }
    }
    Ok(matched)
}

/// `framematch stats`
///
/// # Errors
/// Connection and RPC failures.
pub async fn stats(server: &str) -> Result<(), Error> {
    let mut client = pb::banks_client::BanksClient::new(connect(server).await?);
    let s = client
        .stats(pb::StatsRequest {})
        .await
        .map_err(|s| rpc_error("reading stats", s))?
        .into_inner();
    println!("banks\t{}", s.banks);
    println!("active_references\t{}", s.active_references);
    println!("withdrawn_references\t{}", s.withdrawn_references);
    println!("stored_frames\t{}", s.stored_frames);
    println!("indexed_frames\t{}", s.indexed_frames);
    println!("index_tombstones\t{}", s.index_tombstones);
    println!("index_engine\t{}", s.index_engine);
    println!("index_memory_bytes\t{}", s.index_memory_bytes);
    println!("last_change_seq\t{}", s.last_change_seq);
    println!("open_streams\t{}", s.open_streams);
    Ok(())
}

//! The one place where errors become gRPC status codes (STYLE.md §3.3).
//!
//! Every variant is matched exhaustively, with no wildcard arm, so a new error variant does not
//! compile until someone chooses its code. Client errors carry their detail back to the client;
//! internal errors are logged once here with their whole chain, and the client gets a short
//! message without paths or SQL.

use tonic::{Code, Status};

use crate::hash::pdq;
use crate::store;

/// Everything a request can fail with at the gRPC edge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required field is absent.
    #[error("missing {field}")]
    MissingField {
        /// The field's path in the message.
        field: &'static str,
    },
    /// A field is malformed or out of range.
    #[error("{field} {reason}")]
    InvalidField {
        /// The field's path in the message.
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// Input over one of the server's limits.
    #[error("{what} is {actual} {unit}, limit is {limit} {unit}")]
    OverLimit {
        /// What was measured.
        what: &'static str,
        /// Its size.
        actual: u64,
        /// The limit.
        limit: u64,
        /// The unit of both.
        unit: &'static str,
    },
    /// The server is at capacity for this kind of work.
    #[error("{what} is full ({limit} at most); retry later")]
    Busy {
        /// What is full.
        what: &'static str,
        /// Its capacity.
        limit: usize,
    },
    /// A picture whose decode needs more memory than the server's whole decode budget.
    #[error(
        "image is {width}x{height} pixels; decoding and hashing it needs {needed} bytes, more than the server's whole decode budget of {budget} bytes (--decode-memory); send a smaller picture"
    )]
    DecodeBudget {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// Its working set.
        needed: u64,
        /// The budget.
        budget: u64,
    },
    /// Messages out of the protocol's order.
    #[error("{0}")]
    Protocol(&'static str),
    /// A bank name that does not exist.
    #[error("bank {name:?} not found")]
    UnknownBank {
        /// The name asked for.
        name: String,
    },
    /// The image could not be hashed.
    #[error(transparent)]
    Hash(#[from] pdq::Error),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// The index is still loading.
    #[error("the index is still loading; retry shortly")]
    NotReady,
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A hashing worker died (a bug).
    #[error("hashing worker failed: {0}")]
    Worker(String),
    /// A model could not compute a frame's vector.
    #[error("embedding space {space}: the model failed on this frame: {reason}")]
    Embedding {
        /// The space whose model failed.
        space: String,
        /// What failed.
        reason: String,
    },
    /// The caller's key may not do this.
    #[error(transparent)]
    Denied(#[from] crate::auth::Denied),
    /// A reference that does not exist, or that lives in a bank the caller may not see (the two
    /// are indistinguishable on purpose).
    #[error("reference {id} not found")]
    UnknownReference {
        /// The id asked for.
        id: i64,
    },
    /// An organisation name that does not exist.
    #[error("organisation {name:?} not found")]
    UnknownOrg {
        /// The name asked for.
        name: String,
    },
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = code_of(&error);
        match code {
            Code::Internal | Code::DataLoss | Code::Unknown => {
                tracing::error!(error = %error_chain(&error), ?code, "request failed");
                Status::new(code, "internal error; the server log has the details")
            }
            Code::Ok
            | Code::Cancelled
            | Code::InvalidArgument
            | Code::DeadlineExceeded
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Unavailable
            // Client errors say what is wrong, with the cause (a decoder's reason, say).
            | Code::Unauthenticated => Status::new(code, error_chain(&error)),
        }
    }
}

/// The gRPC code for an error.
pub fn code_of(error: &Error) -> Code {
    match error {
        Error::MissingField { .. } | Error::InvalidField { .. } | Error::Protocol(_) => {
            Code::InvalidArgument
        }
        Error::OverLimit { .. } | Error::Busy { .. } | Error::DecodeBudget { .. } => {
            Code::ResourceExhausted
        }
        Error::UnknownBank { .. } | Error::UnknownReference { .. } | Error::UnknownOrg { .. } => {
            Code::NotFound
        }
        Error::Denied(_) => Code::PermissionDenied,
        Error::Hash(e) => pdq_code(e),
        Error::Store(e) => store_code(e),
        Error::NotReady | Error::ShuttingDown => Code::Unavailable,
        Error::Worker(_) | Error::Embedding { .. } => Code::Internal,
    }
}

fn pdq_code(error: &pdq::Error) -> Code {
    match error {
        pdq::Error::TooManyBytes { .. }
        | pdq::Error::TooManyPixels { .. }
        | pdq::Error::TooManyDecodedBytes { .. } => Code::ResourceExhausted,
        pdq::Error::Empty
        | pdq::Error::UnknownFormat
        | pdq::Error::Decode { .. }
        | pdq::Error::Truncated { .. }
        | pdq::Error::RgbLength { .. }
        | pdq::Error::LumaLength { .. }
        | pdq::Error::ZeroSize { .. } => Code::InvalidArgument,
    }
}

fn store_code(error: &store::Error) -> Code {
    match error {
        store::Error::NotFound { .. } => Code::NotFound,
        store::Error::AlreadyExists { .. } => Code::AlreadyExists,
        store::Error::AlreadyWithdrawn { .. } | store::Error::AlreadyRevoked { .. } => {
            Code::FailedPrecondition
        }
        store::Error::InvalidInput { .. } => Code::InvalidArgument,
        // The request is well formed; the server's existing declaration of the space is not
        // the one asked for.
        store::Error::SpaceConflict { .. } => Code::FailedPrecondition,
        store::Error::Corrupt { .. } => Code::DataLoss,
        // Start-up conditions: a request never sees them, but the mapping stays total.
        store::Error::SchemaTooNew { .. } | store::Error::PragmaNotApplied { .. } => {
            Code::FailedPrecondition
        }
        store::Error::UnsafeSetting { .. } => Code::FailedPrecondition,
        store::Error::Unavailable { .. } => Code::Unavailable,
        store::Error::Sqlite(_)
        | store::Error::Io { .. }
        | store::Error::TaskFailed(_)
        | store::Error::Postgres(_) => Code::Internal,
    }
}

/// The error and its sources, joined with ": ".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ReferenceId;

    #[test]
    fn each_error_has_its_code() {
        let cases: Vec<(Error, Code)> = vec![
            (
                Error::MissingField { field: "frame" },
                Code::InvalidArgument,
            ),
            (
                Error::InvalidField {
                    field: "frame.pdq.hash",
                    reason: "x".into(),
                },
                Code::InvalidArgument,
            ),
            (
                Error::OverLimit {
                    what: "frame.image",
                    actual: 2,
                    limit: 1,
                    unit: "bytes",
                },
                Code::ResourceExhausted,
            ),
            (
                Error::Busy {
                    what: "streams",
                    limit: 1,
                },
                Code::ResourceExhausted,
            ),
            (Error::Protocol("x"), Code::InvalidArgument),
            (
                Error::DecodeBudget {
                    width: 1,
                    height: 1,
                    needed: 2,
                    budget: 1,
                },
                Code::ResourceExhausted,
            ),
            (
                Error::Hash(pdq::Error::TooManyDecodedBytes {
                    width: 7071,
                    height: 7071,
                    color: "16-bit RGBA",
                    bytes: 399_992_328,
                    limit: 268_435_456,
                }),
                Code::ResourceExhausted,
            ),
            (Error::UnknownBank { name: "b".into() }, Code::NotFound),
            (Error::Hash(pdq::Error::Empty), Code::InvalidArgument),
            (
                Error::Hash(pdq::Error::UnknownFormat),
                Code::InvalidArgument,
            ),
            (
                Error::Hash(pdq::Error::TooManyPixels {
                    width: 50_000,
                    height: 50_000,
                    limit: 1,
                }),
                Code::ResourceExhausted,
            ),
            (
                Error::Store(store::Error::NotFound {
                    kind: "reference",
                    key: "1".into(),
                }),
                Code::NotFound,
            ),
            (
                Error::Store(store::Error::AlreadyExists {
                    kind: "bank",
                    key: "b".into(),
                }),
                Code::AlreadyExists,
            ),
            (
                Error::Store(store::Error::AlreadyWithdrawn {
                    reference: ReferenceId(1),
                }),
                Code::FailedPrecondition,
            ),
            (
                Error::Store(store::Error::Corrupt { detail: "x".into() }),
                Code::DataLoss,
            ),
            (
                Error::Store(store::Error::SpaceConflict {
                    space: "sscd".into(),
                    dimension: 512,
                    metric: crate::model::Metric::Cosine,
                    asked_dimension: 256,
                    asked_metric: crate::model::Metric::Cosine,
                }),
                Code::FailedPrecondition,
            ),
            (Error::NotReady, Code::Unavailable),
            (Error::ShuttingDown, Code::Unavailable),
            (Error::Worker("x".into()), Code::Internal),
            (Error::UnknownReference { id: 4 }, Code::NotFound),
            (Error::UnknownOrg { name: "o".into() }, Code::NotFound),
            (
                Error::Denied(crate::auth::Denied::Role {
                    needed: crate::model::Role::Admin,
                    actual: crate::model::Role::Matcher,
                }),
                Code::PermissionDenied,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(code_of(&error), code, "{error}");
            assert_eq!(Status::from(error).code(), code);
        }
    }

    #[test]
    fn internal_errors_do_not_leak_details() {
        let status = Status::from(Error::Worker("/secret/path".into()));
        assert!(!status.message().contains("/secret"));
    }

    #[test]
    fn limit_messages_give_the_numbers() {
        let status = Status::from(Error::OverLimit {
            what: "frame.image",
            actual: 20,
            limit: 16,
            unit: "bytes",
        });
        assert_eq!(
            status.message(),
            "frame.image is 20 bytes, limit is 16 bytes"
        );
    }
}

//! The server's own embedding models (issue #11): an ONNX graph run by ONNX Runtime through `ort`,
//! turning a picture into the L2-normalised descriptor of one embedding space (SSCD by default).
//!
//! ONNX Runtime is not linked: `ort`'s `load-dynamic` feature opens the `libonnxruntime` shared
//! library that the `onnxruntime` PyPI wheel ships (`.ci/fetch-models` fetches it and the model
//! files; their licence forbids committing them). The library is opened once per process
//! ([`init_runtime`]); every model after the first reuses it.
//!
//! Invariant: nothing here panics on a missing or broken file. `ort` itself panics when its first
//! call finds no library, so [`OnnxModel::open`] always loads the library explicitly first, after
//! checking that the file exists.

mod onnx;
mod windows;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

pub use onnx::{OnnxModel, resize};
pub use windows::{MAX_WINDOWS, Windows};

use crate::model::Metric;

/// The space name `--embedding-space` defaults to.
pub const DEFAULT_SPACE: &str = "sscd";

/// The input size `--embedding-input` defaults to: square, as SSCD was trained, and the size at
/// which the int8 ResNet50 costs about 50 ms per frame on one core.
pub const DEFAULT_INPUT: InputSize = InputSize {
    width: 320,
    height: 320,
};

/// The threshold `--embedding-threshold` defaults to: the cosine at or above which a reference
/// frame matches, for banks that declare the space without their own threshold. Chosen by the
/// robustness study (`bench/robustness/`): with `sscd_distilled` at 320x320 no innocent video
/// reached it, through the real server or offline, while 94 % of the edited re-uploads did.
pub const DEFAULT_THRESHOLD: f32 = 0.39;

/// What to tell the operator when a file the model needs is missing.
const FETCH_HINT: &str = "run `eval \"$(.ci/fetch-models)\"` (README \"Embedding model\")";

/// The width and height a picture is resized to before it enters the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputSize {
    /// Pixels across.
    pub width: u32,
    /// Pixels down.
    pub height: u32,
}

impl InputSize {
    /// Largest side accepted: the models are convolutional and take any size, but past this one
    /// frame costs seconds.
    pub const MAX_SIDE: u32 = 2048;
    /// Smallest side accepted: below it the ResNet's 32x downsampling leaves nothing.
    pub const MIN_SIDE: u32 = 32;
}

impl fmt::Display for InputSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl FromStr for InputSize {
    type Err = String;

    /// `WxH`, e.g. `320x320` or `512x288`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (w, h) = text
            .split_once(['x', 'X'])
            .ok_or_else(|| format!("{text:?}: expected WIDTHxHEIGHT, e.g. 320x320"))?;
        let side = |s: &str| {
            s.trim()
                .parse::<u32>()
                .ok()
                .filter(|v| (Self::MIN_SIDE..=Self::MAX_SIDE).contains(v))
                .ok_or_else(|| {
                    format!(
                        "{text:?}: each side must be a whole number from {} to {}",
                        Self::MIN_SIDE,
                        Self::MAX_SIDE
                    )
                })
        };
        Ok(Self {
            width: side(w)?,
            height: side(h)?,
        })
    }
}

/// One model the server runs: which space it serves, where its graph is, and how it is fed.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The embedding space's name, as banks declare it.
    pub space: String,
    /// The `.onnx` file.
    pub model: PathBuf,
    /// The ONNX Runtime shared library (`libonnxruntime.so...`).
    pub runtime: PathBuf,
    /// The size pictures are resized to.
    pub input: InputSize,
    /// The cosine at or above which a reference frame matches, for banks that declare the space
    /// without a threshold.
    pub threshold: f32,
    /// Most ONNX Runtime sessions kept, each running one frame at a time on one thread (a session
    /// runs one call at a time); the server uses one per hashing worker.
    pub sessions: usize,
}

/// Why a model could not be opened or checked at start-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file does not exist.
    #[error("embedding model {}: no such file; {FETCH_HINT}", path.display())]
    ModelMissing {
        /// The configured `--embedding-model`.
        path: PathBuf,
    },
    /// The ONNX Runtime library does not exist.
    #[error("ONNX Runtime library {}: no such file; {FETCH_HINT}", path.display())]
    RuntimeMissing {
        /// The configured `--onnxruntime` (or `ORT_DYLIB_PATH`).
        path: PathBuf,
    },
    /// The library exists but could not be loaded (not a shared library, too old a version).
    #[error("ONNX Runtime library {}: {reason}", path.display())]
    Runtime {
        /// The library.
        path: PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// A second model asked for a different library than the one already loaded.
    #[error(
        "ONNX Runtime library {}: this process already loaded {}, and one process loads one",
        requested.display(),
        loaded.display()
    )]
    OtherRuntime {
        /// The library asked for now.
        requested: PathBuf,
        /// The library loaded first.
        loaded: PathBuf,
    },
    /// ONNX Runtime could not build a session from the file, or the graph is not an embedding
    /// model of the expected shape.
    #[error("embedding model {}: {reason}", path.display())]
    Model {
        /// The model file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// The library this process loaded, once.
static RUNTIME: OnceLock<PathBuf> = OnceLock::new();

/// Loads the ONNX Runtime shared library at `path` for this process, once; later calls with the
/// same path do nothing.
///
/// # Errors
/// [`Error::RuntimeMissing`] when there is no such file, [`Error::Runtime`] when it is not a
/// usable ONNX Runtime, [`Error::OtherRuntime`] when another library is already loaded.
pub fn init_runtime(path: &Path) -> Result<(), Error> {
    if !path.is_file() {
        return Err(Error::RuntimeMissing {
            path: path.to_path_buf(),
        });
    }
    if let Some(loaded) = RUNTIME.get() {
        return if loaded == path {
            Ok(())
        } else {
            Err(Error::OtherRuntime {
                requested: path.to_path_buf(),
                loaded: loaded.clone(),
            })
        };
    }
    let runtime_error = |reason: String| Error::Runtime {
        path: path.to_path_buf(),
        reason,
    };
    // `init_from` opens the library (once per process: ort keeps the first); `commit` sets the
    // global environment's options, which only the first commit does.
    let builder = ort::init_from(path).map_err(|e| runtime_error(e.to_string()))?;
    let _first = builder.commit();
    let _ = RUNTIME.set(path.to_path_buf());
    match RUNTIME.get() {
        Some(loaded) if loaded == path => Ok(()),
        Some(loaded) => Err(Error::OtherRuntime {
            requested: path.to_path_buf(),
            loaded: loaded.clone(),
        }),
        None => Err(runtime_error(
            "the library was not recorded as loaded".into(),
        )),
    }
}

/// Scales `vector` to unit length in place. A zero or non-finite vector is refused: it has no
/// direction, and would match everything or nothing.
///
/// # Errors
/// A description naming the offending length.
pub fn l2_normalise(vector: &mut [f32]) -> Result<(), String> {
    let norm = vector
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt();
    if !norm.is_finite() || norm <= f64::from(f32::MIN_POSITIVE) {
        return Err(format!(
            "the model's output has no direction (L2 norm {norm}); it cannot be normalised"
        ));
    }
    for v in vector.iter_mut() {
        *v = (f64::from(*v) / norm) as f32;
    }
    Ok(())
}

/// A model that turns a picture into a vector of one embedding space: the plug-in point through
/// which the server computes descriptors (SSCD through ONNX Runtime today; a platform's own model
/// tomorrow).
pub trait SpaceModel: Send + Sync {
    /// The space's name.
    fn name(&self) -> &str;
    /// The vector length.
    fn dimension(&self) -> u32;
    /// How the vectors compare.
    fn metric(&self) -> Metric;
    /// The picture's vector (L2-normalised for cosine spaces).
    ///
    /// # Errors
    /// A description of what failed, for the log and the client.
    fn embed(&self, picture: &image::RgbImage) -> Result<Vec<f32>, String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_sizes_parse_and_print() {
        let size: InputSize = "512x288".parse().expect("valid");
        assert_eq!(
            size,
            InputSize {
                width: 512,
                height: 288
            }
        );
        assert_eq!(size.to_string(), "512x288");
        assert_eq!(DEFAULT_INPUT.to_string(), "320x320");
        for bad in ["320", "x320", "0x320", "320x99999", "axb", "16x16"] {
            assert!(bad.parse::<InputSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn normalising_gives_unit_length_and_refuses_zero() {
        let mut v = vec![3.0, 4.0];
        l2_normalise(&mut v).expect("normalisable");
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert!(l2_normalise(&mut [0.0, 0.0]).is_err());
        assert!(l2_normalise(&mut [f32::NAN, 1.0]).is_err());
    }

    #[test]
    fn a_missing_runtime_is_named_with_the_fix() {
        let error = init_runtime(Path::new("/nonexistent/libonnxruntime.so")).expect_err("missing");
        let text = error.to_string();
        assert!(
            text.contains("/nonexistent/libonnxruntime.so: no such file"),
            "{text}"
        );
        assert!(text.contains(".ci/fetch-models"), "{text}");
    }
}

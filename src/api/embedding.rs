//! The embedding side of the match path (issue #11): which spaces a request searches and at what
//! thresholds, which upload frames are worth the model's time, and the vectors a frame is searched
//! with (the client's own, checked against the spaces in scope, and the server's).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;

use crate::api::{BankFilter, Catalog, Error};
use crate::hash::border;
use crate::matching::{QueryEmbedding, SpaceScope};
use crate::model::Metric;

use crate::embed::{SpaceModel, Windows};

/// Whether `model` computes the vectors of the space `name` as declared: same name, dimension
/// and metric (a partner's bank may declare a space of the same name differently).
pub fn serves(model: &dyn SpaceModel, name: &str, dimension: u32, metric: Metric) -> bool {
    model.name() == name && model.dimension() == dimension && model.metric() == metric
}

/// The server's models that serve a space in `scopes`.
pub fn models_in_scope(
    models: &[Arc<dyn SpaceModel>],
    scopes: &[SpaceScope],
) -> Vec<Arc<dyn SpaceModel>> {
    models
        .iter()
        .filter(|m| {
            scopes
                .iter()
                .any(|s| serves(m.as_ref(), &s.space, s.dimension, s.metric))
        })
        .cloned()
        .collect()
}

/// The vectors of a decoded picture in each of `models`' spaces: of the whole picture and, given
/// its `content_area` inside borders (letterbox, pillarbox, 16:9 inside 9:16: what
/// [`border::content_area`] found while hashing), of that area too, so a re-upload that added or
/// removed bars still meets the reference's vector; then of each of `windows` (uploads only: a
/// reference shown small inside another picture). Returns them with the time the models took.
///
/// # Errors
/// [`Error::Embedding`] when a model fails.
pub fn embed_picture(
    models: &[Arc<dyn SpaceModel>],
    picture: &RgbImage,
    content_area: Option<border::Rect>,
    windows: &Windows,
) -> Result<(Vec<QueryEmbedding>, Duration), Error> {
    let started = Instant::now();
    let mut out = Vec::new();
    if models.is_empty() {
        return Ok((out, started.elapsed()));
    }
    let width = picture.width();
    let cut = |area: border::Rect| {
        RgbImage::from_raw(
            area.width,
            area.height,
            border::crop_rgb(width, picture.as_raw(), area),
        )
    };
    let content = content_area.and_then(cut);
    let parts: Vec<(border::Rect, RgbImage)> = windows
        .rects(width, picture.height())
        .into_iter()
        .filter_map(|rect| cut(rect).map(|part| (rect, part)))
        .collect();
    for model in models {
        let embed = |p: &RgbImage| {
            model.embed(p).map_err(|reason| Error::Embedding {
                space: model.name().to_string(),
                reason,
            })
        };
        let space: Arc<str> = Arc::from(model.name());
        out.push(QueryEmbedding {
            space: Arc::clone(&space),
            vector: embed(picture)?,
            content_area: false,
            window: None,
        });
        if let Some(area) = &content {
            out.push(QueryEmbedding {
                space: Arc::clone(&space),
                vector: embed(area)?,
                content_area: true,
                window: None,
            });
        }
        for (rect, part) in &parts {
            out.push(QueryEmbedding {
                space: Arc::clone(&space),
                vector: embed(part)?,
                content_area: false,
                window: Some(*rect),
            });
        }
    }
    Ok((out, started.elapsed()))
}

/// The embedding spaces the banks of `filter` declare, each with every declaring bank's
/// threshold, in name order.
pub fn space_scopes(catalog: &Catalog, filter: &BankFilter) -> Vec<SpaceScope> {
    let mut scopes: HashMap<&str, SpaceScope> = HashMap::new();
    for bank in catalog.banks().filter(|bank| filter.allows(bank.id)) {
        for space in &bank.embedding_spaces {
            scopes
                .entry(space.name.as_str())
                .or_insert_with(|| SpaceScope {
                    space: Arc::from(space.name.as_str()),
                    dimension: space.dimension,
                    metric: space.metric,
                    thresholds: HashMap::new(),
                })
                .thresholds
                .insert(bank.id, space.threshold);
        }
    }
    let mut scopes: Vec<SpaceScope> = scopes.into_values().collect();
    scopes.sort_by(|a, b| a.space.cmp(&b.space));
    scopes
}

/// Picks the upload frames the server embeds: the model costs about a hundred times PDQ, so, as
/// vPDQ samples one frame per second, a frame is embedded when at least `interval_ms` of the
/// upload's clock passed since the last embedded one (the first frame always is). Frames arrive in
/// order of the client's choosing; a frame earlier than the last embedded one is not embedded.
#[derive(Clone, Copy, Debug)]
pub struct EmbedSampler {
    interval_ms: u64,
    next_due_ms: Option<u64>,
}

impl EmbedSampler {
    /// A sampler embedding one frame per `interval_ms` (0: every frame).
    pub fn new(interval_ms: u64) -> Self {
        Self {
            interval_ms,
            next_due_ms: None,
        }
    }

    /// Whether the frame at `timestamp_ms` is to be embedded; if so, it becomes the last one.
    pub fn due(&mut self, timestamp_ms: u64) -> bool {
        if self.next_due_ms.is_some_and(|next| timestamp_ms < next) {
            return false;
        }
        self.next_due_ms = Some(timestamp_ms.saturating_add(self.interval_ms));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_frame_per_interval_is_embedded() {
        let mut sampler = EmbedSampler::new(1000);
        let due: Vec<u64> = (0..100)
            .map(|i| i * 40)
            .filter(|&t| sampler.due(t))
            .collect();
        assert_eq!(due, vec![0, 1000, 2000, 3000]);
        let mut every = EmbedSampler::new(0);
        assert!((0..5).all(|t| every.due(t)));
    }
}

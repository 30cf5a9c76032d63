//! The embedding side of the match path (issue #11): which spaces a request searches and at what
//! thresholds, which upload frames are worth the model's time, and the vectors a frame is searched
//! with (the client's own, checked against the spaces in scope, and the server's).

use std::collections::HashMap;
use std::sync::Arc;

use crate::api::{BankFilter, Catalog};
use crate::matching::SpaceScope;

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

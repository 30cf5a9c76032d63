//! The graph engine of a vector space: an HNSW graph built by hnsw_rs, then flattened into
//! compact adjacency arrays and searched here.
//!
//! hnsw_rs keeps, per point, an `Arc<Point>` with its own copy of the data and, per link, a
//! separately allocated `Arc<PointWithOrder>`: about 2.4 KB per point at M=16 (see
//! `super::super::hnsw`), four times the whole budget of a frame. So the graph is built by
//! hnsw_rs over entry ids (the distance looks the codes up in [`Codes`], so hnsw_rs's copy of a
//! point is one `u32`), its links are copied out into
//! - layer 0: one offset per node (`u32`) and the neighbour ids (`u32`, at most `2 M` per node),
//! - upper layers (about one node in `M`): per layer a sorted node list and its own offsets,
//!
//! and hnsw_rs's structure is dropped. That is `4 + 4 × degree` bytes per vector (about 100 at
//! M=16) beside the codes. A search is the usual HNSW descent: greedy through the upper layers,
//! then a beam of width `ef` over layer 0, scoring every visited node by the query (prepared
//! once as integers, [`Query`]) against its int8 code (the same score the flat scan gives, so the best candidates come out re-scored
//! already). The graph is immutable: entries added after the build are the owner's flat tail.

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::mem::size_of;
use std::sync::Arc;

use anndists::dist::Distance;
use hnsw_rs::hnsw::Hnsw;

use super::codes::{Codes, Query};

/// hnsw_rs caps layers at 16.
const MAX_LAYERS: usize = 16;

/// hnsw_rs's distance between two stored vectors, looked up by entry id: `offset - a · b`,
/// which is >= 0 as hnsw_rs requires (`offset` exceeds every stored squared norm, and
/// `a · b <= |a| |b|`) and orders neighbours as the dot product does.
struct CodeDistance {
    codes: Arc<Codes>,
    offset: f32,
}

impl Distance<u32> for CodeDistance {
    fn eval(&self, va: &[u32], vb: &[u32]) -> f32 {
        match (va.first(), vb.first()) {
            (Some(&a), Some(&b)) => (self.offset - self.codes.code_dot(a, b)).max(0.0),
            _ => self.offset,
        }
    }
}

/// Adjacency lists of one layer in CSR form: node `nodes[i]`'s neighbours are
/// `links[offsets[i]..offsets[i + 1]]`. Layer 0 lists every node, so `nodes` is empty there and
/// the position is the node id.
#[derive(Clone, Debug, Default)]
struct Layer {
    nodes: Vec<u32>,
    offsets: Vec<u32>,
    links: Vec<u32>,
}

impl Layer {
    fn neighbours(&self, node: u32) -> &[u32] {
        let position = if self.nodes.is_empty() {
            Some(node as usize)
        } else {
            self.nodes.binary_search(&node).ok()
        };
        let Some(i) = position else {
            return &[];
        };
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&start), Some(&end)) => {
                self.links.get(start as usize..end as usize).unwrap_or(&[])
            }
            _ => &[],
        }
    }

    fn memory_bytes(&self) -> usize {
        (self.nodes.capacity() + self.offsets.capacity() + self.links.capacity()) * size_of::<u32>()
    }
}

/// An immutable HNSW graph over entries `0..len`.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// `layers[0]` is the base layer.
    layers: Vec<Layer>,
    entry: u32,
    len: usize,
}

/// A candidate during the search, ordered by score.
#[derive(Clone, Copy, Debug)]
struct Scored {
    score: f32,
    id: u32,
}

impl PartialEq for Scored {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.id.cmp(&self.id))
    }
}

/// The reverse order, for min-heaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Worst(std::cmp::Reverse<Scored>);

/// Visited nodes, one bit each, kept per thread between searches (a fresh bitset per search
/// was a 125 KB allocation, zeroed, per query at 1M entries); only the words a search touched
/// are cleared after it.
#[derive(Default)]
struct Visited {
    words: Vec<u64>,
    touched: Vec<u32>,
}

impl Visited {
    /// Makes room for ids `0..n` (all clear).
    fn reset(&mut self, n: usize) {
        for &word in &self.touched {
            if let Some(w) = self.words.get_mut(word as usize) {
                *w = 0;
            }
        }
        self.touched.clear();
        let words = n.div_ceil(64);
        if self.words.len() < words {
            self.words.resize(words, 0);
        }
    }

    /// Marks `id`; whether it was new.
    #[inline]
    fn insert(&mut self, id: u32) -> bool {
        let (word, bit) = ((id / 64) as usize, id % 64);
        match self.words.get_mut(word) {
            Some(w) if *w & (1 << bit) == 0 => {
                if *w == 0 {
                    self.touched.push(word as u32);
                }
                *w |= 1 << bit;
                true
            }
            _ => false,
        }
    }
}

thread_local! {
    static VISITED: RefCell<Visited> = RefCell::new(Visited::default());
}

impl Graph {
    /// Builds the graph over every vector in `codes` with hnsw_rs (inserting on all cores) and
    /// flattens it. `max_connections` is clamped to 2..=256.
    pub fn build(codes: Arc<Codes>, max_connections: usize, ef_construction: usize) -> Self {
        let len = codes.len();
        if len == 0 {
            return Self::default();
        }
        let max_connections = max_connections.clamp(2, 256);
        let offset = codes.max_squared_norm() * 1.01 + 1e-3;
        let distance = CodeDistance {
            codes: Arc::clone(&codes),
            offset,
        };
        let hnsw: Hnsw<'static, u32, CodeDistance> = Hnsw::new(
            max_connections,
            len,
            MAX_LAYERS,
            ef_construction.max(max_connections),
            distance,
        );
        let ids: Vec<[u32; 1]> = (0..len as u32).map(|id| [id]).collect();
        let batch: Vec<(&[u32], usize)> = ids
            .iter()
            .map(|id| (id.as_slice(), id[0] as usize))
            .collect();
        hnsw.parallel_insert_slice(&batch);
        drop(batch);
        Self::flatten(&hnsw, len)
    }

    /// Copies hnsw_rs's links into CSR layers.
    fn flatten(hnsw: &Hnsw<'static, u32, CodeDistance>, len: usize) -> Self {
        let top = usize::from(hnsw.get_max_level_observed());
        // Per layer: (node, its neighbours' entry ids).
        let mut per_layer: Vec<Vec<(u32, Vec<u32>)>> = vec![Vec::new(); top + 1];
        let mut entry = 0u32;
        let mut entry_level = 0usize;
        for point in hnsw.get_point_indexation() {
            let Ok(id) = u32::try_from(point.get_origin_id()) else {
                continue;
            };
            let level = usize::from(point.get_point_id().0);
            if level > entry_level || (level == entry_level && id < entry) {
                entry_level = level;
                entry = id;
            }
            for (layer, neighbours) in point.get_neighborhood_id().into_iter().enumerate() {
                if layer > level || layer > top {
                    break;
                }
                let links: Vec<u32> = neighbours
                    .iter()
                    .filter_map(|n| u32::try_from(n.get_origin_id()).ok())
                    .collect();
                if let Some(list) = per_layer.get_mut(layer) {
                    list.push((id, links));
                }
            }
        }
        let mut layers = Vec::with_capacity(per_layer.len());
        for (layer, mut list) in per_layer.into_iter().enumerate() {
            list.sort_unstable_by_key(|(node, _)| *node);
            let total: usize = list.iter().map(|(_, l)| l.len()).sum();
            let mut built = Layer {
                nodes: Vec::new(),
                offsets: Vec::with_capacity(list.len() + 1),
                links: Vec::with_capacity(total),
            };
            if layer == 0 {
                // Every node is in layer 0; a node hnsw_rs somehow skipped gets an empty list.
                let mut lists = list.into_iter().peekable();
                for node in 0..len as u32 {
                    built.offsets.push(built.links.len() as u32);
                    if let Some((_, links)) = lists.next_if(|(n, _)| *n == node) {
                        built.links.extend(links);
                    }
                }
            } else {
                built.nodes.reserve_exact(list.len());
                for (node, links) in list {
                    built.nodes.push(node);
                    built.offsets.push(built.links.len() as u32);
                    built.links.extend(links);
                }
            }
            built.offsets.push(built.links.len() as u32);
            layers.push(built);
        }
        Self { layers, entry, len }
    }

    /// Entries in the graph (ids `0..len`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the graph is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `ef` best entries for `query` by `codes.score`, best first (fewer if the graph is
    /// smaller), written to `out` (cleared first).
    pub fn search(&self, codes: &Codes, query: &[f32], ef: usize, out: &mut Vec<(u32, f32)>) {
        self.search_query(codes, &Query::new(query), ef, out);
    }

    /// [`search`](Self::search) with a query prepared once ([`Codes::score_query`] scores).
    pub fn search_query(&self, codes: &Codes, query: &Query, ef: usize, out: &mut Vec<(u32, f32)>) {
        out.clear();
        if self.len == 0 || ef == 0 {
            return;
        }
        let mut current = Scored {
            score: codes.score_query(query, self.entry),
            id: self.entry,
        };
        for layer in self.layers.iter().skip(1).rev() {
            loop {
                let mut improved = false;
                for &next in layer.neighbours(current.id) {
                    let score = codes.score_query(query, next);
                    if score > current.score {
                        current = Scored { score, id: next };
                        improved = true;
                    }
                }
                if !improved {
                    break;
                }
            }
        }
        let Some(base) = self.layers.first() else {
            return;
        };
        VISITED.with_borrow_mut(|visited| {
            visited.reset(self.len);
            visited.insert(current.id);
            // Candidates to expand, best first; results kept, worst first.
            let mut candidates = BinaryHeap::with_capacity(ef * 2);
            let mut results: BinaryHeap<Worst> = BinaryHeap::with_capacity(ef + 1);
            candidates.push(current);
            results.push(Worst(std::cmp::Reverse(current)));
            while let Some(candidate) = candidates.pop() {
                let worst = results.peek().map_or(f32::NEG_INFINITY, |w| w.0.0.score);
                if results.len() >= ef && candidate.score < worst {
                    break;
                }
                for &next in base.neighbours(candidate.id) {
                    if !visited.insert(next) {
                        continue;
                    }
                    let score = codes.score_query(query, next);
                    let worst = results.peek().map_or(f32::NEG_INFINITY, |w| w.0.0.score);
                    if results.len() < ef || score > worst {
                        let scored = Scored { score, id: next };
                        candidates.push(scored);
                        results.push(Worst(std::cmp::Reverse(scored)));
                        if results.len() > ef {
                            results.pop();
                        }
                    }
                }
            }
            out.extend(results.into_iter().map(|w| (w.0.0.id, w.0.0.score)));
        });
        out.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    }

    /// Heap bytes of the adjacency arrays.
    pub fn memory_bytes(&self) -> usize {
        self.layers.iter().map(Layer::memory_bytes).sum::<usize>()
            + self.layers.capacity() * size_of::<Layer>()
    }

    /// Mean links per node in layer 0 (for reports).
    pub fn mean_degree(&self) -> f64 {
        match self.layers.first() {
            Some(base) if self.len > 0 => base.links.len() as f64 / self.len as f64,
            _ => 0.0,
        }
    }
}

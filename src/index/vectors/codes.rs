//! Compact vector storage: int8 scalar quantisation with one scale per vector.
//!
//! A vector `x` of `d` floats is stored as `d` signed bytes `c` and a scale `s = max |x_i| / 127`
//! with `c_i = round(x_i / s)`, so `x_i ≈ s c_i` within `s / 2`. That is `d + 4` bytes per vector
//! (516 for SSCD's 512 dimensions) against `4 d` for f32 and `2 d` for f16.
//!
//! Scores against a query keep the query in f32 (asymmetric): `q · x ≈ s Σ q_i c_i`; searches
//! prepare it once as 15-bit integers ([`Query`]) so that the sum runs in integer SIMD. For a unit
//! vector of 512 dimensions the error of one score is of the order of 10^-3 or less (measured in
//! the tests below against the f32 dot product); a match threshold sits far above that.

use std::mem::size_of;

use super::super::reserve;

/// Vectors of one dimension, quantised, by dense entry id (position).
#[derive(Clone, Debug, Default)]
pub struct Codes {
    dimension: usize,
    bytes: Vec<i8>,
    scales: Vec<f32>,
}

impl Codes {
    /// An empty store for vectors of `dimension` values.
    pub fn new(dimension: usize) -> Self {
        Self {
            dimension,
            bytes: Vec::new(),
            scales: Vec::new(),
        }
    }

    /// The vector length.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Vectors stored.
    pub fn len(&self) -> usize {
        self.scales.len()
    }

    /// Whether none is stored.
    pub fn is_empty(&self) -> bool {
        self.scales.is_empty()
    }

    /// Makes room for `additional` more vectors (growing by an eighth at least, see
    /// [`reserve`](super::super::reserve)).
    pub fn reserve(&mut self, additional: usize) {
        reserve(&mut self.bytes, additional * self.dimension);
        reserve(&mut self.scales, additional);
    }

    /// Quantises and appends `vector`, which must have [`dimension`](Self::dimension) finite
    /// values (the caller checks; the API refuses anything else).
    pub fn push(&mut self, vector: &[f32]) {
        debug_assert_eq!(vector.len(), self.dimension);
        let max = vector.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let scale = if max > 0.0 && max.is_finite() {
            max / 127.0
        } else {
            1.0
        };
        let inverse = 1.0 / scale;
        self.reserve(1);
        self.bytes.extend(
            vector
                .iter()
                .map(|x| (x * inverse).round().clamp(-127.0, 127.0) as i8),
        );
        self.scales.push(scale);
    }

    /// Appends stored vector `id` of `other` (same dimension) as it is, without re-quantising.
    pub fn push_from(&mut self, other: &Codes, id: u32) {
        if let Some((code, scale)) = other.get(id) {
            self.reserve(1);
            self.bytes.extend_from_slice(code);
            self.scales.push(scale);
        }
    }

    /// Vector `id`'s bytes and scale.
    #[inline]
    pub fn get(&self, id: u32) -> Option<(&[i8], f32)> {
        let id = id as usize;
        let scale = *self.scales.get(id)?;
        let start = id * self.dimension;
        Some((self.bytes.get(start..start + self.dimension)?, scale))
    }

    /// Vector `id` dequantised to floats.
    pub fn decode(&self, id: u32) -> Option<Vec<f32>> {
        let (code, scale) = self.get(id)?;
        Some(code.iter().map(|&c| f32::from(c) * scale).collect())
    }

    /// `query · vector id` with the query in full precision; 0 for an unknown id.
    #[inline]
    pub fn score(&self, query: &[f32], id: u32) -> f32 {
        match self.get(id) {
            Some((code, scale)) => dot_f32_i8(query, code) * scale,
            None => 0.0,
        }
    }

    /// [`score`](Self::score) for a query prepared once with [`Query::new`]: the query's values
    /// as 15-bit integers, so that the dot product runs in integers (SSE2's `pmaddwd` multiplies
    /// and adds 8 pairs a step, against 4 for f32 after widening each byte); what the integer
    /// query loses is below 10^-5 of a score, far under the int8 codes' own error.
    #[inline]
    pub fn score_query(&self, query: &Query, id: u32) -> f32 {
        match self.get(id) {
            Some((code, scale)) => dot_i16_i8(&query.values, code) as f32 * query.scale * scale,
            None => 0.0,
        }
    }

    /// `vector a · vector b`, both quantised (used while the graph is built).
    #[inline]
    pub fn code_dot(&self, a: u32, b: u32) -> f32 {
        match (self.get(a), self.get(b)) {
            (Some((ca, sa)), Some((cb, sb))) => dot_i8(ca, cb) as f32 * sa * sb,
            _ => 0.0,
        }
    }

    /// The largest squared norm of any stored vector (dequantised).
    pub fn max_squared_norm(&self) -> f32 {
        (0..self.len() as u32)
            .map(|id| self.code_dot(id, id))
            .fold(0.0, f32::max)
    }

    /// Heap bytes: the capacity of both arrays.
    pub fn memory_bytes(&self) -> usize {
        self.bytes.capacity() + self.scales.capacity() * size_of::<f32>()
    }
}

/// A query quantised for [`Codes::score_query`]: `query_i ≈ scale values_i` with
/// `|values_i| <= QUERY_MAX`.
#[derive(Clone, Debug, Default)]
pub struct Query {
    values: Vec<i16>,
    scale: f32,
}

/// The largest magnitude of a prepared query value: 2^14 - 1, so that a pair of products
/// (`pmaddwd`'s step) and 1024 products summed stay far below `i32::MAX`.
const QUERY_MAX: f32 = 16_383.0;

/// Values summed in `i32` before the running total moves to `i64` (keeps any dimension exact).
const BLOCK: usize = 1024;

impl Query {
    /// Quantises `query` (finite values; a zero or non-finite query scores 0 everywhere).
    pub fn new(query: &[f32]) -> Self {
        let max = query.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        if !(max > 0.0 && max.is_finite()) {
            return Self {
                values: vec![0; query.len()],
                scale: 0.0,
            };
        }
        let inverse = QUERY_MAX / max;
        Self {
            values: query
                .iter()
                .map(|x| (x * inverse).round().clamp(-QUERY_MAX, QUERY_MAX) as i16)
                .collect(),
            scale: max / QUERY_MAX,
        }
    }

    /// The vector length.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether it has no values.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// `Σ q_i c_i` in integers, exact. Written as a plain widening reduction, which LLVM turns into
/// `pmaddwd` on x86-64 (`cargo bench --bench vectors` measures it).
#[inline]
pub fn dot_i16_i8(query: &[i16], code: &[i8]) -> i64 {
    query
        .chunks(BLOCK)
        .zip(code.chunks(BLOCK))
        .map(|(q, c)| {
            let sum: i32 = q
                .iter()
                .zip(c)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            i64::from(sum)
        })
        .sum()
}

/// Lanes the dot products accumulate in: wide enough for the compiler to fill SSE registers and
/// keep several independent sums in flight.
const LANES: usize = 16;

/// `Σ q_i c_i` in f32.
#[inline]
pub fn dot_f32_i8(query: &[f32], code: &[i8]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let q_chunks = query.chunks_exact(LANES);
    let c_chunks = code.chunks_exact(LANES);
    let (q_tail, c_tail) = (q_chunks.remainder(), c_chunks.remainder());
    for (q, c) in q_chunks.zip(c_chunks) {
        for ((a, &x), &y) in acc.iter_mut().zip(q).zip(c) {
            *a += x * f32::from(y);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (&x, &y) in q_tail.iter().zip(c_tail) {
        sum += x * f32::from(y);
    }
    sum
}

/// `Σ a_i b_i` in i32 (exact: 4096 × 127² is far below 2^31). A plain widening reduction, which
/// LLVM turns into `pmaddwd`.
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&p, &q)| i32::from(p) * i32::from(q))
        .sum()
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn unit(rng: &mut StdRng, d: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect()
    }

    #[test]
    fn quantised_scores_stay_close_to_f32() {
        let mut rng = StdRng::seed_from_u64(31);
        // 19 dimensions exercise the tails of both loops.
        for d in [19usize, 512] {
            let vectors: Vec<Vec<f32>> = (0..200).map(|_| unit(&mut rng, d)).collect();
            let mut codes = Codes::new(d);
            for v in &vectors {
                codes.push(v);
            }
            assert_eq!(codes.len(), 200);
            let mut worst = 0.0f32;
            for _ in 0..20 {
                let q = unit(&mut rng, d);
                for (id, v) in vectors.iter().enumerate() {
                    let exact: f32 = q.iter().zip(v).map(|(a, b)| a * b).sum();
                    worst = worst.max((codes.score(&q, id as u32) - exact).abs());
                }
            }
            // Half a quantisation step per value: about 0.004 / sqrt(d) per score.
            assert!(worst < 0.01, "d {d}: worst score error {worst}");
            // The integer query scores as the f32 one does, to well under the codes' error.
            let mut apart = 0.0f32;
            for _ in 0..20 {
                let q = unit(&mut rng, d);
                let prepared = Query::new(&q);
                assert_eq!(prepared.len(), d);
                for id in 0..200u32 {
                    apart =
                        apart.max((codes.score_query(&prepared, id) - codes.score(&q, id)).abs());
                }
            }
            assert!(apart < 1e-4, "d {d}: integer query differs by {apart}");
            let self_dot = codes.code_dot(3, 3);
            assert!((self_dot - 1.0).abs() < 0.02, "{self_dot}");
            assert!((codes.max_squared_norm() - 1.0).abs() < 0.02);
        }
    }

    #[test]
    fn zero_vectors_and_copies() {
        let mut codes = Codes::new(4);
        codes.push(&[0.0; 4]);
        codes.push(&[0.5, -0.5, 0.25, 1.0]);
        assert_eq!(codes.score(&[1.0; 4], 0), 0.0);
        let decoded = codes.decode(1).unwrap_or_default();
        let original = [0.5f32, -0.5, 0.25, 1.0];
        assert_eq!(decoded.len(), 4);
        for (d, o) in decoded.iter().zip(original) {
            assert!((d - o).abs() <= 0.5 / 127.0 + 1e-6, "{decoded:?}");
        }
        assert_eq!(decoded[3], 1.0, "the largest value is exact");
        let mut copy = Codes::new(4);
        copy.push_from(&codes, 1);
        assert_eq!(copy.get(0), codes.get(1));
        assert_eq!(copy.get(1), None);
        assert_eq!(codes.score(&[1.0; 4], 9), 0.0);
        assert_eq!(codes.score_query(&Query::new(&[1.0; 4]), 9), 0.0);
        assert_eq!(codes.score_query(&Query::new(&[0.0; 4]), 1), 0.0);
        let prepared = Query::new(&[1.0; 4]);
        let expected = codes.score(&[1.0; 4], 1);
        assert!(
            (codes.score_query(&prepared, 1) - expected).abs() < 1e-3,
            "{expected}"
        );
        let long = vec![3i16; 2500];
        let ones = vec![-2i8; 2500];
        assert_eq!(
            dot_i16_i8(&long, &ones),
            -15_000,
            "blocks past 1024 values add up"
        );
        assert!(codes.memory_bytes() >= 2 * (4 + 4));
    }
}

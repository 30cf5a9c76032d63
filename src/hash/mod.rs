//! Frame signals: the 256-bit PDQ hash type and its distance.
//!
//! `PdqHash` stores the hash as the 32 bytes of its 64-hex-digit text form (shared/PDQ.md §1.7):
//! byte 0 holds bits 255..248, byte 31 bits 7..0, so `bytes.fromhex(hex)` in Python and
//! `PdqHash::from_bytes` agree, and the wire format (32 bytes) is the same as faiss/HMA use.
//! Distance is the Hamming distance over all 256 bits.

pub mod border;
pub mod pdq;
pub mod vpdq;

use std::fmt;
use std::str::FromStr;

/// Number of bits in a PDQ hash.
pub const PDQ_BITS: u32 = 256;
/// Number of bytes in a PDQ hash.
pub const PDQ_BYTES: usize = 32;
/// Meta's recommended match threshold: distance <= 31 (shared/PDQ.md §1.9).
pub const DEFAULT_MAX_DISTANCE: u32 = 31;
/// Frames of quality below this never match (shared/PDQ.md §1.9).
pub const DEFAULT_MIN_QUALITY: u8 = 50;

/// A 256-bit PDQ hash in the byte order of its hex form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PdqHash([u8; PDQ_BYTES]);

/// A string or byte slice that is not a PDQ hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The input has the wrong length.
    #[error("a PDQ hash is {expected} {unit}, got {actual}")]
    Length {
        /// Expected length.
        expected: usize,
        /// Actual length.
        actual: usize,
        /// "hex digits" or "bytes".
        unit: &'static str,
    },
    /// A character is not a hex digit.
    #[error("a PDQ hash is hex digits only, found {found:?} at position {position}")]
    NotHex {
        /// The offending character.
        found: char,
        /// Its 0-based position.
        position: usize,
    },
}

impl PdqHash {
    /// Wraps 32 bytes in hex-text order.
    pub const fn from_bytes(bytes: [u8; PDQ_BYTES]) -> Self {
        Self(bytes)
    }

    /// Parses 32 bytes from a slice.
    ///
    /// # Errors
    /// [`ParseError::Length`] when the slice is not 32 bytes long.
    pub fn try_from_slice(bytes: &[u8]) -> Result<Self, ParseError> {
        let array: [u8; PDQ_BYTES] = bytes.try_into().map_err(|_| ParseError::Length {
            expected: PDQ_BYTES,
            actual: bytes.len(),
            unit: "bytes",
        })?;
        Ok(Self(array))
    }

    /// The 32 bytes, in hex-text order.
    pub const fn as_bytes(&self) -> &[u8; PDQ_BYTES] {
        &self.0
    }

    /// Builds a hash from the reference's coefficient bit order: bit `k` (k = 16·row + column) of
    /// the 256-bit big-endian integer the hex form spells (shared/PDQ.md §1.7).
    pub fn from_bit_fn(mut bit: impl FnMut(usize) -> bool) -> Self {
        let mut bytes = [0u8; PDQ_BYTES];
        for k in 0..PDQ_BITS as usize {
            if bit(k) {
                bytes[PDQ_BYTES - 1 - k / 8] |= 1 << (k % 8);
            }
        }
        Self(bytes)
    }

    /// Bit `k` (0..256) in the reference's coefficient order.
    pub fn bit(&self, k: usize) -> bool {
        (self.0[PDQ_BYTES - 1 - k / 8] >> (k % 8)) & 1 == 1
    }

    /// The hash as four 64-bit words, for popcount scans. Any fixed word order works for distance;
    /// this one is big-endian chunks of the byte form.
    pub fn words(&self) -> [u64; 4] {
        let mut words = [0u64; 4];
        for (word, chunk) in words.iter_mut().zip(self.0.chunks_exact(8)) {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(chunk);
            *word = u64::from_be_bytes(buf);
        }
        words
    }

    /// Inverse of [`PdqHash::words`].
    pub fn from_words(words: [u64; 4]) -> Self {
        let mut bytes = [0u8; PDQ_BYTES];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_be_bytes());
        }
        Self(bytes)
    }

    /// Hamming distance: the number of differing bits, 0..=256.
    pub fn distance(&self, other: &Self) -> u32 {
        hamming(&self.words(), &other.words())
    }

    /// Number of set bits.
    pub fn popcount(&self) -> u32 {
        self.words().iter().map(|w| w.count_ones()).sum()
    }

    /// The lowercase 64-hex-digit form.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

/// Hamming distance between two hashes in word form. Always inlined, so the index engines' scan
/// loops compile to straight-line POPCNTs (x86-64-v2).
#[inline(always)]
pub fn hamming(a: &[u64; 4], b: &[u64; 4]) -> u32 {
    (a[0] ^ b[0]).count_ones()
        + (a[1] ^ b[1]).count_ones()
        + (a[2] ^ b[2]).count_ones()
        + (a[3] ^ b[3]).count_ones()
}

impl fmt::Display for PdqHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PdqHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PdqHash({self})")
    }
}

impl FromStr for PdqHash {
    type Err = ParseError;

    /// Parses 64 hex digits, either case (shared/PDQ.md §5: accept both, write lowercase).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let chars: Vec<char> = text.chars().collect();
        if chars.len() != 2 * PDQ_BYTES {
            return Err(ParseError::Length {
                expected: 2 * PDQ_BYTES,
                actual: chars.len(),
                unit: "hex digits",
            });
        }
        let mut bytes = [0u8; PDQ_BYTES];
        for (position, &found) in chars.iter().enumerate() {
            let nibble = found
                .to_digit(16)
                .ok_or(ParseError::NotHex { found, position })?;
            // to_digit(16) is < 16, so the cast cannot truncate.
            bytes[position / 2] |= (nibble as u8) << if position % 2 == 0 { 4 } else { 0 };
        }
        Ok(Self(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE: &str = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22";

    #[test]
    fn hex_round_trips_and_accepts_uppercase() {
        let hash: PdqHash = BRIDGE.parse().expect("valid hex");
        assert_eq!(hash.to_string(), BRIDGE);
        let upper: PdqHash = BRIDGE.to_uppercase().parse().expect("valid hex");
        assert_eq!(upper, hash);
        assert_eq!(PdqHash::from_words(hash.words()), hash);
    }

    #[test]
    fn bit_order_follows_the_reference() {
        // Bit 0 is the last hex digit's low bit; bit 255 the first digit's high bit.
        let low = PdqHash::from_bit_fn(|k| k == 0);
        assert_eq!(low.to_string(), format!("{}1", "0".repeat(63)));
        let high = PdqHash::from_bit_fn(|k| k == 255);
        assert_eq!(high.to_string(), format!("8{}", "0".repeat(63)));
        let hash: PdqHash = BRIDGE.parse().expect("valid hex");
        assert_eq!(PdqHash::from_bit_fn(|k| hash.bit(k)), hash);
    }

    #[test]
    fn distance_counts_bits() {
        let a: PdqHash = BRIDGE.parse().expect("valid hex");
        let b = PdqHash::from_bit_fn(|k| a.bit(k) ^ (k % 3 == 0));
        assert_eq!(a.distance(&b), 86);
        assert_eq!(a.distance(&a), 0);
        assert_eq!(a.popcount(), 128);
    }

    #[test]
    fn bad_text_is_rejected_with_position() {
        assert!(matches!(
            "abc".parse::<PdqHash>(),
            Err(ParseError::Length { actual: 3, .. })
        ));
        let mut text = BRIDGE.to_string();
        text.replace_range(10..11, "g");
        assert_eq!(
            text.parse::<PdqHash>(),
            Err(ParseError::NotHex {
                found: 'g',
                position: 10
            })
        );
        assert!(PdqHash::try_from_slice(&[0u8; 31]).is_err());
    }
}

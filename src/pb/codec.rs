//! The codec of every framematch service and client: prost's, except that a message that does
//! not decode is INVALID_ARGUMENT (the caller sent it) rather than prost's INTERNAL.
//!
//! tonic decodes a unary request before the handler runs, and a streamed one inside the
//! handler's `Streaming::message`: both come through [`WireDecoder`], so garbage bytes and
//! invalid UTF-8 in a `string` field get one clear status wherever they arrive. The message
//! starts with [`MALFORMED`] or [`INVALID_UTF8`], which the rejection metrics read as its reason.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// How the status of a message that is not valid protobuf begins.
pub const MALFORMED: &str = "malformed protobuf message";
/// How the status of a message with invalid UTF-8 in a `string` field begins.
pub const INVALID_UTF8: &str = "invalid UTF-8 in a string field";

/// prost encoding and decoding, with decoding errors as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct WireCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for WireCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for WireCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = WireEncoder<T>;
    type Decoder = WireDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        WireEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireDecoder(PhantomData)
    }
}

/// Encodes `T` with prost.
#[derive(Debug, Clone, Default)]
pub struct WireEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for WireEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // An EncodeBuf grows as needed, so prost's only error (too little room) cannot happen.
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Decodes `U` with prost; a decoding error is INVALID_ARGUMENT.
#[derive(Debug, Clone, Default)]
pub struct WireDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for WireDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| rejected(&e))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The status of a message that did not decode, saying where (prost names the field).
pub fn rejected(error: &prost::DecodeError) -> Status {
    let detail = error.to_string();
    let detail = detail
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&detail);
    let kind = if detail.contains("not UTF-8") {
        INVALID_UTF8
    } else {
        MALFORMED
    };
    Status::invalid_argument(format!(
        "{kind}: {detail}; the bytes are not the framematch.v1 message this method takes"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_errors_are_invalid_argument_with_their_kind() {
        let garbage = crate::pb::MatchImageRequest::decode(&[0x0f_u8, 0xff, 0xff][..])
            .expect_err("not protobuf");
        let status = rejected(&garbage);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with(MALFORMED), "{status:?}");
        // CreateOrganisationRequest.name (field 1, a string) holding the bytes C3 28.
        let bad_utf8 =
            crate::pb::CreateOrganisationRequest::decode(&[0x0a_u8, 0x02, 0xc3, 0x28][..])
                .expect_err("not UTF-8");
        let status = rejected(&bad_utf8);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with(INVALID_UTF8), "{status:?}");
        assert!(status.message().contains("name"), "{status:?}");
    }
}

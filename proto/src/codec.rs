//! The codec of every generated service and client: prost's, except that a
//! message that does not decode (a truncated field, a string that is not
//! UTF-8) is answered `INVALID_ARGUMENT` (the sender's mistake) rather than
//! tonic's `INTERNAL` (which would send clients and operators looking for a
//! server bug). A client that receives a malformed response sees the same
//! code; neither code is retried.

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstCodec;

/// [`ProstCodec`] with decode errors as `INVALID_ARGUMENT`.
#[derive(Debug, Clone, Default)]
pub struct ProtoCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ProtoDecoder<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder(self.0.decoder())
    }
}

/// The decoder of [`ProtoCodec`].
#[derive(Debug)]
pub struct ProtoDecoder<D>(D);

impl<D: Decoder<Error = Status>> Decoder for ProtoDecoder<D> {
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<D::Item>, Status> {
        self.0.decode(buf).map_err(|status| {
            Status::invalid_argument(format!(
                "the message is not valid protobuf: {}",
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

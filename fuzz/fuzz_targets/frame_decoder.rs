//! Any byte stream through the frame decoder, and every frame through the request
//! decoder and the response decoders: no panic, no allocation beyond the input.
#![no_main]

use bytes::BytesMut;
use lanes_protocol::ResponseBody;
use lanes_protocol::api::{decode_request, decode_response_body, decode_response_header};
use lanes_protocol::codec::FrameCodec;
use lanes_protocol::messages::{
    ApiVersionsResponse, FetchResponse, InitProducerIdResponse, ListOffsetsResponse, MetadataResponse,
    ProduceResponse,
};
use lanes_protocol::wire::Reader;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fn body<B: ResponseBody>(frame: &BytesMut) {
    if let Ok((_, reader)) = decode_response_header(frame.clone()) {
        let _ = decode_response_body::<B>(reader);
    }
    let _ = B::decode(&mut Reader::new(frame.clone()));
}

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::new(1 << 16);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        let _ = decode_request(frame.clone());
        body::<ApiVersionsResponse>(&frame);
        body::<MetadataResponse>(&frame);
        body::<ProduceResponse>(&frame);
        body::<FetchResponse>(&frame);
        body::<ListOffsetsResponse>(&frame);
        body::<InitProducerIdResponse>(&frame);
    }
});

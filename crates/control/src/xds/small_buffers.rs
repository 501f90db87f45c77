//! The ADS service with small codec buffers for delta streams.
//!
//! tonic allocates a stream's encode and decode buffers at 8 KiB each and keeps them as long
//! as the stream lives; a control plane serving a thousand proxies holds 16 MB in them before
//! a byte is sent. A Trellis proxy's requests are ACKs of a few hundred bytes, and most of
//! its updates a few documents, so delta streams here start at 1 KiB each way and grow only
//! as far as their largest message (at most 16 KiB for a response: `delta::PART_BYTES`).
//! The generated service (`AggregatedDiscoveryServiceServer`) takes everything else: state of
//! the world streams (Envoy, proxyless gRPC) and unknown methods.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use tonic::{
    codec::{BufferSettings, Codec},
    codegen::{http, BoxFuture, Service, StdError},
    server::{Grpc, NamedService, StreamingService},
    Request, Response, Status, Streaming,
};
use tonic_prost::{ProstDecoder, ProstEncoder};
use trellis_xds::envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};

const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Where a delta stream's buffers start.
const START: usize = 1 << 10;

/// Responses ready together go out in one write up to this much (tonic's default).
const YIELD: usize = 32 << 10;

/// The largest request a stream reads (a proxy subscribing to many names by name).
const MAX_REQUEST: usize = 16 << 20;

/// Protobuf messages of delta ADS with small buffers.
#[derive(Clone, Copy, Debug, Default)]
struct DeltaCodec;

impl DeltaCodec {
    fn settings() -> BufferSettings {
        BufferSettings::new(START, YIELD)
    }
}

impl Codec for DeltaCodec {
    type Encode = DeltaDiscoveryResponse;
    type Decode = DeltaDiscoveryRequest;
    type Encoder = ProstEncoder<DeltaDiscoveryResponse>;
    type Decoder = ProstDecoder<DeltaDiscoveryRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(Self::settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(Self::settings())
    }
}

/// A delta stream, handed to the ADS implementation.
struct Delta<T>(Arc<T>);

impl<T: AggregatedDiscoveryService> StreamingService<DeltaDiscoveryRequest> for Delta<T> {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream = T::DeltaAggregatedResourcesStream;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let ads = self.0.clone();
        Box::pin(async move { ads.delta_aggregated_resources(request).await })
    }
}

/// ADS: delta streams with [`DeltaCodec`], the rest by the generated service.
pub(super) struct AdsService<T> {
    ads: Arc<T>,
    generated: AggregatedDiscoveryServiceServer<T>,
}

impl<T> Clone for AdsService<T> {
    fn clone(&self) -> Self {
        Self {
            ads: self.ads.clone(),
            generated: self.generated.clone(),
        }
    }
}

impl<T: AggregatedDiscoveryService> AdsService<T> {
    pub(super) fn new(ads: T) -> Self {
        let ads = Arc::new(ads);
        Self {
            generated: AggregatedDiscoveryServiceServer::from_arc(ads.clone())
                .max_decoding_message_size(MAX_REQUEST),
            ads,
        }
    }
}

impl<T> NamedService for AdsService<T> {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl<T, B> Service<http::Request<B>> for AdsService<T>
where
    T: AggregatedDiscoveryService,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != DELTA_PATH {
            return self.generated.call(req);
        }
        let method = Delta(self.ads.clone());
        Box::pin(async move {
            let mut grpc =
                Grpc::new(DeltaCodec).apply_max_message_size_config(Some(MAX_REQUEST), None);
            Ok(grpc.streaming(method, req).await)
        })
    }
}

//! Arrow Flight on the gRPC port: `DoGet` with ticket `snapshot` (optionally
//! `snapshot?service=...&metric=...`) streams the same data as `GET /api/v1/snapshot`. Every other
//! Flight method answers `UNIMPLEMENTED`.

use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures_util::stream::{self, BoxStream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::arrow::{shard_batch, snapshot_schema, Filter};
use super::gather;
use crate::aggregate::table::Table;

/// The Flight service over the shard table.
pub struct Flight {
    table: Arc<Table>,
}

impl Flight {
    pub fn server(table: Arc<Table>) -> FlightServiceServer<Flight> {
        FlightServiceServer::new(Self { table })
    }
}

/// Parses `snapshot` or `snapshot?service=a&metric=b`.
pub fn parse_ticket(ticket: &[u8]) -> Result<Filter, Status> {
    let text =
        std::str::from_utf8(ticket).map_err(|_| Status::invalid_argument("ticket is not UTF-8"))?;
    let (name, query) = text.split_once('?').unwrap_or((text, ""));
    if name != "snapshot" {
        return Err(Status::invalid_argument(format!(
            "unknown ticket {name:?}: the one ticket is `snapshot` (optionally \
             `snapshot?service=...&metric=...`)"
        )));
    }
    let mut filter = Filter::default();
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|e| Status::invalid_argument(format!("bad ticket query: {e}")))?;
    for (k, v) in pairs {
        match k.as_str() {
            "service" => filter.service = Some(v),
            "metric" => filter.metric = Some(v),
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown ticket parameter {other:?} (service, metric)"
                )))
            }
        }
    }
    Ok(filter)
}

type Stream<T> = Pin<Box<dyn futures_util::Stream<Item = Result<T, Status>> + Send + 'static>>;

fn unimplemented<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not supported; use DoGet with ticket `snapshot`"
    )))
}

#[tonic::async_trait]
impl FlightService for Flight {
    type HandshakeStream = Stream<HandshakeResponse>;
    type ListFlightsStream = Stream<FlightInfo>;
    type DoGetStream = Stream<FlightData>;
    type DoPutStream = Stream<PutResult>;
    type DoExchangeStream = Stream<FlightData>;
    type DoActionStream = Stream<arrow_flight::Result>;
    type ListActionsStream = Stream<ActionType>;

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let filter = Arc::new(parse_ticket(&request.into_inner().ticket)?);
        let batches = gather(&self.table, move |s| shard_batch(s, &filter))
            .await
            .ok_or_else(|| Status::unavailable("shards are shutting down"))?;
        let input: BoxStream<'static, Result<_, FlightError>> =
            stream::iter(batches.into_iter().map(|b| b.map_err(FlightError::Arrow))).boxed();
        // Keep dictionaries: the default hydrates them into plain strings, and the schema is
        // the contract on both doors.
        let out = FlightDataEncoderBuilder::new()
            .with_dictionary_handling(DictionaryHandling::Resend)
            .with_schema(snapshot_schema())
            .build(input)
            .map(|r| r.map_err(Status::from));
        Ok(Response::new(Box::pin(out)))
    }

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        unimplemented("Handshake")
    }
    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        unimplemented("ListFlights")
    }
    async fn get_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        unimplemented("GetFlightInfo")
    }
    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        unimplemented("PollFlightInfo")
    }
    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        unimplemented("GetSchema")
    }
    async fn do_put(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        unimplemented("DoPut")
    }
    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        unimplemented("DoExchange")
    }
    async fn do_action(
        &self,
        _: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        unimplemented("DoAction")
    }
    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        unimplemented("ListActions")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_name_the_snapshot_and_its_filters() {
        let f = parse_ticket(b"snapshot").unwrap();
        assert!(f.service.is_none() && f.metric.is_none());
        let f = parse_ticket(b"snapshot?service=cart&metric=traces.span.metrics.calls").unwrap();
        assert_eq!(f.service.as_deref(), Some("cart"));
        assert_eq!(f.metric.as_deref(), Some("traces.span.metrics.calls"));
        assert_eq!(
            parse_ticket(b"everything").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            parse_ticket(b"snapshot?pod=x").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            parse_ticket(b"\xff").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}

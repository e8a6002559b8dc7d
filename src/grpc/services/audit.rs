//! `AuditService`: the audit log's read side, for auditors. Reads are
//! authorized by the core (`Kms::list_audit_events`, `audit_checkpoint`,
//! `audit_reader`); the streams start only after their request's record is
//! written.

use tonic::{Request, Response, Status};

use crate::audit::EventFilter;
use crate::authz::Operation;
use crate::error::Error;
use crate::grpc::GrpcApi;
use crate::grpc::api::AuditedRequest;
use crate::grpc::convert::{checkpoint_to_pb, event_to_pb, outcome_from_pb, time_from_pb};
use crate::grpc::pb::{self, audit_service_server::AuditService};
use crate::grpc::status::status;
use crate::pipeline::Failure;
use crate::service::{AuditReader, MAX_AUDIT_PAGE};

/// Bytes per chunk of an export.
const EXPORT_CHUNK: usize = 256 * 1024;

type ChunkStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ExportLogChunk, Status>> + Send>>;
type EventStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::AuditEvent, Status>> + Send>>;

/// What a stream sends when the log cannot be read mid-way.
fn unreadable(e: Error) -> Status {
    status(Failure::from(e))
}

impl GrpcApi {
    /// Authorizes a stream and writes its request's record before the
    /// stream starts; the reader it may use.
    async fn open_stream<T: AuditedRequest>(
        &self,
        op: Operation,
        request: Request<T>,
    ) -> Result<(AuditReader, T), Status> {
        let reader = self
            .handle(op, request, async |caller, req, _| {
                Ok((self.kms().audit_reader(caller, op)?, req))
            })
            .await?;
        Ok(reader.into_inner())
    }
}

#[tonic::async_trait]
impl AuditService for GrpcApi {
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let op = Operation::ListAuditEvents;
        self.handle(op, request, async |caller, req, _| {
            let filter = EventFilter {
                start_time: time_from_pb("start_time", req.start_time)?,
                end_time: time_from_pb("end_time", req.end_time)?,
                key_id: (!req.key_id.is_empty()).then_some(req.key_id),
                principal: (!req.principal.is_empty()).then_some(req.principal),
                operation: (!req.operation.is_empty()).then_some(req.operation),
                outcome: outcome_from_pb(req.outcome)?,
            };
            let page_size = usize::try_from(req.page_size).unwrap_or(usize::MAX);
            let after = if req.page_token.is_empty() {
                0
            } else {
                req.page_token
                    .parse::<u64>()
                    .map_err(|_| Error::InvalidArgument("invalid page_token".into()))?
            };
            let page = self
                .kms()
                .list_audit_events(caller, filter, after, page_size)
                .await?;
            Ok(pb::ListEventsResponse {
                events: page.records.into_iter().map(event_to_pb).collect(),
                next_page_token: page
                    .next_after_seq
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        let op = Operation::GetAuditCheckpoint;
        self.handle(op, request, async |caller, _, _| {
            let signed = self.kms().audit_checkpoint(caller).await?;
            Ok(pb::GetCheckpointResponse {
                checkpoint: signed.checkpoint.map(checkpoint_to_pb),
                public_key_pem: signed.public_key_pem,
            })
        })
        .await
    }

    type ExportLogStream = ChunkStream;

    async fn export_log(
        &self,
        request: Request<pb::ExportLogRequest>,
    ) -> Result<Response<Self::ExportLogStream>, Status> {
        let (reader, _) = self.open_stream(Operation::ExportAuditLog, request).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::task::spawn_blocking(move || {
            let result = reader.export(EXPORT_CHUNK, |data| {
                tx.blocking_send(Ok(pb::ExportLogChunk { data })).is_ok()
            });
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(unreadable(e)));
            }
        });
        Ok(Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as ChunkStream,
        ))
    }

    type TailEventsStream = EventStream;

    async fn tail_events(
        &self,
        request: Request<pb::TailEventsRequest>,
    ) -> Result<Response<Self::TailEventsStream>, Status> {
        let (reader, req) = self
            .open_stream(Operation::TailAuditEvents, request)
            .await?;
        let mut after = req.after_seq;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let mut head = reader.subscribe();
        let mut closing = reader.closing();
        tokio::spawn(async move {
            loop {
                let page = match reader
                    .list_events(EventFilter::default(), after, MAX_AUDIT_PAGE)
                    .await
                {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(unreadable(e))).await;
                        return;
                    }
                };
                let more = page.next_after_seq.is_some();
                for record in page.records {
                    after = record.seq;
                    if tx.send(Ok(event_to_pb(record))).await.is_err() {
                        return; // the client went away
                    }
                }
                if let Some(next) = page.next_after_seq {
                    after = after.max(next);
                }
                if !more {
                    tokio::select! {
                        changed = head.changed() => if changed.is_err() { return },
                        _ = closing.wait_for(|c| *c) => return,
                        () = tx.closed() => return,
                    }
                }
            }
        });
        Ok(Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as EventStream,
        ))
    }
}

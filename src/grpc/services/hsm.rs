//! `HsmService`: the HSM's state and root-key rotation, for operators.

use tonic::{Request, Response, Status};

use crate::authz::Operation;
use crate::error::Error;
use crate::grpc::GrpcApi;
use crate::grpc::convert::progress_to_pb;
use crate::grpc::pb::{self, hsm_service_server::HsmService};
use crate::grpc::status::response;

type ProgressStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::RotateRootKeyProgress, Status>> + Send>,
>;

#[tonic::async_trait]
impl HsmService for GrpcApi {
    async fn get_hsm_info(
        &self,
        request: Request<pb::GetHsmInfoRequest>,
    ) -> Result<Response<pb::GetHsmInfoResponse>, Status> {
        self.handle(Operation::GetHsmInfo, request, async |caller, _, _| {
            let info = self.kms().hsm_info(caller).await?;
            Ok(pb::GetHsmInfoResponse {
                backend: info.backend,
                label: info.label,
                current_root_key_id: info.current_root_key_id,
                root_key_ids: info.root_key_ids,
                secure: self.kms().hsm().is_secure(),
            })
        })
        .await
    }

    type RotateRootKeyStream = ProgressStream;

    /// A stream of progress reports; the last one (or the error) goes out
    /// after the request's audit record is written. A refused request is
    /// answered at once, without a stream.
    async fn rotate_root_key(
        &self,
        request: Request<pb::RotateRootKeyRequest>,
    ) -> Result<Response<Self::RotateRootKeyStream>, Status> {
        let open = self
            .pipeline
            .open(Operation::RotateRootKey, self.facts(&request));
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let stream = || Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as ProgressStream;
        if open.is_refused() {
            let refused = open.run(async |_, _| Ok(())).await;
            return response(refused).map(|r| r.map(|()| stream()));
        }
        // The rotation runs to its end (or error) even if the client goes
        // away: stopping midway is safe, but finishing is better.
        let kms = std::sync::Arc::clone(self.pipeline.kms());
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let last = open
                .run(async |caller, audit| {
                    let result = kms
                        .rotate_root_key(caller, move |p| {
                            // The final report goes out after the audit record.
                            if !p.done {
                                let _ = progress_tx.try_send(Ok(progress_to_pb(p)));
                            }
                            true
                        })
                        .await;
                    match result {
                        Err(Error::ApprovalPending(a)) => {
                            audit.detail(format!("pending approval {}", a.id));
                            Ok(pb::RotateRootKeyProgress {
                                pending_approval_id: a.id.to_string(),
                                ..Default::default()
                            })
                        }
                        Err(e) => Err(e),
                        Ok(p) => {
                            audit.detail(format!(
                                "new root key {}, {} versions re-wrapped, destroyed root keys {:?}",
                                p.new_root_key_id, p.rewrapped, p.destroyed_root_key_ids
                            ));
                            Ok(progress_to_pb(&p))
                        }
                    }
                })
                .await;
            let _ = tx.send(response(last).map(Response::into_inner)).await;
        });
        Ok(Response::new(stream()))
    }
}

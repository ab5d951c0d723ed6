//! The local API server: JSON lines over a Unix socket (see `sinew-local-api`).

use std::sync::Arc;

use sinew_local_api::{MAX_REQUEST_BYTES, Request, Response};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{debug, warn};

use crate::pods::Registry;

/// How long a connection may wait between requests (or inside one) before it is closed.
const IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves requests until the task is aborted.
pub async fn serve(listener: UnixListener, registry: Arc<Registry>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, registry.clone()));
            }
            Err(e) => {
                warn!(error = %e, "local API accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, registry: Arc<Registry>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        // One byte past the limit tells an oversized request from one that just fits.
        let mut limited = (&mut reader).take(MAX_REQUEST_BYTES as u64 + 1);
        let n = match tokio::time::timeout(IDLE, limited.read_until(b'\n', &mut line)).await {
            Err(_) => return debug!("local API connection idle for {IDLE:?}: closed"),
            Ok(Ok(0)) => return,
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return debug!(error = %e, "local API read failed"),
        };
        let oversized = n > MAX_REQUEST_BYTES;
        let response = if oversized {
            Response::Error { message: format!("request longer than {MAX_REQUEST_BYTES} bytes") }
        } else {
            handle(&line, &registry).await
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_else(|e| {
            let message = format!("the answer could not be written as JSON: {e}");
            serde_json::to_vec(&Response::Error { message }).unwrap_or_default()
        });
        out.push(b'\n');
        if write.write_all(&out).await.is_err() || oversized {
            return;
        }
    }
}

/// Why a request line was refused, naming the field when it is inside an enroll's pod (the
/// tagged request enum's own error loses the path: "invalid IP address syntax at line 1").
fn malformed(line: &[u8], e: &serde_json::Error) -> String {
    let field = serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .filter(|v| v["op"] == "enroll")
        .and_then(|v| v.get("pod").cloned())
        .and_then(|pod| serde_path_to_error::deserialize::<_, sinew_local_api::PodSpec>(pod).err())
        .map(|pe| format!("malformed request: field pod.{}: {}", pe.path(), pe.inner()));
    field.unwrap_or_else(|| format!("malformed request: {e}"))
}

async fn handle(line: &[u8], registry: &Arc<Registry>) -> Response {
    let request: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => return Response::Error { message: malformed(line, &e) },
    };
    let registry = registry.clone();
    // Enrollment enters namespaces and touches bpffs: keep it off the data path's workers.
    let result = tokio::task::spawn_blocking(move || match request {
        Request::Enroll { pod } => registry.enroll(pod).map(Response::Enrolled),
        Request::Unenroll { uid } => registry.unenroll(&uid).map(|()| Response::Unenrolled { uid }),
        Request::Status {} => Ok(Response::Status(registry.status())),
        Request::Explain { source, destination, method, path, host, headers } => {
            let ctx = registry.ctx();
            let mesh = ctx.mesh.borrow().clone();
            let request = crate::explain::RequestSpec {
                method: method.as_deref(),
                path: path.as_deref(),
                host: host.as_deref(),
                headers: &headers,
            };
            Ok(
                match crate::explain::explain(
                    &mesh,
                    &ctx.trust_domain,
                    &source,
                    &destination,
                    &request,
                ) {
                    Ok(v) => Response::Explanation(v),
                    Err(message) => Response::Error { message },
                },
            )
        }
    })
    .await;
    match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Response::Error { message: e.to_string() },
        Err(e) => Response::Error { message: format!("internal error: {e}") },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_value_inside_a_pod_is_named_by_its_field() {
        let line = br#"{"op":"enroll","pod":{"uid":"u","name":"a","namespace":"n","netns":"/x","ips":["198.18.1.1","300.1.1.1"]}}"#;
        let e = serde_json::from_slice::<Request>(line).unwrap_err();
        let msg = malformed(line, &e);
        assert!(msg.contains("field pod.ips[1]"), "{msg}");
        // Outside a pod, serde's own message.
        let line = br#"{"op":"reboot"}"#;
        let e = serde_json::from_slice::<Request>(line).unwrap_err();
        assert!(malformed(line, &e).starts_with("malformed request: unknown variant"));
    }
}

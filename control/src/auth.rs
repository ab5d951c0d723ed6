//! Who is calling: a node, proven by its own certificate (mTLS, verified by rustls against the
//! trust bundle) or, to bootstrap, by a token from the token file. Either way the node must be
//! in the token file in force: taking it out revokes it.

use sinew_identity::SpiffeId;
use tonic::{Request, Status};

use crate::tokens::Tokens;

/// Authenticates a request's caller as a node.
pub fn caller_node<T>(
    request: &Request<T>,
    tokens: &Tokens,
    trust_domain: &str,
) -> Result<String, Status> {
    if let Some(certs) = request.peer_certs()
        && let Some(leaf) = certs.first()
    {
        let id: SpiffeId =
            sinew_identity::spiffe_id_of_der(leaf).map_err(Status::unauthenticated)?;
        return match id.node_name() {
            // A node taken out of the token file is revoked, certificate or not.
            Some(node) if id.trust_domain == trust_domain && !tokens.has_node(node) => {
                Err(Status::permission_denied(format!(
                    "node {node} is no longer in the token file (revoked)"
                )))
            }
            Some(node) if id.trust_domain == trust_domain => Ok(node.to_owned()),
            _ => Err(Status::permission_denied(format!(
                "{id} is not a node identity of {trust_domain}"
            ))),
        };
    }
    let header = request.metadata().get(sinew_api::AUTHORIZATION).ok_or_else(|| {
        Status::unauthenticated(
            "no client certificate and no bootstrap token (authorization: Bearer <token>)",
        )
    })?;
    let token = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
    tokens
        .node(token)
        .map(str::to_owned)
        .ok_or_else(|| Status::unauthenticated("unknown bootstrap token"))
}

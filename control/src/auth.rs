//! Who is calling: a node, proven by its own certificate (mTLS, verified by rustls against the
//! trust bundle) or, to bootstrap, by a token from the token file. Either way the node must be
//! in the token file in force: taking it out revokes it.

use sinew_identity::SpiffeId;
use tonic::{Request, Status};

use crate::tokens::Tokens;

/// How a caller proved it is its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// The node's own certificate (mutual TLS).
    Certificate,
    /// A bootstrap token from the token file.
    Token,
}

/// Authenticates a request's caller as a node.
pub fn caller_node<T>(
    request: &Request<T>,
    tokens: &Tokens,
    trust_domain: &str,
) -> Result<String, Status> {
    caller(request, tokens, trust_domain).map(|(node, _)| node)
}

/// Authenticates a request's caller as a node, and says how.
pub fn caller<T>(
    request: &Request<T>,
    tokens: &Tokens,
    trust_domain: &str,
) -> Result<(String, Proof), Status> {
    if let Some(certs) = request.peer_certs()
        && let Some(leaf) = certs.first()
    {
        let id: SpiffeId =
            sinew_identity::spiffe_id_of_der(leaf).map_err(Status::unauthenticated)?;
        let node = match id.node_name() {
            // A node taken out of the token file is revoked, certificate or not.
            Some(node) if id.trust_domain == trust_domain && !tokens.has_node(node) => {
                return Err(Status::permission_denied(format!(
                    "node {node} is no longer in the token file (revoked)"
                )));
            }
            Some(node) if id.trust_domain == trust_domain => node.to_owned(),
            _ => {
                return Err(Status::permission_denied(format!(
                    "{id} is not a node identity of {trust_domain}"
                )));
            }
        };
        // Issued before the node's tokens last changed: it may come from a leaked token.
        // Certificates are backdated by the CA, and their times are whole seconds; a
        // bootstrap token, if sent, still counts.
        let issued = sinew_identity::not_before_of_der(leaf).map_err(Status::unauthenticated)?;
        let slack = sinew_identity::BACKDATE + std::time::Duration::from_secs(1);
        if issued + slack >= tokens.since(&node) {
            return Ok((node, Proof::Certificate));
        }
        return match token_node(request, tokens) {
            Ok(n) if n == node => Ok((node, Proof::Token)),
            _ => Err(Status::permission_denied(format!(
                "node {node}'s certificate predates its current token: bootstrap again with the token"
            ))),
        };
    }
    token_node(request, tokens).map(|node| (node, Proof::Token))
}

fn token_node<T>(request: &Request<T>, tokens: &Tokens) -> Result<String, Status> {
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

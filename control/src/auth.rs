//! Who is calling: a node, proven by its own certificate (mTLS, verified by rustls against the
//! trust bundle) or, to bootstrap, by a token from the token file. Either way the node must be
//! in the token file in force: taking it out revokes it.

use sinew_identity::SpiffeId;
use tonic::{Request, Status};

use crate::tokens::Tokens;

/// How a caller proved it is its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// The node's own certificate (mutual TLS), issued then (its `notBefore`).
    Certificate {
        /// When the certificate was issued.
        issued: std::time::SystemTime,
    },
    /// A bootstrap token from the token file.
    Token(String),
}

impl Proof {
    /// Whether the proof still holds for `node` under `tokens`: listed, and the certificate
    /// not older than the node's tokens, or the token still the node's. A stream opened
    /// with a proof that no longer holds is ended.
    pub fn holds(&self, node: &str, tokens: &Tokens) -> bool {
        tokens.has_node(node)
            && match self {
                Proof::Certificate { issued } => !predates(*issued, node, tokens),
                Proof::Token(t) => tokens.node(t) == Some(node),
            }
    }
}

/// Whether a node certificate issued at `issued` predates `node`'s current tokens.
/// Certificates are backdated by the CA, and their times are whole seconds.
fn predates(issued: std::time::SystemTime, node: &str, tokens: &Tokens) -> bool {
    let slack = sinew_identity::BACKDATE + std::time::Duration::from_secs(1);
    issued + slack < tokens.since(node)
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
        // Issued before the node's tokens last changed: it may come from a leaked token; a
        // bootstrap token, if sent, still counts.
        let issued = sinew_identity::not_before_of_der(leaf).map_err(Status::unauthenticated)?;
        if !predates(issued, &node, tokens) {
            return Ok((node, Proof::Certificate { issued }));
        }
        return match token_node(request, tokens) {
            Ok((n, token)) if n == node => Ok((node, Proof::Token(token))),
            _ => Err(Status::permission_denied(format!(
                "node {node}'s certificate predates its current token: bootstrap again with the token"
            ))),
        };
    }
    token_node(request, tokens).map(|(node, token)| (node, Proof::Token(token)))
}

fn token_node<T>(request: &Request<T>, tokens: &Tokens) -> Result<(String, String), Status> {
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
        .map(|node| (node.to_owned(), token.to_owned()))
        .ok_or_else(|| Status::unauthenticated("unknown bootstrap token"))
}

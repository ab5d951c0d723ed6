//! L7 decisions shared by the waypoint (and later by any HTTP-aware component), with no I/O:
//! Gateway API route selection ([`route`]), local rate limiting ([`ratelimit`]), retries
//! with backoff and a budget ([`retry`]), outlier detection ([`outlier`]) and load balancing
//! with circuit-breaking limits ([`balance`]), and path normalization ([`path`]). Time is passed in, so everything is tested in
//! virtual time.
#![forbid(unsafe_code)]

pub mod balance;
pub mod outlier;
pub mod path;
pub mod ratelimit;
pub mod retry;
pub mod route;

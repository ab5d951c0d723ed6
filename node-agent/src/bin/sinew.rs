//! `sinew`: the operator CLI. Drives the node agent's local API.

use std::{net::IpAddr, path::PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};
use sinew_local_api::{Client, PodSpec, Request, Response};

#[derive(Parser)]
#[command(name = "sinew", version, about = "Sinew operator CLI")]
struct Cli {
    /// The agent's local API socket.
    #[arg(long, global = true, default_value = sinew_local_api::DEFAULT_SOCKET)]
    agent: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Enroll a pod (a network namespace plus a cgroup) with the node agent.
    Enroll {
        /// Pod UID (node-unique).
        #[arg(long)]
        uid: String,
        /// Pod name.
        #[arg(long)]
        name: String,
        /// Namespace.
        #[arg(long)]
        namespace: String,
        /// Service account.
        #[arg(long, default_value = "default")]
        service_account: String,
        /// Network namespace path.
        #[arg(long)]
        netns: PathBuf,
        /// cgroup v2 directory; discovered from the UID when absent.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Pod address (repeat for several).
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
    },
    /// Un-enroll a pod.
    Unenroll {
        /// Pod UID.
        uid: String,
    },
    /// Pods and connection counters.
    Status,
    /// Explain whether SOURCE may reach DESTINATION, and which policies decide it.
    Explain {
        /// `<namespace>/<workload>` or an address.
        source: String,
        /// `<address>:<port>` of a pod or a service.
        destination: String,
        /// For a service behind a waypoint: the HTTP method its L7 policies see (default GET;
        /// not used for a plain TCP port, which is explained as a connection).
        #[arg(long)]
        method: Option<String>,
        /// For a service behind a waypoint: the HTTP path its L7 policies see (default /;
        /// not used for a plain TCP port).
        #[arg(long)]
        path: Option<String>,
        /// For a service behind a waypoint: the Host its L7 policies see (default: the
        /// service's hostname).
        #[arg(long)]
        host: Option<String>,
        /// For a service behind a waypoint: a request header, `Name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let request = match cli.cmd {
        Cmd::Enroll { uid, name, namespace, service_account, netns, cgroup, ips } => {
            Request::Enroll {
                pod: PodSpec { uid, name, namespace, service_account, netns, cgroup, ips },
            }
        }
        Cmd::Unenroll { uid } => Request::Unenroll { uid },
        Cmd::Status => Request::Status {},
        Cmd::Explain { source, destination, method, path, host, headers } => {
            Request::Explain { source, destination, method, path, host, headers }
        }
    };
    match Client::new(&cli.agent).call(&request)? {
        Response::Enrolled(p) if p.captured => println!("enrolled {} (captured)", p.spec.uid),
        Response::Enrolled(p) => {
            println!("enrolled {} (not captured: {})", p.spec.uid, p.reason.unwrap_or_default())
        }
        Response::Unenrolled { uid } => println!("un-enrolled {uid}"),
        Response::Status(s) => println!("{}", serde_json::to_string_pretty(&s)?),
        Response::Explanation(e) => {
            println!("{}: {}", e["verdict"].as_str().unwrap_or("?"), summary(&e));
            println!("{}", serde_json::to_string_pretty(&e)?);
        }
        Response::Error { message } => anyhow::bail!(message),
    }
    Ok(())
}

/// One line per endpoint: its workload, verdict and reason.
fn summary(e: &serde_json::Value) -> String {
    match e["endpoints"].as_array() {
        Some(eps) => eps
            .iter()
            .map(|ep| {
                format!(
                    "{} -> {}",
                    ep["workload"].as_str().unwrap_or("?"),
                    ep["reason"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        None => e["reason"].as_str().unwrap_or("").to_owned(),
    }
}

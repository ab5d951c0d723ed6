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
    };
    match Client::new(&cli.agent).call(&request)? {
        Response::Enrolled(p) if p.captured => println!("enrolled {} (captured)", p.spec.uid),
        Response::Enrolled(p) => {
            println!("enrolled {} (not captured: {})", p.spec.uid, p.reason.unwrap_or_default())
        }
        Response::Unenrolled { uid } => println!("un-enrolled {uid}"),
        Response::Status(s) => println!("{}", serde_json::to_string_pretty(&s)?),
        Response::Error { message } => anyhow::bail!(message),
    }
    Ok(())
}

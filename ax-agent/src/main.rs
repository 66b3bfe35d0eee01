//! `ax-agent`: the ax agent. Today it carries the single-host statepoint demo and the development PKI
//! command; the daemon and the witness arrive with the FT-pair and agent work (issues 3 and 4).

use std::path::PathBuf;

use ax_agent::{certs, demo};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ax-agent",
    version,
    about = "ax: availability extension for KVM compute hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a guest with epoch checkpoints and an in-process replica, fail the primary, resume the replica.
    Demo(demo::DemoArgs),
    /// Write a development CA and host certificates (for the replication link's mutual TLS).
    Certs {
        /// Directory for ca.pem, ca-key.pem, <host>.pem, <host>-key.pem (an existing CA there is reused).
        #[arg(long, default_value = "/etc/ax/pki")]
        out: PathBuf,
        /// Host names to issue certificates for.
        #[arg(required = true)]
        hosts: Vec<String>,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Certs { out, hosts } => match certs::write_dev_pki(&out, &hosts) {
            Ok(_) => {
                println!(
                    "wrote the development CA and {} host certificate(s) to {}",
                    hosts.len(),
                    out.display()
                );
                0
            }
            Err(e) => {
                eprintln!("ax-agent certs: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}

//! `ax-agent`: the ax agent. Today it carries the single-host statepoint demo; the daemon, witness and
//! certificate commands arrive with the FT-pair and agent work (issues 3 and 4).

mod demo;

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
    };
    std::process::exit(code);
}

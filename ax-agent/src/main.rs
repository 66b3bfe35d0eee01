//! `ax-agent`: the ax agent — the daemon (`run`) and its VM workers (`vm-worker`), the witness, the FT
//! node and HA node processes, the development PKI command and the single-host statepoint demo.

use std::path::PathBuf;

use ax_agent::{certs, demo, ha};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ax-agent",
    version,
    about = "ax: availability extension for KVM compute hosts"
)]
struct Cli {
    /// Log format on a terminal (under systemd, logs go to the journal).
    #[arg(long, global = true, value_enum, default_value_t = ax_agent::logging::LogFormat::Human)]
    log_format: ax_agent::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent daemon: VMs, availability levels, REST API (see docs/daemon.md).
    Run(ax_agent::daemon::RunArgs),
    /// Run one VM's worker process (started by the daemon; one per VM).
    VmWorker {
        /// The worker's directory (worker.json, control socket, pid file).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Run a guest with epoch checkpoints and an in-process replica, fail the primary, resume the replica.
    Demo(demo::DemoArgs),
    /// Run one host's FT node for one VM (standby; `--boot` to start the VM here as primary).
    FtNode(Box<FtNodeArgs>),
    /// FT for a QEMU VM through QEMU's COLO, on one host of a pair: boots the VM (`--boot`) or waits as
    /// a standby; heartbeats, the coordinator's compare-and-set, failover and re-protection as ft-node.
    ColoNode(Box<ColoNodeArgs>),
    /// Run the witness: the compare-and-set register of FT VMs' generations (protocol v2), over
    /// mutual TLS with the cluster PKI.
    Witness(Box<WitnessArgs>),
    /// Run one compute host's HA agent: heartbeats with peers; fence and evacuate a dead peer's HA VMs.
    HaNode(ha::HaNodeArgs),
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
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Run(_) | Command::VmWorker { .. } => "info",
        _ => "warn",
    };
    ax_agent::logging::init(cli.log_format, default_filter);
    let code = match cli.command {
        Command::Run(args) => ax_agent::daemon::run(&args),
        Command::VmWorker { dir } => ax_agent::worker::run(&dir),
        Command::Demo(args) => demo::run(&args),
        Command::HaNode(args) => ha::run(&args),
        Command::FtNode(args) => ft_node(*args),
        Command::ColoNode(args) => colo_node(*args),
        Command::Witness(args) => witness(*args),
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

/// Options of `ax-agent ft-node`.
#[derive(clap::Args, Debug)]
struct FtNodeArgs {
    /// This host's name (its certificate's name).
    #[arg(long)]
    host: String,
    /// PKI directory written by `ax-agent certs`.
    #[arg(long, default_value = "/etc/ax/pki")]
    pki: PathBuf,
    /// The VM's name.
    #[arg(long, default_value = "vm1")]
    vm: String,
    /// Guest program from the guest kit (counter, dirtier, disk-writer, smp-counter), or the path of
    /// your own static ELF64 guest (any value with a '/').
    #[arg(long, default_value = "counter")]
    guest: String,
    /// Guest arguments.
    #[arg(long = "guest-arg")]
    guest_args: Vec<u64>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    mem_mib: u64,
    /// Replication link listen address.
    #[arg(long)]
    link: std::net::SocketAddr,
    /// Heartbeat address.
    #[arg(long)]
    hb: std::net::SocketAddr,
    /// Local address of a second heartbeat path (used with peers that name a second address).
    #[arg(long)]
    hb2: Option<std::net::SocketAddr>,
    /// Output endpoint address (served while this host is primary).
    #[arg(long)]
    output: std::net::SocketAddr,
    /// A peer: NAME=LINK_ADDR,HB_ADDR[,HB2_ADDR] (repeat).
    #[arg(long = "peer")]
    peers: Vec<ax_agent::node::Peer>,
    /// The witness: `[NAME@]ADDR:PORT`, NAME being the name its certificate is valid for (default
    /// `witness`). Not with `--etcd`.
    #[arg(long, required_unless_present = "etcd", conflicts_with = "etcd")]
    witness: Option<ax_agent::coord::CoordTarget>,
    /// etcd client URLs (repeat) keeping the generations instead of the witness; `https://` ones use
    /// the PKI directory's CA, certificate and key.
    #[arg(long)]
    etcd: Vec<String>,
    /// Boot the VM here as its first primary.
    #[arg(long)]
    boot: bool,
    /// Epoch length in milliseconds.
    #[arg(long, default_value_t = 5)]
    epoch_ms: u64,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 20)]
    hb_interval_ms: u64,
    /// Heartbeat timeout in milliseconds.
    #[arg(long, default_value_t = 100)]
    hb_timeout_ms: u64,
    /// Append a line per output release to this file (time, host, generation, offsets).
    #[arg(long)]
    release_journal: Option<PathBuf>,
    /// Give a VM booted here a raw disk of this many MiB (0: no disk).
    #[arg(long, default_value_t = 0)]
    disk_mib: u64,
    /// Directory for disk images (the VM's own and the replicas').
    #[arg(long, default_value = "/var/lib/ax/ft")]
    state_dir: PathBuf,
    /// Fence a dead primary before promoting: a shell command, `{host}` replaced by its name.
    #[arg(long)]
    fence_cmd: Option<String>,
    /// How long the fence command may run, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    fence_timeout_ms: u64,
    /// Never promote without a successful fence (default: report the failure and promote on the
    /// witness grant alone).
    #[arg(long)]
    fence_required: bool,
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ax-agent: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// The coordinator of `--witness` or `--etcd` (https URLs use the host's certificate).
fn coordinator(
    witness: Option<ax_agent::coord::CoordTarget>,
    etcd: Vec<String>,
    pki: &std::path::Path,
    host: &str,
) -> ax_agent::coord::CoordTarget {
    match witness {
        Some(w) => w,
        None => {
            let tls = etcd.iter().any(|u| u.starts_with("https://"));
            let pki = ax_agent::certs::PkiPaths::in_dir(pki, host);
            let mut etcd = failover::coordinator::etcd::EtcdConfig::new(etcd);
            if tls {
                etcd.ca = Some(pki.ca);
                etcd.cert = Some(pki.cert);
                etcd.key = Some(pki.key);
            }
            ax_agent::coord::CoordTarget::Etcd(etcd)
        }
    }
}

fn ft_node(a: FtNodeArgs) -> i32 {
    use std::time::Duration;
    let coordinator = coordinator(a.witness, a.etcd, &a.pki, &a.host);
    let cfg = ax_agent::node::NodeConfig {
        host: a.host,
        pki: a.pki,
        vm: a.vm,
        guest: a.guest,
        guest_args: a.guest_args,
        mem_mib: a.mem_mib,
        link_listen: a.link,
        hb_listen: a.hb,
        output_listen: a.output,
        peers: a.peers,
        coordinator,
        boot: a.boot,
        epoch: Duration::from_millis(a.epoch_ms),
        hb_interval: Duration::from_millis(a.hb_interval_ms),
        hb_timeout: Duration::from_millis(a.hb_timeout_ms),
        release_journal: a.release_journal,
        hb2_listen: a.hb2,
        disk_mib: a.disk_mib,
        state_dir: a.state_dir,
        fence: a.fence_cmd.map(|command| ax_agent::node::FenceConfig {
            command,
            timeout: Duration::from_millis(a.fence_timeout_ms),
            required: a.fence_required,
        }),
    };
    if cfg.disk_mib > 0 || !cfg.peers.is_empty() {
        if let Err(e) = std::fs::create_dir_all(&cfg.state_dir) {
            eprintln!(
                "ax-agent ft-node: state dir {}: {e}",
                cfg.state_dir.display()
            );
            return 1;
        }
    }
    match runtime().block_on(ax_agent::node::run(cfg)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ax-agent ft-node: {e}");
            1
        }
    }
}

/// Options of `ax-agent colo-node`.
#[derive(clap::Args, Debug)]
struct ColoNodeArgs {
    /// This host's name (its certificate's name).
    #[arg(long)]
    host: String,
    /// PKI directory written by `ax-agent certs`.
    #[arg(long, default_value = "/etc/ax/pki")]
    pki: PathBuf,
    /// The VM's name.
    #[arg(long, default_value = "vm1")]
    vm: String,
    /// The VM's QEMU definition on this host: a JSON file (`kernel`, `append`, `disks`, `nics`, …, as
    /// in `POST /v1/vms`' `qemu`); its disks are this host's copies.
    #[arg(long)]
    def: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    mem_mib: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Session address (mutual TLS); COLO's relays use the next ports (P+1 migration, P+2 NBD,
    /// P+3+2i / P+4+2i the mirror and compare of NIC i).
    #[arg(long)]
    link: std::net::SocketAddr,
    /// Heartbeat address.
    #[arg(long)]
    hb: std::net::SocketAddr,
    /// Local address of a second heartbeat path.
    #[arg(long)]
    hb2: Option<std::net::SocketAddr>,
    /// A peer: NAME=LINK_ADDR,HB_ADDR[,HB2_ADDR] (repeat).
    #[arg(long = "peer")]
    peers: Vec<ax_agent::node::Peer>,
    /// The witness: `[NAME@]ADDR:PORT`. Not with `--etcd`.
    #[arg(long, required_unless_present = "etcd", conflicts_with = "etcd")]
    witness: Option<ax_agent::coord::CoordTarget>,
    /// etcd client URLs (repeat).
    #[arg(long)]
    etcd: Vec<String>,
    /// Boot the VM here as its first primary.
    #[arg(long)]
    boot: bool,
    /// Checkpoint period in milliseconds (COLO's `x-checkpoint-delay`).
    #[arg(long, default_value_t = 100)]
    epoch_ms: u64,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 20)]
    hb_interval_ms: u64,
    /// Heartbeat timeout in milliseconds.
    #[arg(long, default_value_t = 100)]
    hb_timeout_ms: u64,
    /// Directory for the generation record and QEMU's files.
    #[arg(long, default_value = "/var/lib/ax/colo")]
    state_dir: PathBuf,
    /// Fence a dead primary before promoting: a shell command, `{host}` standing for its name.
    #[arg(long)]
    fence_cmd: Option<String>,
    /// How long the fence command may run, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    fence_timeout_ms: u64,
    /// Never promote without a successful fence.
    #[arg(long)]
    fence_required: bool,
    /// Bandwidth cap of COLO's migration stream, bytes/s (default 1 GiB/s).
    #[arg(long)]
    max_bandwidth: Option<u64>,
}

fn colo_node(a: ColoNodeArgs) -> i32 {
    use std::time::Duration;
    let def: ax_qemu::def::QemuDef = match std::fs::read(&a.def)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("ax-agent colo-node: --def {}: {e}", a.def.display());
            return 1;
        }
    };
    let cfg = ax_agent::colo_node::ColoNodeConfig {
        coordinator: coordinator(a.witness, a.etcd, &a.pki, &a.host),
        host: a.host,
        pki: a.pki,
        vm: a.vm.clone(),
        def,
        mem_mib: a.mem_mib,
        vcpus: a.vcpus,
        link_listen: a.link,
        data_port: a.link.port().wrapping_add(1),
        hb_listen: a.hb,
        hb2_listen: a.hb2,
        peers: a.peers,
        boot: a.boot,
        epoch: Duration::from_millis(a.epoch_ms),
        hb_interval: Duration::from_millis(a.hb_interval_ms),
        hb_timeout: Duration::from_millis(a.hb_timeout_ms),
        run_dir: ax_agent::colo_node::run_dir(&a.state_dir, &a.vm),
        state_dir: a.state_dir,
        fence: a.fence_cmd.map(|command| ax_agent::node::FenceConfig {
            command,
            timeout: Duration::from_millis(a.fence_timeout_ms),
            required: a.fence_required,
        }),
        max_bandwidth: a.max_bandwidth,
    };
    match runtime().block_on(ax_agent::colo_node::run(cfg)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ax-agent colo-node: {e}");
            1
        }
    }
}

/// Options of `ax-agent witness`.
#[derive(clap::Args, Debug)]
struct WitnessArgs {
    /// TCP address to listen on.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: std::net::SocketAddr,
    /// State file (generations survive restarts; written and fsynced before every answer that
    /// changed it).
    #[arg(long, default_value = "/var/lib/ax/witness.json")]
    state: PathBuf,
    /// PKI directory (`ax-agent certs`): the witness serves with `<name>.pem` and accepts clients
    /// chained to `ca.pem`.
    #[arg(long, default_value = "/etc/ax/pki")]
    pki: PathBuf,
    /// The witness's certificate name.
    #[arg(long, default_value = "witness")]
    name: String,
    /// A new cluster: start fresh when the state file is missing. Without it, a missing state file
    /// means the state was lost: the witness re-learns each VM's generation from the hosts' claims
    /// before it answers for that VM.
    #[arg(long)]
    init: bool,
}

fn witness(a: WitnessArgs) -> i32 {
    use failover::coordinator::witness::{WitnessConfig, WitnessServer};
    let tls = match certs::TlsIdentity::load(&certs::PkiPaths::in_dir(&a.pki, &a.name))
        .and_then(|id| id.rustls_server())
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ax-agent witness: PKI for {:?}: {e}", a.name);
            return 1;
        }
    };
    let cfg = WitnessConfig {
        listen: a.listen,
        state_path: a.state,
        init: a.init,
    };
    runtime().block_on(async move {
        let served = match WitnessServer::bind(cfg, tls).await {
            Ok(server) => server.spawn(),
            Err(e) => Err(e),
        };
        match served {
            Ok(handle) => {
                eprintln!("ax-agent witness: listening on {}", handle.local_addr());
                let _ = tokio::signal::ctrl_c().await;
                0
            }
            Err(e) => {
                eprintln!("ax-agent witness: {e}");
                1
            }
        }
    })
}

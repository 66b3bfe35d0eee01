//! `axctl`: the command-line client of the ax agent's REST API.
//!
//! Exit codes: 0 ok, 1 error (agent unreachable, server error), 2 usage, 3 not found, 4 conflict
//! (e.g. another transition runs), 5 the transition did not reach the level (rolled back or failed),
//! 6 `--wait` timed out, 7 unauthorized (wrong or missing token), 8 bad input refused by the agent.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ax_agent::client::{read_token, ApiClient, ClientError};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

const EXIT_ERROR: i32 = 1;
const EXIT_NOT_FOUND: i32 = 3;
const EXIT_CONFLICT: i32 = 4;
const EXIT_NOT_REACHED: i32 = 5;
const EXIT_TIMEOUT: i32 = 6;
const EXIT_UNAUTHORIZED: i32 = 7;
const EXIT_BAD_INPUT: i32 = 8;

#[derive(Parser, Debug)]
#[command(
    name = "axctl",
    version,
    about = "Client of the ax agent's REST API",
    after_help = "Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 conflict, 5 level not reached, \
                  6 --wait timed out, 7 unauthorized, 8 bad input."
)]
struct Cli {
    /// The agent's API.
    #[arg(
        long,
        env = "AX_URL",
        default_value = "http://127.0.0.1:7600",
        global = true
    )]
    url: String,
    /// The API token file.
    #[arg(
        long,
        env = "AX_TOKEN_FILE",
        default_value = "/etc/ax/token",
        global = true
    )]
    token_file: PathBuf,
    /// CA certificate (PEM) to verify an `https://` API with (the cluster CA: `ca.pem` of `ax-agent
    /// certs`).
    #[arg(long, env = "AX_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    /// The name the API's certificate carries (the agent's host name), when the URL gives an address.
    #[arg(long, env = "AX_TLS_NAME", global = true)]
    tls_name: Option<String>,
    /// JSON output (for scripts) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// VMs (native and QEMU).
    #[command(subcommand)]
    Vm(VmCmd),
    /// The event history (transitions, crashes, failovers).
    Events {
        /// Only this VM's events.
        #[arg(long)]
        vm: Option<String>,
        /// Only events after this id.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// At most this many (1–1000).
        #[arg(long, default_value_t = 100)]
        limit: u64,
        /// Keep printing new events.
        #[arg(long, short)]
        follow: bool,
    },
    /// Hosts (this agent and its peers).
    #[command(subcommand)]
    Host(HostCmd),
    /// HA host recoveries (fence, force-down, evacuations) run by this host's `ax-agent ha-node`: through
    /// the agent's API (`ha.node_socket` in its config), or the ha-node's socket with --ha-socket.
    #[command(subcommand)]
    Recovery(RecoveryCmd),
}

#[derive(Subcommand, Debug)]
enum HostCmd {
    /// This host and its peers: up, FT VMs.
    List,
    /// Maintenance: move every QEMU VM of the agent's host (levels none and ha) to another host by live
    /// migration, one at a time; native and FT VMs are listed as staying.
    Drain {
        /// The host to drain (the agent at --url must be that host's).
        host: String,
        /// Where the VMs go.
        #[arg(long)]
        to: String,
        /// QEMU's downtime limit, ms.
        #[arg(long)]
        downtime_limit_ms: Option<u64>,
        /// Bandwidth cap of the migration stream, bytes per second (suffixes K, M, G: binary
        /// multiples, e.g. `200M`); QEMU's default when absent.
        #[arg(long, value_parser = parse_bandwidth)]
        max_bandwidth: Option<u64>,
    },
    /// Re-enable a recovered compute host in Nova (it stays disabled and forced down after a recovery
    /// until an operator says it is repaired). Through the agent's API, or the ha-node's socket.
    Enable {
        /// The compute host.
        host: String,
        /// Ask the ha-node's control socket directly instead of the agent's API (on a host that runs
        /// `ax-agent ha-node` without the daemon).
        #[arg(long, env = "AX_HA_SOCKET")]
        ha_socket: Option<PathBuf>,
    },
}

const DEFAULT_HA_SOCKET: &str = "/run/ax/ha.sock";

#[derive(Subcommand, Debug)]
enum RecoveryCmd {
    /// Every host recovery: outcome, and when each step happened (ms after the host's last heartbeat).
    List {
        /// Ask the ha-node's control socket directly instead of the agent's API (on a host that runs
        /// `ax-agent ha-node` without the daemon).
        #[arg(long, env = "AX_HA_SOCKET")]
        ha_socket: Option<PathBuf>,
    },
    /// One host's recoveries (a host name or a recovery id), step by step, with each VM.
    Show {
        /// Host name or recovery id.
        what: String,
        /// Ask the ha-node's control socket directly instead of the agent's API (on a host that runs
        /// `ax-agent ha-node` without the daemon).
        #[arg(long, env = "AX_HA_SOCKET")]
        ha_socket: Option<PathBuf>,
    },
    /// The HA event history (every step of every recovery, crashes, restarts), from the ha-node's
    /// control socket.
    History {
        /// The ha-node's control socket.
        #[arg(long, env = "AX_HA_SOCKET", default_value = DEFAULT_HA_SOCKET)]
        ha_socket: PathBuf,
    },
}

/// `axctl vm create --engine qemu`: the QEMU definition's flags (paths are made absolute here).
#[derive(clap::Args, Debug)]
struct QemuArgs {
    /// A Linux kernel to boot directly (QEMU).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Its initramfs (QEMU).
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// The kernel command line (QEMU; `console=ttyS0` is added unless it names a console).
    #[arg(long, value_name = "CMDLINE", allow_hyphen_values = true)]
    append: Option<String>,
    /// A bootable disk image, qcow2 or raw, instead of --kernel (QEMU).
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// A further disk image, qcow2 or raw (QEMU; repeat: /dev/vda, /dev/vdb, … after --image).
    #[arg(long = "disk", value_name = "FILE")]
    disks: Vec<PathBuf>,
    /// A NIC on this bridge (QEMU; repeat; `BRIDGE,mac=52:54:00:12:34:56` sets its MAC,
    /// `,model=e1000` its device: virtio-net by default).
    #[arg(long = "nic", value_name = "BRIDGE[,mac=MAC][,model=virtio-net|e1000]")]
    nics: Vec<String>,
    /// The accelerator (QEMU): kvm, tcg, or auto (kvm where /dev/kvm opens).
    #[arg(long, value_name = "kvm|tcg|auto")]
    accel: Option<String>,
    /// The QEMU binary (default: the agent's [qemu] binary, else qemu-system-x86_64).
    #[arg(long, value_name = "PATH")]
    qemu_binary: Option<String>,
    /// Start the VM so that it may become FT later (QEMU; COLO's `pc` machine, quorum-wrapped disks,
    /// taps without vnet_hdr: what cannot be added to a running QEMU). `set-level ft` refuses a QEMU
    /// VM created without it.
    #[arg(long)]
    ft_capable: bool,
}

impl QemuArgs {
    /// The first QEMU flag given, if any (for a native VM, that is a mistake).
    fn given(&self) -> Option<&'static str> {
        [
            (self.kernel.is_some(), "--kernel"),
            (self.initrd.is_some(), "--initrd"),
            (self.append.is_some(), "--append"),
            (self.image.is_some(), "--image"),
            (!self.disks.is_empty(), "--disk"),
            (!self.nics.is_empty(), "--nic"),
            (self.accel.is_some(), "--accel"),
            (self.qemu_binary.is_some(), "--qemu-binary"),
            (self.ft_capable, "--ft-capable"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }

    /// The API's `qemu` object.
    fn definition(&self) -> Result<Value, ClientError> {
        let abs = |flag: &str, p: &PathBuf| -> Result<String, ClientError> {
            std::path::absolute(p)
                .map(|p| p.display().to_string())
                .map_err(|e| ClientError::Input(format!("{flag} {}: {e}", p.display())))
        };
        let opt = |flag: &str, p: &Option<PathBuf>| p.as_ref().map(|p| abs(flag, p)).transpose();
        let disks = self
            .disks
            .iter()
            .map(|d| abs("--disk", d).map(|path| json!({ "path": path })))
            .collect::<Result<Vec<_>, _>>()?;
        let nics = self
            .nics
            .iter()
            .map(|n| {
                let mut parts = n.split(',');
                let bridge = parts.next().unwrap_or_default();
                let mut mac = None;
                let mut model = None;
                for p in parts {
                    if let Some(m) = p.strip_prefix("mac=") {
                        mac = Some(m.to_string());
                    } else if let Some(m) = p.strip_prefix("model=") {
                        if !matches!(m, "virtio-net" | "e1000") {
                            return Err(ClientError::Input(format!(
                                "--nic {n}: model {m:?}: expected virtio-net or e1000"
                            )));
                        }
                        model = Some(m.to_string());
                    } else {
                        return Err(ClientError::Input(format!(
                            "--nic {n}: expected BRIDGE[,mac=MAC][,model=virtio-net|e1000]"
                        )));
                    }
                }
                let mut nic = json!({ "bridge": bridge, "mac": mac });
                if let Some(m) = model {
                    nic["model"] = json!(m);
                }
                Ok(nic)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut q = json!({
            "kernel": opt("--kernel", &self.kernel)?,
            "initrd": opt("--initrd", &self.initrd)?,
            "append": self.append,
            "image": opt("--image", &self.image)?,
            "disks": disks,
            "nics": nics,
            "binary": self.qemu_binary,
        });
        if let Some(a) = &self.accel {
            q["accel"] = json!(a);
        }
        if self.ft_capable {
            q["ft_capable"] = json!(true);
        }
        // Absent fields stay absent (the API's defaults apply).
        if let Value::Object(m) = &mut q {
            m.retain(|_, v| !v.is_null());
        }
        Ok(q)
    }
}

#[derive(Subcommand, Debug)]
enum VmCmd {
    /// Every VM on this host (primaries and standbys).
    List,
    /// One VM: level, role, peer, epoch, stun p99, ack lag, transition.
    Show {
        /// The VM.
        vm: String,
    },
    /// Define a native VM (and start it, unless --no-start).
    Create {
        /// Its name.
        name: String,
        /// Guest program from the guest kit (counter, dirtier, disk-writer, smp-counter).
        #[arg(long, conflicts_with = "guest_elf")]
        guest: Option<String>,
        /// Your own guest: a static ELF64 program written to docs/guest-abi.md, uploaded and stored
        /// with the VM (and carried to its secondary under FT).
        #[arg(long, value_name = "FILE")]
        guest_elf: Option<PathBuf>,
        /// What the guest's own exit leads to at level ha: stop (stays exited) or restart.
        #[arg(long, value_name = "stop|restart")]
        on_exit: Option<String>,
        /// Memory in MiB (default: 64 for a native VM, 256 for a QEMU VM).
        #[arg(long, visible_alias = "mem-mib")]
        memory_mib: Option<u64>,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u64,
        /// Disk in MiB (0: none).
        #[arg(long, default_value_t = 0)]
        disk_mib: u64,
        /// Guest argument (repeat).
        #[arg(long = "guest-arg")]
        guest_args: Vec<u64>,
        /// Define it only.
        #[arg(long)]
        no_start: bool,
        /// The Nova server it stands for: with `[openstack] nova_tagging`, the server's `ax:level`
        /// metadata sets its level.
        #[arg(long, value_name = "ID")]
        nova_server: Option<String>,
        /// Start from the newest replicated version of the volume of this name (a lost host's HA VM
        /// brought up here); --disk-mib 0 takes the image's size. A QEMU VM gets every disk of that
        /// version, written to the files --image/--disk name (which must not exist yet).
        #[arg(long)]
        restore_volume: bool,
        /// The VMM: native (ax's own, the guest kit's programs) or qemu (stock guests).
        #[arg(long, default_value = "native", value_name = "native|qemu")]
        engine: String,
        #[command(flatten)]
        qemu: Box<QemuArgs>,
    },
    /// Replicate a VM's disk to the volume target now (levels ha and ft, with a target configured).
    Replicate {
        /// The VM.
        vm: String,
        /// Wait until the new version is stored (a progress bar).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// The VM's console output (what its output endpoint serves), like `virsh console` / `openstack
    /// console log show`. Without --from-start, the last 4 KiB so far.
    Console {
        /// The VM.
        vm: String,
        /// From the first byte this host holds.
        #[arg(long)]
        from_start: bool,
        /// Keep printing new output until the VM ends (Ctrl-C to leave).
        #[arg(long, short)]
        follow: bool,
    },
    /// Move a running QEMU VM to another host by live migration (memory, and local disks by NBD
    /// mirror, over TLS with the cluster PKI); it keeps its level and volume replication.
    Migrate {
        /// The VM.
        vm: String,
        /// The destination host (a peer of the agent).
        #[arg(long)]
        to: String,
        /// QEMU's downtime limit, ms.
        #[arg(long)]
        downtime_limit_ms: Option<u64>,
        /// Bandwidth cap of the migration stream, bytes per second (suffixes K, M, G: binary
        /// multiples, e.g. `200M`); QEMU's default when absent.
        #[arg(long, value_parser = parse_bandwidth)]
        max_bandwidth: Option<u64>,
        /// Return once the migration has started instead of waiting for its end.
        #[arg(long)]
        no_wait: bool,
    },
    /// Start a stopped VM.
    Start {
        /// The VM.
        vm: String,
    },
    /// Stop a VM (levels none and ha).
    Stop {
        /// The VM.
        vm: String,
    },
    /// Delete a VM (not at level ft; a VM running at level ha needs --force).
    Delete {
        /// The VM.
        vm: String,
        /// Delete a VM that runs at level ha (its guest is destroyed).
        #[arg(long)]
        force: bool,
    },
    /// Change a VM's availability level (none, ha, ft) while it runs.
    SetLevel {
        /// The VM.
        vm: String,
        /// none, ha or ft.
        level: String,
        /// Wait until the transition ends (a progress bar during the initial sync).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

fn code_of(e: &ClientError) -> i32 {
    match e.status() {
        Some(404) => EXIT_NOT_FOUND,
        Some(409) => EXIT_CONFLICT,
        Some(401) => EXIT_UNAUTHORIZED,
        Some(400) => EXIT_BAD_INPUT,
        _ => EXIT_ERROR,
    }
}

fn main() {
    let cli = Cli::parse();
    if let Some(code) = ha_command(&cli) {
        std::process::exit(code);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("axctl: {e}");
            std::process::exit(EXIT_ERROR);
        }
    };
    let code = rt.block_on(async {
        let token = match read_token(&cli.token_file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("axctl: {e} (use --token-file or AX_TOKEN_FILE)");
                return EXIT_ERROR;
            }
        };
        let c = match client(&cli, &token) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("axctl: {e}");
                return EXIT_ERROR;
            }
        };
        match run(&cli, &c).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("axctl: {e}");
                code_of(&e)
            }
        }
    });
    std::process::exit(code);
}

/// The API client for `--url`: plain HTTP, or HTTPS verified with `--ca-cert` (and `--tls-name`).
fn client(cli: &Cli, token: &str) -> Result<ApiClient, String> {
    let timeout = Duration::from_secs(30);
    let Some(rest) = cli.url.strip_prefix("https://") else {
        return Ok(ApiClient::new(&cli.url, token, timeout));
    };
    let Some(ca) = &cli.ca_cert else {
        return Err(format!(
            "{}: an https URL needs --ca-cert (the cluster CA that signed the agent's certificate)",
            cli.url
        ));
    };
    let authority = rest.trim_end_matches('/');
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .map_err(|e| format!("--url {}: {e}", cli.url))?
        .next()
        .ok_or_else(|| format!("--url {}: no address", cli.url))?;
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .trim_matches(['[', ']']);
    let name = cli.tls_name.as_deref().unwrap_or(host);
    let tls = ax_agent::certs::https_client_from_ca(ca).map_err(|e| e.to_string())?;
    ApiClient::https(addr, name, tls, token, timeout).map_err(|e| e.to_string())
}

/// Prints `vm`'s console from the start (or its last 4 KiB), and with `follow` on until the VM ends.
async fn console(
    c: &ApiClient,
    vm: &str,
    from_start: bool,
    follow: bool,
) -> Result<i32, ClientError> {
    use std::io::Write as _;
    let header = |h: &reqwest::header::HeaderMap, name: &str| -> u64 {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut offset = if from_start {
        None
    } else {
        let (h, _) = c
            .get_raw(&format!("/v1/vms/{vm}/console?offset=0"))
            .await
            .or_else(|e| {
                // An offset below the base is refused: ask without one.
                if e.status() == Some(400) {
                    Ok((reqwest::header::HeaderMap::new(), bytes::Bytes::new()))
                } else {
                    Err(e)
                }
            })?;
        let end = header(&h, "x-ax-console-end");
        Some(
            end.saturating_sub(4096)
                .max(header(&h, "x-ax-console-base")),
        )
    };
    let mut out = std::io::stdout().lock();
    loop {
        let path = match offset {
            Some(o) => format!("/v1/vms/{vm}/console?offset={o}"),
            None => format!("/v1/vms/{vm}/console"),
        };
        let (h, body) = c.get_raw(&path).await?;
        let at = offset.unwrap_or_else(|| header(&h, "x-ax-console-base"));
        let _ = out.write_all(&body);
        let _ = out.flush();
        offset = Some(at + body.len() as u64);
        let ended = h
            .get("x-ax-console-ended")
            .is_some_and(|v| v.as_bytes() == b"true");
        let more = at + (body.len() as u64) < header(&h, "x-ax-console-end");
        if more {
            continue;
        }
        if ended || !follow {
            return Ok(0);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn transition_text(t: &Value) -> String {
    if t.is_null() {
        return "-".into();
    }
    let mut out = format!("{}→{} {}", s(&t["from"]), s(&t["to"]), s(&t["phase"]));
    if let Some(step) = t["step"].as_str() {
        out.push_str(&format!(" ({step}"));
        if let Some(f) = t["progress"]["fraction"].as_f64() {
            out.push_str(&format!(" {:.0}%", f * 100.0));
        }
        out.push(')');
    }
    out
}

async fn run(cli: &Cli, c: &ApiClient) -> Result<i32, ClientError> {
    match &cli.command {
        Cmd::Vm(VmCmd::List) => {
            let v: Value = c.get("/v1/vms").await?;
            if cli.json {
                print_json(&v);
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = v["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|vm| {
                    vec![
                        s(&vm["name"]),
                        state_text(vm),
                        s(&vm["level"]),
                        s(&vm["role"]),
                        s(&vm["host"]),
                        s(&vm["peer"]),
                        s(&vm["epoch"]),
                        vm["stun_p99_us"]
                            .as_u64()
                            .map_or_else(|| "-".into(), |b| format!("≤{b}")),
                        s(&vm["ack_lag"]),
                        transition_text(&vm["transition"]),
                    ]
                })
                .collect();
            table(
                &[
                    "NAME",
                    "STATE",
                    "LEVEL",
                    "ROLE",
                    "HOST",
                    "PEER",
                    "EPOCH",
                    "STUN_P99_US",
                    "ACK_LAG",
                    "TRANSITION",
                ],
                &rows,
            );
            Ok(0)
        }
        Cmd::Vm(VmCmd::Show { vm }) => {
            let v: Value = c.get(&format!("/v1/vms/{vm}")).await?;
            if cli.json {
                print_json(&v);
                return Ok(0);
            }
            show(&v);
            Ok(0)
        }
        Cmd::Vm(VmCmd::Create {
            name,
            guest,
            guest_elf,
            on_exit,
            memory_mib,
            vcpus,
            disk_mib,
            guest_args,
            no_start,
            restore_volume,
            nova_server,
            engine,
            qemu,
        }) => {
            let body = if engine == "qemu" {
                json!({
                    "name": name, "engine": "qemu", "qemu": qemu.definition()?,
                    "on_exit": on_exit, "memory_mib": memory_mib, "vcpus": vcpus,
                    "start": !no_start, "nova_server": nova_server,
                })
            } else {
                if let Some(flag) = qemu.given() {
                    return Err(ClientError::Input(format!(
                        "{flag} is for QEMU VMs: add --engine qemu"
                    )));
                }
                let elf = match guest_elf {
                    None => None,
                    Some(path) => {
                        use base64::Engine as _;
                        let bytes = ax_agent::guest::read_elf(path).map_err(ClientError::Token)?;
                        Some(base64::engine::general_purpose::STANDARD.encode(bytes))
                    }
                };
                json!({
                    "name": name, "engine": engine, "guest": guest, "guest_elf": elf,
                    "on_exit": on_exit, "memory_mib": memory_mib, "vcpus": vcpus,
                    "disk_mib": disk_mib, "guest_args": guest_args, "start": !no_start,
                    "restore_volume": restore_volume,
                    "nova_server": nova_server,
                })
            };
            let v: Value = c
                .call(reqwest::Method::POST, "/v1/vms", Some(&body))
                .await?;
            if cli.json {
                print_json(&v);
            } else {
                if v["engine"] == "qemu" {
                    println!(
                        "created {} (QEMU, {}): its serial console with `axctl vm console {}`",
                        s(&v["name"]),
                        s(&v["state"]),
                        s(&v["name"])
                    );
                } else {
                    println!(
                        "created {} ({}), output on {}",
                        s(&v["name"]),
                        s(&v["state"]),
                        s(&v["output"])
                    );
                }
            }
            Ok(0)
        }
        Cmd::Vm(VmCmd::Replicate { vm, wait, timeout }) => {
            let before: Value = c.get(&format!("/v1/vms/{vm}")).await?;
            let v: Value = c
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/vms/{vm}/volume/replicate"),
                    None::<&()>,
                )
                .await?;
            if !wait {
                if cli.json {
                    print_json(&v);
                } else {
                    println!("{vm}: replication asked ({})", volume_text(&v["volume"]));
                }
                return Ok(0);
            }
            wait_volume(cli, c, vm, &before["volume"], Duration::from_secs(*timeout)).await
        }
        Cmd::Vm(VmCmd::Console {
            vm,
            from_start,
            follow,
        }) => console(c, vm, *from_start, *follow).await,
        Cmd::Vm(VmCmd::Migrate {
            vm,
            to,
            downtime_limit_ms,
            max_bandwidth,
            no_wait,
        }) => {
            let tuning = (*downtime_limit_ms, *max_bandwidth);
            let ok = migrate(cli, c, vm, to, tuning, !*no_wait).await?;
            Ok(if ok { 0 } else { 1 })
        }
        Cmd::Host(HostCmd::Drain {
            host,
            to,
            downtime_limit_ms,
            max_bandwidth,
        }) => {
            let me: Value = c.get("/v1/host").await?;
            if me["name"].as_str().is_some_and(|n| n != host) {
                return Err(ClientError::Input(format!(
                    "the agent at {} is {}, not {host}: point --url at {host}'s agent",
                    c.base(),
                    s(&me["name"])
                )));
            }
            let v: Value = c.get("/v1/vms").await?;
            let mut failed = 0;
            for vm in v["vms"].as_array().cloned().unwrap_or_default() {
                let name = s(&vm["name"]);
                let why_not = if vm["engine"] != "qemu" {
                    Some("a native VM (live migration is for QEMU VMs)")
                } else if vm["role"] != "primary" {
                    Some("a standby")
                } else if vm["level"] == "ft" {
                    Some("at level ft")
                } else if vm["state"] != "running" {
                    Some("not running")
                } else {
                    None
                };
                if let Some(why) = why_not {
                    println!("{name}: stays on {host} ({why})");
                    continue;
                }
                if !migrate(
                    cli,
                    c,
                    &name,
                    to,
                    (*downtime_limit_ms, *max_bandwidth),
                    true,
                )
                .await?
                {
                    failed += 1;
                }
            }
            Ok(if failed == 0 { 0 } else { 1 })
        }
        Cmd::Vm(VmCmd::Start { vm }) | Cmd::Vm(VmCmd::Stop { vm }) => {
            let what = if matches!(cli.command, Cmd::Vm(VmCmd::Start { .. })) {
                "start"
            } else {
                "stop"
            };
            let v: Value = c
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/vms/{vm}/{what}"),
                    None::<&()>,
                )
                .await?;
            if cli.json {
                print_json(&v);
            } else {
                println!("{vm}: {}", s(&v["state"]));
            }
            Ok(0)
        }
        Cmd::Vm(VmCmd::Delete { vm, force }) => {
            let force = if *force { "?force=true" } else { "" };
            let _: Value = c
                .call(
                    reqwest::Method::DELETE,
                    &format!("/v1/vms/{vm}{force}"),
                    None::<&()>,
                )
                .await?;
            if cli.json {
                print_json(&json!({"deleted": vm}));
            } else {
                println!("{vm}: deleted");
            }
            Ok(0)
        }
        Cmd::Vm(VmCmd::SetLevel {
            vm,
            level,
            wait,
            timeout,
        }) => {
            let v: Value = c
                .call(
                    reqwest::Method::PUT,
                    &format!("/v1/vms/{vm}/level"),
                    Some(&json!({ "level": level })),
                )
                .await?;
            if !wait || v["transition"].is_null() {
                if cli.json {
                    print_json(&v);
                } else if v["transition"].is_null() {
                    println!("{vm}: already at level {}", s(&v["level"]));
                } else {
                    println!("{vm}: {}", transition_text(&v["transition"]));
                }
                return Ok(0);
            }
            wait_level(cli, c, vm, Duration::from_secs(*timeout)).await
        }
        Cmd::Recovery(RecoveryCmd::List { .. }) | Cmd::Recovery(RecoveryCmd::Show { .. }) => {
            let v: Value = c.get("/v1/recoveries").await?;
            Ok(print_ha(cli, &v))
        }
        Cmd::Host(HostCmd::Enable { host, .. }) => {
            let v: Value = c
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/hosts/{host}/enable"),
                    None::<&()>,
                )
                .await?;
            Ok(print_ha(cli, &v))
        }
        Cmd::Recovery(RecoveryCmd::History { .. }) => Ok(0), // handled by ha_command
        Cmd::Events {
            vm,
            since,
            limit,
            follow,
        } => {
            let mut since = *since;
            loop {
                let mut path = format!("/v1/events?since={since}&limit={limit}");
                if let Some(vm) = vm {
                    path.push_str(&format!("&vm={vm}"));
                }
                let v: Value = c.get(&path).await?;
                let evs = v["events"].as_array().cloned().unwrap_or_default();
                for e in &evs {
                    if cli.json {
                        println!("{e}");
                    } else {
                        println!(
                            "{:>6}  {}  {:<12} {:<22} {}",
                            s(&e["id"]),
                            fmt_time(e["time_ms"].as_u64().unwrap_or(0)),
                            s(&e["vm"]),
                            s(&e["kind"]),
                            s(&e["detail"])
                        );
                    }
                    since = since.max(e["id"].as_u64().unwrap_or(0));
                }
                if !follow {
                    return Ok(0);
                }
                if evs.is_empty() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Cmd::Host(HostCmd::List) => {
            let v: Value = c.get("/v1/hosts").await?;
            if cli.json {
                print_json(&v);
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = v["hosts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| {
                    vec![
                        s(&h["name"]),
                        if h["up"].as_bool() == Some(true) {
                            "up"
                        } else {
                            "down"
                        }
                        .into(),
                        s(&h["vms"]),
                        format!("{}/{}", s(&h["ft_vms"]), s(&h["max_ft_vms"])),
                        s(&h["version"]),
                    ]
                })
                .collect();
            table(&["HOST", "STATE", "VMS", "FT_VMS", "VERSION"], &rows);
            Ok(0)
        }
    }
}

/// Commands answered by the ha-node's control socket (no API token needed); `None` for the others.
fn ha_command(cli: &Cli) -> Option<i32> {
    let (socket, line) = match &cli.command {
        Cmd::Recovery(RecoveryCmd::List {
            ha_socket: Some(ha_socket),
        })
        | Cmd::Recovery(RecoveryCmd::Show {
            ha_socket: Some(ha_socket),
            ..
        }) => (ha_socket, "recoveries".to_string()),
        Cmd::Recovery(RecoveryCmd::History { ha_socket }) => (ha_socket, "history".to_string()),
        Cmd::Host(HostCmd::Enable {
            host,
            ha_socket: Some(ha_socket),
        }) => (ha_socket, format!("reenable {host}")),
        _ => return None,
    };
    let answer = match ax_agent::ha::control_request(socket, &line) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("axctl: {e}");
            return Some(EXIT_ERROR);
        }
    };
    if answer["ok"] != Value::Bool(true) {
        let error = s(&answer["error"]);
        eprintln!("axctl: ha-node: {error}");
        return Some(
            if error.contains("unknown host") || error.contains("not found") {
                EXIT_NOT_FOUND
            } else {
                EXIT_ERROR
            },
        );
    }
    Some(print_ha(cli, &answer))
}

/// Prints an HA answer (`recoveries`, `history` or `service`, from the ha-node or the API); the exit
/// code.
fn print_ha(cli: &Cli, answer: &Value) -> i32 {
    match &cli.command {
        Cmd::Recovery(RecoveryCmd::List { .. }) => {
            let recs = answer["recoveries"].as_array().cloned().unwrap_or_default();
            let failures = answer["host_failures"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if cli.json {
                print_json(&Value::Array(recs));
            } else {
                if !recs.is_empty() || failures.is_empty() {
                    recovery_table(&recs);
                }
                if !failures.is_empty() {
                    host_failure_table(&failures);
                }
            }
            0
        }
        Cmd::Recovery(RecoveryCmd::Show { what, .. }) => {
            let recs: Vec<Value> = answer["recoveries"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| s(&r["host"]) == *what || s(&r["id"]) == *what)
                .cloned()
                .collect();
            if recs.is_empty() {
                eprintln!("axctl: no recovery of host or id {what:?}");
                return EXIT_NOT_FOUND;
            }
            if cli.json {
                print_json(&Value::Array(recs));
            } else {
                for r in &recs {
                    recovery_show(r);
                }
            }
            0
        }
        Cmd::Recovery(RecoveryCmd::History { .. }) => {
            let events = answer["history"].as_array().cloned().unwrap_or_default();
            if cli.json {
                print_json(&Value::Array(events));
            } else {
                for e in &events {
                    let mut fields = e.as_object().cloned().unwrap_or_default();
                    let at = fields.remove("at_ms").and_then(|v| v.as_u64()).unwrap_or(0);
                    let host = fields.remove("host").map(|v| s(&v)).unwrap_or_default();
                    let event = fields.remove("event").map(|v| s(&v)).unwrap_or_default();
                    let recovery = fields.remove("recovery").map(|v| s(&v)).unwrap_or_default();
                    let rest: Vec<String> = fields
                        .iter()
                        .map(|(k, v)| format!("{k}={}", s(v)))
                        .collect();
                    println!(
                        "{}  #{recovery:<3} {host:<12} {event:<20} {}",
                        fmt_time(at),
                        rest.join(" ")
                    );
                }
            }
            0
        }
        Cmd::Host(HostCmd::Enable { host, .. }) => {
            if cli.json {
                print_json(answer);
            } else {
                println!(
                    "{host}: nova-compute enabled ({})",
                    s(&answer["service"]["status"])
                );
            }
            0
        }
        _ => 0,
    }
}

/// `+N ms` after `base`, or `-`.
fn after(base: u64, t: &Value) -> String {
    t.as_u64()
        .map_or("-".into(), |t| format!("+{}", t.saturating_sub(base)))
}

/// The first acceptance and the last recovery among a host recovery's VMs.
fn vm_span(r: &Value) -> (Value, Value) {
    let vms = r["vms"].as_array().cloned().unwrap_or_default();
    let first = vms.iter().filter_map(|v| v["accepted_ms"].as_u64()).min();
    let all_done = !vms.is_empty() && vms.iter().all(|v| v["recovered_ms"].is_u64());
    let last = vms.iter().filter_map(|v| v["recovered_ms"].as_u64()).max();
    (
        first.map_or(Value::Null, Value::from),
        if all_done {
            last.map_or(Value::Null, Value::from)
        } else {
            Value::Null
        },
    )
}

/// Host failures of VMs not under Nova (`host_failures` of `GET /v1/recoveries`): state, times from
/// the verdict, and each VM with where it went.
fn host_failure_table(failures: &[Value]) {
    let rows: Vec<Vec<String>> = failures
        .iter()
        .map(|f| {
            let base = f["declared_ms"].as_u64().unwrap_or(0);
            let vms: Vec<String> = f["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| format!("{}->{} {}", s(&v["vm"]), s(&v["target"]), s(&v["outcome"])))
                .collect();
            vec![
                s(&f["host"]),
                s(&f["state"]),
                fmt_time(base),
                format!("{}", f["silent_ms"].as_u64().unwrap_or(0)),
                after(base, &f["fenced_ms"]),
                if vms.is_empty() {
                    s(&f["detail"])
                } else {
                    vms.join(", ")
                },
            ]
        })
        .collect();
    table(
        &["HOST", "STATE", "DECLARED", "SILENT_MS", "FENCED", "VMS"],
        &rows,
    );
}

fn recovery_table(recs: &[Value]) {
    let rows: Vec<Vec<String>> = recs
        .iter()
        .map(|r| {
            let base = r["last_heartbeat_ms"].as_u64().unwrap_or(0);
            let (accepted, active) = vm_span(r);
            let vms = r["vms"].as_array().map_or(0, |v| v.len());
            let ok = r["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["recovered_ms"].is_u64())
                .count();
            vec![
                s(&r["id"]),
                s(&r["host"]),
                s(&r["outcome"]),
                fmt_time(base),
                after(base, &r["declared_ms"]),
                after(base, &r["fenced_ms"]),
                after(base, &r["forced_down_ms"]),
                after(base, &accepted),
                after(base, &active),
                format!("{ok}/{vms}"),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "HOST",
            "OUTCOME",
            "LAST_HEARTBEAT",
            "DEAD_MS",
            "FENCED_MS",
            "FORCED_DOWN_MS",
            "ACCEPTED_MS",
            "ACTIVE_MS",
            "VMS_OK",
        ],
        &rows,
    );
    println!("(ms after the host's last heartbeat; ACCEPTED: first evacuation accepted; ACTIVE: last VM running, or SHUTOFF if it was)");
}

fn recovery_show(r: &Value) {
    let base = r["last_heartbeat_ms"].as_u64().unwrap_or(0);
    println!(
        "recovery {} of {}: {}",
        s(&r["id"]),
        s(&r["host"]),
        s(&r["outcome"])
    );
    let step = |what: &str, t: &Value| {
        if let Some(ms) = t.as_u64() {
            println!(
                "  {:<28} {}  (+{} ms)",
                what,
                fmt_time(ms),
                ms.saturating_sub(base)
            );
        } else {
            println!("  {what:<28} -");
        }
    };
    step("last heartbeat", &r["last_heartbeat_ms"]);
    step("declared dead", &r["declared_ms"]);
    step("fenced", &r["fenced_ms"]);
    step("nova-compute forced down", &r["forced_down_ms"]);
    for vm in r["vms"].as_array().into_iter().flatten() {
        println!(
            "  VM {} ({}), was {}:",
            s(&vm["name"]),
            s(&vm["id"]),
            s(&vm["was"])
        );
        step("  evacuation accepted", &vm["accepted_ms"]);
        step(
            &format!("  {} on {}", s(&vm["status"]), s(&vm["to"])),
            &vm["recovered_ms"],
        );
        if !vm["error"].is_null() {
            println!("    error: {}", s(&vm["error"]));
        }
    }
    step("finished", &r["finished_ms"]);
}

/// `exited (code 7)`, `crashed (#UD at 0x4001a3)`, or the state as it is.
fn state_text(v: &Value) -> String {
    match (
        s(&v["state"]).as_str(),
        v["exit_code"].as_i64(),
        v["crash"].as_str(),
    ) {
        ("exited", Some(code), _) => format!("exited (code {code})"),
        ("crashed", _, Some(why)) => format!("crashed ({why})"),
        (st, _, _) => st.to_string(),
    }
}

/// How long ago `ms` (ms since the Unix epoch) was, roughly.
fn ago(ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        _ => format!("{} h", secs / 3600),
    }
}

fn fmt_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", ms % 1000)
}

/// Starts a live migration and (with `wait`) follows it to its end; whether it succeeded.
/// `--max-bandwidth`: bytes per second, with an optional binary suffix (`K`, `M`, `G`), at least
/// 64 KiB/s and at most 100 GiB/s (what the API accepts).
fn parse_bandwidth(v: &str) -> Result<u64, String> {
    let t = v.trim();
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| {
        format!("{v:?} is not a bandwidth: bytes per second, e.g. 67108864, 64M or 1G")
    })?;
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{v:?} is too large"))?;
    if !(64 << 10..=100 << 30).contains(&bytes) {
        return Err(format!(
            "{v:?} = {bytes} bytes/s: the bandwidth must be between 64K and 100G"
        ));
    }
    Ok(bytes)
}

async fn migrate(
    cli: &Cli,
    c: &ApiClient,
    vm: &str,
    to: &str,
    (downtime_limit_ms, max_bandwidth): (Option<u64>, Option<u64>),
    wait: bool,
) -> Result<bool, ClientError> {
    let body =
        json!({ "to": to, "downtime_limit_ms": downtime_limit_ms, "max_bandwidth": max_bandwidth });
    let v: Value = c
        .call(
            reqwest::Method::POST,
            &format!("/v1/vms/{vm}/migrate"),
            Some(&body),
        )
        .await?;
    if !wait {
        if cli.json {
            print_json(&v);
        } else {
            println!("{vm}: live migration to {to} started");
        }
        return Ok(true);
    }
    let mut last = Value::Null;
    let mut shown = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match c.get::<Value>(&format!("/v1/vms/{vm}")).await {
            Ok(v) => {
                let m = v["migration"].clone();
                if m["state"] == "failed" {
                    if cli.json {
                        print_json(&m);
                    } else {
                        println!("{vm}: live migration to {to} failed: {}", s(&m["error"]));
                    }
                    return Ok(false);
                }
                let p = &m["worker"]["progress"];
                let line = format!(
                    "{vm}: {} {} (RAM {} of {} MB, disk {} of {} MB)",
                    s(&m["state"]),
                    s(&p["status"]),
                    p["ram_transferred"].as_u64().unwrap_or(0) >> 20,
                    p["ram_total"].as_u64().unwrap_or(0) >> 20,
                    p["disk_done"].as_u64().unwrap_or(0) >> 20,
                    p["disk_total"].as_u64().unwrap_or(0) >> 20,
                );
                if line != shown && !cli.json {
                    println!("{line}");
                    shown = line;
                }
                last = m;
            }
            // The VM is the destination's now.
            Err(e) if e.status() == Some(404) => break,
            Err(e) => return Err(e),
        }
    }
    // The source's record is gone; its event history keeps the figures.
    let evs: Value = c
        .get(&format!("/v1/events?vm={vm}&limit=20"))
        .await
        .unwrap_or_default();
    let detail = evs["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["detail"].as_str())
        .rfind(|d| d.starts_with("migrated to"))
        .map(str::to_string)
        .unwrap_or_else(|| format!("migrated to {to}"));
    if cli.json {
        print_json(
            &json!({"vm": vm, "to": to, "report": last["worker"]["report"], "detail": detail}),
        );
    } else {
        println!("{vm}: {detail}");
    }
    Ok(true)
}

fn show(v: &Value) {
    println!("{:<20} {}", "name", s(&v["name"]));
    println!("{:<20} {}", "engine", s(&v["engine"]));
    println!("{:<20} {}", "state", state_text(v));
    let keys = [
        ("level", "level"),
        ("desired_level", "desired level"),
        ("role", "role"),
        ("host", "host"),
        ("peer", "peer"),
        ("protected", "protected"),
        ("epoch", "epoch"),
        ("generation", "generation"),
        ("stun_p99_us", "stun p99 ≤ (µs)"),
        ("ack_lag", "ack lag (epochs)"),
        ("bytes_sent", "bytes sent"),
        ("output", "output endpoint"),
        ("output_bytes", "output released"),
        ("restarts", "restarts"),
        ("on_exit", "on guest exit"),
        ("guest", "guest"),
        ("guest_elf_sha256", "guest ELF sha256"),
        ("memory_mib", "memory (MiB)"),
        ("vcpus", "vCPUs"),
        ("disk_mib", "disk (MiB)"),
        ("nova_server", "nova server"),
        ("down_reason", "down because"),
        ("last_error", "last error"),
    ];
    for (k, label) in keys {
        println!("{label:<20} {}", s(&v[k]));
    }
    let last_failover = v["last_failover_ms"].as_u64().map_or_else(
        || "-".to_string(),
        |ms| format!("{} ({} ago)", fmt_time(ms), ago(ms)),
    );
    println!("{:<20} {last_failover}", "last failover");
    if !v["nova_tag"].is_null() {
        println!("{:<20} {}", "nova ax:level", nova_tag_text(&v["nova_tag"]));
    }
    println!("{:<20} {}", "transition", transition_text(&v["transition"]));
    println!("{:<20} {}", "volume", volume_text(&v["volume"]));
}

/// One line about a VM's volume replication (`volume` of the VM view).
fn volume_text(v: &Value) -> String {
    if v.is_null() {
        return "-".into();
    }
    let st = &v["status"];
    let mut out = match st["version"].as_u64() {
        Some(n) => format!(
            "{} version {n} at {}",
            s(&st["target"]),
            st["last_ok_ms"].as_u64().map_or("-".into(), fmt_time)
        ),
        None => format!("{} no version yet", s(&st["target"])),
    };
    let last = &st["last"];
    if !last.is_null() {
        out += &format!(
            " ({}/{} chunks changed, {} MB sent, {} ms, guest I/O held {} µs)",
            s(&last["changed"]),
            s(&last["chunks"]),
            last["bytes_uploaded"].as_u64().unwrap_or(0) / 1_000_000,
            s(&last["elapsed_ms"]),
            s(&last["snapshot"]["io_held_us"])
        );
    }
    if v["replicating"] != true {
        out += "; not replicated now";
    }
    if let Some(r) = st["running"].as_object() {
        out += &format!(
            "; running: {} {}/{} MB",
            r["phase"].as_str().unwrap_or("?"),
            r["bytes_done"].as_u64().unwrap_or(0) / 1_000_000,
            r["bytes_total"].as_u64().unwrap_or(0) / 1_000_000
        );
    }
    if !st["last_error"].is_null() {
        out += &format!("; last error: {}", s(&st["last_error"]));
    }
    out
}

/// Waits until the VM's volume has a version newer than in `before` (or the attempt failed).
async fn wait_volume(
    cli: &Cli,
    c: &ApiClient,
    vm: &str,
    before: &Value,
    timeout: Duration,
) -> Result<i32, ClientError> {
    let attempts = before["status"]["attempts"].as_u64().unwrap_or(0);
    let bar = progress_bar(12);
    let t = Instant::now();
    loop {
        let v: Value = c.get(&format!("/v1/vms/{vm}")).await?;
        let st = &v["volume"]["status"];
        let running = &st["running"];
        let ended = running.is_null() && st["attempts"].as_u64().unwrap_or(0) > attempts;
        if ended && st["last_error"].is_null() {
            bar.finish_and_clear();
            if cli.json {
                print_json(&v);
            } else {
                println!("{vm}: {}", volume_text(&v["volume"]));
            }
            return Ok(0);
        }
        if ended {
            bar.finish_and_clear();
            eprintln!("axctl: {vm}: replication failed: {}", s(&st["last_error"]));
            return Ok(EXIT_NOT_REACHED);
        }
        if let (Some(done), Some(total)) = (
            running["bytes_done"].as_u64(),
            running["bytes_total"].as_u64().filter(|t| *t > 0),
        ) {
            bar.set_position(done * 1000 / total);
            bar.set_message(running["phase"].as_str().unwrap_or("").to_string());
        }
        if t.elapsed() > timeout {
            bar.finish_and_clear();
            eprintln!("axctl: {vm}: no new version after {timeout:?}");
            return Ok(EXIT_TIMEOUT);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A bar out of 1000 with a message of `msg_width` columns.
fn progress_bar(msg_width: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {{msg:{msg_width}}} [{{bar:30}}] {{percent:>3}}% {{elapsed}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// What the agent last read of a VM's Nova server: `ha (read 12:00:01.250Z)`, `absent (…)`, or why the
/// latest read failed.
fn nova_tag_text(t: &Value) -> String {
    let value = match &t["value"] {
        Value::String(v) => v.clone(),
        _ => "absent".into(),
    };
    let read = t["read_ms"].as_u64().map_or_else(
        || "never read".into(),
        |ms| format!("read {}", fmt_time(ms)),
    );
    match t["error"].as_str() {
        Some(e) => format!("{value} ({read}); latest read failed: {e}"),
        None => format!("{value} ({read})"),
    }
}

async fn wait_level(
    cli: &Cli,
    c: &ApiClient,
    vm: &str,
    timeout: Duration,
) -> Result<i32, ClientError> {
    let bar = progress_bar(32);
    let t = Instant::now();
    let mut last_step = String::new();
    loop {
        let v: Value = c.get(&format!("/v1/vms/{vm}")).await?;
        let tr = &v["transition"];
        if tr.is_null() {
            bar.finish_and_clear();
            if cli.json {
                print_json(&v);
            }
            let reached = v["level"] == v["desired_level"];
            if reached {
                if !cli.json {
                    println!(
                        "{vm}: level {} ({} s)",
                        s(&v["level"]),
                        t.elapsed().as_secs()
                    );
                }
                return Ok(0);
            }
            eprintln!(
                "axctl: {vm} stayed at level {} (wanted {}): {}",
                s(&v["level"]),
                s(&v["desired_level"]),
                s(&v["last_error"])
            );
            return Ok(EXIT_NOT_REACHED);
        }
        if tr["phase"] == "failed" {
            bar.finish_and_clear();
            eprintln!("axctl: {vm}: transition failed: {}", s(&tr["reason"]));
            return Ok(EXIT_NOT_REACHED);
        }
        let step = s(&tr["step"]);
        let steps = tr["steps"].as_array().map_or(1, |a| a.len().max(1)) as f64;
        let done = tr["done"].as_u64().unwrap_or(0) as f64;
        let within = tr["progress"]["fraction"]
            .as_f64()
            .filter(|_| step == "initial_sync")
            .unwrap_or(0.0);
        bar.set_position((((done + within) / steps) * 1000.0) as u64);
        bar.set_message(format!("{} {step}", s(&tr["phase"])));
        if step != last_step && bar.is_hidden() && !cli.json {
            eprintln!("{vm}: {}", transition_text(tr));
        }
        last_step = step;
        if t.elapsed() > timeout {
            bar.finish_and_clear();
            eprintln!(
                "axctl: {vm}: still {} after {timeout:?}",
                transition_text(tr)
            );
            return Ok(EXIT_TIMEOUT);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bandwidth;

    #[test]
    fn bandwidths_parse_with_binary_suffixes_and_bounds() {
        assert_eq!(parse_bandwidth("64K"), Ok(64 << 10));
        assert_eq!(parse_bandwidth("200m"), Ok(200 << 20));
        assert_eq!(parse_bandwidth("1G"), Ok(1 << 30));
        assert_eq!(parse_bandwidth("67108864"), Ok(64 << 20));
        assert!(parse_bandwidth("1K")
            .unwrap_err()
            .contains("between 64K and 100G"));
        assert!(parse_bandwidth("101G").is_err());
        assert!(parse_bandwidth("fast")
            .unwrap_err()
            .contains("not a bandwidth"));
        assert!(parse_bandwidth("99999999999999999999G").is_err());
    }
}

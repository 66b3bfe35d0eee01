//! Running ax agents on lab hosts, and judging what an observer saw.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use crate::netns::Lab;

/// Port of the replication link on every host.
pub const LINK_PORT: u16 = 7000;
/// Port of the heartbeats on every host.
pub const HB_PORT: u16 = 7001;
/// Port of the second heartbeat path (on the `repl` network) when a node has one.
pub const HB2_PORT: u16 = 7002;
/// Port of the output endpoint on every host.
pub const OUTPUT_PORT: u16 = 7100;
/// Port of the witness.
pub const WITNESS_PORT: u16 = 7400;

/// Variations of an ft-node command line (see [`ft_node_args_with`]).
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Guest program.
    pub guest: String,
    /// Guest arguments.
    pub guest_args: Vec<u64>,
    /// Disk of a VM booted by this node, MiB (0: none).
    pub disk_mib: u64,
    /// A second heartbeat path over the `repl` network ([`HB2_PORT`]).
    pub second_hb_path: bool,
    /// Peers' replication addresses to use instead of their own (e.g. a fault proxy in front of each).
    pub link_of: BTreeMap<String, SocketAddr>,
    /// `--fence-cmd`.
    pub fence_cmd: Option<String>,
}

impl Default for NodeOptions {
    /// A `counter` guest printing a line every 2 000 000 iterations, no disk, one heartbeat path.
    fn default() -> Self {
        NodeOptions {
            guest: "counter".into(),
            guest_args: vec![2_000_000],
            disk_mib: 0,
            second_hb_path: false,
            link_of: BTreeMap::new(),
            fence_cmd: None,
        }
    }
}

impl NodeOptions {
    /// A `disk-writer` guest on a `disk_mib` disk, printing every batch number (so its output reads
    /// 1, 2, 3, … like a counter's, and a `MISMATCH` line if its disk ever disagrees with what it wrote).
    pub fn disk_writer(disk_mib: u64) -> Self {
        NodeOptions {
            guest: "disk-writer".into(),
            guest_args: vec![8, 0, 1],
            disk_mib,
            ..NodeOptions::default()
        }
    }
}

/// The command line of `ax-agent ft-node` for `host` of an [`Lab::ax`] lab: link and output endpoint
/// on the `repl` network, heartbeats on `hb`, the witness on the `witness` host, every other host of
/// `hosts` as a peer, a `counter` guest printing a line every 2 000 000 iterations; disk images under
/// `pki`'s parent directory.
pub fn ft_node_args(
    lab: &Lab,
    host: &str,
    hosts: &[&str],
    pki: &Path,
    boot: bool,
) -> crate::netns::Result<Vec<String>> {
    ft_node_args_with(lab, host, hosts, pki, boot, &NodeOptions::default())
}

/// [`ft_node_args`] with [`NodeOptions`].
pub fn ft_node_args_with(
    lab: &Lab,
    host: &str,
    hosts: &[&str],
    pki: &Path,
    boot: bool,
    opts: &NodeOptions,
) -> crate::netns::Result<Vec<String>> {
    let repl = lab.addr(host, "repl")?;
    let hb = lab.addr(host, "hb")?;
    let state = pki
        .parent()
        .unwrap_or(Path::new("/tmp"))
        .join(format!("state-{host}"));
    let mut args: Vec<String> = vec![
        "ft-node".into(),
        "--host".into(),
        host.into(),
        "--pki".into(),
        pki.display().to_string(),
        "--link".into(),
        format!("{repl}:{LINK_PORT}"),
        "--hb".into(),
        format!("{hb}:{HB_PORT}"),
        "--output".into(),
        format!("{repl}:{OUTPUT_PORT}"),
        "--witness".into(),
        format!("{}:{WITNESS_PORT}", lab.addr("witness", "hb")?),
        "--guest".into(),
        opts.guest.clone(),
        "--state-dir".into(),
        state.display().to_string(),
        "--disk-mib".into(),
        opts.disk_mib.to_string(),
    ];
    for a in &opts.guest_args {
        args.push("--guest-arg".into());
        args.push(a.to_string());
    }
    if opts.second_hb_path {
        args.push("--hb2".into());
        args.push(format!("{repl}:{HB2_PORT}"));
    }
    if let Some(cmd) = &opts.fence_cmd {
        args.push("--fence-cmd".into());
        args.push(cmd.clone());
    }
    for p in hosts.iter().filter(|p| **p != host) {
        let link = match opts.link_of.get(*p) {
            Some(a) => a.to_string(),
            None => format!("{}:{LINK_PORT}", lab.addr(p, "repl")?),
        };
        let mut peer = format!("{p}={link},{}:{HB_PORT}", lab.addr(p, "hb")?);
        if opts.second_hb_path {
            peer.push_str(&format!(",{}:{HB2_PORT}", lab.addr(p, "repl")?));
        }
        args.push("--peer".into());
        args.push(peer);
    }
    if boot {
        args.push("--boot".into());
    }
    Ok(args)
}

/// The command line of `ax-agent witness` on the lab's `witness` host: the certificate `witness` of
/// `pki`, state in `state`; `init`: a new cluster (a missing state file starts fresh; without it, a
/// missing state file means lost state and the witness re-learns).
pub fn witness_args(
    lab: &Lab,
    state: &Path,
    pki: &Path,
    init: bool,
) -> crate::netns::Result<Vec<String>> {
    let mut args = vec![
        "witness".into(),
        "--listen".into(),
        format!("{}:{WITNESS_PORT}", lab.addr("witness", "hb")?),
        "--state".into(),
        state.display().to_string(),
        "--pki".into(),
        pki.display().to_string(),
        "--name".into(),
        "witness".into(),
    ];
    if init {
        args.push("--init".into());
    }
    Ok(args)
}

/// Client port of the first etcd member of [`etcd_in_lab`] (member `i`: `ETCD_PORT + 2i`, its peer port
/// one above).
pub const ETCD_PORT: u16 = 2379;

/// `n` etcd members on `host`'s address on `network`, data and logs under `dir`; killed on drop. The
/// nodes reach them with `--etcd URL` for each of `endpoints`.
pub fn etcd_in_lab(
    lab: &Lab,
    host: &str,
    network: &str,
    n: usize,
    dir: &Path,
) -> Result<failover::coordinator::etcd::LocalEtcd, String> {
    let ip = lab.addr(host, network).map_err(|e| e.to_string())?;
    let ports: Vec<(u16, u16)> = (0..n as u16)
        .map(|i| (ETCD_PORT + 2 * i, ETCD_PORT + 2 * i + 1))
        .collect();
    failover::coordinator::etcd::LocalEtcd::start_on(
        dir.to_owned(),
        None,
        ip.into(),
        &ports,
        &mut |args, log| spawn_etcd(lab, host, args, log),
    )
    .map_err(|e| e.to_string())
}

/// Starts member `i` of an [`etcd_in_lab`] cluster on `host` again (after `LocalEtcd::kill`), on
/// its data directory.
pub fn etcd_restart_in_lab(
    lab: &Lab,
    host: &str,
    etcd: &mut failover::coordinator::etcd::LocalEtcd,
    i: usize,
) -> Result<(), String> {
    etcd.restart(i, &mut |args, log| spawn_etcd(lab, host, args, log))
        .map_err(|e| e.to_string())
}

fn spawn_etcd(
    lab: &Lab,
    host: &str,
    args: &[String],
    log: std::fs::File,
) -> std::io::Result<std::process::Child> {
    lab.spawn_with(host, "etcd", |c| {
        c.args(args).stdout(std::process::Stdio::null()).stderr(log);
    })
    .map(crate::netns::HostChild::into_inner)
    .map_err(std::io::Error::other)
}

/// What an observer of a `counter` guest saw: the last number of its complete lines, the numbers
/// missing before it (lost), and the lines that repeated or went back (duplicated). A trailing partial
/// line is ignored; a line that is not a number counts as lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Last number seen.
    pub last: u64,
    /// Lines missing.
    pub lost: u64,
    /// Lines repeated.
    pub duplicated: u64,
}

/// Judges a `counter` output stream (see [`Verdict`]).
pub fn counter_verdict(bytes: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(bytes);
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let mut v = Verdict {
        last: 0,
        lost: 0,
        duplicated: 0,
    };
    for line in complete.lines() {
        match line.trim().parse::<u64>() {
            Ok(n) if n <= v.last => v.duplicated += 1,
            Ok(n) => {
                v.lost += n - v.last - 1;
                v.last = n;
            }
            Err(_) => v.lost += 1,
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let v = counter_verdict(b"1\n2\n3\n4");
        assert_eq!((v.last, v.lost, v.duplicated), (3, 0, 0));
        let v = counter_verdict(b"1\n3\n3\n2\n4\n");
        assert_eq!((v.last, v.lost, v.duplicated), (4, 1, 2));
        assert_eq!(counter_verdict(b"").last, 0);
    }
}

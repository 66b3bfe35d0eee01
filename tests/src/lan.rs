//! A layer-2 LAN for a [`Lab`]: the segment VMs' NICs and a client share, whichever host runs the VM.
//!
//! ```text
//!                       switch namespace: bridge `lan`
//!              ┌──────────────────┼──────────────────┐
//!          l<i>-lan            l<j>-lan           l<k>-lan        (veth, switch side)
//!              │                  │                  │
//!   host-a: lan ─ br0 ─ tap…   host-b: lan ─ br0   client: lan 10.77.3.2/24 (fixed MAC)
//! ```
//!
//! * Each VM host gets a bridge `br0` (no address) with its `lan` veth as a port: a QEMU NIC whose def
//!   names bridge `br0` (ax creates the tap and enslaves it) is on the LAN on every such host, so a VM
//!   keeps its MAC and IP wherever it runs; after a failover QEMU's `announce-self` moves the MAC in the
//!   switch's forwarding table.
//! * The client host (a lab host, usually attached to no other network) gets the address
//!   [`CLIENT_IP`]`/24` and the MAC [`CLIENT_MAC`] on its `lan` interface, so guests without ARP (the
//!   `qudp` test guest) can address it directly (`dmac=`).
//! * Built inside the lab's namespaces only; the lab's teardown removes it (the switch namespace holds
//!   the `lan` bridge and one end of every veth).

use std::net::Ipv4Addr;
use std::process::Command;

use crate::netns::{run, Lab, NetnsError, Result};

/// The bridge a VM's NIC names on every VM host.
pub const VM_BRIDGE: &str = "br0";
/// The client's address on the LAN.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 2);
/// The client's MAC on the LAN (locally administered).
pub const CLIENT_MAC: &str = "02:a0:00:00:00:02";
/// An address for a VM on the LAN (nothing else uses it).
pub const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 100);
/// Prefix length of the LAN.
pub const PREFIX_LEN: u8 = 24;
/// The bridge in the switch namespace.
const SWITCH_BRIDGE: &str = "lan";
/// The interface name in each host namespace.
const HOST_IF: &str = "lan";

fn ip(netns: &str, args: &[&str]) -> Result<()> {
    let mut c = Command::new("ip");
    c.arg("-n").arg(netns).args(args);
    run(&mut c, format!("ip -n {netns} {}", args.join(" "))).map(|_| ())
}

/// The LAN of a lab, as [`Lan::build`] made it.
#[derive(Debug, Clone)]
pub struct Lan {
    /// Hosts with a `br0` on the LAN (where VMs may run).
    pub vm_hosts: Vec<String>,
    /// The client host.
    pub client: String,
}

impl Lan {
    /// Wires `vm_hosts` (a `br0` each) and `client` ([`CLIENT_IP`], [`CLIENT_MAC`]) to one bridge in the
    /// lab's switch namespace. Fails on an unknown host or a failed `ip` command (the lab's teardown
    /// removes whatever was created).
    pub fn build(lab: &Lab, vm_hosts: &[&str], client: &str) -> Result<Lan> {
        let sw = lab.switch_netns().to_string();
        ip(&sw, &["link", "add", SWITCH_BRIDGE, "type", "bridge"])?;
        ip(&sw, &["link", "set", SWITCH_BRIDGE, "up"])?;
        let port = |host: &str| -> Result<String> {
            let i = lab
                .hosts()
                .iter()
                .position(|h| h.name == host)
                .ok_or_else(|| NetnsError::UnknownHost(host.to_string()))?;
            let ns = lab.netns_name(host)?.to_string();
            let sw_if = format!("l{i}-lan");
            ip(
                &sw,
                &[
                    "link", "add", &sw_if, "type", "veth", "peer", "name", HOST_IF, "netns", &ns,
                ],
            )?;
            ip(&sw, &["link", "set", &sw_if, "master", SWITCH_BRIDGE])?;
            ip(&sw, &["link", "set", &sw_if, "up"])?;
            Ok(ns)
        };
        for host in vm_hosts {
            let ns = port(host)?;
            ip(&ns, &["link", "add", VM_BRIDGE, "type", "bridge"])?;
            ip(&ns, &["link", "set", HOST_IF, "master", VM_BRIDGE])?;
            ip(&ns, &["link", "set", HOST_IF, "up"])?;
            ip(&ns, &["link", "set", VM_BRIDGE, "up"])?;
        }
        let ns = port(client)?;
        ip(&ns, &["link", "set", HOST_IF, "address", CLIENT_MAC])?;
        let cidr = format!("{CLIENT_IP}/{PREFIX_LEN}");
        ip(&ns, &["addr", "add", &cidr, "dev", HOST_IF])?;
        ip(&ns, &["link", "set", HOST_IF, "up"])?;
        Ok(Lan {
            vm_hosts: vm_hosts.iter().map(|s| s.to_string()).collect(),
            client: client.to_string(),
        })
    }

    /// The VM host whose LAN port the switch has learned `mac` on (from `bridge fdb` in the switch
    /// namespace), if any: where the LAN delivers frames for that MAC.
    pub fn host_of_mac(&self, lab: &Lab, mac: &str) -> Result<Option<String>> {
        let sw = lab.switch_netns().to_string();
        let mut c = Command::new("bridge");
        c.args(["-n", &sw, "fdb", "show", "br", SWITCH_BRIDGE]);
        let out = run(
            &mut c,
            format!("bridge -n {sw} fdb show br {SWITCH_BRIDGE}"),
        )?;
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        let mac = mac.to_lowercase();
        let port = text.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(mac.as_str()) && w.next() == Some("dev")).then(|| w.next())?
        });
        let Some(port) = port else { return Ok(None) };
        Ok(self.vm_hosts.iter().find_map(|h| {
            let i = lab.hosts().iter().position(|x| &x.name == h)?;
            (port == format!("l{i}-lan")).then(|| h.clone())
        }))
    }

    /// The `qudp` guest's command line for a stream to the client's `port` at `rate` packets per
    /// second, from [`VM_IP`], printing every `print`-th sequence number.
    pub fn qudp_append(port: u16, rate: u32, print: u32) -> String {
        format!(
            "src={VM_IP} dst={CLIENT_IP} dmac={CLIENT_MAC} port={port} rate={rate} print={print}"
        )
    }
}

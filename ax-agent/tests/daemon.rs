//! The agent daemon as operators run it: real `ax-agent run` processes on loopback (no namespaces).
//!
//! - the OpenAPI document lists exactly the router's routes, and the server serves it byte for byte;
//! - contract: every documented (route, status) pair is produced by a real server on port 0;
//! - start-up refusals: a bad config names the key, a token file others can read is refused;
//! - restart: state survives and workers are re-attached (KVM);
//! - a transition ha→ft with the agent SIGKILLed midway resumes or rolls back, and says so (KVM);
//! - Nova tagging against a stand-in Keystone and Nova: `ax:level` sets the level, binds `PUT /level`,
//!   warns once about an invalid value and about an unreachable Nova;
//! - systemd-analyze verify on the units.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::*;

fn openapi() -> Value {
    serde_json::from_str(include_str!("../openapi.json")).unwrap()
}

/// (method, path, status) of every documented response.
fn documented() -> BTreeSet<(String, String, u16)> {
    let doc = openapi();
    let mut out = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            for code in op["responses"].as_object().unwrap().keys() {
                out.insert((method.to_uppercase(), path.clone(), code.parse().unwrap()));
            }
        }
    }
    out
}

#[test]
fn openapi_documents_exactly_the_routes_the_router_serves() {
    let doc = openapi();
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            if method != "parameters" {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = ax_agent::daemon::api::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served, "openapi.json and api::ROUTES differ");
}

/// Every documented (route, status) pair, produced against a real server; the routes' templates are
/// checked to be served (not the fallback) along the way.
#[test]
fn contract_every_documented_route_and_status() {
    let dir = scratch("contract");
    let storage = dir.join("a");
    // A peer that does not run: placement sees it down; its name is accepted by the standby routes.
    let peer = "[[peers]]\nname = \"host-z\"\napi = \"127.0.0.1:9\"\nlink = \"127.0.0.1\"\nhb = \"127.0.0.1\"\n";
    // A stand-in for this host's ha-node on its control socket (the real one is tests/e2e/nova.sh's).
    let ha_socket = dir.join("ha.sock");
    let ha = format!(
        "[ha]\nrestart_limit = 3\nrestart_window_s = 600\nnode_socket = \"{}\"\n",
        ha_socket.display()
    );
    fake_ha_node(&ha_socket);
    // A volume target that does not answer: replications and restores fail, and say so.
    let volume = "[sheepdog]\naddress = \"127.0.0.1:9\"\n[volume]\ninterval_s = 3600\n";
    let cfg = one_host_config(&dir, &storage, 21000, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[api]", &format!("{peer}{ha}{volume}[api]"));
    std::fs::write(&cfg, text).unwrap();
    let mut a = Agent::start(&cfg, &storage);
    let seen: std::cell::RefCell<BTreeSet<(String, String, u16)>> = Default::default();
    let check = |a: &Agent,
                 method: &str,
                 template: &str,
                 path: &str,
                 body: Option<Value>,
                 want: u16|
     -> Value {
        let (code, v) = a.req(method, path, body.as_ref());
        assert_eq!(code, want, "{method} {path}: {v}");
        if code >= 400 {
            assert!(v["error"].is_string(), "{method} {path}: error body {v}");
            assert_ne!(
                v["error"], "no such route (see /openapi.json)",
                "{method} {template} is not routed"
            );
        }
        seen.borrow_mut()
            .insert((method.to_string(), template.to_string(), code));
        v
    };
    // Public routes.
    let v = check(&a, "GET", "/healthz", "/healthz", None, 200);
    assert_eq!(v["status"], "ok");
    check(&a, "GET", "/readyz", "/readyz", None, 200);
    let (code, served) = http(a.addr, "GET", "/openapi.json", None, None);
    assert_eq!(code, 200);
    assert_eq!(
        served,
        openapi(),
        "the served document differs from ax-agent/openapi.json"
    );
    seen.borrow_mut()
        .insert(("GET".into(), "/openapi.json".into(), 200));
    let (code, metrics) = http(a.addr, "GET", "/metrics", None, None);
    assert_eq!(code, 200);
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    for m in [
        "ax_transitions_total",
        "ax_failovers_total",
        "ax_stun_seconds",
        "ax_ha_node_up 1",
        "ax_evacuations_total{outcome=\"accepted\"} 1",
        "ax_evacuations_total{outcome=\"recovered\"} 1",
        "ax_volume_replications_total{outcome=\"ok\"} 0",
    ] {
        assert!(metrics.contains(m), "metrics lack {m}: {metrics}");
    }
    seen.borrow_mut()
        .insert(("GET".into(), "/metrics".into(), 200));

    // HA recoveries, through the ha-node's socket.
    let v = check(&a, "GET", "/v1/recoveries", "/v1/recoveries", None, 200);
    assert_eq!(v["recoveries"][0]["host"], "compute1", "{v}");
    assert_eq!(v["recoveries"][0]["vms"][0]["accepted_ms"], 5, "{v}");
    let t = "/v1/hosts/{host}/enable";
    let v = check(&a, "POST", t, "/v1/hosts/compute1/enable", None, 200);
    assert_eq!(v["service"]["status"], "enabled", "{v}");
    let v = check(&a, "POST", t, "/v1/hosts/compute9/enable", None, 409);
    assert!(v["error"].as_str().unwrap().contains("still in use"), "{v}");
    let v = check(&a, "POST", t, "/v1/hosts/bad%20name!/enable", None, 400);
    assert_eq!(v["field"], "host");
    // axctl reads them through the API.
    let axctl = |args: &[&str]| axctl(a.addr, &dir, args);
    let list = axctl(&["recovery", "list"]);
    assert!(
        list.contains("compute1") && list.contains("FENCED_MS"),
        "{list}"
    );
    let show = axctl(&["recovery", "show", "compute1"]);
    assert!(
        show.contains("evacuation accepted") && show.contains("(+4 ms)"),
        "{show}"
    );
    std::fs::remove_file(&ha_socket).unwrap();
    let (_, metrics) = http(a.addr, "GET", "/metrics", None, None);
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        metrics.contains("ax_ha_node_up 0") && !metrics.contains("ax_evacuations_total{"),
        "{metrics}"
    );
    check(&a, "GET", "/v1/recoveries", "/v1/recoveries", None, 503);
    check(&a, "POST", t, "/v1/hosts/compute1/enable", None, 503);

    // Auth: every /v1 route answers 401 without the token.
    for (m, p) in ax_agent::daemon::api::ROUTES
        .iter()
        .filter(|(_, p)| p.starts_with("/v1"))
    {
        let path = p.replace("{name}", "x");
        let (code, v) = http(a.addr, m, &path, Some(&json!({})), None);
        assert_eq!(code, 401, "{m} {p}: {v}");
        let (code, _) = http(a.addr, m, &path, Some(&json!({})), Some("wrong"));
        assert_eq!(code, 401, "{m} {p} with a wrong token");
        seen.borrow_mut()
            .insert((m.to_string(), p.to_string(), 401));
    }

    // VMs (defined, not started: no KVM needed).
    check(&a, "GET", "/v1/vms", "/v1/vms", None, 200);
    let vm = json!({"name": "web1", "guest": "counter", "memory_mib": 64, "start": false,
                    "nova_server": "3f0c5a5e-8d7b-4b8e-9a61-2f1d3c4b5a69"});
    let v = check(&a, "POST", "/v1/vms", "/v1/vms", Some(vm.clone()), 201);
    assert_eq!(
        (v["state"].as_str(), v["level"].as_str()),
        (Some("stopped"), Some("none"))
    );
    assert_eq!(v["nova_server"], vm["nova_server"], "{v}");
    assert!(v["nova_tag"].is_null(), "nova_tagging is off: {v}");
    check(&a, "POST", "/v1/vms", "/v1/vms", Some(vm.clone()), 409);
    let mut same_server = vm.clone();
    same_server["name"] = json!("web2");
    let v = check(&a, "POST", "/v1/vms", "/v1/vms", Some(same_server), 409);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("web1 already stands for Nova server"),
        "{v}"
    );
    for (body, field) in [
        (json!({"guest": "counter"}), "name"),
        (json!({"name": "Bad Name"}), "name"),
        (json!({"name": "x", "guest": "doom"}), "guest"),
        (json!({"name": "x", "memory_mib": 1}), "memory_mib"),
        (json!({"name": "x", "memory_mib": "lots"}), "memory_mib"),
        (json!({"name": "x", "vcpus": 0}), "vcpus"),
        (json!({"name": "x", "disk_mib": -1}), "disk_mib"),
        (json!({"name": "x", "guest_args": [1, "a"]}), "guest_args"),
        (json!({"name": "x", "start": "yes"}), "start"),
        (json!({"name": "x", "restore_volume": 1}), "restore_volume"),
        (json!({"name": "x", "colour": "red"}), "colour"),
        (json!({"name": "x", "nova_server": ""}), "nova_server"),
        (json!({"name": "x", "nova_server": "a/b"}), "nova_server"),
        (
            json!({"name": "x", "nova_server": "x".repeat(65)}),
            "nova_server",
        ),
        (json!({"name": "x", "nova_server": 7}), "nova_server"),
        (
            json!({"name": "x", "guest_elf": "not base64!"}),
            "guest_elf",
        ),
        (json!({"name": "x", "guest_elf": "aGVsbG8="}), "guest_elf"),
        (json!({"name": "x", "guest_elf": 7}), "guest_elf"),
        (json!({"name": "x", "on_exit": "explode"}), "on_exit"),
        (json!([1, 2]), "body"),
    ] {
        let v = check(&a, "POST", "/v1/vms", "/v1/vms", Some(body.clone()), 400);
        assert_eq!(v["field"], field, "{body}: {v}");
    }
    let (code, v) = http(a.addr, "POST", "/v1/vms", None, Some(TOKEN));
    assert_eq!((code, v["field"].as_str()), (400, Some("body")));
    let v = check(&a, "GET", "/v1/vms/{name}", "/v1/vms/web1", None, 200);
    assert_eq!(v["role"], "primary");
    check(&a, "GET", "/v1/vms/{name}", "/v1/vms/nope", None, 404);

    // Levels: 400 naming the field, 404, 200 (unchanged), 202 (started, then again: idempotent),
    // 409 (ft on a stopped VM; another transition while one runs is covered by the policy tests).
    let lv = |l: &str| Some(json!({ "level": l }));
    let v = check(
        &a,
        "PUT",
        "/v1/vms/{name}/level",
        "/v1/vms/web1/level",
        lv("gold"),
        400,
    );
    assert_eq!(v["field"], "level");
    let v = check(
        &a,
        "PUT",
        "/v1/vms/{name}/level",
        "/v1/vms/web1/level",
        Some(json!({"lvl": "ha"})),
        400,
    );
    assert_eq!(v["field"], "lvl");
    check(
        &a,
        "PUT",
        "/v1/vms/{name}/level",
        "/v1/vms/nope/level",
        lv("ha"),
        404,
    );
    check(
        &a,
        "PUT",
        "/v1/vms/{name}/level",
        "/v1/vms/web1/level",
        lv("none"),
        200,
    );
    check(
        &a,
        "PUT",
        "/v1/vms/{name}/level",
        "/v1/vms/web1/level",
        lv("ft"),
        409,
    );
    let v = check(
        &a,
        "PUT",
        "/v1/vms/{name}/level",
        "/v1/vms/web1/level",
        lv("ha"),
        202,
    );
    assert_eq!(v["transition"]["to"], "ha");
    let t = Instant::now();
    loop {
        let (_, v) = a.req("GET", "/v1/vms/web1", None);
        if v["transition"].is_null() {
            assert_eq!(v["level"], "ha", "{v}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "none→ha did not end: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    check(
        &a,
        "PUT",
        "/v1/vms/{name}/level",
        "/v1/vms/web1/level",
        lv("ha"),
        200,
    );

    // Start / stop (start spawns a worker: without KVM it crashes, the answer is still 200).
    for (what, vm, want) in [
        ("start", "nope", 404),
        ("stop", "nope", 404),
        ("stop", "web1", 200),
        ("start", "web1", 200),
        ("stop", "web1", 200),
    ] {
        let template = format!("/v1/vms/{{name}}/{what}");
        check(
            &a,
            "POST",
            &template,
            &format!("/v1/vms/{vm}/{what}"),
            None,
            want,
        );
    }

    // Volume replication: 404, 409 (no disk), 503 (restore from a target that does not answer),
    // 202 (asked: the replication fails, and the VM's status and the events say why).
    let t = "/v1/vms/{name}/volume/replicate";
    check(&a, "POST", t, "/v1/vms/nope/volume/replicate", None, 404);
    let v = check(&a, "POST", t, "/v1/vms/web1/volume/replicate", None, 409);
    assert!(
        v["error"].as_str().unwrap().contains("not replicated"),
        "{v}"
    );
    let restore = json!({"name": "back1", "disk_mib": 8, "start": false, "restore_volume": true});
    let v = check(&a, "POST", "/v1/vms", "/v1/vms", Some(restore), 503);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("sheepdog:127.0.0.1:9"),
        "{v}"
    );
    check(&a, "GET", "/v1/vms/{name}", "/v1/vms/back1", None, 404);
    if kvm_or_skip("contract: POST /v1/vms/{name}/volume/replicate 202 (a running VM)") {
        running_at_ha(
            &a,
            json!({"name": "vol1", "guest": "disk-writer", "memory_mib": 32, "disk_mib": 8}),
        );
        let v = check(&a, "POST", t, "/v1/vms/vol1/volume/replicate", None, 202);
        assert_eq!(v["volume"]["replicating"], true, "{v}");
        let v = wait_vm(&a, "vol1", "the failed replication reported", 30, |v| {
            v["volume"]["status"]["last_error"].is_string()
        });
        assert!(v["volume"]["status"]["version"].is_null(), "{v}");
        let failed = events(&a, "vol1").iter().any(|e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("volume replication to sheepdog:127.0.0.1:9 failed"))
        });
        assert!(failed, "no event for the failed replication");
        let (code, _) = a.req("PUT", "/v1/vms/vol1/level", lv("none").as_ref());
        assert_eq!(code, 202);
        wait_vm(&a, "vol1", "vol1 at none", 20, |v| {
            v["level"] == "none" && v["transition"].is_null()
        });
        let v = check(&a, "POST", t, "/v1/vms/vol1/volume/replicate", None, 409);
        assert!(
            v["error"].as_str().unwrap().contains("not replicated"),
            "{v}"
        );
        let (code, _) = a.req("POST", "/v1/vms/vol1/stop", None);
        assert_eq!(code, 200);
        let (code, _) = a.req("DELETE", "/v1/vms/vol1", None);
        assert_eq!(code, 204);
    } else {
        seen.borrow_mut().insert(("POST".into(), t.into(), 202));
    }

    // Events.
    let v = check(
        &a,
        "GET",
        "/v1/events",
        "/v1/events?vm=web1&since=0&limit=50",
        None,
        200,
    );
    let kinds: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"transition_done"), "{kinds:?}");
    let v = check(&a, "GET", "/v1/events", "/v1/events?vm=nope", None, 404);
    assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");
    // The console of a VM that never ran: empty, ended; the standby's is on its primary.
    let ct = "/v1/vms/{name}/console";
    check(&a, "GET", ct, "/v1/vms/web1/console", None, 200);
    check(&a, "GET", ct, "/v1/vms/nope/console", None, 404);
    let v = check(&a, "GET", ct, "/v1/vms/web1/console?offset=x", None, 400);
    assert_eq!(v["field"], "offset");
    for q in ["since=-1", "limit=0", "limit=x", "colour=red"] {
        let v = check(
            &a,
            "GET",
            "/v1/events",
            &format!("/v1/events?{q}"),
            None,
            400,
        );
        assert_eq!(v["field"], q.split('=').next().unwrap(), "{q}: {v}");
    }

    // Hosts: the configured peer is down.
    let v = check(&a, "GET", "/v1/hosts", "/v1/hosts", None, 200);
    assert_eq!(v["hosts"][0]["name"], "host-a");
    assert_eq!(v["hosts"][1]["up"], false);
    let v = check(&a, "GET", "/v1/host", "/v1/host", None, 200);
    assert_eq!(v["name"], "host-a");

    // Standbys (peer calls). A standby worker waits for a session; it needs no KVM until one comes.
    let def = json!({"name": "sb1", "guest": "counter", "memory_mib": 64, "vcpus": 1, "disk_mib": 0,
                     "guest_args": [], "output_port": 21025});
    let sb = json!({"primary": "host-z", "def": def, "primary_link": "127.0.0.1:21099",
                    "primary_hb": "127.0.0.1:21098"});
    let put_sb = |body: Value, want: u16| {
        check(
            &a,
            "PUT",
            "/v1/standbys/{name}",
            "/v1/standbys/sb1",
            Some(body),
            want,
        )
    };
    let v = put_sb(sb.clone(), 200);
    assert_eq!(
        v["link_port"].as_u64().map(|p| p >= 21000),
        Some(true),
        "{v}"
    );
    let again = put_sb(sb.clone(), 200);
    assert_eq!(v, again, "PUT standby is idempotent");
    for (field, value) in [
        ("primary", json!("host-q")),
        ("primary_link", json!("nowhere")),
        ("primary_hb", json!(7)),
    ] {
        let mut bad = sb.clone();
        bad[field] = value;
        let v = put_sb(bad, 400);
        assert_eq!(v["field"], field);
    }
    let mut other = sb.clone();
    other["def"]["name"] = json!("web1");
    check(
        &a,
        "PUT",
        "/v1/standbys/{name}",
        "/v1/standbys/web1",
        Some(other),
        409,
    );
    let v = check(&a, "GET", "/v1/vms/{name}", "/v1/vms/sb1", None, 200);
    assert_eq!(
        (v["role"].as_str(), v["host"].as_str()),
        (Some("secondary"), Some("host-z"))
    );
    check(
        &a,
        "PUT",
        "/v1/vms/{name}/level",
        "/v1/vms/sb1/level",
        lv("none"),
        409,
    );
    check(
        &a,
        "POST",
        "/v1/vms/{name}/start",
        "/v1/vms/sb1/start",
        None,
        409,
    );
    check(
        &a,
        "POST",
        "/v1/vms/{name}/stop",
        "/v1/vms/sb1/stop",
        None,
        409,
    );
    check(
        &a,
        "GET",
        "/v1/vms/{name}/console",
        "/v1/vms/sb1/console",
        None,
        409,
    );
    check(&a, "DELETE", "/v1/vms/{name}", "/v1/vms/sb1", None, 409);
    check(
        &a,
        "DELETE",
        "/v1/standbys/{name}",
        "/v1/standbys/web1",
        None,
        409,
    );
    check(
        &a,
        "DELETE",
        "/v1/standbys/{name}",
        "/v1/standbys/sb1",
        None,
        204,
    );
    check(
        &a,
        "DELETE",
        "/v1/standbys/{name}",
        "/v1/standbys/sb1",
        None,
        404,
    );

    // Delete.
    check(&a, "DELETE", "/v1/vms/{name}", "/v1/vms/nope", None, 404);
    check(&a, "DELETE", "/v1/vms/{name}", "/v1/vms/web1", None, 204);
    check(&a, "GET", "/v1/vms/{name}", "/v1/vms/web1", None, 404);

    // Live migration of QEMU VMs (a real QEMU and the Linux test guest; the migration itself, and
    // `POST /v1/incoming/{name}/finish` answering 200, are in tests/qemu.rs).
    if let Some(guest) = linux_guest("contract_every_documented_route_and_status (live migration)")
    {
        let qdef = json!({"kernel": guest.0, "initrd": guest.1, "accel": "tcg", "append": "quiet"});
        let m = "/v1/vms/{name}/migrate";
        let to_z = Some(json!({"to": "host-z"}));
        check(&a, "POST", m, "/v1/vms/nope/migrate", to_z.clone(), 404);
        let (code, v) = a.req(
            "POST",
            "/v1/vms",
            Some(&json!({"name": "qm1", "engine": "qemu", "qemu": qdef})),
        );
        assert_eq!(code, 201, "{v}");
        check(&a, "POST", m, "/v1/vms/qm1/migrate", Some(json!({})), 400);
        let v = check(
            &a,
            "POST",
            m,
            "/v1/vms/qm1/migrate",
            Some(json!({"to": "host-q"})),
            400,
        );
        assert!(v["error"].as_str().unwrap().contains("unknown host"), "{v}");
        wait_vm(&a, "qm1", "QEMU running", 60, |v| v["state"] == "running");
        // host-z does not run: the migration starts, then fails without touching the guest.
        check(&a, "POST", m, "/v1/vms/qm1/migrate", to_z.clone(), 202);
        let v = wait_vm(&a, "qm1", "migration failed", 60, |v| {
            v["migration"]["state"] == "failed"
        });
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(a.req("POST", "/v1/vms/qm1/stop", None).0, 200);
        check(&a, "POST", m, "/v1/vms/qm1/migrate", to_z, 409);
        // The destination's side, as the source's agent calls it.
        let inc = "/v1/incoming/{name}";
        let def = json!({"name": "qm2", "guest": "qemu", "memory_mib": 256, "vcpus": 1,
                         "disk_mib": 0, "guest_args": [], "output_port": 0, "qemu": qdef});
        let body = json!({"source": "host-z", "def": def, "level": "ha", "disks": []});
        check(
            &a,
            "PUT",
            inc,
            "/v1/incoming/qm2",
            Some(json!({"source": "host-z"})),
            400,
        );
        let v = check(&a, "PUT", inc, "/v1/incoming/qm2", Some(body.clone()), 200);
        assert!(v["migrate_port"].as_u64().is_some_and(|p| p > 0), "{v}");
        wait_vm(&a, "qm2", "waiting for the migration", 30, |v| {
            v["state"] == "incoming"
        });
        // The same source asking again (a retry after a lost answer, or a restarted source agent)
        // gets the copy already prepared; another source is refused.
        let again = check(&a, "PUT", inc, "/v1/incoming/qm2", Some(body.clone()), 200);
        assert_eq!(again["migrate_port"], v["migrate_port"], "{again}");
        let mut other = body;
        other["source"] = json!("host-y");
        check(&a, "PUT", inc, "/v1/incoming/qm2", Some(other), 409);
        let fin = "/v1/incoming/{name}/finish";
        check(&a, "POST", fin, "/v1/incoming/nope/finish", None, 404);
        check(&a, "DELETE", inc, "/v1/incoming/qm2", None, 204);
        check(&a, "DELETE", inc, "/v1/incoming/qm2", None, 404);
        check(&a, "GET", "/v1/vms/{name}", "/v1/vms/qm2", None, 404);
        seen.borrow_mut().insert(("POST".into(), fin.into(), 200));
        check(&a, "DELETE", "/v1/vms/{name}", "/v1/vms/qm1", None, 204);
    }

    // Takeovers (a peer's call after a host failure): this agent runs no host-failure recovery (no
    // [coordinator]), so it refuses; a real takeover (201) is in `host_failure_restarts_*` below.
    let tk = "/v1/takeovers/{name}";
    check(
        &a,
        "POST",
        tk,
        "/v1/takeovers/web",
        Some(json!({"from": "host z"})),
        400,
    );
    check(
        &a,
        "POST",
        tk,
        "/v1/takeovers/web",
        Some(json!({"from": "host-z"})),
        409,
    );
    seen.borrow_mut().insert(("POST".into(), tk.into(), 201));
    let (code, _) = http(
        a.addr,
        "POST",
        "/v1/takeovers/web",
        Some(&json!({"from": "host-z"})),
        None,
    );
    assert_eq!(code, 401);
    seen.borrow_mut().insert(("POST".into(), tk.into(), 401));

    // Unknown routes and methods are JSON errors too.
    let (code, v) = a.req("GET", "/v2/nothing", None);
    assert_eq!((code, v["error"].is_string()), (404, true));
    let (code, v) = a.req("PATCH", "/v1/vms", None);
    assert_eq!((code, v["error"].is_string()), (405, true));

    // 503 while draining (SIGTERM): readiness fails before the listener closes.
    a.signal(libc::SIGTERM);
    let t = Instant::now();
    let mut drained = false;
    while t.elapsed() < Duration::from_millis(400) {
        let (code, v) = http(a.addr, "GET", "/readyz", None, None);
        if code == 503 {
            assert_eq!(v["status"], "draining");
            drained = true;
            break;
        }
    }
    assert!(drained, "readyz never answered 503 while draining");
    seen.borrow_mut()
        .insert(("GET".into(), "/readyz".into(), 503));
    let status = a.wait().unwrap();
    assert!(status.success(), "drain exit: {status}");

    let missing: Vec<_> = documented().difference(&seen.borrow()).cloned().collect();
    assert!(
        missing.is_empty(),
        "documented but not exercised: {missing:?}"
    );
    let undocumented: Vec<_> = seen.borrow().difference(&documented()).cloned().collect();
    assert!(
        undocumented.is_empty(),
        "exercised but not documented: {undocumented:?}"
    );
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Answers an ha-node's control socket at `path` like a real one would, from canned data: one
/// recovery of compute1; re-enabling compute1 works, any other host is refused by "Nova".
fn fake_ha_node(path: &Path) {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(
                &mut std::io::BufReader::new(s.try_clone().unwrap()),
                &mut line,
            );
            let answer = match line.trim() {
                "recoveries" => json!({"ok": true, "recoveries": [{
                    "id": 1, "host": "compute1", "outcome": "recovered", "last_heartbeat_ms": 1,
                    "declared_ms": 2, "fenced_ms": 3, "forced_down_ms": 4, "finished_ms": 6,
                    "vms": [{"id": "s1", "name": "vm1", "was": "ACTIVE", "accepted_ms": 5,
                             "recovered_ms": 6, "to": "compute2", "status": "ACTIVE", "error": null}]}]}),
                "reenable compute1" => {
                    json!({"ok": true, "service": {"host": "compute1", "status": "enabled"}})
                }
                _ => json!({"ok": false, "error": "Nova: 400 compute9 still in use"}),
            };
            let _ = s.write_all(format!("{answer}\n").as_bytes());
        }
    });
}

fn run_expecting_refusal(config: &Path) -> String {
    let out = Command::new(AGENT)
        .arg("run")
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn start_up_refuses_a_bad_config_and_a_readable_token_file() {
    let dir = scratch("refusals");
    let storage = dir.join("a");
    let cfg = one_host_config(&dir, &storage, 21100, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("[ports]\n", "[ports]\ncolour = 1\n")).unwrap();
    let e = run_expecting_refusal(&cfg);
    assert!(
        e.contains("colour") && e.contains(&cfg.display().to_string()),
        "{e}"
    );
    std::fs::write(
        &cfg,
        text.replace("interval", "x")
            .replace("[api]", "[epoch]\ninterval_ms = 0\n[api]"),
    )
    .unwrap();
    let e = run_expecting_refusal(&cfg);
    assert!(e.contains("epoch.interval_ms") && e.contains("= 0"), "{e}");
    // A Swift key that others can read.
    let key = dir.join("swift.key");
    std::fs::write(&key, "secret\n").unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "[api]",
            &format!(
                "[swift]\ncontainer = \"ax\"\ntempauth_url = \"http://127.0.0.1:9/auth/v1.0\"\nuser = \"a:b\"\nkey_file = \"{}\"\n[api]",
                key.display()
            ),
        ),
    )
    .unwrap();
    let e = run_expecting_refusal(&cfg);
    assert!(e.contains("swift.key_file") && e.contains("0644"), "{e}");
    // Nova tagging needs the Keystone password in a file only its owner reads.
    let pw = dir.join("os-password");
    write_token(&pw, 0o640);
    std::fs::write(
        &cfg,
        text.replace(
            "[api]",
            &format!(
                "{}[api]",
                openstack_section("http://127.0.0.1:9/v3", &pw, 30)
            ),
        ),
    )
    .unwrap();
    let e = run_expecting_refusal(&cfg);
    assert!(
        e.contains("`openstack.password_file`") && e.contains("0640") && e.contains("nova_tagging"),
        "{e}"
    );
    std::fs::write(&cfg, &text).unwrap();
    write_token(&dir.join("token"), 0o644);
    let e = run_expecting_refusal(&cfg);
    assert!(
        e.contains(&dir.join("token").display().to_string()) && e.contains("0644"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Creates the VM `body` describes, waits until it runs, sets it to level ha and waits until it is there.
fn running_at_ha(a: &Agent, body: Value) -> Value {
    let name = body["name"].as_str().unwrap().to_string();
    let (code, v) = a.req("POST", "/v1/vms", Some(&body));
    assert_eq!(code, 201, "{v}");
    wait_vm(a, &name, "running", 20, |v| v["state"] == "running");
    let (code, v) = a.req(
        "PUT",
        &format!("/v1/vms/{name}/level"),
        Some(&json!({"level": "ha"})),
    );
    assert_eq!(code, 202, "{v}");
    wait_vm(a, &name, "at level ha", 30, |v| {
        v["level"] == "ha" && v["transition"].is_null()
    })
}

#[test]
fn restart_keeps_state_and_reattaches_running_workers() {
    if !kvm_or_skip("restart_keeps_state_and_reattaches_running_workers") {
        return;
    }
    let dir = scratch("restart");
    let storage = dir.join("a");
    let cfg = one_host_config(
        &dir,
        &storage,
        21200,
        "[addresses]\nlink = \"127.0.0.1\"\nhb = \"127.0.0.1\"\nhb2 = \"127.0.0.9\"\n",
    );
    let mut a = Agent::start(&cfg, &storage);
    running_at_ha(
        &a,
        json!({"name": "c1", "guest_args": [2000000], "disk_mib": 1}),
    );
    let worker = ax_agent::worker::alive(&storage.join("vms/c1/worker.pid")).unwrap();
    // The second heartbeat path reaches the worker: same port as the first, on addresses.hb2.
    let spec: Value =
        serde_json::from_slice(&std::fs::read(storage.join("vms/c1/worker.json")).unwrap())
            .unwrap();
    let hb_port = spec["hb"].as_str().unwrap().rsplit(':').next().unwrap();
    assert_eq!(spec["hb2"], format!("127.0.0.9:{hb_port}"), "{spec}");
    let before = wait_vm(&a, "c1", "output", 20, |v| {
        v["output_bytes"].as_u64() > Some(0)
    });
    let agent_pid = a.pid();
    a.restart();
    assert_ne!(a.pid(), agent_pid);
    let v = wait_vm(&a, "c1", "c1 after restart", 20, |v| {
        v["state"] == "running"
    });
    assert_eq!(v["level"], "ha");
    assert_eq!(
        ax_agent::worker::alive(&storage.join("vms/c1/worker.pid")),
        Some(worker),
        "the worker was replaced instead of re-attached"
    );
    assert!(
        v["output_bytes"].as_u64() >= before["output_bytes"].as_u64(),
        "{v}"
    );
    let evs = events(&a, "c1");
    assert!(
        evs.iter().any(|e| e["kind"] == "transition_done"),
        "history lost: {evs:?}"
    );
    // HA: a crashed worker is restarted in place, with the disk as the VM left it (the counter guest
    // never touches its disk: a mark written into the image stays there unless the image is reset).
    let disk = storage.join("vms/c1/c1.disk");
    let mark = b"ax restart-in-place mark";
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(mark, 4096).unwrap();
    }
    // SAFETY: kill(2) on the worker this test's agent started.
    unsafe {
        libc::kill(worker as i32, libc::SIGKILL);
    }
    let v = wait_vm(&a, "c1", "restart in place", 20, |v| {
        v["restarts"] == 1 && v["state"] == "running"
    });
    assert_eq!(v["level"], "ha");
    let image = std::fs::read(&disk).unwrap();
    assert_eq!(image.len(), 1 << 20);
    assert_eq!(
        &image[4096..4096 + mark.len()],
        mark,
        "the restart in place reset the VM's disk"
    );
    assert!(events(&a, "c1").iter().any(|e| e["detail"]
        .as_str()
        .is_some_and(|d| d.contains("restarting in place"))));
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

fn pair_config(
    dir: &Path,
    me: &str,
    other: &str,
    ip: &str,
    oip: &str,
    witness: u16,
    base: u16,
) -> PathBuf {
    let storage = dir.join(me);
    let cfg = dir.join(format!("{me}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "host = \"{me}\"\nstorage_dir = \"{}\"\npki_dir = \"{}\"\ntoken_file = \"{}\"\nwitness = \"127.0.0.1:{witness}\"\n\
             [api]\nlisten = \"{ip}:{}\"\n[addresses]\nlink = \"{ip}\"\nhb = \"{ip}\"\n{}\
             [[peers]]\nname = \"{other}\"\napi = \"{oip}:{}\"\nlink = \"{oip}\"\nhb = \"{oip}\"\n",
            storage.display(),
            dir.join("pki").display(),
            dir.join("token").display(),
            base + 50,
            ports(base),
            base + 50,
        ),
    )
    .unwrap();
    cfg
}

/// A current-thread tokio runtime for the tests' async clients.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// An HTTPS API client of the agent at `addr` whose certificate should name `name`, trusting the
/// cluster CA of `dir`'s PKI.
fn https_client(dir: &Path, addr: SocketAddr, name: &str) -> ax_agent::client::ApiClient {
    let tls = ax_agent::certs::https_client_from_ca(&dir.join("pki/ca.pem")).unwrap();
    ax_agent::client::ApiClient::https(addr, name, tls, TOKEN, Duration::from_secs(10)).unwrap()
}

/// Ends a two-host test: both agents (and their workers), the witness, the scratch directory.
fn stop_pair(a: Agent, b: Agent, witness: Witness, dir: &Path) {
    drop(a);
    drop(b);
    drop(witness);
    let _ = std::fs::remove_dir_all(dir);
}

/// host-a's agent is SIGKILLed while ha→ft runs (after the secondary was picked); the restarted agent
/// resumes the transition from its cursor (or rolls it back) and records it.
#[test]
fn ha_to_ft_survives_the_agent_killed_mid_transition() {
    if !kvm_or_skip("ha_to_ft_survives_the_agent_killed_mid_transition") {
        return;
    }
    let dir = scratch("midway");
    let witness_port = 21390;
    let witness = start_witness(&dir, witness_port);
    let cfg_a = pair_config(
        &dir,
        "host-a",
        "host-b",
        "127.0.0.1",
        "127.0.0.2",
        witness_port,
        21300,
    );
    let cfg_b = pair_config(
        &dir,
        "host-b",
        "host-a",
        "127.0.0.2",
        "127.0.0.1",
        witness_port,
        21300,
    );
    let mut a = Agent::start(&cfg_a, &dir.join("host-a"));
    let b = Agent::start(&cfg_b, &dir.join("host-b"));
    // A bigger, busier guest makes the initial sync last long enough to be interrupted.
    running_at_ha(
        &a,
        json!({"name": "d1", "guest": "counter", "memory_mib": 512, "guest_args": [2000000]}),
    );
    let (code, v) = a.req("PUT", "/v1/vms/d1/level", Some(&json!({"level": "ft"})));
    assert_eq!(code, 202, "{v}");
    // Idempotent: asking again answers the same transition.
    let (code, again) = a.req("PUT", "/v1/vms/d1/level", Some(&json!({"level": "ft"})));
    assert_eq!((code, &again["transition"]["to"]), (202, &json!("ft")));
    // A different level while it runs: 409.
    let (code, _) = a.req("PUT", "/v1/vms/d1/level", Some(&json!({"level": "none"})));
    assert_eq!(code, 409);
    let t = Instant::now();
    while !events(&a, "d1")
        .iter()
        .any(|e| e["kind"] == "step_done" && e["step"] == "pick_secondary")
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "pick_secondary never finished"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    a.signal(libc::SIGKILL);
    a.wait();
    a.start_again();
    let v = wait_vm(&a, "d1", "transition ends after the restart", 120, |v| {
        v["transition"].is_null()
    });
    let evs = events(&a, "d1");
    let kinds: Vec<&str> = evs.iter().filter_map(|e| e["kind"].as_str()).collect();
    println!("after the restart: level {}, events {kinds:?}", v["level"]);
    assert!(
        kinds.contains(&"transition_resumed"),
        "no transition_resumed: {kinds:?}"
    );
    if v["level"] == "ft" {
        assert!(kinds.contains(&"transition_done"), "{kinds:?}");
        let v = wait_vm(&a, "d1", "protected", 30, |v| v["protected"] == true);
        assert_eq!(v["peer"], "host-b");
        // The pair's heartbeat RTT reaches /metrics once the detector has echoes.
        let rtt_line = (0..100).find_map(|_| {
            let (_, m) = http(a.addr, "GET", "/metrics", None, None);
            let line = m
                .as_str()
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("ax_heartbeat_rtt_seconds{vm=\"d1\"}"))
                .map(str::to_string);
            if line.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            line
        });
        println!("heartbeat RTT: {rtt_line:?}");
        assert!(rtt_line.is_some(), "no heartbeat RTT for d1 in /metrics");
        let (_, bv) = b.req("GET", "/v1/vms/d1", None);
        assert_eq!(
            (bv["role"].as_str(), bv["level"].as_str()),
            (Some("secondary"), Some("ft"))
        );
    } else {
        assert_eq!(v["level"], "ha", "{v}");
        assert!(kinds.contains(&"transition_rolled_back"), "{kinds:?}");
        assert!(v["last_error"].is_string(), "a rollback says why: {v}");
    }
    // And back down: ft→ha releases the standby on host-b.
    if v["level"] == "ft" {
        let (code, _) = a.req("PUT", "/v1/vms/d1/level", Some(&json!({"level": "ha"})));
        assert_eq!(code, 202);
        wait_vm(&a, "d1", "back to ha", 60, |v| {
            v["level"] == "ha" && v["transition"].is_null()
        });
        let (code, _) = b.req("GET", "/v1/vms/d1", None);
        assert_eq!(code, 404, "the standby on host-b was not released");
    }
    stop_pair(a, b, witness, &dir);
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let Ok(which) = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
    else {
        return skip("systemd_units_pass_systemd_analyze_verify", "no shell");
    };
    if !which.status.success() {
        return skip(
            "systemd_units_pass_systemd_analyze_verify",
            "systemd-analyze is not installed",
        );
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // The units name /usr/local/bin/ax-agent; verify checks ExecStart exists, so point a copy of the
    // units at the built binary.
    let dir = std::env::temp_dir().join(format!("ax-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut units = Vec::new();
    for unit in [
        "ax-agent.service",
        "ax-witness.service",
        "ax-ha-node.service",
    ] {
        let text = std::fs::read_to_string(root.join("systemd").join(unit)).unwrap();
        let path = dir.join(unit);
        std::fs::write(&path, text.replace("/usr/local/bin/ax-agent", AGENT)).unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Without a running systemd (containers) verify still parses the units; only complaints about the
    // units themselves count.
    let complaints: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("ax-") && l.contains(".service"))
        .collect();
    assert!(
        complaints.is_empty()
            && (out.status.success() || err.contains("System has not been booted")),
        "systemd-analyze verify: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn install_script_puts_binaries_units_and_config_in_place() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dest = std::env::temp_dir().join(format!("ax-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dest);
    let bin_dir = Path::new(AGENT).parent().unwrap();
    assert!(Path::new(env!("CARGO_BIN_EXE_axctl")).starts_with(bin_dir));
    let out = Command::new(root.join("scripts/install.sh"))
        .args(["--prefix", "/opt/ax", "--no-build", "--destdir"])
        .arg(&dest)
        .arg("--bin-dir")
        .arg(bin_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for f in [
        "opt/ax/bin/ax-agent",
        "opt/ax/bin/axctl",
        "etc/ax/agent.toml",
        "etc/systemd/system/ax-witness.service",
        "etc/systemd/system/ax-ha-node.service",
        "etc/ax/ha-node.toml",
    ] {
        assert!(dest.join(f).exists(), "{f} not installed");
    }
    let unit = std::fs::read_to_string(dest.join("etc/systemd/system/ax-agent.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/opt/ax/bin/ax-agent run"),
        "{unit}"
    );
    // A second run keeps the operator's configuration.
    std::fs::write(dest.join("etc/ax/agent.toml"), "host = \"mine\"\n").unwrap();
    let out = Command::new(root.join("scripts/install.sh"))
        .args(["--prefix", "/opt/ax", "--no-build", "--destdir"])
        .arg(&dest)
        .arg("--bin-dir")
        .arg(bin_dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(dest.join("etc/ax/agent.toml")).unwrap(),
        "host = \"mine\"\n"
    );
    assert!(dest.join("etc/ax/agent.toml.sample").exists());
    let _ = std::fs::remove_dir_all(&dest);
}

/// `[api] tls = true`: HTTPS with the host's certificate; plain HTTP gets no answer; a client that
/// trusts the cluster CA and names the host gets in (the library client and axctl); a wrong name or no
/// CA is refused.
#[test]
fn api_over_https() {
    let dir = scratch("tls");
    let storage = dir.join("a");
    let cfg = one_host_config(&dir, &storage, 21600, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[api]\n", "[api]\ntls = true\n");
    std::fs::write(&cfg, text).unwrap();
    let a = Agent::start(&cfg, &storage);
    let ca = dir.join("pki/ca.pem");

    // Plain HTTP: the handshake fails, no HTTP answer.
    let mut s = TcpStream::connect(a.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).starts_with("HTTP/"),
        "plain HTTP answered: {:?}",
        String::from_utf8_lossy(&answer)
    );

    runtime().block_on(async {
        let c = https_client(&dir, a.addr, "host-a");
        let v: Value = c.get("/v1/vms").await.expect("HTTPS with the cluster CA");
        assert!(v["vms"].is_array(), "{v}");
        let health: Value = c.get("/healthz").await.unwrap();
        assert_eq!(health["status"], "ok");
        // The certificate names host-a, not host-b.
        let wrong = https_client(&dir, a.addr, "host-b");
        let e = wrong.get::<Value>("/v1/vms").await.unwrap_err();
        println!("wrong name refused: {e}");
    });

    let axctl = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_axctl"))
            .arg("--url")
            .arg(format!("https://{}", a.addr))
            .arg("--token-file")
            .arg(dir.join("token"))
            .args(extra)
            .args(["vm", "list"])
            .output()
            .unwrap()
    };
    let ok = axctl(&["--ca-cert", ca.to_str().unwrap(), "--tls-name", "host-a"]);
    assert!(
        ok.status.success(),
        "axctl over HTTPS: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("NAME"));
    let no_ca = axctl(&[]);
    assert_eq!(no_ca.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&no_ca.stderr).contains("--ca-cert"),
        "{}",
        String::from_utf8_lossy(&no_ca.stderr)
    );
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two agents with `[api] tls = true`: the FT pair's peer calls (host list, standby) go over HTTPS,
/// verified against the cluster CA, and a VM set to ft ends up protected.
#[test]
fn ft_pair_over_https() {
    if !kvm_or_skip("ft_pair_over_https") {
        return;
    }
    let dir = scratch("tls-pair");
    let witness_port = 21790;
    let witness = start_witness(&dir, witness_port);
    let tls_config = |me: &str, other: &str, ip: &str, oip: &str| {
        let cfg = pair_config(&dir, me, other, ip, oip, witness_port, 21700);
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("[api]\n", "[api]\ntls = true\n");
        std::fs::write(&cfg, text).unwrap();
        cfg
    };
    let a = Agent::start(
        &tls_config("host-a", "host-b", "127.0.0.1", "127.0.0.2"),
        &dir.join("host-a"),
    );
    let b = Agent::start(
        &tls_config("host-b", "host-a", "127.0.0.2", "127.0.0.1"),
        &dir.join("host-b"),
    );
    let (ca, cb) = (
        https_client(&dir, a.addr, "host-a"),
        https_client(&dir, b.addr, "host-b"),
    );
    runtime().block_on(async {
        let hosts: Value = ca.get("/v1/hosts").await.unwrap();
        println!("hosts seen by host-a over HTTPS: {hosts}");
        let _: Value = ca
            .call(
                reqwest::Method::POST,
                "/v1/vms",
                Some(&json!({"name": "t1", "guest": "counter", "guest_args": [2000000]})),
            )
            .await
            .unwrap();
        let t = Instant::now();
        loop {
            let v: Value = ca.get("/v1/vms/t1").await.unwrap();
            if v["state"] == "running" {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "t1 not running: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _: Value = ca
            .call(
                reqwest::Method::PUT,
                "/v1/vms/t1/level",
                Some(&json!({"level": "ft"})),
            )
            .await
            .unwrap();
        let t = Instant::now();
        let v = loop {
            let v: Value = ca.get("/v1/vms/t1").await.unwrap();
            if v["protected"] == true {
                break v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "t1 not protected over HTTPS peers: {v}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(v["peer"], "host-b", "{v}");
        let s: Value = cb.get("/v1/vms/t1").await.unwrap();
        assert_eq!(s["role"], "secondary", "{s}");
    });
    stop_pair(a, b, witness, &dir);
}

/// HA volume replication against a real Swift (`tests/e2e/swift.sh` starts one and sets
/// `AX_SWIFT_AUTH_URL`, `AX_SWIFT_USER`, `AX_SWIFT_KEY`): a running `disk-writer` VM set to level ha
/// gets its disk replicated (first version at once, more on request), old versions are pruned, the
/// newest version is a consistent cut of the guest's writes, and a VM created with `restore_volume`
/// starts from exactly that image.
#[test]
fn ha_volume_replication_to_a_real_swift() {
    let test = "ha_volume_replication_to_a_real_swift";
    let (Ok(auth), Ok(user), Ok(key)) = (
        std::env::var("AX_SWIFT_AUTH_URL"),
        std::env::var("AX_SWIFT_USER"),
        std::env::var("AX_SWIFT_KEY"),
    ) else {
        skip(
            test,
            "no Swift (tests/e2e/swift.sh runs it against a real one)",
        );
        return;
    };
    if !kvm_or_skip(test) {
        return;
    }
    let dir = scratch("swift");
    let storage = dir.join("a");
    let key_file = dir.join("swift.key");
    write_token(&key_file, 0o600);
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let container = format!("ax-daemon-{}", std::process::id());
    let volume = format!(
        "[swift]\ncontainer = \"{container}\"\ntempauth_url = \"{auth}\"\nuser = \"{user}\"\nkey_file = \"{}\"\n\
         [volume]\ninterval_s = 3600\nkeep = 2\n",
        key_file.display()
    );
    let cfg = one_host_config(&dir, &storage, 21400, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("[api]", &format!("{volume}[api]"))).unwrap();
    let a = Agent::start(&cfg, &storage);
    running_at_ha(
        &a,
        json!({"name": "dw1", "guest": "disk-writer", "memory_mib": 32, "disk_mib": 64}),
    );
    let version = |n: u64| {
        move |v: &Value| {
            v["volume"]["status"]["version"] == n && v["volume"]["status"]["running"].is_null()
        }
    };
    // none → ha takes the first version at once.
    let v = wait_vm(&a, "dw1", "version 1", 60, version(1));
    assert_eq!(v["level"], "ha");
    assert_eq!(v["volume"]["replicating"], true);
    let first = v["volume"]["status"]["last"].clone();
    assert_eq!(first["bytes"], 64 << 20, "{first}");
    assert_eq!(
        first["changed"], first["chunks"],
        "a first version sends every chunk: {first}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let (code, _) = a.req("POST", "/v1/vms/dw1/volume/replicate", None);
    assert_eq!(code, 202);
    wait_vm(&a, "dw1", "version 2", 60, version(2));
    // The operator's way: axctl waits for the new version with a progress bar.
    std::thread::sleep(Duration::from_millis(500));
    let axctl = |args: &[&str]| axctl(a.addr, &dir, args);
    let done = axctl(&["vm", "replicate", "dw1", "--wait", "--timeout", "60"]);
    assert!(done.contains("version 3"), "{done}");
    let shown = axctl(&["vm", "show", "dw1"]);
    assert!(
        shown.contains(&format!("swift:{container} version 3")),
        "{shown}"
    );
    let (_, v) = a.req("GET", "/v1/vms/dw1", None);
    let last = v["volume"]["status"]["last"].clone();
    assert_eq!(
        last["pruned"],
        json!([1]),
        "keep = 2 prunes version 1: {last}"
    );
    println!(
        "volume replication: first version {} ms ({} chunks); version 3 {} ms, {} of {} chunks changed, \
         {} bytes sent; snapshot {} ms with the guest's I/O held {} us ({} writes during the copy)",
        first["elapsed_ms"], first["chunks"], last["elapsed_ms"], last["changed"], last["chunks"],
        last["bytes_uploaded"], last["snapshot"]["elapsed_ms"], last["snapshot"]["io_held_us"],
        last["snapshot"]["writes_during_copy"]
    );
    let (_, metrics) = http(a.addr, "GET", "/metrics", None, None);
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("ax_volume_replications_total{outcome=\"ok\"} 3"),
        "{metrics}"
    );

    // The newest version, read back from Swift, is a consistent cut of the guest's writes.
    let rt = runtime();
    let tokens = evacuate::volume::swift::TempAuth::new(&auth, &user, &key);
    let swift = evacuate::volume::swift::SwiftBackend::new(
        tokens,
        evacuate::volume::swift::SwiftConfig::new(&container),
    )
    .unwrap();
    let fetched = dir.join("fetched.img");
    let report = rt
        .block_on(evacuate::volume::restore(
            &swift,
            "dw1",
            3,
            &fetched,
            &|_| {},
        ))
        .unwrap();
    let image = std::fs::read(&fetched).unwrap();
    let newest = ax_guests::check_disk_writer_image(&image)
        .unwrap_or_else(|e| panic!("version 3 is not a consistent cut: {e}"));
    assert!(newest > 0, "the guest wrote nothing before version 3");
    println!(
        "restored version 3 ({} MB/s): newest sector-write {newest}",
        report.mb_s() as u64
    );

    // The VM is lost; a new one of the same name starts from the replica.
    assert_eq!(a.req("POST", "/v1/vms/dw1/stop", None).0, 200);
    assert_eq!(a.req("DELETE", "/v1/vms/dw1", None).0, 204);
    let again = json!({"name": "dw1", "guest": "disk-writer", "memory_mib": 32, "start": false,
                       "restore_volume": true});
    let (code, v) = a.req("POST", "/v1/vms", Some(&again));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["disk_mib"], 64, "disk_mib 0 takes the image's size: {v}");
    assert!(
        std::fs::read(storage.join("vms/dw1/dw1.disk")).unwrap() == image,
        "the restored disk differs from version 3"
    );
    assert!(events(&a, "dw1").iter().any(|e| e["detail"]
        .as_str()
        .is_some_and(|d| d.contains("disk restored from version 3"))));
    let wrong = json!({"name": "dw2", "disk_mib": 8, "start": false, "restore_volume": true});
    let (code, v) = a.req("POST", "/v1/vms", Some(&wrong));
    assert_eq!(code, 409, "no version of dw2: {v}");
    assert_eq!(a.req("POST", "/v1/vms/dw1/start", None).0, 200);
    wait_vm(&a, "dw1", "restored dw1 running", 20, |v| {
        v["state"] == "running"
    });
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `[openstack]` with Nova tagging on, for a Keystone at `auth_url` (user and project `admin`, the
/// password in `pw`), read every `poll_s` seconds.
fn openstack_section(auth_url: &str, pw: &Path, poll_s: u64) -> String {
    format!(
        "[openstack]\nauth_url = \"{auth_url}\"\nusername = \"admin\"\npassword_file = \"{}\"\nproject = \"admin\"\nnova_tagging = true\ntag_poll_s = {poll_s}\n",
        pw.display()
    )
}

/// A stand-in for Keystone and Nova (the real ones are tests/e2e/nova.sh's): tokens with a catalog,
/// compute version discovery, and `GET /servers/s1`, whose `ax:level` is `tag` (`None`: absent). While
/// `down`, everything answers 503. `reads` counts the requests for s1.
struct FakeOpenStack {
    addr: SocketAddr,
    tag: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reads: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FakeOpenStack {
    fn start() -> FakeOpenStack {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let os = FakeOpenStack {
            addr: listener.local_addr().unwrap(),
            tag: Default::default(),
            down: Default::default(),
            reads: Default::default(),
        };
        let (addr, tag, down, reads) = (os.addr, os.tag.clone(), os.down.clone(), os.reads.clone());
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let Some((method, path)) = read_request(&mut s) else {
                    continue;
                };
                if path == "/compute/v2.1/servers/s1" {
                    reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let (status, extra, body) = if down.load(std::sync::atomic::Ordering::SeqCst) {
                    (503, "", json!({"error": {"message": "down for the test"}}))
                } else {
                    match (method.as_str(), path.as_str()) {
                        ("POST", "/v3/auth/tokens") => (
                            201,
                            "X-Subject-Token: fake-token\r\n",
                            json!({"token": {
                                "issued_at": "2026-01-01T00:00:00.000000Z",
                                "expires_at": "2026-01-01T01:00:00.000000Z",
                                "catalog": [{"type": "compute", "name": "nova", "endpoints": [
                                    {"interface": "public", "region_id": "RegionOne",
                                     "url": format!("http://{addr}/compute/v2.1")}]}]}}),
                        ),
                        ("GET", "/compute/v2.1") => (
                            200,
                            "",
                            json!({"version": {"id": "v2.1", "status": "CURRENT",
                                               "min_version": "2.1", "version": "2.96"}}),
                        ),
                        ("GET", "/compute/v2.1/servers/s1") => {
                            let meta = match tag.lock().unwrap().clone() {
                                Some(v) => json!({ "ax:level": v }),
                                None => json!({}),
                            };
                            (
                                200,
                                "",
                                json!({"server": {"id": "s1", "name": "tagged",
                                                  "status": "ACTIVE", "metadata": meta}}),
                            )
                        }
                        _ => (
                            404,
                            "",
                            json!({"itemNotFound": {"message": "no such thing"}}),
                        ),
                    }
                };
                let body = body.to_string();
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        os
    }

    fn set_tag(&self, v: Option<&str>) {
        *self.tag.lock().unwrap() = v.map(str::to_string);
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until the server has been read `n` more times.
    fn wait_reads(&self, n: u64) {
        let from = self.reads.load(std::sync::atomic::Ordering::SeqCst);
        let t = Instant::now();
        while self.reads.load(std::sync::atomic::Ordering::SeqCst) < from + n {
            assert!(t.elapsed() < Duration::from_secs(30), "server not read");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Reads one HTTP request (head and body); its method and path.
fn read_request(s: &mut TcpStream) -> Option<(String, String)> {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).ok().filter(|n| *n > 0)?;
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    while raw.len() < head_end + len {
        let n = s.read(&mut buf).ok().filter(|n| *n > 0)?;
        raw.extend_from_slice(&buf[..n]);
    }
    let mut first = head.lines().next()?.split_whitespace();
    Some((first.next()?.to_string(), first.next()?.to_string()))
}

fn details(a: &Agent, vm: &str, needle: &str) -> Vec<String> {
    events(a, vm)
        .iter()
        .filter_map(|e| e["detail"].as_str())
        .filter(|d| d.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Nova tagging against a stand-in Keystone and Nova: the tag sets the level (with an event saying so),
/// binds `PUT /level`, an invalid value is one warning, an unreachable Nova is a warning and leaves the
/// API in charge until the tag reads again. Levels none and ha on a stopped VM: no KVM needed.
#[test]
fn nova_tags_set_the_level_and_bind_the_api() {
    let dir = scratch("tags");
    let storage = dir.join("a");
    let os = FakeOpenStack::start();
    let pw = dir.join("os-password");
    write_token(&pw, 0o600);
    let cfg = one_host_config(&dir, &storage, 21800, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[api]",
        &format!(
            "{}[api]",
            openstack_section(&format!("http://{}/v3", os.addr), &pw, 1)
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let a = Agent::start(&cfg, &storage);
    let body = json!({"name": "web1", "start": false, "nova_server": "s1"});
    let (code, v) = a.req("POST", "/v1/vms", Some(&body));
    assert_eq!(code, 201, "{v}");
    let put = |level: &str| {
        a.req(
            "PUT",
            "/v1/vms/web1/level",
            Some(&json!({ "level": level })),
        )
    };
    let settled = |level: &'static str| {
        move |v: &Value| {
            v["level"] == level && v["desired_level"] == level && v["transition"].is_null()
        }
    };

    // Absent: read, nothing changes.
    let v = wait_vm(&a, "web1", "server read", 20, |v| {
        v["nova_tag"]["read_ms"].is_u64()
    });
    assert_eq!(
        (v["level"].as_str(), &v["nova_tag"]["value"]),
        (Some("none"), &Value::Null),
        "{v}"
    );

    // ax:level=ha: the level follows, the event names the origin; a contradicting PUT is refused.
    os.set_tag(Some("ha"));
    wait_vm(&a, "web1", "level ha from the tag", 30, settled("ha"));
    assert_eq!(
        details(
            &a,
            "web1",
            "level set from Nova metadata ax:level=ha of server s1"
        )
        .len(),
        1
    );
    let (code, v) = put("none");
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("ax:level=ha on Nova server s1"),
        "{v}"
    );
    assert_eq!(put("ha").0, 200);

    // ax:level=gold: one warning however many reads, the level stays.
    os.set_tag(Some("gold"));
    os.wait_reads(4);
    let v = wait_vm(&a, "web1", "gold read", 5, |v| {
        v["nova_tag"]["value"] == "gold"
    });
    assert_eq!(v["level"], "ha", "{v}");
    let warned = details(&a, "web1", "ax:level=\"gold\"");
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(warned[0].starts_with("warning: "), "{warned:?}");

    // ax:level=none: followed.
    os.set_tag(Some("none"));
    wait_vm(&a, "web1", "level none from the tag", 30, settled("none"));

    // Nova down: one warning, the API decides meanwhile; back: the tag is applied again.
    os.set_down(true);
    wait_vm(&a, "web1", "read error shown", 30, |v| {
        v["nova_tag"]["error"].is_string()
    });
    let (code, v) = put("ha");
    assert_eq!(code, 202, "an unreadable tag does not bind: {v}");
    wait_vm(&a, "web1", "level ha from the API", 30, settled("ha"));
    os.wait_reads(3);
    os.set_down(false);
    wait_vm(&a, "web1", "the tag applied again", 30, settled("none"));
    let warned = details(&a, "web1", "cannot read ax:level");
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(details(&a, "web1", "read again (after").len(), 1);
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The HA engine inside the daemon (`ha.node_config`), against the stand-in Keystone and Nova: while
/// they are down the engine does not start and the API says why (503); once they answer it starts
/// (retried), serves its recoveries through the API and its control socket, and /metrics reports it.
/// Host failures and evacuations against a real Nova: tests/e2e/nova.sh (compute2 runs this way).
#[test]
fn ha_engine_runs_in_the_daemon() {
    let dir = scratch("ha-engine");
    let storage = dir.join("a");
    let os = FakeOpenStack::start();
    os.set_down(true);
    let socket = dir.join("ha.sock");
    let ha_toml = dir.join("ha-node.toml");
    std::fs::write(
        &ha_toml,
        format!(
            "host = \"host-a\"\ncontrol = \"{}\"\nstate = \"{}\"\n[fence]\ncommand = [\"true\"]\n\
             [keystone]\nauth_url = \"http://{}/v3\"\nusername = \"admin\"\npassword = \"pw\"\nproject_name = \"admin\"\n",
            socket.display(),
            dir.join("ha-state.json").display(),
            os.addr
        ),
    )
    .unwrap();
    let ha = format!(
        "[ha]\nrestart_limit = 3\nrestart_window_s = 600\nnode_config = \"{}\"\n",
        ha_toml.display()
    );
    let cfg = one_host_config(&dir, &storage, 21900, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // A missing engine configuration refuses the start, naming the key.
    let missing = ha.replace("ha-node.toml", "nothing.toml");
    std::fs::write(&cfg, text.replace("[api]", &format!("{missing}[api]"))).unwrap();
    let e = run_expecting_refusal(&cfg);
    assert!(
        e.contains("ha.node_config") && e.contains("nothing.toml"),
        "{e}"
    );
    std::fs::write(&cfg, text.replace("[api]", &format!("{ha}[api]"))).unwrap();
    let a = Agent::start(&cfg, &storage);
    let (code, v) = a.req("GET", "/v1/recoveries", None);
    assert_eq!(code, 503, "{v}");
    let metrics = |a: &Agent| {
        let (_, m) = http(a.addr, "GET", "/metrics", None, None);
        m.as_str().unwrap_or_default().to_string()
    };
    assert!(metrics(&a).contains("ax_ha_node_up 0"));
    // Keystone and Nova answer: the engine starts at its next attempt.
    os.set_down(false);
    let t = Instant::now();
    let v = loop {
        let (code, v) = a.req("GET", "/v1/recoveries", None);
        if code == 200 {
            break v;
        }
        assert!(
            v["error"].as_str().unwrap().contains("does not run")
                || v["error"].as_str().unwrap().contains("starting"),
            "{v}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the engine did not start: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(v["recoveries"], json!([]), "{v}");
    let m = metrics(&a);
    assert!(
        m.contains("ax_ha_node_up 1") && m.contains("ax_evacuations_total{outcome=\"accepted\"} 0"),
        "{m}"
    );
    // Its control socket answers like an ha-node's (axctl --ha-socket).
    let out = axctl(
        a.addr,
        &dir,
        &[
            "recovery",
            "list",
            "--ha-socket",
            &socket.display().to_string(),
        ],
    );
    assert!(
        out.contains("no host recover") || out.trim().is_empty() || out.contains("HOST"),
        "{out}"
    );
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The daemon's volume replication with Keystone tokens against a real Swift behind keystonemiddleware
/// (`tests/e2e/swift.sh` sets `AX_SWIFT_KEYSTONE_*`): `[openstack]` credentials, the Swift endpoint from
/// Keystone's catalog, a version stored, and a VM restored from it.
#[test]
fn volume_replication_to_a_real_swift_with_keystone_tokens() {
    let test = "volume_replication_to_a_real_swift_with_keystone_tokens";
    let var = |k: &str| std::env::var(format!("AX_SWIFT_KEYSTONE_{k}"));
    let (Ok(url), Ok(user), Ok(password), Ok(project)) =
        (var("URL"), var("USER"), var("PASSWORD"), var("PROJECT"))
    else {
        skip(
            test,
            "no Swift with Keystone (tests/e2e/swift.sh runs it against real ones)",
        );
        return;
    };
    if !kvm_or_skip(test) {
        return;
    }
    let dir = scratch("swift-keystone");
    let storage = dir.join("a");
    let pw = dir.join("os-password");
    write_token(&pw, 0o600);
    std::fs::write(&pw, format!("{password}\n")).unwrap();
    let container = format!("ax-keystone-{}", std::process::id());
    let section = format!(
        "[openstack]\nauth_url = \"{url}\"\nusername = \"{user}\"\npassword_file = \"{}\"\nproject = \"{project}\"\n\
         [swift]\ncontainer = \"{container}\"\n[volume]\ninterval_s = 3600\n",
        pw.display()
    );
    let cfg = one_host_config(&dir, &storage, 21450, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("[api]", &format!("{section}[api]"))).unwrap();
    let a = Agent::start(&cfg, &storage);
    running_at_ha(
        &a,
        json!({"name": "ks1", "guest": "disk-writer", "memory_mib": 32, "disk_mib": 16}),
    );
    let v = wait_vm(&a, "ks1", "version 1 through Keystone", 60, |v| {
        v["volume"]["status"]["version"] == 1 || v["volume"]["status"]["last_error"].is_string()
    });
    assert_eq!(v["volume"]["status"]["version"], 1, "{v}");
    assert_eq!(
        v["volume"]["status"]["target"],
        format!("swift:{container}")
    );
    assert_eq!(a.req("POST", "/v1/vms/ks1/stop", None).0, 200);
    assert_eq!(a.req("DELETE", "/v1/vms/ks1", None).0, 204);
    let again = json!({"name": "ks1", "guest": "disk-writer", "memory_mib": 32, "start": false,
                       "restore_volume": true});
    let (code, v) = a.req("POST", "/v1/vms", Some(&again));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["disk_mib"], 16, "{v}");
    let image = std::fs::read(storage.join("vms/ks1/ks1.disk")).unwrap();
    ax_guests::check_disk_writer_image(&image)
        .unwrap_or_else(|e| panic!("the restored version is not a consistent cut: {e}"));
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `axctl` as a user runs it: its exit status, stdout and stderr.
fn axctl_status(addr: SocketAddr, dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_axctl"))
        .arg("--url")
        .arg(format!("http://{addr}"))
        .arg("--token-file")
        .arg(dir.join("token"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Creates `body`'s VM stopped, brings it to level `level` and starts it: a guest that ends quickly
/// ends under that level.
fn started_at(a: &Agent, mut body: Value, level: &str) {
    let name = body["name"].as_str().unwrap().to_string();
    body["start"] = json!(false);
    let (code, v) = a.req("POST", "/v1/vms", Some(&body));
    assert_eq!(code, 201, "{v}");
    if level != "none" {
        let (code, v) = a.req(
            "PUT",
            &format!("/v1/vms/{name}/level"),
            Some(&json!({"level": level})),
        );
        assert_eq!(code, 202, "{v}");
        wait_vm(a, &name, "at its level", 30, |v| {
            v["level"] == level && v["transition"].is_null()
        });
    }
    let (code, v) = a.req("POST", &format!("/v1/vms/{name}/start"), None);
    assert_eq!(code, 200, "{v}");
}

fn lines(n: u64) -> String {
    (1..=n).map(|i| format!("{i}\n")).collect()
}

/// A guest's exit and crash are VM events at levels none and ha: shown (`exited (code 7)`, `crashed
/// (#UD at …)`), counted, recorded; at ha a crash is restarted within the limit, an exit is not (unless
/// on_exit = restart). Also: a custom guest ELF through the API, the console, a partial `[ha]` section.
#[test]
fn guest_exits_and_crashes_are_vm_events() {
    if !kvm_or_skip("guest_exits_and_crashes_are_vm_events") {
        return;
    }
    let dir = scratch("guest-ends");
    let storage = dir.join("a");
    // Only restart_limit: every other key of [ha] keeps its default.
    let cfg = one_host_config(&dir, &storage, 22000, "[ha]\nrestart_limit = 2\n");
    let a = Agent::start(&cfg, &storage);
    // Level none, exit code 7 after 30 lines.
    started_at(
        &a,
        json!({"name": "e7", "guest_args": [20000, 30, 7]}),
        "none",
    );
    let v = wait_vm(&a, "e7", "exited", 30, |v| v["state"] == "exited");
    assert_eq!(
        (v["exit_code"].as_i64(), v["restarts"].as_u64()),
        (Some(7), Some(0)),
        "{v}"
    );
    assert!(v["crash"].is_null(), "{v}");
    let show = axctl(a.addr, &dir, &["vm", "show", "e7"]);
    assert!(show.contains("exited (code 7)"), "{show}");
    // The console holds every line, and --from-start ends by itself once the VM has ended.
    assert_eq!(
        axctl(a.addr, &dir, &["vm", "console", "e7", "--from-start"]),
        lines(30)
    );
    assert_eq!(
        axctl(
            a.addr,
            &dir,
            &["vm", "console", "e7", "--from-start", "--follow"]
        ),
        lines(30)
    );
    assert!(details(&a, "e7", "exited (code 7)").len() == 1);

    // Level ha: a crash (ud2 after 40 lines) is restarted in place until the limit, then stays crashed.
    started_at(
        &a,
        json!({"name": "ud", "guest_args": [20000, 40, 256]}),
        "ha",
    );
    let v = wait_vm(&a, "ud", "crashed for good", 60, |v| {
        v["state"] == "crashed"
    });
    assert_eq!(v["restarts"], 2, "{v}");
    let crash = v["crash"].as_str().unwrap_or_default();
    assert!(crash.starts_with("#UD at 0x4"), "{v}");
    assert_eq!(details(&a, "ud", "restarting in place").len(), 2);
    assert_eq!(details(&a, "ud", "giving up").len(), 1);
    let (_, m) = http(a.addr, "GET", "/metrics", None, None);
    let m = m.as_str().unwrap_or_default().to_string();
    assert!(m.contains("ax_guest_ends_total{kind=\"crashed\"} 3"), "{m}");
    assert!(m.contains("ax_guest_ends_total{kind=\"exited\"} 1"), "{m}");
    assert!(m.contains("ax_vm_up{vm=\"ud\"} 0"), "{m}");

    // Level ha, exit code 0: stays stopped (on_exit = stop, the default); with on_exit = restart it
    // starts again.
    started_at(
        &a,
        json!({"name": "x0", "guest_args": [20000, 30, 0]}),
        "ha",
    );
    let v = wait_vm(&a, "x0", "exited", 30, |v| v["state"] == "exited");
    assert_eq!(
        (v["exit_code"].as_i64(), v["restarts"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    started_at(
        &a,
        json!({"name": "rs", "guest_args": [20000, 30, 0], "on_exit": "restart"}),
        "ha",
    );
    wait_vm(&a, "rs", "restarted after its exit", 30, |v| {
        v["restarts"].as_u64() >= Some(1)
    });

    // Any guest: an ELF file through axctl (here the kit's counter, as a user's own program would be).
    let elf = dir.join("my-guest.elf");
    std::fs::write(&elf, ax_guests::by_name("counter").unwrap()).unwrap();
    let elf_s = elf.display().to_string();
    axctl(
        a.addr,
        &dir,
        &[
            "vm",
            "create",
            "mine",
            "--guest-elf",
            &elf_s,
            "--guest-arg",
            "20000",
            "--guest-arg",
            "12",
            "--guest-arg",
            "5",
        ],
    );
    let v = wait_vm(&a, "mine", "exited", 30, |v| v["state"] == "exited");
    assert_eq!(
        (v["guest"].as_str(), v["exit_code"].as_i64()),
        (Some("elf"), Some(5)),
        "{v}"
    );
    assert_eq!(
        v["guest_elf_sha256"].as_str().map(str::len),
        Some(64),
        "{v}"
    );
    assert_eq!(
        axctl(a.addr, &dir, &["vm", "console", "mine", "--from-start"]),
        lines(12)
    );
    // A file that is not a guest: refused by the loader, which says why; nothing is created.
    let bad = dir.join("bad.elf");
    std::fs::write(&bad, b"\x7fELF not really").unwrap();
    let (code, _, err) = axctl_status(
        a.addr,
        &dir,
        &[
            "vm",
            "create",
            "bad",
            "--guest-elf",
            &bad.display().to_string(),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("guest_elf") && err.contains("loader"), "{err}");
    let (code, _) = a.req("GET", "/v1/vms/bad", None);
    assert_eq!(code, 404);
    // Unknown VM: events and console say so, with a failing exit status.
    let (code, _, err) = axctl_status(a.addr, &dir, &["events", "--vm", "nope"]);
    assert_ne!(code, 0, "{err}");
    let (code, _, _) = axctl_status(a.addr, &dir, &["vm", "console", "nope"]);
    assert_ne!(code, 0);
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An FT VM whose guest exits: both hosts end in `exited` with the code, no failover, no orphan, and
/// the console (on either host) holds every line. Then a second VM whose primary worker is SIGKILLed
/// before its guest ended: a failover, after which the guest ends on the new primary (exited, whole
/// output).
/// The guest is uploaded (`guest_elf`) and carried to the secondary by the standby call.
#[test]
fn ft_guest_exit_ends_the_vm_on_both_hosts() {
    if !kvm_or_skip("ft_guest_exit_ends_the_vm_on_both_hosts") {
        return;
    }
    let dir = scratch("ft-exit");
    let witness_port = 22190;
    let witness = start_witness(&dir, witness_port);
    let cfg = |me, other, ip, oip| pair_config(&dir, me, other, ip, oip, witness_port, 22100);
    let a = Agent::start(
        &cfg("host-a", "host-b", "127.0.0.1", "127.0.0.2"),
        &dir.join("host-a"),
    );
    let b = Agent::start(
        &cfg("host-b", "host-a", "127.0.0.2", "127.0.0.1"),
        &dir.join("host-b"),
    );
    let elf = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(ax_guests::by_name("counter").unwrap())
    };
    for (vm, code, pace) in [("f1", 3, 200_000), ("f2", 9, 2_000_000)] {
        // Enough lines to outlast the initial sync, few enough to end soon after.
        let body = json!({"name": vm, "guest_elf": elf, "guest_args": [pace, 4000, code]});
        let (c, v) = a.req("POST", "/v1/vms", Some(&body));
        assert_eq!(c, 201, "{v}");
        wait_vm(&a, vm, "running", 20, |v| v["state"] == "running");
        let (c, v) = a.req(
            "PUT",
            &format!("/v1/vms/{vm}/level"),
            Some(&json!({"level": "ft"})),
        );
        assert_eq!(c, 202, "{v}");
        wait_vm(&a, vm, "protected", 60, |v| v["protected"] == true);
        let (_, bv) = b.req("GET", &format!("/v1/vms/{vm}"), None);
        assert_eq!(bv["role"], "secondary", "{bv}");
        assert_eq!(
            bv["guest_elf_sha256"],
            json!(ax_agent::daemon::api::sha256_hex(
                ax_guests::by_name("counter").unwrap()
            ))
        );
        if vm == "f2" {
            // The primary dies *without* its guest's end reaching the secondary (100 lines after
            // protection, long before the end): that is a failover, and the guest runs on to its end
            // on host-b, which then shows it exited with the whole output; host-a shows it moved.
            let last_line = |out: &str| -> u64 {
                out.lines()
                    .last()
                    .and_then(|l| l.trim().parse().ok())
                    .unwrap_or(0)
            };
            let from = last_line(&axctl(a.addr, &dir, &["vm", "console", vm]));
            assert!(
                from + 500 < 4000,
                "f2 was nearly done before it was protected ({from})"
            );
            let t = Instant::now();
            while last_line(&axctl(a.addr, &dir, &["vm", "console", vm])) < from + 100 {
                assert!(
                    t.elapsed() < Duration::from_secs(120),
                    "f2 stopped printing"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            let pid = ax_agent::worker::alive(&dir.join("host-a/vms/f2/worker.pid")).unwrap();
            // SAFETY: kill(2) on the worker this test's agent started.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            let bv = wait_vm(&b, vm, "exited on host-b after the failover", 120, |v| {
                v["state"] == "exited"
            });
            // Either a failover (host-b promoted and ran the guest to its end), or — when the guest
            // was quicker than the kill — its end was already in host-b's last committed epoch.
            assert_eq!(bv["exit_code"].as_i64(), Some(code), "{bv}");
            let failed_over = bv["role"] == "primary";
            println!("f2: failover {failed_over}");
            assert_eq!(
                details(&b, vm, "was declared dead").len(),
                usize::from(failed_over)
            );
            // host-a: moved, or — once host-b protected the VM again to host-a's returning agent — its
            // standby, which ended with the guest.
            wait_vm(&a, vm, "moved or ended on host-a", 60, |v| {
                v["state"] == "moved" || v["state"] == "exited"
            });
            assert_eq!(
                axctl(b.addr, &dir, &["vm", "console", vm, "--from-start"]),
                lines(4000),
                "f2 on host-b"
            );
            continue;
        }
        let av = wait_vm(&a, vm, "exited on host-a", 60, |v| v["state"] == "exited");
        let bv = wait_vm(&b, vm, "exited on host-b", 60, |v| v["state"] == "exited");
        for v in [&av, &bv] {
            assert_eq!(v["exit_code"], code, "{v}");
        }
        assert_eq!(
            (av["role"].as_str(), bv["role"].as_str()),
            (Some("primary"), Some("secondary"))
        );
        assert!(
            details(&b, vm, "was declared dead").is_empty(),
            "host-b took the ended VM over"
        );
        assert_eq!(
            details(&b, vm, "this standby ends with it").len(),
            1,
            "{vm}: {:?}",
            events(&b, vm)
        );
        println!("{vm}: host-a {:?}", details(&a, vm, "exited (code"));
        assert!(
            ax_agent::worker::alive(&dir.join(format!("host-b/vms/{vm}/worker.pid"))).is_none(),
            "orphan standby"
        );
        assert_eq!(
            axctl(a.addr, &dir, &["vm", "console", vm, "--from-start"]),
            lines(4000),
            "{vm} on host-a"
        );
        assert_eq!(
            axctl(b.addr, &dir, &["vm", "console", vm, "--from-start"]),
            lines(4000),
            "{vm} on host-b"
        );
    }
    // Started again: it runs alone and is protected again, to a fresh standby.
    let (c, v) = a.req("POST", "/v1/vms/f1/start", None);
    assert_eq!(c, 200, "{v}");
    wait_vm(&a, "f1", "protected again", 60, |v| {
        v["protected"] == true && v["level"] == "ft"
    });
    stop_pair(a, b, witness, &dir);
}

/// A host of a three-host cluster with host-failure recovery: etcd at `etcd`, the fence command
/// logging to `fence.log` (the test powers the host off itself), host heartbeats on one port.
fn trio_config(dir: &Path, me: usize, etcd: &str, base: u16) -> PathBuf {
    let name = |i: usize| format!("host-{}", ["a", "b", "c"][i]);
    let ip = |i: usize| format!("127.0.0.{}", i + 1);
    let storage = dir.join(name(me));
    let cfg = dir.join(format!("{}.toml", name(me)));
    let peers: String = (0..3)
        .filter(|i| *i != me)
        .map(|i| {
            format!(
                "[[peers]]\nname = \"{}\"\napi = \"{}:{}\"\nlink = \"{}\"\nhb = \"{}\"\n",
                name(i),
                ip(i),
                base + 50,
                ip(i),
                ip(i)
            )
        })
        .collect();
    // Each host's local witness needs its own port on 127.0.0.1; host heartbeats share one. The three
    // agents share one machine, whose MemAvailable moves with other work: each offers a fixed amount
    // of memory to VMs, so that the placement of a failed host's VMs is deterministic.
    let ports = ports(base + 100 * me as u16).replace(
        &format!("host_heartbeat = {}", base + 100 * me as u16 + 31),
        &format!("host_heartbeat = {}", base + 60),
    );
    std::fs::write(
        &cfg,
        format!(
            "host = \"{}\"\nstorage_dir = \"{}\"\npki_dir = \"{}\"\ntoken_file = \"{}\"\n\
             vm_memory_mib = 4096\n[api]\nlisten = \"{}:{}\"\n[addresses]\nlink = \"{}\"\nhb = \"{}\"\n{ports}\
             [coordinator]\netcd = [\"{etcd}\"]\n\
             [fence]\ncommand = \"echo {{host}} >> {}\"\n\
             [ha]\nhost_interval_ms = 100\nhost_timeout_ms = 600\n{peers}",
            name(me),
            storage.display(),
            dir.join("pki").display(),
            dir.join("token").display(),
            ip(me),
            base + 50,
            ip(me),
            ip(me),
            dir.join("fence.log").display(),
        ),
    )
    .unwrap();
    cfg
}

/// The catalog of VM definitions at the coordinator: (VM, home host).
fn catalog(endpoint: &str) -> Vec<(String, String)> {
    use failover::coordinator::etcd::{EtcdConfig, EtcdCoordinator};
    let c = EtcdCoordinator::new(EtcdConfig::new(vec![endpoint.to_string()])).unwrap();
    runtime()
        .block_on(c.kv_prefix("/ax/catalog/", 100, 1 << 20))
        .unwrap()
        .into_iter()
        .map(|kv| {
            let v: Value = serde_json::from_slice(&kv.value).unwrap();
            (
                v["def"]["name"].as_str().unwrap().to_string(),
                v["home"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Host-failure recovery of VMs not under Nova: host-a (two level-ha VMs) loses power; host-b, the
/// first survivor by name, declares it dead, fences it, and places one VM on itself and one on host-c
/// (through `POST /v1/takeovers/{name}`), each winning the VM's register at a real etcd. When host-a's
/// agent comes back, its VMs are `moved`: never run twice.
#[test]
fn host_failure_restarts_the_ha_vms_of_a_fenced_host_on_the_survivors() {
    if !kvm_or_skip("host_failure_restarts_the_ha_vms_of_a_fenced_host_on_the_survivors") {
        return;
    }
    use failover::coordinator::etcd::LocalEtcd;
    if !LocalEtcd::available() {
        skip(
            "host_failure_restarts_the_ha_vms_of_a_fenced_host_on_the_survivors",
            "etcd is not installed (apt-get install etcd-server)",
        );
        return;
    }
    let dir = scratch("hostfail");
    let etcd = LocalEtcd::start(dir.join("etcd"), 1, None).unwrap();
    let endpoint = etcd.endpoints[0].clone();
    let cfgs: Vec<PathBuf> = (0..3)
        .map(|i| trio_config(&dir, i, &endpoint, 22600))
        .collect();
    let names = ["host-a", "host-b", "host-c"];
    let mut a = Agent::start(&cfgs[0], &dir.join(names[0]));
    let b = Agent::start(&cfgs[1], &dir.join(names[1]));
    let c = Agent::start(&cfgs[2], &dir.join(names[2]));
    for vm in ["hf1", "hf2"] {
        running_at_ha(
            &a,
            json!({"name": vm, "guest": "counter", "memory_mib": 64}),
        );
    }
    // A level-none VM is not in the catalog and is not taken over.
    let (code, v) = a.req(
        "POST",
        "/v1/vms",
        Some(&json!({"name": "hf0", "guest": "counter", "memory_mib": 64})),
    );
    assert_eq!(code, 201, "{v}");
    let t = Instant::now();
    loop {
        let cat = catalog(&endpoint);
        if cat.len() == 2 && cat.iter().all(|(_, home)| home == "host-a") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "catalog: {cat:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Power loss: the agent and its workers die at once.
    let workers = a.worker_pids();
    assert!(workers.len() >= 3, "host-a runs its workers: {workers:?}");
    a.signal(libc::SIGKILL);
    for pid in workers {
        // SAFETY: kill(2) on the pids of host-a's workers, read from their pid files just now.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
    a.wait();
    let killed = Instant::now();

    // host-b acts: fence, then one VM here and one on host-c.
    let failure = wait_host_failure(&b, "host-a", 60);
    assert_eq!(failure["state"], "done", "{failure}");
    assert!(failure["fenced_ms"].as_u64().is_some(), "{failure}");
    let vms = failure["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2, "{failure}");
    assert!(vms.iter().all(|v| v["outcome"] == "restarted"), "{failure}");
    let mut targets: Vec<&str> = vms.iter().map(|v| v["target"].as_str().unwrap()).collect();
    targets.sort();
    assert_eq!(targets, ["host-b", "host-c"], "{failure}");
    let (_, metrics) = http(b.addr, "GET", "/metrics", None, None);
    assert!(
        metrics
            .as_str()
            .unwrap_or_default()
            .contains("ax_takeovers_total 1"),
        "{metrics}"
    );
    let listed = axctl(b.addr, &dir, &["recovery", "list"]);
    assert!(
        listed.contains("host-a") && listed.contains("done") && listed.contains("restarted"),
        "axctl recovery list:\n{listed}"
    );
    let fenced = std::fs::read_to_string(dir.join("fence.log")).unwrap();
    assert_eq!(fenced.trim(), "host-a", "fence log: {fenced}");
    for v in vms {
        let vm = v["vm"].as_str().unwrap();
        let host = if v["target"] == "host-b" { &b } else { &c };
        let view = wait_vm(host, vm, "running after the takeover", 30, |v| {
            v["state"] == "running" && v["level"] == "ha" && v["transition"].is_null()
        });
        assert_eq!(view["engine"], "native", "{view}");
        assert!(
            events(host, vm).iter().any(|e| e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("taken over from host-a"))),
            "{vm}: no takeover event"
        );
    }
    eprintln!(
        "host-a powered off -> both VMs running on the survivors: {} ms (host timeout 600 ms)",
        killed.elapsed().as_millis()
    );
    // The catalog follows: each VM is listed on its new host.
    let t = Instant::now();
    loop {
        let mut cat = catalog(&endpoint);
        cat.sort();
        let mut want: Vec<(String, String)> = vms
            .iter()
            .map(|v| {
                (
                    v["vm"].as_str().unwrap().to_string(),
                    v["target"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        want.sort();
        if cat == want {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "catalog {cat:?} want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // host-a comes back: its two HA VMs moved; they never run here again. The level-none VM was not
    // taken over: it is host-a's, restarted by nobody (level none) until the operator starts it.
    a.start_again();
    for vm in ["hf1", "hf2"] {
        wait_vm(&a, vm, "moved", 30, |v| v["state"] == "moved");
    }
    std::thread::sleep(Duration::from_secs(1));
    let (_, hf0) = a.req("GET", "/v1/vms/hf0", None);
    assert_ne!(hf0["state"], "moved", "{hf0}");
    for vm in ["hf0", "hf1", "hf2"] {
        let pid = a.storage.join("vms").join(vm).join("worker.pid");
        assert_eq!(
            ax_agent::worker::alive(&pid),
            None,
            "host-a runs {vm} again"
        );
    }
    for v in vms {
        let host = if v["target"] == "host-b" { &b } else { &c };
        let vm = v["vm"].as_str().unwrap();
        let (_, view) = host.req("GET", &format!("/v1/vms/{vm}"), None);
        assert_eq!(view["state"], "running", "{view}");
    }
    drop(a);
    drop(b);
    drop(c);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}

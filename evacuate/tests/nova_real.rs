//! The Keystone and Nova clients against real services. Needs the services that `tests/e2e/nova.sh`
//! starts: it runs this test with `AX_E2E_NOVA_ENV` naming an env file (`OS_*`, `AX_E2E_FLAVOR`,
//! `AX_E2E_IMAGE`). Without it the test prints `SKIPPED: …` and passes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use evacuate::auth::TokenSource;
use evacuate::keystone::{Keystone, KeystoneSettings};
use evacuate::nova::{Microversion, Nova, NovaError, NovaSettings};

fn env_file() -> Option<HashMap<String, String>> {
    let path = std::env::var("AX_E2E_NOVA_ENV").ok()?;
    let text = std::fs::read_to_string(&path).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    )
}

#[tokio::test]
async fn keystone_and_nova_against_real_services() {
    let Some(env) = env_file() else {
        println!("SKIPPED: keystone_and_nova_against_real_services: AX_E2E_NOVA_ENV not set (tests/e2e/nova.sh sets it)");
        eprintln!("SKIPPED: keystone_and_nova_against_real_services: AX_E2E_NOVA_ENV not set");
        return;
    };
    let settings = KeystoneSettings::from_env_map(&env).unwrap();
    let ks = Arc::new(Keystone::new(settings).unwrap());

    // Keystone: token, catalog, re-issue after invalidation.
    let t1 = ks.token().await.unwrap();
    assert!(!t1.value.is_empty());
    assert_eq!(ks.token().await.unwrap().value, t1.value, "cached");
    let compute = ks.endpoint("compute").await.unwrap();
    assert!(compute.ends_with("/v2.1"), "{compute}");
    ks.invalidate();
    tokio::time::sleep(Duration::from_millis(1100)).await; // a new second: a different fernet token
    assert_ne!(ks.token().await.unwrap().value, t1.value, "re-issued");
    let mut wrong = KeystoneSettings::from_env_map(&env).unwrap();
    wrong.password = "wrong".into();
    let e = Keystone::new(wrong).unwrap().token().await.unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");

    // Nova: microversions, services, a server's life, typed errors.
    let nova = Nova::from_keystone(ks.clone(), NovaSettings::default())
        .await
        .unwrap();
    let (min, max) = nova.versions();
    assert!(
        min <= Microversion(2, 1) && max >= Microversion(2, 95),
        "{min}..{max}"
    );
    assert_eq!(nova.evacuate_microversion().unwrap(), Microversion(2, 94));
    let services = nova.services(None, Some("nova-compute")).await.unwrap();
    let hosts: Vec<_> = services.iter().map(|s| s.host.as_str()).collect();
    assert!(
        hosts.contains(&"compute1") && hosts.contains(&"compute2"),
        "{hosts:?}"
    );
    assert_eq!(nova.compute_service("compute2").await.unwrap().state, "up");
    assert!(matches!(
        nova.compute_service("nohost").await,
        Err(NovaError::NoService { .. })
    ));

    let meta = HashMap::from([("ax:level".to_string(), "none".to_string())]);
    let id = nova
        .boot(
            "ax-client-test",
            &env["AX_E2E_IMAGE"],
            &env["AX_E2E_FLAVOR"],
            Some("compute2"),
            &meta,
        )
        .await
        .unwrap();
    let t = Duration::from_secs(120);
    let s = nova.wait_status(&id, "ACTIVE", t).await.unwrap();
    assert_eq!(s.host.as_deref(), Some("compute2"));
    assert_eq!(s.metadata["ax:level"], "none");
    assert!(nova
        .servers_on_host("compute2")
        .await
        .unwrap()
        .iter()
        .any(|x| x.id == id));
    nova.lock(&id).await.unwrap();
    assert!(nova.server(&id).await.unwrap().locked);
    nova.unlock(&id).await.unwrap();
    nova.stop(&id).await.unwrap();
    nova.wait_status(&id, "SHUTOFF", t).await.unwrap();
    // 409: stopping a stopped server.
    let e = nova.stop(&id).await.unwrap_err();
    assert!(matches!(e, NovaError::Conflict { .. }), "{e}");
    assert!(e.to_string().contains("stop"), "{e}");
    nova.start(&id).await.unwrap();
    nova.wait_status(&id, "ACTIVE", t).await.unwrap();
    // 400 "still in use": evacuating off a host whose nova-compute is up.
    let e = nova.evacuate(&id, None).await.unwrap_err();
    assert!(matches!(e, NovaError::HostInUse { .. }), "{e}");
    assert!(e.to_string().contains("compute2"), "{e}");
    // 404.
    let e = nova
        .server("00000000-0000-0000-0000-000000000000")
        .await
        .unwrap_err();
    assert!(matches!(e, NovaError::NotFound { .. }), "{e}");
    // A wait that cannot succeed times out with the last state seen.
    let e = nova
        .wait_status(&id, "SHUTOFF", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(e, NovaError::Timeout { .. }) && e.to_string().contains("ACTIVE"),
        "{e}"
    );
    assert!(nova.evacuations(Some(&id)).await.unwrap().is_empty());
    nova.delete(&id).await.unwrap();
}

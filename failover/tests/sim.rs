//! Thousands of seeded runs of the protocol v2 simulation (`failover::sim`): two or three hosts,
//! a coordinator, partitions, pauses, reordering, duplication, loss, crashes, coordinator outages and
//! state loss. A failing seed is printed; `AX_SIM_SEED=N` replays it alone, with its trace.

use failover::sim::{run, Bug, SimConfig, SimStats};

fn runs() -> u64 {
    std::env::var("AX_SIM_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

#[test]
fn seeded_runs_keep_one_releaser_per_epoch_and_lose_no_released_output() {
    if let Some(seed) = std::env::var("AX_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        let r = run(
            seed,
            &SimConfig {
                trace: true,
                ..SimConfig::default()
            },
        );
        eprintln!("{}", r.trace);
        eprintln!("seed {seed}: {:?}", r.stats);
        assert!(r.violation.is_none(), "seed {seed}: {:?}", r.violation);
        return;
    }
    let mut total = SimStats::default();
    let t = std::time::Instant::now();
    for seed in 0..runs() {
        let r = run(seed, &SimConfig::default());
        if let Some(v) = r.violation {
            panic!("seed {seed}: {v}\nreplay: AX_SIM_SEED={seed} cargo test --release -p failover --test sim -- --nocapture");
        }
        let s = r.stats;
        total.promotions += s.promotions;
        total.fences += s.fences;
        total.solo_wins += s.solo_wins;
        total.stale_drops += s.stale_drops;
        total.relearning += s.relearning;
        total.coordinator_requests += s.coordinator_requests;
        total.releases += s.releases;
        total.faults += s.faults;
        total.state_losses += s.state_losses;
    }
    eprintln!("{} runs in {:?}: {total:?}", runs(), t.elapsed());
    // The runs reach the interesting states (the property is not vacuous).
    let n = runs();
    assert!(total.promotions > n / 4, "{total:?}");
    assert!(total.fences > n / 20, "{total:?}");
    assert!(total.stale_drops > n / 20, "{total:?}");
    assert!(total.relearning > n / 20, "{total:?}");
    assert!(total.releases > n * 50, "{total:?}");
}

/// The checks catch broken drivers: a secondary that acknowledges after deciding to promote, a
/// primary that releases without acknowledgements.
#[test]
fn broken_drivers_are_caught() {
    for bug in [Bug::AckAfterDecision, Bug::ReleaseUnacked] {
        let cfg = SimConfig {
            bug: Some(bug),
            ..SimConfig::default()
        };
        let caught = (0..500).find_map(|seed| run(seed, &cfg).violation.map(|v| (seed, v)));
        let (seed, v) = caught.unwrap_or_else(|| panic!("{bug:?} not caught in 500 seeds"));
        eprintln!("{bug:?}: seed {seed}: {v}");
    }
}

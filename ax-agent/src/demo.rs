//! The local statepoint demo: one process plays primary and secondary.
//!
//! 1. A `counter` guest runs under epochs; every frame is applied to an in-process replica, and only
//!    then is the epoch's console output released (the output gate), tagged `primary`.
//! 2. Live statistics every second: epochs, stun p50/p99, dirty pages, bytes shipped, compression.
//! 3. The primary "fails" in the middle of an epoch: it has run past its last committed checkpoint and
//!    produced output nobody will ever see (it was never committed).
//! 4. The replica is restored into a fresh VM and resumed; its output is tagged `replica`.
//! 5. The demo checks the released stream — primary then replica — is 1, 2, 3, … with no gap and no
//!    duplicate, and prints `demo: ok`.

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use statepoint::{EpochConfig, OutputGate, Replica, Statepointer, Vm, VmConfig};

/// Options of `ax-agent demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Seconds the primary runs before it fails.
    #[arg(long, default_value_t = 3.0)]
    primary_secs: f64,
    /// Seconds the restored replica runs after the failover.
    #[arg(long, default_value_t = 2.0)]
    replica_secs: f64,
    /// Epoch length in milliseconds.
    #[arg(long, default_value_t = 10)]
    epoch_ms: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Counter iterations between two output lines (sets the output rate).
    #[arg(long, default_value_t = 150_000_000)]
    iterations: u64,
    /// Print only every tenth released line.
    #[arg(long)]
    quiet: bool,
    /// Run your own guest (a static ELF64 program written to docs/guest-abi.md) instead of the kit's
    /// counter; its console output is what the demo shows.
    #[arg(long, value_name = "FILE")]
    guest_elf: Option<std::path::PathBuf>,
    /// Guest arguments (with --guest-elf; the counter gets --iterations).
    #[arg(long = "guest-arg")]
    guest_args: Vec<u64>,
}

#[derive(Default)]
struct Stream {
    text: Vec<u8>,
    lines_shown: u64,
}

fn print_released(stream: &Mutex<Stream>, who: &str, bytes: &[u8], verbose: bool) {
    let mut s = stream.lock().unwrap_or_else(|p| p.into_inner());
    let before = s.text.len();
    s.text.extend_from_slice(bytes);
    let start = s.text[..before]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let complete_end = s
        .text
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    if complete_end <= start {
        return;
    }
    let new_lines: Vec<String> = String::from_utf8_lossy(&s.text[start..complete_end])
        .lines()
        .map(str::to_owned)
        .collect();
    for line in new_lines {
        s.lines_shown += 1;
        if verbose || s.lines_shown % 10 == 1 {
            println!("  [{who:>7}] {line}");
        }
    }
}

/// Runs the demo; returns the process exit code.
pub fn run(args: &DemoArgs) -> i32 {
    match demo(args) {
        Ok(true) => {
            println!("demo: ok");
            0
        }
        Ok(false) => {
            println!("demo: FAILED (see above)");
            1
        }
        Err(e) => {
            eprintln!("demo: error: {e}");
            if e.to_string().contains("/dev/kvm") {
                println!("SKIPPED: the demo needs /dev/kvm: {e}");
            }
            2
        }
    }
}

fn demo(args: &DemoArgs) -> Result<bool, Box<dyn std::error::Error>> {
    statepoint::kvm_available()?;
    let mem_size = args.mem_mib << 20;
    let vm = Vm::try_from(VmConfig {
        mem_size,
        vcpus: 1,
        image: match &args.guest_elf {
            Some(path) => crate::guest::read_elf(path)?,
            None => ax_guests::COUNTER.to_vec(),
        },
        args: match &args.guest_elf {
            Some(_) => args.guest_args.clone(),
            None => vec![args.iterations],
        },
        ..VmConfig::default()
    })?;
    let stream = Arc::new(Mutex::new(Stream::default()));
    let sink_stream = Arc::clone(&stream);
    let verbose = !args.quiet;
    let gate = OutputGate::new(move |_epoch: u64, bytes: &[u8]| {
        print_released(&sink_stream, "primary", bytes, verbose)
    });
    let config = EpochConfig {
        interval: Duration::from_millis(args.epoch_ms),
        ..EpochConfig::default()
    };
    let mut primary = Statepointer::new(vm, config)?.with_output_gate(gate);
    let mut replica = Replica::new(mem_size, None)?;
    println!(
        "ax statepoint demo: counter guest, {} MiB, {} ms epochs, replica in this process",
        args.mem_mib, args.epoch_ms
    );
    println!("guest output is released only after the replica has committed its epoch:\n");

    let mut frame = Vec::new();
    let boot = primary.boot(&mut frame)?;
    replica.apply(&frame)?;
    println!(
        "  epoch 0 (boot image): {} pages, frame {} bytes",
        boot.dirty_pages, boot.encode.frame_bytes
    );
    let started = Instant::now();
    let mut last_stats = Instant::now();
    let (mut raw, mut shipped, mut dirty, mut epochs) = (0u64, 0u64, 0u64, 0u64);
    while started.elapsed().as_secs_f64() < args.primary_secs {
        let rep = primary.next_epoch(&mut frame)?;
        let committed = replica.apply(&frame)?;
        primary.commit(committed);
        raw += rep.encode.raw_bytes;
        shipped += rep.encode.frame_bytes;
        dirty += rep.dirty_pages;
        epochs += 1;
        if last_stats.elapsed() >= Duration::from_secs(1) {
            last_stats = Instant::now();
            let s = primary.stun_stats();
            println!(
                "  -- {epochs} epochs, stun p50 {:.0} µs p99 {:.0} µs, {:.0} dirty pages/epoch, {:.1} MB shipped, compression {:.1}x",
                s.percentile(50.0).as_secs_f64() * 1e6,
                s.percentile(99.0).as_secs_f64() * 1e6,
                dirty as f64 / epochs as f64,
                shipped as f64 / 1e6,
                raw as f64 / shipped.max(1) as f64
            );
        }
    }
    // The primary runs on past its last committed checkpoint, then dies: what it printed since is lost
    // with it, and must never have been shown.
    // It fails while it holds output: once the guest has printed past the last committed epoch.
    let at = replica.epoch().unwrap_or(0);
    let dead = primary.into_vm();
    let mut uncommitted = Vec::new();
    let t = Instant::now();
    while uncommitted.is_empty() && t.elapsed() < Duration::from_secs(10) && dead.exit().is_none() {
        std::thread::sleep(Duration::from_millis(1));
        uncommitted.extend(dead.take_console());
    }
    drop(dead);
    println!(
        "\n==== primary FAILED after epoch {at}, holding {} bytes of output no replica had committed \
         ({:?}): they die with it, never shown; the replica prints them again ====",
        uncommitted.len(),
        String::from_utf8_lossy(&uncommitted)
    );
    let t = Instant::now();
    let mut restored = replica.restore()?;
    restored.start()?;
    println!(
        "==== replica restored from epoch {at} and resumed in {:.1} ms ====\n",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < args.replica_secs {
        std::thread::sleep(Duration::from_millis(20));
        let bytes = restored.take_console();
        print_released(&stream, "replica", &bytes, !args.quiet);
    }
    let _ = std::io::stdout().flush();

    let s = stream.lock().unwrap_or_else(|p| p.into_inner());
    let text = String::from_utf8_lossy(&s.text);
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let mut expected = 1u64;
    for line in complete.lines() {
        match line.trim().parse::<u64>() {
            Ok(n) if n == expected => expected += 1,
            Ok(n) => {
                println!("output stream broken: expected {expected}, got {n}");
                return Ok(false);
            }
            Err(_) => {
                println!("unexpected output line {line:?}");
                return Ok(false);
            }
        }
    }
    let st = primary_stats_line(&s, expected - 1);
    println!("\n{st}");
    Ok(expected > 2)
}

fn primary_stats_line(s: &Stream, last: u64) -> String {
    format!(
        "output stream 1..{last}: no gap, no duplicate across the failover ({} lines released)",
        s.lines_shown
    )
}

//! The Prometheus exporter end to end: serve on a free local port, record, scrape `/metrics` over
//! a plain HTTP/1.0 request, and check the exposition. The `metrics` recorder is process-global,
//! so this binary holds exactly one test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use troupe::telemetry::{self, StepMetrics, TelemetryError};

/// The exporter cannot report the port it bound, so ask the OS for a free one and release it.
fn free_local_addr() -> SocketAddr {
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap()
}

/// Fetches `/metrics`, polling until the listener answers with a 200 or the deadline passes.
fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })();
        match attempt {
            Ok(response) if response.starts_with("HTTP/1.0 200") => return Ok(response),
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(response) => anyhow::bail!("no 200 from {addr} within 5 s; last answer:\n{response}"),
            Err(e) => anyhow::bail!("no answer from {addr} within 5 s: {e}"),
        }
    }
}

/// The value of the series written exactly as `series` (name and labels), if present.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

#[test]
fn prometheus_endpoint_serves_recorded_metrics_and_refuses_a_second_install() -> anyhow::Result<()> {
    // A port already in use is an error naming the address, and leaves nothing installed.
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let taken_addr = taken.local_addr()?;
    match telemetry::serve_prometheus(taken_addr) {
        Err(e @ TelemetryError::Bind { addr: a, .. }) => {
            assert_eq!(a, taken_addr);
            assert!(e.to_string().contains(&taken_addr.to_string()), "{e}");
        }
        other => panic!("serving on a taken port gave {other:?}"),
    }
    drop(taken);

    let addr = free_local_addr();
    telemetry::serve_prometheus(addr)?;

    let step = StepMetrics {
        step: 12,
        loss: 3.25,
        grad_norm: 0.5,
        tokens_per_second: 1024.0,
        bubble_fraction: 0.125,
        step_seconds: 0.75,
        skipped: false,
    };
    telemetry::record_step(0, &step);
    telemetry::record_step(0, &StepMetrics { step: 13, skipped: true, ..step });
    telemetry::add_bytes_sent(0, "activation", 4096);
    telemetry::add_bytes_sent(0, "activation", 1000);
    telemetry::add_bytes_sent(1, "gradient", 7);
    telemetry::add_messages(0, "activation", 2);
    telemetry::add_instructions(0, 9);
    telemetry::set_queue_depth(0, "stage", 3);
    telemetry::set_optimizer_state_bytes(0, 1 << 20);

    let body = scrape(addr)?;
    let expect = |series: &str, value: f64| {
        assert_eq!(sample(&body, series), Some(value), "{series} in:\n{body}");
    };
    expect(r#"troupe_loss{rank="0"}"#, 3.25);
    expect(r#"troupe_grad_norm{rank="0"}"#, 0.5);
    expect(r#"troupe_tokens_per_second{rank="0"}"#, 1024.0);
    expect(r#"troupe_bubble_fraction{rank="0"}"#, 0.125);
    expect(r#"troupe_step_duration_seconds{rank="0"}"#, 0.75);
    expect(r#"troupe_step{rank="0"}"#, 13.0);
    expect(r#"troupe_steps_total{rank="0"}"#, 2.0);
    expect(r#"troupe_skipped_steps_total{rank="0"}"#, 1.0);
    expect(r#"troupe_sent_bytes_total{rank="0",kind="activation"}"#, 5096.0);
    expect(r#"troupe_sent_bytes_total{rank="1",kind="gradient"}"#, 7.0);
    expect(r#"troupe_messages_total{rank="0",kind="activation"}"#, 2.0);
    expect(r#"troupe_instructions_total{rank="0"}"#, 9.0);
    expect(r#"troupe_queue_depth{rank="0",actor="stage"}"#, 3.0);
    expect(r#"troupe_optimizer_state_bytes{rank="0"}"#, f64::from(1u32 << 20));
    assert!(body.contains("# HELP troupe_sent_bytes_total"), "descriptions registered:\n{body}");
    assert!(body.contains("# TYPE troupe_steps_total counter"), "{body}");

    // A second install is refused with an error naming both addresses, on the same address
    // (which is in use) and on another one, and the first exporter keeps serving.
    for again in [addr, free_local_addr()] {
        match telemetry::serve_prometheus(again) {
            Err(e @ TelemetryError::AlreadyServing { addr: a, serving }) => {
                assert_eq!((a, serving), (again, addr));
                let msg = e.to_string();
                assert!(msg.contains(&addr.to_string()) && msg.contains(&again.to_string()));
            }
            other => panic!("second serve_prometheus({again}) gave {other:?}"),
        }
    }
    assert!(scrape(addr)?.contains("troupe_loss"));
    Ok(())
}

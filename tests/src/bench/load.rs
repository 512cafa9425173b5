//! Load generators run inside test pods: an HTTP/1.1 client for the metadata hot path
//! (IMDSv2 as SDKs do it: one token PUT, then GETs with the token), and plain TCP clients for
//! ordinary pod traffic. Blocking sockets, one thread per connection in flight, latencies
//! recorded per request.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde::{Deserialize, Serialize};

/// What a load run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    #[serde(default)]
    pub max_us: f64,
    /// The first failed request's error, so a run with errors says what they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

impl Stats {
    pub fn from_latencies(mut micros: Vec<u32>, errors: u64, elapsed: Duration) -> Self {
        micros.sort_unstable();
        let pick = |q: f64| {
            if micros.is_empty() {
                return 0.0;
            }
            let i = ((micros.len() as f64 - 1.0) * q).round() as usize;
            f64::from(micros[i])
        };
        let seconds = elapsed.as_secs_f64();
        Self {
            requests: micros.len() as u64,
            errors,
            seconds,
            per_second: micros.len() as f64 / seconds.max(1e-9),
            p50_us: pick(0.50),
            p99_us: pick(0.99),
            max_us: pick(1.0),
            first_error: None,
        }
    }
}

/// Runs `worker` on `concurrency` threads until `duration` has passed; each call of
/// `worker` is one timed request (`Err` counts as an error). With `every`, each thread starts
/// a request at most that often (an open-loop rate, as SDKs ask), else back to back.
fn drive(
    concurrency: usize,
    duration: Duration,
    every: Option<Duration>,
    worker: impl Fn() -> Box<dyn FnMut() -> anyhow::Result<()> + Send> + Sync,
) -> Stats {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let results: Vec<(Vec<u32>, u64, Option<String>)> = thread::scope(|scope| {
        let handles: Vec<_> = (0..concurrency.max(1))
            .map(|_| {
                let mut request = worker();
                let stop = stop.clone();
                scope.spawn(move || {
                    let (mut micros, mut errors) = (Vec::with_capacity(1 << 16), 0u64);
                    let mut first_error = None;
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let next = every.map(|every| t + every);
                        match request() {
                            Ok(()) => micros
                                .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX)),
                            Err(error) => {
                                errors += 1;
                                first_error.get_or_insert_with(|| format!("{error:#}"));
                            }
                        }
                        if let Some(next) = next {
                            thread::sleep(next.saturating_duration_since(Instant::now()));
                        }
                    }
                    (micros, errors, first_error)
                })
            })
            .collect();
        thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let elapsed = started.elapsed();
    let errors = results.iter().map(|r| r.1).sum();
    let first_error = results.iter().find_map(|r| r.2.clone());
    let micros = results.into_iter().flat_map(|r| r.0).collect();
    Stats {
        first_error,
        ..Stats::from_latencies(micros, errors, elapsed)
    }
}

/// One HTTP/1.1 exchange on `stream`; the status code. Reads exactly the response.
fn exchange(reader: &mut BufReader<TcpStream>, request: &[u8]) -> anyhow::Result<u16> {
    reader.get_mut().write_all(request)?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status line: {line:?}"))?;
    let mut length = 0usize;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("connection closed in the headers");
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse()?;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(status)
}

fn connect(addr: SocketAddr) -> anyhow::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(BufReader::new(stream))
}

/// The IMDSv2 hot path: one token PUT, then `GET path` with the token, for `duration`, on a
/// new connection per request or on one kept-alive connection per thread. Every answer
/// must be 200.
pub fn imds(
    addr: SocketAddr,
    path: &str,
    keep_alive: bool,
    concurrency: usize,
    duration: Duration,
    per_second: Option<f64>,
) -> anyhow::Result<Stats> {
    let mut conn = connect(addr).context("connecting for the token")?;
    let put = "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    conn.get_mut().write_all(put.as_bytes())?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let token = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .filter(|_| answer.starts_with("HTTP/1.1 200"))
        .ok_or_else(|| anyhow!("token PUT failed: {answer}"))?;
    let request: Arc<[u8]> = format!(
        "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n"
    )
    .into_bytes()
    .into();
    let every = per_second
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(concurrency.max(1) as f64 / r));
    let stats = drive(concurrency, duration, every, || {
        let request = request.clone();
        let mut kept: Option<BufReader<TcpStream>> = None;
        Box::new(move || {
            let mut conn = match kept.take() {
                Some(conn) => conn,
                None => connect(addr)?,
            };
            let status = exchange(&mut conn, &request)?;
            if status != 200 {
                bail!("status {status}");
            }
            if keep_alive {
                kept = Some(conn);
            }
            Ok(())
        })
    });
    if stats.errors > 0 && stats.requests == 0 {
        bail!("every request failed");
    }
    Ok(stats)
}

/// Bytes per exchange of the ordinary-traffic clients.
pub const MESSAGE: usize = 64;

/// Ordinary pod traffic to an echo server: `connect` opens a connection per exchange (the
/// connect path every TCP client pays), otherwise one connection carries all exchanges.
pub fn tcp(
    addr: SocketAddr,
    connect_each: bool,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Stats> {
    let stats = drive(concurrency, duration, None, || {
        let mut kept: Option<TcpStream> = None;
        Box::new(move || {
            let mut stream = match kept.take() {
                Some(stream) => stream,
                None => {
                    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                    s.set_nodelay(true)?;
                    s
                }
            };
            let mut buf = [7u8; MESSAGE];
            stream.write_all(&buf)?;
            stream.read_exact(&mut buf)?;
            if !connect_each {
                kept = Some(stream);
            }
            Ok(())
        })
    });
    if stats.requests == 0 {
        bail!("no exchange succeeded ({} errors)", stats.errors);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let stats = Stats::from_latencies((1..=100).rev().collect(), 2, Duration::from_secs(2));
        assert_eq!(stats.requests, 100);
        assert_eq!(stats.errors, 2);
        assert_eq!(stats.per_second, 50.0);
        assert_eq!(stats.p50_us, 51.0);
        assert_eq!(stats.p99_us, 99.0);
        assert_eq!(
            Stats::from_latencies(Vec::new(), 0, Duration::from_secs(1)).p99_us,
            0.0
        );
    }
}

//! `kiam-bench`: the benchmarks behind `cargo xtask bench` (see `kiam_e2e::bench`), and the
//! small programs they run inside test pods.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use kiam_e2e::bench::{self, load};

#[derive(Parser)]
#[command(name = "kiam-bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmarks (root, cgroup v2, BPF) and write `report.json` under `--out`.
    Run {
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Rounds of each side-by-side comparison.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds of each load run.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Pod counts of the server scale runs.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        scale: Vec<usize>,
        /// Only these sections: hot, ordinary, new-pod, agent-memory, scale, refused, outage.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// (in a pod) The IMDSv2 hot path against `--target`; prints stats as JSON.
    Load {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        path: String,
        #[arg(long)]
        keep_alive: bool,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Requests a second, all threads together (default: back to back).
        #[arg(long)]
        per_second: Option<f64>,
    },
    /// (in a pod) Ordinary TCP traffic to an echo server; prints stats as JSON.
    Tcp {
        #[arg(long)]
        target: SocketAddr,
        /// A new connection per exchange.
        #[arg(long)]
        connect: bool,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Run on this CPU only.
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// (in a pod) `--count` requests to the agent's identity path, each on a new
    /// connection; prints their times in milliseconds as JSON.
    FirstRequest {
        #[arg(long, default_value = "169.254.169.254:80")]
        target: SocketAddr,
        #[arg(long, default_value_t = 2)]
        count: usize,
    },
    /// The bare hyper responder.
    Bare {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// The echo server for ordinary traffic.
    Echo {
        #[arg(long)]
        listen: SocketAddr,
        /// Run on this CPU only.
        #[arg(long)]
        cpu: Option<usize>,
    },
}

fn first_requests(target: SocketAddr, count: usize) -> anyhow::Result<Vec<f64>> {
    use std::io::{Read as _, Write as _};
    let mut times = Vec::new();
    for _ in 0..count {
        let started = std::time::Instant::now();
        let mut stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
        stream.write_all(
            b"GET /kiam/v1/identity HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n",
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
        if !answer.starts_with("HTTP/1.1 200") {
            bail!("identity request answered {answer}");
        }
    }
    Ok(times)
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// Keeps this process (and the threads it starts) on one CPU.
fn pin(cpu: Option<usize>) -> anyhow::Result<()> {
    if let Some(cpu) = cpu {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::Run {
            out,
            rounds,
            seconds,
            scale,
            only,
        } => {
            let options = bench::Options {
                out,
                rounds: rounds.max(1),
                run: Duration::from_secs_f64(seconds),
                scale,
                only,
            };
            bench::preflight().and_then(|()| bench::run(&options).map(|_| ()))
        }
        Cmd::Load {
            target,
            path,
            keep_alive,
            concurrency,
            seconds,
            per_second,
        } => load::imds(
            target,
            &path,
            keep_alive,
            concurrency,
            Duration::from_secs_f64(seconds),
            per_second,
        )
        .and_then(|stats| print_json(&stats)),
        Cmd::Tcp {
            target,
            connect,
            concurrency,
            seconds,
            cpu,
        } => pin(cpu)
            .and_then(|()| {
                load::tcp(
                    target,
                    connect,
                    concurrency,
                    Duration::from_secs_f64(seconds),
                )
            })
            .and_then(|stats| print_json(&stats)),
        Cmd::FirstRequest { target, count } => {
            first_requests(target, count).and_then(|times| print_json(&times))
        }
        Cmd::Bare { listen } => bench::servers::bare_hyper(listen),
        Cmd::Echo { listen, cpu } => pin(cpu)
            .and_then(|()| bench::servers::echo(listen))
            .context("echo server"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiam-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

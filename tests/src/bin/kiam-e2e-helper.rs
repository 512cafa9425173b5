//! Small programs the end-to-end tests run inside their "pods" (a network namespace and a
//! cgroup): HTTP clients with precise control over the connection, a raw-socket SYN sender
//! and sniffer, and a stand-in for the node's real metadata service.
//!
//! The HTTP client is deliberately minimal: tests need to send, half-close or abandon a
//! connection at exact moments, which ordinary clients hide. Real AWS SDKs are tested
//! elsewhere.

use std::{
    fs::OpenOptions,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// GET a URL; print one line per response: `<status> <body>` or `ERROR <reason>`.
    Get {
        url: String,
        /// Requests to make, each on its own connection.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Connections in flight at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Half-close (shutdown write) after sending, then read the answer.
        #[arg(long)]
        half_close: bool,
        /// Connect from this local port.
        #[arg(long)]
        bind_port: Option<u16>,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// One request with a method and headers; prints `<status> <body>`.
    Request {
        url: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// `Name: value`, repeatable.
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// Fetch credentials the way the AWS SDKs do (token PUT, role listing, credentials GET,
    /// each on a new connection) and time each call from inside the pod: prints
    /// `<step> <status> <microseconds>` per call, then the credentials' `AccessKeyId`.
    FetchCredentials {
        /// The metadata service, e.g. `http://169.254.169.254`.
        base: String,
    },
    /// Connect, send a request and close at once without reading; print own pid first.
    SendAndClose { url: String },
    /// One GET on a new connection, timed here in the pod from connect to the end of the
    /// answer (no process start in it): prints `<status> <microseconds> <body>`.
    TimedGet { url: String },
    /// Connect to `url`, then move this process into the cgroup `to` (another container's),
    /// then send a GET on the connection made before: prints `<status> <body>`. What
    /// identity a connection carries: its connector's, or whoever sends on it.
    ConnectThenMove {
        url: String,
        #[arg(long)]
        to: std::path::PathBuf,
    },
    /// Open `count` connections to `url` and hold them: every other one sends half a
    /// request head, the rest nothing. Prints `held <open> of <count>` once they are open,
    /// then holds them for `hold_ms`.
    Flood {
        url: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 10_000)]
        hold_ms: u64,
    },
    /// Let the kernel pick ports (`bind()` to port 0, or with `--listen`, `listen()` on an
    /// unbound socket), holding each, until the ephemeral range is used up or `tries` are
    /// done; prints `got <times given port want> denied <EPERM count> held <ports held>`.
    Autobind {
        #[arg(long)]
        want: u16,
        #[arg(long, default_value_t = 70_000)]
        tries: usize,
        #[arg(long)]
        listen: bool,
    },
    /// Connect to `url` and close at once, in a loop on `threads` threads for `seconds`;
    /// prints the number of connections made.
    Churn {
        url: String,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Hold `count` keep-alive connections to `url`, each sending a GET every `every_ms`
    /// for `seconds`, as a client that means to keep a listener busy would; prints
    /// `answered <connections answered at least once> held <still answered at the end> of
    /// <count>`.
    HoldHttp {
        url: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 1000)]
        every_ms: u64,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Print this network namespace's IPv4 default gateway (from /proc/net/route).
    Gateway,
    /// Try to listen on `addr`; prints `bound` or `denied: <error>`.
    Bind { addr: SocketAddr },
    /// Claim another address (IP_TRANSPARENT: a pod granted CAP_NET_ADMIN can do this), start
    /// a connection from it and hold it open (in SYN_SENT: the answers go to the address's
    /// real owner) for `hold_ms`. Prints `started`.
    Spoof {
        #[arg(long)]
        from: SocketAddr,
        url: String,
        #[arg(long, default_value_t = 5000)]
        hold_ms: u64,
    },
    /// Send one hand-made TCP SYN through a raw socket.
    RawSyn {
        #[arg(long)]
        src: Ipv4Addr,
        #[arg(long)]
        dst: Ipv4Addr,
        #[arg(long, default_value_t = 80)]
        dst_port: u16,
        #[arg(long)]
        seq: u32,
    },
    /// Count TCP packets to `dst:dst_port` carrying sequence number `seq`; prints `ready`
    /// once listening, then the count after `duration_ms`.
    Sniff {
        #[arg(long)]
        dst: Ipv4Addr,
        #[arg(long, default_value_t = 80)]
        dst_port: u16,
        #[arg(long)]
        seq: u32,
        #[arg(long, default_value_t = 1500)]
        duration_ms: u64,
    },
    /// The node's "real" metadata service, one request per connection. Logs every
    /// connection (`connection from <peer>`) and request (`request <method> <path>
    /// token=<token or ->`) to `log`. Issues IMDSv2 tokens (`node-token-<n>`) on
    /// `PUT /latest/api/token` and checks the ones it is sent (401 otherwise); answers the
    /// role listing with `node-role` and every other GET with `answer`.
    FakeImds {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        log: std::path::PathBuf,
        #[arg(long, default_value = "real-imds")]
        answer: String,
    },
}

struct Url {
    addr: SocketAddr,
    host: String,
    path: String,
}

fn parse_url(url: &str) -> anyhow::Result<Url> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("only http:// URLs: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_owned()
    };
    let addr = with_port
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow!("no address for {authority}"))?;
    Ok(Url {
        addr,
        host: authority.to_owned(),
        path: path.to_owned(),
    })
}

fn request(url: &Url) -> String {
    request_with(url, "GET", &[])
}

fn request_with(url: &Url, method: &str, headers: &[String]) -> String {
    let mut text = format!("{method} {} HTTP/1.1\r\nHost: {}\r\n", url.path, url.host);
    for header in headers {
        text.push_str(header);
        text.push_str("\r\n");
    }
    if method == "PUT" || method == "POST" {
        text.push_str("Content-Length: 0\r\n");
    }
    text.push_str("Connection: close\r\n\r\n");
    text
}

fn one_request(url: &str, method: &str, headers: &[String]) -> anyhow::Result<()> {
    let (status, body) = exchange(url, method, headers)?;
    println!("{status} {}", body.replace('\n', " "));
    Ok(())
}

fn connect_then_move(url: &str, to: &std::path::Path) -> anyhow::Result<()> {
    let url = parse_url(url)?;
    let mut stream = TcpStream::connect_timeout(&url.addr, Duration::from_secs(5))?;
    std::fs::write(to.join("cgroup.procs"), std::process::id().to_string())?;
    let now = std::fs::read_to_string("/proc/self/cgroup")?;
    let leaf = to.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    anyhow::ensure!(now.trim_end().ends_with(leaf), "not moved: {now}");
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(request_with(&url, "GET", &[]).as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1).unwrap_or("?");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    println!("{status} {}", body.trim().replace('\n', " "));
    Ok(())
}

/// One request on a new connection: the status and the body.
fn exchange(url: &str, method: &str, headers: &[String]) -> anyhow::Result<(String, String)> {
    let url = parse_url(url)?;
    let mut stream = TcpStream::connect_timeout(&url.addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(request_with(&url, method, headers).as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1).unwrap_or("?").to_owned();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.trim().to_owned()))
}

fn fetch_credentials(base: &str) -> anyhow::Result<()> {
    let timed = |step: &str, url: String, method: &str, headers: &[String]| {
        let started = Instant::now();
        let answer = exchange(&url, method, headers);
        let took = started.elapsed().as_micros();
        let (status, body) = answer.unwrap_or_else(|e| ("ERROR".into(), e.to_string()));
        println!("{step} {status} {took}");
        body
    };
    let token = timed(
        "token",
        format!("{base}/latest/api/token"),
        "PUT",
        &["X-aws-ec2-metadata-token-ttl-seconds: 21600".into()],
    );
    let header = [format!("X-aws-ec2-metadata-token: {token}")];
    let listing = format!("{base}/latest/meta-data/iam/security-credentials/");
    let role = timed("role", listing.clone(), "GET", &header);
    let document = timed("credentials", format!("{listing}{role}"), "GET", &header);
    let key = serde_json::from_str::<serde_json::Value>(&document)
        .ok()
        .and_then(|d| d["AccessKeyId"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("none: {document}"));
    println!("key {key}");
    Ok(())
}

fn connect(url: &Url, bind_port: Option<u16>, timeout: Duration) -> anyhow::Result<TcpStream> {
    let Some(port) = bind_port else {
        return Ok(TcpStream::connect_timeout(&url.addr, timeout)?);
    };
    let socket = Socket::new(Domain::for_address(url.addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    let local: SocketAddr = match url.addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, port).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
    };
    socket.bind(&local.into())?;
    socket.connect_timeout(&url.addr.into(), timeout)?;
    Ok(socket.into())
}

fn get_once(
    url: &Url,
    half_close: bool,
    bind_port: Option<u16>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut stream = connect(url, bind_port, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(request(url).as_bytes())?;
    if half_close {
        stream.shutdown(Shutdown::Write)?;
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("no status line in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok(format!("{status} {}", body.trim().replace('\n', " ")))
}

fn get(
    url: &str,
    count: usize,
    concurrency: usize,
    half_close: bool,
    bind_port: Option<u16>,
    timeout_ms: u64,
) -> anyhow::Result<()> {
    let url = Arc::new(parse_url(url)?);
    let next = Arc::new(AtomicUsize::new(0));
    let timeout = Duration::from_millis(timeout_ms);
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (url, next) = (url.clone(), next.clone());
            thread::spawn(move || {
                let mut lines = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < count {
                    lines.push(match get_once(&url, half_close, bind_port, timeout) {
                        Ok(line) => line,
                        Err(e) => format!("ERROR {e}"),
                    });
                }
                lines
            })
        })
        .collect();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for worker in workers {
        let lines = worker.join().map_err(|_| anyhow!("worker panicked"))?;
        for line in lines {
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

fn autobind(want: u16, tries: usize, listen: bool) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    let (mut got, mut denied) = (0, 0);
    let mut held = Vec::new();
    for _ in 0..tries {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        let picked = match listen {
            true => socket.listen(1),
            false => socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into()),
        };
        match picked {
            Ok(()) => {}
            // Refused: once the rest of the range is held, the kernel keeps offering the
            // same port.
            Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => {
                denied += 1;
                if denied == 100 {
                    break;
                }
                continue;
            }
            // The range is used up.
            Err(e) if e.raw_os_error() == Some(nix::libc::EADDRINUSE) => break,
            Err(e) => bail!("{e}"),
        }
        let port = socket
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .unwrap_or(0);
        if port == want {
            got += 1;
        }
        held.push(socket);
    }
    println!("got {got} denied {denied} held {}", held.len());
    Ok(())
}

fn churn(url: &str, run: Duration, threads: usize) -> anyhow::Result<()> {
    let url = parse_url(url)?;
    let until = Instant::now() + run;
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let addr = url.addr;
            thread::spawn(move || {
                let (mut made, mut refused) = (0u64, 0u64);
                while Instant::now() < until {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                        Ok(_) => made += 1,
                        Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => refused += 1,
                        Err(_) => {}
                    }
                }
                (made, refused)
            })
        })
        .collect();
    let (made, refused) = workers
        .into_iter()
        .filter_map(|w| w.join().ok())
        .fold((0, 0), |(m, r), (wm, wr)| (m + wm, r + wr));
    // Connections made, and refused by the kernel (EPERM).
    println!("{made} {refused}");
    Ok(())
}

fn hold_http(url: &str, count: usize, every: Duration, run: Duration) -> anyhow::Result<()> {
    let url = Arc::new(parse_url(url)?);
    let until = Instant::now() + run;
    let request = format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", url.path, url.host);
    let holders: Vec<_> = (0..count)
        .map(|_| {
            let (url, request) = (url.clone(), request.clone());
            thread::spawn(move || {
                let (mut answered, mut last_ok) = (false, false);
                let Ok(mut stream) = TcpStream::connect_timeout(&url.addr, Duration::from_secs(2))
                else {
                    return (false, false);
                };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                while Instant::now() < until {
                    let mut buf = [0u8; 4096];
                    last_ok = stream.write_all(request.as_bytes()).is_ok()
                        && matches!(stream.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200"));
                    answered |= last_ok;
                    if !last_ok {
                        break;
                    }
                    thread::sleep(every);
                }
                (answered, last_ok)
            })
        })
        .collect();
    let results: Vec<(bool, bool)> = holders.into_iter().filter_map(|h| h.join().ok()).collect();
    println!(
        "answered {} held {} of {count}",
        results.iter().filter(|r| r.0).count(),
        results.iter().filter(|r| r.1).count()
    );
    Ok(())
}

fn gateway() -> anyhow::Result<()> {
    let routes = std::fs::read_to_string("/proc/net/route")?;
    // Iface Destination Gateway …, hex in host (little-endian) order.
    let hex = routes
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&"00000000"))
        .and_then(|f| f.get(2).map(|g| (*g).to_owned()))
        .ok_or_else(|| anyhow!("no default route"))?;
    let word = u32::from_str_radix(&hex, 16)?;
    println!("{}", Ipv4Addr::from(word.swap_bytes()));
    Ok(())
}

fn bind(addr: SocketAddr) -> anyhow::Result<()> {
    match TcpListener::bind(addr) {
        Ok(_) => println!("bound"),
        Err(e) => println!("denied: {e}"),
    }
    Ok(())
}

fn spoof(from: SocketAddr, url: &str, hold: Duration) -> anyhow::Result<()> {
    let url = parse_url(url)?;
    let socket = Socket::new(Domain::for_address(url.addr), Type::STREAM, None)?;
    // IP_FREEBIND alone is not enough: TCP's route lookup refuses a non-local source.
    socket.set_ip_transparent_v4(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&from.into())?;
    socket.set_nonblocking(true)?;
    // In progress: the SYN-ACK goes to the address's real owner, never to us.
    match socket.connect(&url.addr.into()) {
        Err(e) if e.raw_os_error() != Some(115) => bail!("connect: {e}"),
        _ => {}
    }
    println!("started");
    std::io::stdout().flush()?;
    thread::sleep(hold);
    Ok(())
}

fn send_and_close(url: &str) -> anyhow::Result<()> {
    println!("{}", std::process::id());
    std::io::stdout().flush()?;
    let url = parse_url(url)?;
    let mut stream = TcpStream::connect_timeout(&url.addr, Duration::from_secs(3))?;
    stream.write_all(request(&url).as_bytes())?;
    drop(stream);
    Ok(())
}

fn flood(url: &str, count: usize, hold: Duration) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    let url = parse_url(url)?;
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let Ok(mut stream) = TcpStream::connect_timeout(&url.addr, Duration::from_secs(2)) else {
            continue;
        };
        if i % 2 == 0 {
            let _ = stream.write_all(
                format!("GET {} HTTP/1.1\r\nHost: {}\r\n", url.path, url.host).as_bytes(),
            );
        }
        held.push(stream);
    }
    println!("held {} of {count}", held.len());
    std::io::stdout().flush()?;
    thread::sleep(hold);
    Ok(())
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn raw_syn(src: Ipv4Addr, dst: Ipv4Addr, dst_port: u16, seq: u32) -> anyhow::Result<()> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let mut sum = 0u32;
    for chunk in pseudo.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    let csum = checksum(&tcp, sum);
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))
        .context("raw socket (needs CAP_NET_RAW)")?;
    let target = SockAddr::from(SocketAddr::new(IpAddr::V4(dst), 0));
    match socket.send_to(&tcp, &target) {
        Ok(_) => println!("sent"),
        // The egress guard drops the packet: the kernel reports EPERM to the sender.
        Err(e) => println!("send failed: {e}"),
    }
    Ok(())
}

fn sniff(dst: Ipv4Addr, dst_port: u16, seq: u32, duration: Duration) -> anyhow::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))
        .context("raw socket (needs CAP_NET_RAW)")?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    println!("ready");
    std::io::stdout().flush()?;
    let deadline = Instant::now() + duration;
    let mut seen = 0;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let Ok(n) = (&socket).read(&mut buf) else {
            continue;
        };
        let packet = &buf[..n];
        if packet.len() < 20 {
            continue;
        }
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        if packet.len() < ihl + 8 || packet[16..20] != dst.octets() {
            continue;
        }
        let port = u16::from_be_bytes([packet[ihl + 2], packet[ihl + 3]]);
        let got_seq = u32::from_be_bytes([
            packet[ihl + 4],
            packet[ihl + 5],
            packet[ihl + 6],
            packet[ihl + 7],
        ]);
        if port == dst_port && got_seq == seq {
            seen += 1;
        }
    }
    println!("{seen}");
    Ok(())
}

/// One HTTP/1.1 request head and body, read from `stream`.
struct Incoming {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Incoming {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_request(stream: &mut TcpStream) -> anyhow::Result<Incoming> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 || raw.len() > 16 * 1024 {
            bail!("incomplete request head");
        }
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw);
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let request = Incoming {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
    };
    let length: usize = request
        .header("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length.min(64 * 1024)];
    stream.read_exact(&mut body)?;
    Ok(request)
}

fn fake_imds(listen: SocketAddr, log: &std::path::Path, answer: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    let tokens = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = Arc::new(std::sync::Mutex::new(
        OpenOptions::new().create(true).append(true).open(log)?,
    ));
    let answer = Arc::new(answer.to_owned());
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let peer = stream
            .peer_addr()
            .map(|p| p.to_string())
            .unwrap_or_default();
        writeln!(
            log.lock().map_err(|_| anyhow!("log lock"))?,
            "connection from {peer}"
        )?;
        let (tokens, log, answer) = (tokens.clone(), log.clone(), answer.clone());
        thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let Ok(request) = read_request(&mut stream) else {
                return;
            };
            let token = request
                .header("x-aws-ec2-metadata-token")
                .map(str::to_owned);
            if let Ok(mut log) = log.lock() {
                let _ = writeln!(
                    log,
                    "request {} {} token={}",
                    request.method,
                    request.path,
                    token.as_deref().unwrap_or("-")
                );
            }
            let mut tokens = tokens.lock().unwrap_or_else(|e| e.into_inner());
            let (status, extra, body) = if request.path == "/latest/api/token" {
                match (
                    request.method.as_str(),
                    request.header("x-aws-ec2-metadata-token-ttl-seconds"),
                    request.header("x-forwarded-for"),
                ) {
                    ("PUT", _, Some(_)) => ("403 Forbidden", String::new(), String::new()),
                    ("PUT", Some(ttl), None) => {
                        let issued = format!("node-token-{}", tokens.len() + 1);
                        tokens.push(issued.clone());
                        (
                            "200 OK",
                            format!("X-aws-ec2-metadata-token-ttl-seconds: {ttl}\r\n"),
                            issued,
                        )
                    }
                    ("PUT", None, None) => ("400 Bad Request", String::new(), String::new()),
                    _ => ("405 Method Not Allowed", String::new(), String::new()),
                }
            } else if token.as_ref().is_some_and(|t| !tokens.contains(t)) {
                ("401 Unauthorized", String::new(), String::new())
            } else if request.path.ends_with("/iam/security-credentials/") {
                ("200 OK", String::new(), "node-role".to_owned())
            } else {
                ("200 OK", String::new(), answer.to_string())
            };
            drop(tokens);
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
    bail!("listener closed")
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Get {
            url,
            count,
            concurrency,
            half_close,
            bind_port,
            timeout_ms,
        } => get(&url, count, concurrency, half_close, bind_port, timeout_ms),
        Cmd::Bind { addr } => bind(addr),
        Cmd::Gateway => gateway(),
        Cmd::HoldHttp {
            url,
            count,
            every_ms,
            seconds,
        } => hold_http(
            &url,
            count,
            Duration::from_millis(every_ms),
            Duration::from_secs_f64(seconds),
        ),
        Cmd::Churn {
            url,
            seconds,
            threads,
        } => churn(&url, Duration::from_secs_f64(seconds), threads),
        Cmd::Autobind {
            want,
            tries,
            listen,
        } => autobind(want, tries, listen),
        Cmd::Request {
            url,
            method,
            headers,
        } => one_request(&url, &method, &headers),
        Cmd::Spoof { from, url, hold_ms } => spoof(from, &url, Duration::from_millis(hold_ms)),
        Cmd::SendAndClose { url } => send_and_close(&url),
        Cmd::TimedGet { url } => {
            let started = Instant::now();
            let (status, body) = exchange(&url, "GET", &[])?;
            let took = started.elapsed().as_micros();
            println!("{status} {took} {}", body.replace('\n', " "));
            Ok(())
        }
        Cmd::ConnectThenMove { url, to } => connect_then_move(&url, &to),
        Cmd::FetchCredentials { base } => fetch_credentials(&base),
        Cmd::Flood {
            url,
            count,
            hold_ms,
        } => flood(&url, count, Duration::from_millis(hold_ms)),
        Cmd::RawSyn {
            src,
            dst,
            dst_port,
            seq,
        } => raw_syn(src, dst, dst_port, seq),
        Cmd::Sniff {
            dst,
            dst_port,
            seq,
            duration_ms,
        } => sniff(dst, dst_port, seq, Duration::from_millis(duration_ms)),
        Cmd::FakeImds {
            listen,
            log,
            answer,
        } => fake_imds(listen, &log, &answer),
    }
}

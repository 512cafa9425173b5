//! Listeners that one client cannot exhaust: a deep accept backlog, a cap on connections
//! open at once (over it, new ones are closed at once), and HTTP/1.1 connections that must
//! send a request head within a timeout, which also ends idle keep-alive connections, with
//! a bounded read buffer.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper_util::rt::TokioTimer;
use tokio::net::TcpListener;

/// The accept backlog (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;
/// The largest request head and buffered body a connection may send (hyper's minimum).
pub const MAX_BUFFER: usize = 8 * 1024;

/// A listening socket with a deep backlog; `[::]` accepts IPv4 too.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// An HTTP/1.1 server connection builder: a head must arrive within `header_timeout`
/// (a request's, and the next one's on a kept-alive connection), and buffers are bounded.
pub fn http1(header_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_BUFFER)
        // A client may shut down its sending side and wait for the answer.
        .half_close(true);
    builder
}

/// Connections open at once, up to a cap.
#[derive(Debug)]
pub struct Gate {
    open: AtomicUsize,
    max: usize,
}

/// One open connection; dropping it frees the place.
#[derive(Debug)]
pub struct Pass(Arc<Gate>);

impl Drop for Pass {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            max: max.max(1),
        })
    }

    /// A place for one more connection, if there is one.
    pub fn enter(self: &Arc<Self>) -> Option<Pass> {
        let mut open = self.open.load(Ordering::Acquire);
        loop {
            if open >= self.max {
                return None;
            }
            match self.open.compare_exchange_weak(
                open,
                open + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Pass(self.clone())),
                Err(now) => open = now,
            }
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// Raises the soft limit on open files to the hard one (a listener holding thousands of
/// connections needs it); failing to is only logged.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%error, soft, hard, "cannot raise the open files limit");
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open files limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_holds_at_most_max_and_frees_on_drop() {
        let gate = Gate::new(2);
        let a = gate.enter().expect("first");
        let b = gate.enter().expect("second");
        assert!(gate.enter().is_none(), "full");
        assert_eq!(gate.open(), 2);
        drop(a);
        let c = gate.enter().expect("a place again");
        assert_eq!(gate.open(), 2);
        drop((b, c));
        assert_eq!(gate.open(), 0);
    }

    #[tokio::test]
    async fn a_half_sent_head_is_closed_after_the_timeout() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    hyper::body::Bytes::from_static(b"ok"),
                )))
            });
            let _ = http1(Duration::from_millis(300))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut buf)).await;
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(2),
            "the server held a half-sent head for {waited:?}"
        );
    }
}

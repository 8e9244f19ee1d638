//! What a stranger who reaches the REST API port can make the agent hold: at most
//! `--api-max-connections` connections at once (HTTP and HTTPS together, a TLS handshake in
//! progress included), at most `--api-max-connections-per-source` of them from one address,
//! and none that carries nothing for `--api-idle-timeout` seconds.
//!
//! Without these, every connection was a task and a file descriptor kept for as long as the
//! client liked (axum's server sets no timer, so hyper's header timeout never ran): a client
//! that opened idle connections until the agent's descriptor limit took, with the API, the
//! descriptors its endpoint probes, BGP sessions and state files need. A probe that cannot
//! open a socket fails, and an endpoint whose probes fail is taken out of service.
//!
//! A connection over a limit is accepted and closed at once (the client sees its connection
//! reset, not a hang) and counted by reason; a warning names the source, at most every 10 s.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tracing::warn;

/// The limits (from the flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub max: usize,
    pub per_source: usize,
    pub idle: Duration,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `--api-max-connections` are open.
    Total,
    /// `--api-max-connections-per-source` are open from this address.
    PerSource,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::PerSource => "max_per_source",
        }
    }
}

/// May one more connection from a source open, with `open` connections open in all and
/// `from_source` of them from that source? The per-source limit is told first: a client over
/// its own share is told so even when the whole is full too.
pub fn admits(limits: &ConnLimits, open: usize, from_source: usize) -> Result<(), Refusal> {
    if from_source >= limits.per_source {
        Err(Refusal::PerSource)
    } else if open >= limits.max {
        Err(Refusal::Total)
    } else {
        Ok(())
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub open: AtomicU64,
    pub refused_total: AtomicU64,
    pub refused_per_source: AtomicU64,
    pub idle_closed: AtomicU64,
}

impl ConnStats {
    pub fn refused(&self, r: Refusal) -> u64 {
        match r {
            Refusal::Total => self.refused_total.load(Ordering::Relaxed),
            Refusal::PerSource => self.refused_per_source.load(Ordering::Relaxed),
        }
    }
}

/// The admission state shared by the API's listeners.
pub struct ConnGate {
    limits: ConnLimits,
    /// Open connections per source address (no entry for none).
    open: Mutex<HashMap<IpAddr, usize>>,
    stats: Arc<ConnStats>,
    warned: Mutex<Option<Instant>>,
}

impl ConnGate {
    pub fn new(limits: ConnLimits, stats: Arc<ConnStats>) -> Arc<ConnGate> {
        Arc::new(ConnGate {
            limits,
            open: Mutex::new(HashMap::new()),
            stats,
            warned: Mutex::new(None),
        })
    }

    /// A connection from `peer`, admitted (held until the returned value drops) or refused
    /// (counted, and warned about at most every 10 s).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Admission> {
        let verdict = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let total = self.stats.open.load(Ordering::Relaxed) as usize;
            let mine = open.get(&peer).copied().unwrap_or(0);
            let v = admits(&self.limits, total, mine);
            if v.is_ok() {
                *open.entry(peer).or_default() += 1;
                self.stats.open.fetch_add(1, Ordering::Relaxed);
            }
            v
        };
        match verdict {
            Ok(()) => Some(Admission {
                gate: self.clone(),
                peer,
            }),
            Err(r) => {
                match r {
                    Refusal::Total => &self.stats.refused_total,
                    Refusal::PerSource => &self.stats.refused_per_source,
                }
                .fetch_add(1, Ordering::Relaxed);
                let mut w = self.warned.lock().unwrap_or_else(|p| p.into_inner());
                if w.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    *w = Some(Instant::now());
                    let (flag, n) = match r {
                        Refusal::Total => ("--api-max-connections", self.limits.max),
                        Refusal::PerSource => {
                            ("--api-max-connections-per-source", self.limits.per_source)
                        }
                    };
                    warn!(%peer, limit = n, "REST API connection refused: {flag} reached");
                }
                None
            }
        }
    }
}

/// One admitted connection's place; given back when dropped.
pub struct Admission {
    gate: Arc<ConnGate>,
    peer: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
        self.gate.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An admitted connection: its I/O, closed with `TimedOut` once neither direction has
/// carried a byte for the idle timeout (a client that connects and says nothing, one that
/// stops reading an answer, a kept-alive connection left unused).
pub struct Guarded<T> {
    io: T,
    deadline: Pin<Box<Sleep>>,
    /// Counted as closed for idleness (once, whichever direction saw it first).
    timed_out: bool,
    /// Its place under the limits; its gate holds the idle timeout and the counters.
    admission: Admission,
}

impl<T> Guarded<T> {
    pub fn new(io: T, admission: Admission) -> Guarded<T> {
        Guarded {
            io,
            deadline: Box::pin(tokio::time::sleep(admission.gate.limits.idle)),
            timed_out: false,
            admission,
        }
    }

    fn touch(&mut self) {
        let idle = self.admission.gate.limits.idle;
        self.deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + idle);
    }

    /// An I/O call's result seen through the idle deadline: progress (`moved`) puts it off,
    /// a call that must wait waits on it too.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<R>>,
        moved: impl FnOnce(&R) -> bool,
    ) -> Poll<io::Result<R>> {
        match r {
            Poll::Ready(Ok(v)) => {
                if moved(&v) {
                    self.touch();
                }
                Poll::Ready(Ok(v))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.expired(cx).map(Err),
        }
    }

    /// Pending until the idle deadline passes, then the error that ends the connection.
    fn expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                if !std::mem::replace(&mut self.timed_out, true) {
                    let stats = &self.admission.gate.stats;
                    stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                }
                Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "REST API connection idle past --api-idle-timeout",
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        let moved = buf.filled().len() > before;
        this.watch(cx, r, |_| moved)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, r, |n| *n > 0)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, r, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, r, |_| false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The plain HTTP listener behind the gate.
pub struct GatedTcp {
    tcp: TcpListener,
    gate: Arc<ConnGate>,
}

impl GatedTcp {
    pub fn new(tcp: TcpListener, gate: Arc<ConnGate>) -> GatedTcp {
        GatedTcp { tcp, gate }
    }
}

impl axum::serve::Listener for GatedTcp {
    type Io = Guarded<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (sock, peer) = match self.tcp.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors or memory for a moment: not this listener's end.
                    tracing::debug!(error = %e, "REST API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Some(a) = self.gate.admit(peer.ip()) {
                return (Guarded::new(sock, a), peer);
            }
            // Refused: dropped here, so the client sees its connection closed at once.
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            max: 4,
            per_source: 2,
            idle: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_per_source_share_then_the_whole_bound_admission() {
        let l = limits();
        assert_eq!(admits(&l, 0, 0), Ok(()));
        assert_eq!(admits(&l, 3, 1), Ok(()));
        assert_eq!(admits(&l, 3, 2), Err(Refusal::PerSource));
        assert_eq!(admits(&l, 4, 0), Err(Refusal::Total));
        assert_eq!(admits(&l, 4, 2), Err(Refusal::PerSource));
    }

    #[test]
    fn admissions_are_counted_per_source_and_given_back_on_drop() {
        let stats = Arc::new(ConnStats::default());
        let gate = ConnGate::new(limits(), stats.clone());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_none(), "a third from one source");
        assert_eq!(stats.refused(Refusal::PerSource), 1);
        let _b1 = gate.admit(b).unwrap();
        let _b2 = gate.admit(b).unwrap();
        assert!(gate.admit(c).is_none(), "a fifth in all");
        assert_eq!(stats.refused(Refusal::Total), 1);
        assert_eq!(stats.open.load(Ordering::Relaxed), 4);
        drop(a1);
        assert_eq!(stats.open.load(Ordering::Relaxed), 3);
        let _c1 = gate.admit(c).unwrap();
        assert!(gate.admit(a).is_none(), "full again");
        assert_eq!(gate.open.lock().unwrap().len(), 3);
    }
}

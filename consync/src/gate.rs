//! What one peer address can make the sync server hold.
//!
//! Only `--cluster` addresses connect, but an address is a host, and any process on it can
//! connect from it. Before these bounds, one such process could open connections without
//! limit (each a task and a descriptor), and subscriptions that read nothing, each holding a
//! thread of the blocking pool in a snapshot walk for good; four of them took every blocking
//! thread of the agent's sync runtime, which also installs the peers' flows (decision 0012).
//!
//! - At most [`crate::Config::max_connections_per_peer`] connections from one address. At the
//!   limit, a new connection takes the place of the oldest one that has not carried an
//!   accepted request (a completed mutual-TLS handshake, a request with the token, or any
//!   request where neither is set); when every one has, it is closed at once. So where the
//!   peers authenticate, idle or unauthenticated connections cannot keep the real peer out.
//! - Subscriptions, snapshot walks and stalled subscribers are bounded in `lib.rs` (`to_end`,
//!   `walk_places`, `send`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use crate::Stats;

/// Where a new connection from an address goes, given that address's open connections in the
/// order they were opened (`true`: it has carried an accepted request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// Below the limit.
    Free,
    /// In place of the connection at this index (the oldest not in use).
    InPlaceOf(usize),
    /// Every place is held by a connection in use.
    Refused,
}

pub(crate) fn place(limit: usize, open: &[bool]) -> Place {
    if open.len() < limit {
        Place::Free
    } else {
        open.iter()
            .position(|in_use| !in_use)
            .map_or(Place::Refused, Place::InPlaceOf)
    }
}

/// One open connection, shared between the gate and its I/O.
pub(crate) struct Conn {
    remote: SocketAddr,
    in_use: AtomicBool,
    closed: AtomicBool,
    /// The task reading the connection, woken when the gate closes it.
    reader: Mutex<Option<Waker>>,
}

impl Conn {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(w) = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
    }
}

/// The open connections of every peer address.
pub(crate) struct PeerGate {
    limit: usize,
    /// In the order they were opened.
    open: Mutex<Vec<Arc<Conn>>>,
    stats: Arc<Stats>,
}

impl PeerGate {
    pub(crate) fn new(limit: usize, stats: Arc<Stats>) -> Arc<PeerGate> {
        Arc::new(PeerGate {
            limit: limit.max(1),
            open: Mutex::new(Vec::new()),
            stats,
        })
    }

    /// A connection from a `--cluster` address: admitted (its I/O wrapped) or refused
    /// (`None`, counted; the caller drops it).
    pub(crate) fn admit<T>(self: &Arc<Self>, io: T, remote: SocketAddr) -> Option<Gated<T>> {
        let (conn, displaced) = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let mine: Vec<&Arc<Conn>> = open
                .iter()
                .filter(|c| c.remote.ip() == remote.ip())
                .collect();
            let uses: Vec<bool> = mine
                .iter()
                .map(|c| c.in_use.load(Ordering::Acquire))
                .collect();
            let displaced = match place(self.limit, &uses) {
                Place::Free => None,
                Place::InPlaceOf(i) => Some(mine[i].clone()),
                Place::Refused => {
                    drop(open);
                    self.refused(remote);
                    return None;
                }
            };
            if let Some(d) = &displaced {
                open.retain(|c| !Arc::ptr_eq(c, d));
            }
            let conn = Arc::new(Conn {
                remote,
                in_use: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                reader: Mutex::new(None),
            });
            open.push(conn.clone());
            self.stats
                .connections
                .store(open.len() as u64, Ordering::Relaxed);
            (conn, displaced)
        };
        if let Some(d) = displaced {
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %d.remote, by = %remote, "sync connection closed for a newer one from its address (it carried no accepted request)");
            d.close();
        }
        Some(Gated {
            io,
            conn,
            gate: self.clone(),
        })
    }

    fn refused(&self, remote: SocketAddr) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        let n = self.stats.refused_limit.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(1000) {
            tracing::warn!(peer = %remote, limit = self.limit, refused = n + 1, "conntrack sync: connection refused, its address has the most connections allowed, all in use");
        }
    }

    /// The connection from `remote` has carried an accepted request: it keeps its place.
    pub(crate) fn in_use(&self, remote: Option<SocketAddr>) {
        let Some(remote) = remote else { return };
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = open.iter().find(|c| c.remote == remote) {
            c.in_use.store(true, Ordering::Release);
        }
    }

    fn release(&self, conn: &Arc<Conn>) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|c| !Arc::ptr_eq(c, conn));
        self.stats
            .connections
            .store(open.len() as u64, Ordering::Relaxed);
    }
}

/// An admitted connection's I/O; ends (an error either way) once the gate closes it, and
/// gives its place back when dropped.
pub(crate) struct Gated<T> {
    io: T,
    conn: Arc<Conn>,
    gate: Arc<PeerGate>,
}

impl<T> Gated<T> {
    pub(crate) fn mark_in_use(&self) {
        self.conn.in_use.store(true, Ordering::Release);
    }

    fn check_open(&self) -> io::Result<()> {
        if self.conn.closed.load(Ordering::Acquire) {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed for a newer connection from its address",
            ))
        } else {
            Ok(())
        }
    }
}

impl<T> Drop for Gated<T> {
    fn drop(&mut self) {
        self.gate.release(&self.conn);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Gated<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check_open()?;
        {
            let mut r = self.conn.reader.lock().unwrap_or_else(|p| p.into_inner());
            if !r.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *r = Some(cx.waker().clone());
            }
        }
        // Closed between the check and the waker's registration: not woken, so look again.
        self.check_open()?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Gated<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check_open()?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check_open()?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_open()?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Gated<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_connection_takes_the_oldest_place_not_in_use() {
        assert_eq!(place(2, &[]), Place::Free);
        assert_eq!(place(2, &[true]), Place::Free);
        assert_eq!(place(2, &[true, true]), Place::Refused);
        assert_eq!(place(2, &[false, false]), Place::InPlaceOf(0));
        assert_eq!(place(3, &[true, false, false]), Place::InPlaceOf(1));
        assert_eq!(place(0, &[]), Place::Refused);
    }

    fn remote(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    #[test]
    fn places_are_per_address_and_given_back_on_drop() {
        let stats = Arc::new(Stats::default());
        let gate = PeerGate::new(2, stats.clone());
        let a1 = gate.admit((), remote([10, 0, 0, 1], 1)).unwrap();
        let a2 = gate.admit((), remote([10, 0, 0, 1], 2)).unwrap();
        a1.mark_in_use();
        gate.in_use(Some(remote([10, 0, 0, 1], 2)));
        // Another address has places of its own.
        let b1 = gate.admit((), remote([10, 0, 0, 2], 1)).unwrap();
        assert!(gate.admit((), remote([10, 0, 0, 1], 3)).is_none());
        assert_eq!(stats.refused_limit.load(Ordering::Relaxed), 1);
        assert_eq!(stats.connections.load(Ordering::Relaxed), 3);
        drop(a2);
        let a3 = gate.admit((), remote([10, 0, 0, 1], 3)).unwrap();
        assert_eq!(stats.connections.load(Ordering::Relaxed), 3);
        // b1 not in use: a second and third connection from its address take b1's place.
        let b2 = gate.admit((), remote([10, 0, 0, 2], 2)).unwrap();
        let b3 = gate.admit((), remote([10, 0, 0, 2], 3)).unwrap();
        assert!(
            b1.check_open().is_err(),
            "the oldest idle connection is closed"
        );
        assert!(b2.check_open().is_ok() && b3.check_open().is_ok());
        assert_eq!(stats.evicted.load(Ordering::Relaxed), 1);
        drop((a1, a3, b1, b2, b3));
        assert_eq!(stats.connections.load(Ordering::Relaxed), 0);
        assert!(gate.open.lock().unwrap().is_empty());
    }
}

//! Pooled tunnel connections, shared by both transports: up to
//! `max_conns` per peer key, each carrying up to `max_streams` streams. A
//! burst of new flows shares one handshake; when every allowed connection
//! is full, the least busy one is handed out anyway and the transport's own
//! stream limit makes the new stream wait (backpressure, not buffering).
use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::{PeerKey, TunnelError};

/// What the pool needs to know about a transport's connection.
pub trait PooledConn: Send + Sync + 'static {
    fn is_alive(&self) -> bool;
    /// Closes it politely (idle); dropping must be enough for the rest.
    fn close_idle(&self) {}
}

pub struct Entry<C> {
    pub conn: C,
    /// Takes no new streams (its peer is going away); finishes what it has.
    retired: AtomicBool,
    active: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
}

/// One stream's hold on a pooled connection; released on drop.
pub struct Lease<C> {
    entry: Arc<Entry<C>>,
}

impl<C> std::ops::Deref for Lease<C> {
    type Target = C;
    fn deref(&self) -> &C {
        &self.entry.conn
    }
}

impl<C> Lease<C> {
    /// No new stream goes to this connection again.
    pub fn retire(&self) {
        self.entry.retired.store(true, Ordering::SeqCst);
    }
}

impl<C> Drop for Lease<C> {
    fn drop(&mut self) {
        self.entry.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<C: PooledConn> Entry<C> {
    fn usable(&self) -> bool {
        self.conn.is_alive() && !self.retired.load(Ordering::SeqCst)
    }
}

pub struct Pool<C> {
    conns: Mutex<HashMap<PeerKey, Vec<Arc<Entry<C>>>>>,
    connecting: Mutex<HashMap<PeerKey, Arc<tokio::sync::Mutex<()>>>>,
    max_conns: usize,
    max_streams: usize,
}

impl<C: PooledConn> Pool<C> {
    pub fn new(max_conns: usize, max_streams: usize) -> Self {
        Pool {
            conns: Mutex::default(),
            connecting: Mutex::default(),
            max_conns,
            max_streams,
        }
    }

    /// A lease on a connection to `key`, connecting with `connect` if needed.
    pub async fn get<F, Fut>(&self, key: &PeerKey, connect: F) -> Result<Lease<C>, TunnelError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, TunnelError>>,
    {
        if let Some(l) = self.pick(key) {
            return Ok(l);
        }
        let gate = self
            .connecting
            .lock()
            .expect("connecting lock")
            .entry(key.clone())
            .or_default()
            .clone();
        let _one_at_a_time = gate.lock().await;
        // Someone may have connected while we waited.
        if let Some(l) = self.pick(key) {
            return Ok(l);
        }
        let entry = Arc::new(Entry {
            conn: connect().await?,
            retired: AtomicBool::new(false),
            active: AtomicUsize::new(1),
            idle_since: Mutex::new(None),
        });
        self.conns
            .lock()
            .expect("pool lock")
            .entry(key.clone())
            .or_default()
            .push(entry.clone());
        Ok(Lease { entry })
    }

    /// The least busy live connection, leased; none when there is none, or
    /// when all are full and another may still be opened.
    fn pick(&self, key: &PeerKey) -> Option<Lease<C>> {
        let mut pool = self.conns.lock().expect("pool lock");
        let conns = pool.entry(key.clone()).or_default();
        conns.retain(|e| e.usable());
        let entry = conns.iter().min_by_key(|e| e.active.load(Ordering::SeqCst)).cloned()?;
        if entry.active.load(Ordering::SeqCst) >= self.max_streams && conns.len() < self.max_conns {
            return None;
        }
        entry.active.fetch_add(1, Ordering::SeqCst);
        *entry.idle_since.lock().expect("idle lock") = None;
        Some(Lease { entry })
    }

    /// Drops dead connections and closes those without streams for `idle`.
    pub fn reap(&self, idle: Duration) {
        let now = Instant::now();
        let mut pool = self.conns.lock().expect("pool lock");
        for conns in pool.values_mut() {
            conns.retain(|e| {
                if !e.usable() {
                    return false;
                }
                let mut since = e.idle_since.lock().expect("idle lock");
                if e.active.load(Ordering::SeqCst) > 0 {
                    *since = None;
                    return true;
                }
                if now.duration_since(*since.get_or_insert(now)) >= idle {
                    e.conn.close_idle();
                    return false;
                }
                true
            });
        }
        pool.retain(|_, conns| !conns.is_empty());
    }
}

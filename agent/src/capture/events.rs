//! The eBPF programs' rare events (aya-log), forwarded to the agent's log.
//!
//! The programs write a record to the pinned `AYA_LOGS` ring buffer only when something goes
//! wrong: a map insert failed, a socket had an unexpected family, an inbound connection found
//! no listener in its pod. The agent reads the ring as it fills and logs each record through
//! `tracing` under the target `meshlet::ebpf`, at the record's level, so `RUST_LOG` and the
//! admin API's `/logging` decide what is shown. A burst of the same record (a pod whose proxy
//! is down, refusing every SYN) is logged once a second per message, with how many were
//! folded into it.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::Ebpf;
use aya_log::EbpfLogger;

/// How often the ring is read.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// How often one message is logged at most.
const REPEAT_EVERY: Duration = Duration::from_secs(1);
/// How many recent records [`EbpfLog::recent`] keeps.
const RECENT: usize = 64;

/// The reader of the programs' log ring.
pub struct EbpfLog {
    logger: EbpfLogger<Forward>,
    recent: Arc<Mutex<VecDeque<String>>>,
}

impl std::fmt::Debug for EbpfLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfLog").finish_non_exhaustive()
    }
}

impl EbpfLog {
    /// Takes the `AYA_LOGS` ring of a loaded object. Keep the value as long as the object's
    /// programs may be loaded: dropping it closes the map.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, aya_log::Error> {
        let recent = Arc::new(Mutex::new(VecDeque::with_capacity(RECENT)));
        let forward = Forward {
            recent: recent.clone(),
            repeats: Mutex::default(),
        };
        Ok(Self {
            logger: EbpfLogger::init_with_logger(ebpf, forward)?,
            recent,
        })
    }

    /// Logs every record waiting in the ring.
    pub fn flush(&mut self) {
        self.logger.flush();
    }

    /// The latest records read (at most 64), oldest first, as logged.
    pub fn recent(&self) -> Vec<String> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().cloned().collect()
    }

    /// Logs the records of `log` as they arrive (looking every 250 ms: reading an empty ring is
    /// two loads from shared memory), until the task is dropped.
    pub async fn run(log: Arc<Mutex<Self>>) {
        let mut ticks = tokio::time::interval(POLL_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            lock(&log).flush();
        }
    }
}

fn lock(log: &Mutex<EbpfLog>) -> std::sync::MutexGuard<'_, EbpfLog> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// Repeats of one message since it was last logged.
#[derive(Debug)]
struct Repeats {
    logged: Instant,
    folded: u64,
}

/// Forwards aya-log's records to `tracing`.
struct Forward {
    recent: Arc<Mutex<VecDeque<String>>>,
    repeats: Mutex<HashMap<String, Repeats>>,
}

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(message.clone());
        }
        let now = Instant::now();
        let folded = {
            let mut repeats = self.repeats.lock().unwrap_or_else(|p| p.into_inner());
            repeats.retain(|_, r| now.duration_since(r.logged) < 60 * REPEAT_EVERY);
            match repeats.get_mut(&message) {
                Some(r) if now.duration_since(r.logged) < REPEAT_EVERY => {
                    r.folded += 1;
                    return;
                }
                Some(r) => {
                    r.logged = now;
                    std::mem::take(&mut r.folded)
                }
                None => {
                    repeats.insert(
                        message.clone(),
                        Repeats {
                            logged: now,
                            folded: 0,
                        },
                    );
                    0
                }
            }
        };
        let program = record.module_path().unwrap_or("meshlet-ebpf");
        match record.level() {
            log::Level::Error => {
                tracing::error!(target: "meshlet::ebpf", program, folded, "{message}");
            }
            log::Level::Warn => {
                tracing::warn!(target: "meshlet::ebpf", program, folded, "{message}");
            }
            log::Level::Info => {
                tracing::info!(target: "meshlet::ebpf", program, folded, "{message}");
            }
            log::Level::Debug => {
                tracing::debug!(target: "meshlet::ebpf", program, folded, "{message}");
            }
            log::Level::Trace => {
                tracing::trace!(target: "meshlet::ebpf", program, folded, "{message}");
            }
        }
    }

    fn flush(&self) {}
}

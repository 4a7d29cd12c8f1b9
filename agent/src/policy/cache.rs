//! The policies in force: compiled from the store's policy objects when they change, read by
//! every connection decision. Owned by the agent and shared with the proxy, which only reads it.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicU64, Ordering},
};

use super::{DEFAULT_ROOT_NAMESPACE, Index};
use crate::workload::model::Policy;

/// The compiled policies and the objects they were compiled from.
#[derive(Debug)]
pub struct Cache {
    current: RwLock<(Vec<Arc<Policy>>, Arc<Index>)>,
    /// The store generation the policies in force reflect (for "applied" checks).
    applied: AtomicU64,
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            current: RwLock::new((Vec::new(), Arc::new(Index::default()))),
            applied: AtomicU64::new(0),
        }
    }
}

impl Cache {
    /// An empty cache: no policy, everything allowed, PERMISSIVE.
    pub fn new() -> Self {
        Self::default()
    }

    /// The compiled policies in force.
    pub fn current(&self) -> Arc<Index> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Recompiles from `objects` (the store's policy objects at `generation`) if they differ
    /// from the last ones; returns whether it did.
    pub fn refresh(&self, objects: Vec<Arc<Policy>>, generation: u64) -> bool {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let unchanged =
            current.0.len() == objects.len() && current.0.iter().zip(&objects).all(|(a, b)| a == b);
        if !unchanged {
            let index = Arc::new(Index::build(&objects, DEFAULT_ROOT_NAMESPACE));
            *current = (objects, index);
        }
        self.applied.store(generation, Ordering::Release);
        !unchanged
    }

    /// The store generation the policies in force reflect.
    pub fn applied_generation(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }
}

//! Versioned map pins, and what happens to the maps of another layout.
//!
//! The maps of layout version N ([`MAP_LAYOUT_VERSION`]) are pinned in `maps/v<N>/`. The
//! version changes whenever a map's definition (type, key or value size, capacity, flags)
//! does. Before the programs are loaded, [`prepare`] compares each pinned map with the
//! definition in the object about to be loaded:
//!
//! - a pin of this layout that matches is reused as it is (the common case: a restart);
//! - a pin of this layout that does not match (a build that changed a map without bumping the
//!   version) is unpinned and the map starts fresh;
//! - a pin of another layout (`maps/v<M>/`, or directly in `maps/` before layouts were
//!   versioned) whose definition matches is moved into this layout with `rename(2)`: the same
//!   map, nothing lost;
//! - one that does not match starts fresh, and for the maps worth carrying over (the enrolled
//!   namespaces and the excluded CIDRs) its entries are copied into the new map after the load
//!   ([`Plan::finish`]), when their key and value sizes allow.
//!
//! What is not carried over starts empty: connection records of connects made just before
//! (those connections lose their original destination), the inbound listeners (re-registered
//! by the agent for every pod it serves), the redirect counters. The other layout's pins are
//! removed once its maps are carried over; the programs of the earlier agent keep their maps
//! alive until their links run this build's programs.

use std::{
    collections::HashMap,
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use meshlet_common::maps;
use tracing::{info, warn};

use super::{Error, pins::Layout};
use crate::sys::bpf::{self, MapInfo};

/// The layout version of this build's maps (`maps/v<N>`).
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// Maps whose entries are carried over into a map of a new definition.
const CARRIED_OVER: &[&str] = &[maps::ENROLLED, maps::EXCLUDED_CIDRS];

/// A map's definition: what must match for a pinned map to be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Definition {
    /// `enum bpf_map_type`.
    pub kind: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// `BPF_F_*` flags.
    pub flags: u32,
}

impl From<MapInfo> for Definition {
    fn from(info: MapInfo) -> Self {
        Self {
            kind: info.kind,
            key_size: info.key_size,
            value_size: info.value_size,
            max_entries: info.max_entries,
            flags: info.flags,
        }
    }
}

/// The definitions of the maps in the eBPF object `object`, by name.
pub fn definitions(object: &[u8]) -> Result<HashMap<String, Definition>, Error> {
    let parsed = aya_obj::Object::parse(object).map_err(|err| Error::Object(err.to_string()))?;
    Ok(parsed
        .maps
        .iter()
        .map(|(name, map)| {
            (
                name.clone(),
                Definition {
                    kind: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: map.max_entries(),
                    flags: map.map_flags(),
                },
            )
        })
        .collect())
}

/// The definition of the map pinned at `pin`.
fn pinned(pin: &Path) -> Result<Definition, Error> {
    let fd = bpf::obj_get(pin).map_err(Error::io("open the pinned map", pin))?;
    bpf::map_info(fd.as_fd())
        .map(Definition::from)
        .map_err(Error::io("read the definition of", pin))
}

/// Entries to carry over once the new maps exist, and the pins of other layouts to remove.
#[derive(Debug, Default)]
pub struct Plan {
    /// (map name, the old map's pin).
    carry: Vec<(String, PathBuf)>,
    /// Pins of other layouts, removed by [`Plan::finish`].
    leftovers: Vec<PathBuf>,
}

/// Makes `maps/v<N>/` hold only pins this build can use (see the module docs); returns what is
/// left to do once the object is loaded.
pub fn prepare(layout: &Layout, expected: &HashMap<String, Definition>) -> Result<Plan, Error> {
    let current = layout.maps_dir();
    fs::create_dir_all(&current).map_err(Error::io("create pin directory", &current))?;
    for (name, pin) in pins_in(&current)? {
        match expected.get(&name) {
            Some(want) => {
                let found = pinned(&pin)?;
                if found != *want {
                    warn!(map = %name, ?found, ?want, "a pinned map of this layout has another definition; it starts afresh");
                    fs::remove_file(&pin).map_err(Error::io("unpin", &pin))?;
                }
            }
            None => {
                info!(map = %name, "unpinning a map this build does not have");
                fs::remove_file(&pin).map_err(Error::io("unpin", &pin))?;
            }
        }
    }
    let mut plan = Plan::default();
    for (version, pins) in layout.other_map_layouts()? {
        for (name, pin) in pins {
            plan.leftovers.push(pin.clone());
            let Some(want) = expected.get(&name) else {
                continue;
            };
            let target = layout.map(&name);
            // A map carried over by a start that failed half-way is carried over again (the
            // copy overwrites); one moved or started afresh is not touched.
            if target.exists() {
                if CARRIED_OVER.contains(&name.as_str()) && pinned(&pin)? != *want {
                    plan.carry.push((name, pin));
                }
                continue;
            }
            if pinned(&pin)? == *want {
                fs::rename(&pin, &target).map_err(Error::io("move the pin", &pin))?;
                info!(map = %name, from = %version, to = MAP_LAYOUT_VERSION, "map moved to this layout as it is");
            } else if CARRIED_OVER.contains(&name.as_str()) {
                plan.carry.push((name, pin));
            } else {
                info!(map = %name, from = %version, "map definition changed; it starts afresh");
            }
        }
    }
    Ok(plan)
}

impl Plan {
    /// Copies the entries of the maps carried over into this build's maps (pinned by now at
    /// `layout.map(name)`), then removes the other layouts' pins.
    pub fn finish(self, layout: &Layout) -> Result<(), Error> {
        for (name, old) in &self.carry {
            let new = layout.map(name);
            let (from, to) = (pinned(old)?, pinned(&new)?);
            if (from.key_size, from.value_size) != (to.key_size, to.value_size) {
                warn!(map = %name, "its entries cannot be carried over (key or value size changed); it starts afresh");
                continue;
            }
            let open =
                |pin: &Path| bpf::obj_get(pin).map_err(Error::io("open the pinned map", pin));
            let (copied, left_out) = bpf::map_copy(
                open(old)?.as_fd(),
                open(&new)?.as_fd(),
                to.key_size as usize,
                to.value_size as usize,
            )
            .map_err(Error::io("carry over the entries of", old))?;
            info!(map = %name, entries = copied, "map definition changed; entries carried over");
            if left_out > 0 {
                warn!(map = %name, left_out, "entries that did not fit the new map were left out");
            }
        }
        for pin in &self.leftovers {
            if pin.exists() {
                fs::remove_file(pin).map_err(Error::io("unpin", pin))?;
            }
        }
        layout.remove_empty_map_layouts()
    }
}

/// The map pins directly in `dir`: (name, path).
pub(super) fn pins_in(dir: &Path) -> Result<Vec<(String, PathBuf)>, Error> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(Error::io("list", dir)(err)),
    };
    let mut pins = Vec::new();
    for entry in entries {
        let entry = entry.map_err(Error::io("list", dir))?;
        let kind = entry.file_type().map_err(Error::io("list", dir))?;
        if kind.is_file()
            && let Some(name) = entry.file_name().to_str()
        {
            pins.push((name.to_owned(), entry.path()));
        }
    }
    pins.sort();
    Ok(pins)
}

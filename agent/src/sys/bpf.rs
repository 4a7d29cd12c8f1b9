//! The `bpf(2)` commands aya 0.14 does not offer for every program type: creating a bpf link on
//! a cgroup as a file descriptor we own, and pinning it (aya cannot turn a `cgroup/getsockopt`
//! link into a pinnable `FdLink`); replacing the program behind a pinned link in place
//! (`BPF_LINK_UPDATE`), and reading a program's tag by id to know whether it must be; reading a
//! pinned map's definition and copying a map's entries into another, byte for byte, whatever
//! its types (map layout migration); detaching a link for every holder at once
//! (`BPF_LINK_DETACH`, uninstall while an agent runs). Adopting a pinned link goes through aya again
//! (`PinnedLink::from_pin`).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// `enum bpf_attach_type` value for `cgroup/getsockopt`.
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `BPF_LINK_UPDATE` flag: replace only if the link still runs `old_prog_fd`.
const BPF_F_REPLACE: u32 = 1 << 2;

/// `union bpf_attr`, as large as the kernel's; only the leading fields of each command are set.
#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

impl BpfAttr {
    fn new() -> Self {
        Self([0; 128])
    }

    fn put_u32(&mut self, offset: usize, value: u32) {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
    }

    fn put_u64(&mut self, offset: usize, value: u64) {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut BpfAttr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable bpf_attr of the size passed; the kernel reads (and
    // for some commands writes) at most that many bytes, and any pointer inside it (a pin path)
    // outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len() as u32) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `BPF_LINK_CREATE`: attaches `program` to the cgroup `cgroup` as a bpf link (Linux >= 5.7).
pub fn link_create(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = BpfAttr::new();
    attr.put_u32(0, program.as_raw_fd() as u32); // link_create.prog_fd
    attr.put_u32(4, cgroup.as_raw_fd() as u32); // link_create.target_fd
    attr.put_u32(8, attach_type); // link_create.attach_type
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: on success BPF_LINK_CREATE returns a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN`: pins the bpf object `fd` (a link here) at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = BpfAttr::new();
    attr.put_u64(0, path.as_ptr() as u64); // obj_pin.pathname
    attr.put_u32(8, fd.as_raw_fd() as u32); // obj_pin.bpf_fd
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// `BPF_OBJ_GET`: opens the bpf object (a link here) pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = BpfAttr::new();
    attr.put_u64(0, path.as_ptr() as u64); // obj_get.pathname
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_PROG_GET_FD_BY_ID`: a descriptor of the loaded program `id`.
pub fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = BpfAttr::new();
    attr.put_u32(0, id); // prog_id
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: on success the command returns a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What makes a loaded program the one it is: the kernel's tag (a hash of its instructions,
/// map references left out: the same for every load of the same code) and the ids of the maps
/// it uses, sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgIdentity {
    /// The tag, as the kernel shows it (big-endian).
    pub tag: u64,
    /// The maps it uses.
    pub map_ids: Vec<u32>,
}

/// The [`ProgIdentity`] of the program `fd`.
pub fn prog_identity(fd: BorrowedFd<'_>) -> io::Result<ProgIdentity> {
    // The head of `struct bpf_prog_info`, up to `map_ids`: type (0), id (4), tag (8..16), ...,
    // nr_map_ids (52), map_ids (56).
    let info_of = |info: &mut [u8; 64]| {
        let mut attr = BpfAttr::new();
        attr.put_u32(0, fd.as_raw_fd() as u32); // info.bpf_fd
        attr.put_u32(4, info.len() as u32); // info.info_len
        attr.put_u64(8, info.as_mut_ptr() as u64); // info.info
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
    };
    let mut info = [0u8; 64];
    info_of(&mut info)?;
    let count = u32::from_ne_bytes(info[52..56].try_into().expect("4 bytes"));
    let mut map_ids = vec![0u32; count as usize];
    if count > 0 {
        let mut info = [0u8; 64];
        info[52..56].copy_from_slice(&count.to_ne_bytes());
        info[56..64].copy_from_slice(&(map_ids.as_mut_ptr() as u64).to_ne_bytes());
        info_of(&mut info)?;
    }
    map_ids.sort_unstable();
    Ok(ProgIdentity {
        tag: u64::from_be_bytes(info[8..16].try_into().expect("8 bytes")),
        map_ids,
    })
}

/// `BPF_LINK_DETACH`: detaches the program of link `link` now, whoever else holds the link
/// (Linux >= 5.9); the link object lives on, attached to nothing, until its last holder closes
/// it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = BpfAttr::new();
    attr.put_u32(0, link.as_raw_fd() as u32); // link_detach.link_fd
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// `BPF_LINK_UPDATE` with `BPF_F_REPLACE`: the link `link` runs `new` instead of `old`, in one
/// step (no moment without a program); fails if it no longer runs `old`.
pub fn link_update(
    link: BorrowedFd<'_>,
    new: BorrowedFd<'_>,
    old: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut attr = BpfAttr::new();
    attr.put_u32(0, link.as_raw_fd() as u32); // link_update.link_fd
    attr.put_u32(4, new.as_raw_fd() as u32); // link_update.new_prog_fd
    attr.put_u32(8, BPF_F_REPLACE); // link_update.flags
    attr.put_u32(12, old.as_raw_fd() as u32); // link_update.old_prog_fd
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// A map's definition as the kernel reports it (the head of `struct bpf_map_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapInfo {
    /// `enum bpf_map_type`.
    pub kind: u32,
    /// The map's id.
    pub id: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// `BPF_F_*` creation flags.
    pub flags: u32,
}

/// The definition of the map `fd`.
pub fn map_info(fd: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let mut info = [0u8; 24];
    let mut attr = BpfAttr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32); // info.bpf_fd
    attr.put_u32(4, info.len() as u32); // info.info_len
    attr.put_u64(8, info.as_mut_ptr() as u64); // info.info
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let word = |at: usize| u32::from_ne_bytes(info[at..at + 4].try_into().expect("4 bytes"));
    Ok(MapInfo {
        kind: word(0),
        id: word(4),
        key_size: word(8),
        value_size: word(12),
        max_entries: word(16),
        flags: word(20),
    })
}

/// Copies every entry of the map `from` into the map `to` (both with keys of `key_size` and
/// values of `value_size` bytes; not per-CPU maps). Returns how many were copied and how many
/// did not fit (`to` is full).
pub fn map_copy(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> io::Result<(usize, usize)> {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; value_size];
    let mut first = true;
    let mut copied = 0;
    let mut left_out = 0;
    loop {
        let mut attr = BpfAttr::new();
        attr.put_u32(0, from.as_raw_fd() as u32); // map_fd
        // key: NULL asks for the first key.
        attr.put_u64(8, if first { 0 } else { key.as_ptr() as u64 });
        attr.put_u64(16, next.as_mut_ptr() as u64); // next_key
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok((copied, left_out)),
            Err(err) => return Err(err),
        }
        first = false;
        key.copy_from_slice(&next);
        let mut attr = BpfAttr::new();
        attr.put_u32(0, from.as_raw_fd() as u32);
        attr.put_u64(8, key.as_ptr() as u64);
        attr.put_u64(16, value.as_mut_ptr() as u64);
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => {}
            // Deleted since it was listed.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(err) => return Err(err),
        }
        let mut attr = BpfAttr::new();
        attr.put_u32(0, to.as_raw_fd() as u32);
        attr.put_u64(8, key.as_ptr() as u64);
        attr.put_u64(16, value.as_ptr() as u64);
        match bpf(BPF_MAP_UPDATE_ELEM, &mut attr) {
            // flags 0: BPF_ANY
            Ok(_) => copied += 1,
            Err(err) if matches!(err.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) => {
                left_out += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

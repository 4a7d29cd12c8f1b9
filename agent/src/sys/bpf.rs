//! The `bpf(2)` commands aya 0.14 does not offer for every program type: creating a bpf link on
//! a cgroup as a file descriptor we own, and pinning it (aya cannot turn a `cgroup/getsockopt`
//! link into a pinnable `FdLink`); replacing the program behind a pinned link in place
//! (`BPF_LINK_UPDATE`), and reading a program's tag by id to know whether it must be; reading a
//! pinned map's definition and copying a map's entries into another, byte for byte, whatever
//! its types (map layout migration); detaching a link for every holder at once
//! (`BPF_LINK_DETACH`, uninstall while an agent runs); listing the programs attached to a
//! cgroup at one hook and naming them (preflight looks for other meshes' programs). Adopting a
//! pinned link goes through aya again (`PinnedLink::from_pin`).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// `enum bpf_attach_type` value for `cgroup/sock_ops`.
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
/// `enum bpf_attach_type` value for `cgroup/connect4`.
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
/// `enum bpf_attach_type` value for `cgroup/connect6`.
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
/// `enum bpf_attach_type` value for `cgroup/getsockopt`.
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;
/// `enum bpf_attach_type` value for `cgroup/getpeername4`.
pub const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
/// `enum bpf_attach_type` value for `cgroup/getpeername6`.
pub const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `BPF_PROG_QUERY` flag: the programs that run for the cgroup, its ancestors' included.
const BPF_F_QUERY_EFFECTIVE: u32 = 1;
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

    fn get_u32(&self, offset: usize) -> u32 {
        u32::from_ne_bytes(self.0[offset..offset + 4].try_into().expect("4 bytes"))
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
/// map references left out: the same for every load of the same code), the ids of the maps it
/// uses, sorted, and the contents of its global data maps (`.rodata`, ...: every load makes
/// its own, so they are compared by what they hold, not by id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgIdentity {
    /// The tag, as the kernel shows it (big-endian).
    pub tag: u64,
    /// The maps it uses, but its global data.
    pub map_ids: Vec<u32>,
    /// Its global data maps: name and contents, by name.
    pub data: Vec<(String, Vec<u8>)>,
}

/// `BPF_OBJ_GET_INFO_BY_FD`: the head of the `bpf_*_info` of the object `fd`, as much of it as
/// `info` holds (fields the caller set in it, like a buffer for map ids, are read too).
fn obj_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> io::Result<()> {
    let mut attr = BpfAttr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32); // info.bpf_fd
    attr.put_u32(4, info.len() as u32); // info.info_len
    attr.put_u64(8, info.as_mut_ptr() as u64); // info.info
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// The [`ProgIdentity`] of the program `fd`.
pub fn prog_identity(fd: BorrowedFd<'_>) -> io::Result<ProgIdentity> {
    // The head of `struct bpf_prog_info`, up to `map_ids`: type (0), id (4), tag (8..16), ...,
    // nr_map_ids (52), map_ids (56).
    let info_of = |info: &mut [u8; 64]| obj_info(fd, info);
    let mut info = [0u8; 64];
    info_of(&mut info)?;
    let count = u32::from_ne_bytes(info[52..56].try_into().expect("4 bytes"));
    let mut ids = vec![0u32; count as usize];
    if count > 0 {
        let mut info = [0u8; 64];
        info[52..56].copy_from_slice(&count.to_ne_bytes());
        info[56..64].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
        info_of(&mut info)?;
    }
    let mut map_ids = Vec::new();
    let mut data = Vec::new();
    for id in ids {
        match global_data(id)? {
            Some(held) => data.push(held),
            None => map_ids.push(id),
        }
    }
    map_ids.sort_unstable();
    data.sort();
    Ok(ProgIdentity {
        tag: u64::from_be_bytes(info[8..16].try_into().expect("8 bytes")),
        map_ids,
        data,
    })
}

/// The name and contents of the map `id` if it holds a program's global data (an array of
/// one value named after its section: `.rodata`, `.data`, `.bss`).
fn global_data(id: u32) -> io::Result<Option<(String, Vec<u8>)>> {
    let mut attr = BpfAttr::new();
    attr.put_u32(0, id); // map_id
    let fd = bpf(BPF_MAP_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: on success the command returns a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The head of `struct bpf_map_info`: type (0), id (4), key_size (8), value_size (12),
    // max_entries (16), map_flags (20), name (24..40).
    let mut info = [0u8; 40];
    obj_info(fd.as_fd(), &mut info)?;
    let word = |at: usize| u32::from_ne_bytes(info[at..at + 4].try_into().expect("4 bytes"));
    let name: Vec<u8> = info[24..40]
        .iter()
        .copied()
        .take_while(|&b| b != 0)
        .collect();
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    if word(0) != BPF_MAP_TYPE_ARRAY || word(16) != 1 || !name.starts_with(b".") {
        return Ok(None);
    }
    let key = 0u32;
    let mut value = vec![0u8; word(12) as usize];
    let mut attr = BpfAttr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32);
    attr.put_u64(8, &raw const key as u64);
    attr.put_u64(16, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
    Ok(Some((String::from_utf8_lossy(&name).into_owned(), value)))
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
    obj_info(fd, &mut info)?;
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

/// `BPF_PROG_QUERY`: the ids of the programs attached to the cgroup `cgroup` at
/// `attach_type` (an `enum bpf_attach_type`), by `BPF_PROG_ATTACH` or as bpf links alike. With
/// `effective`, the programs that run for sockets of the cgroup: its own and those its
/// ancestors pass down.
pub fn prog_query(
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
    effective: bool,
) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 16];
    loop {
        let mut attr = BpfAttr::new();
        attr.put_u32(0, cgroup.as_raw_fd() as u32); // query.target_fd
        attr.put_u32(4, attach_type); // query.attach_type
        attr.put_u32(8, if effective { BPF_F_QUERY_EFFECTIVE } else { 0 }); // query.query_flags
        attr.put_u64(16, ids.as_mut_ptr() as u64); // query.prog_ids
        attr.put_u32(24, ids.len() as u32); // query.prog_cnt
        match bpf(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {
                ids.truncate(attr.get_u32(24) as usize);
                return Ok(ids);
            }
            // More than fit: the kernel said how many there are.
            Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => {
                ids = vec![0; (attr.get_u32(24) as usize).max(ids.len() * 2)];
            }
            Err(err) => return Err(err),
        }
    }
}

/// What the kernel says of a loaded program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgInfo {
    /// The program's id.
    pub id: u32,
    /// `enum bpf_prog_type`.
    pub kind: u32,
    /// Its name: the function's full name from the program's BTF when it has one, else the
    /// kernel's copy, cut to 15 bytes.
    pub name: String,
}

/// The [`ProgInfo`] of the program `fd`.
pub fn prog_info(fd: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    // The head of `struct bpf_prog_info`: type (0), id (4), ..., name (64..80), ..., btf_id
    // (128), func_info_rec_size (132), func_info (136), nr_func_info (144), nr_line_info (148).
    let info_of = |info: &mut [u8; 152]| obj_info(fd, info);
    let word =
        |info: &[u8; 152], at: usize| u32::from_ne_bytes(info[at..at + 4].try_into().expect("4"));
    let mut info = [0u8; 152];
    info_of(&mut info)?;
    let short = &info[64..80];
    let short = short[..short.iter().position(|&b| b == 0).unwrap_or(16)].to_vec();
    let short = String::from_utf8_lossy(&short).into_owned();
    let (btf_id, functions) = (word(&info, 128), word(&info, 144));
    // The first `struct bpf_func_info` (insn_off, type_id) is the program's own function.
    let full = (btf_id != 0 && functions > 0)
        .then(|| {
            let mut record = [0u32; 2];
            let mut again = [0u8; 152];
            again[132..136].copy_from_slice(&8u32.to_ne_bytes());
            again[136..144].copy_from_slice(&(record.as_mut_ptr() as u64).to_ne_bytes());
            again[144..148].copy_from_slice(&1u32.to_ne_bytes());
            info_of(&mut again).ok()?;
            btf_func_name(&btf_by_id(btf_id).ok()?, record[1])
        })
        .flatten()
        // The BTF name is the whole of the one the kernel cut; any other is not this program's.
        .filter(|full| full.starts_with(&short));
    Ok(ProgInfo {
        id: word(&info, 4),
        kind: word(&info, 0),
        name: full.unwrap_or(short),
    })
}

/// The raw BTF (header, types, strings) of the kernel's BTF object `id`.
fn btf_by_id(id: u32) -> io::Result<Vec<u8>> {
    let mut attr = BpfAttr::new();
    attr.put_u32(0, id); // btf_id
    let fd = bpf(BPF_BTF_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: on success the command returns a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The head of `struct bpf_btf_info`: btf (0), btf_size (8), id (12).
    let info_of = |info: &mut [u8; 16]| obj_info(fd.as_fd(), info);
    let mut info = [0u8; 16];
    info_of(&mut info)?;
    let size = u32::from_ne_bytes(info[8..12].try_into().expect("4 bytes"));
    let mut btf = vec![0u8; size as usize];
    let mut info = [0u8; 16];
    info[0..8].copy_from_slice(&(btf.as_mut_ptr() as u64).to_ne_bytes());
    info[8..12].copy_from_slice(&size.to_ne_bytes());
    info_of(&mut info)?;
    Ok(btf)
}

/// The name of the type `type_id` of the raw BTF `btf` (native byte order), if it is a
/// function (`BTF_KIND_FUNC`).
pub fn btf_func_name(btf: &[u8], type_id: u32) -> Option<String> {
    const MAGIC: u16 = 0xeb9f;
    const KIND_FUNC: u32 = 12;
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(btf.get(at..at + 4)?.try_into().ok()?))
    };
    if u16::from_ne_bytes(btf.get(0..2)?.try_into().ok()?) != MAGIC {
        return None;
    }
    // struct btf_header: magic, version, flags, hdr_len (4), type_off (8), type_len (12),
    // str_off (16), str_len (20); the offsets count from the end of the header.
    let header = u32_at(4)? as usize;
    let types = header + u32_at(8)? as usize;
    let types_end = types + u32_at(12)? as usize;
    let strings = header + u32_at(16)? as usize;
    let strings_end = strings + u32_at(20)? as usize;
    let mut at = types;
    // Type ids count from 1 (0 is void).
    for id in 1.. {
        if at + 12 > types_end {
            return None;
        }
        // struct btf_type: name_off, info (vlen: bits 0-15, kind: bits 24-28), size or type.
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        if id == type_id {
            if kind != KIND_FUNC {
                return None;
            }
            let name = btf.get(strings + name_off as usize..strings_end)?;
            let end = name.iter().position(|&b| b == 0)?;
            return Some(String::from_utf8_lossy(&name[..end]).into_owned());
        }
        // What follows each kind's struct btf_type (linux/btf.h).
        let extra = match kind {
            // INT, VAR, DECL_TAG: one word.
            1 | 14 | 17 => 4,
            // ARRAY: struct btf_array.
            3 => 12,
            // STRUCT, UNION, DATASEC, ENUM64: vlen three-word entries.
            4 | 5 | 15 | 19 => 12 * vlen,
            // ENUM, FUNC_PROTO: vlen two-word entries.
            6 | 13 => 8 * vlen,
            // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG: nothing.
            2 | 7..=12 | 16 | 18 => 0,
            // A kind this parser does not know: its size is unknown, so is everything after.
            _ => return None,
        };
        at += 12 + extra;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw BTF: `int` (id 1), a `FUNC_PROTO` with one parameter (id 2) and the `FUNC`
    /// "cil_sock4_connect" (id 3), then the strings.
    fn btf() -> Vec<u8> {
        let strings = b"\0int\0cil_sock4_connect\0ctx\0";
        #[rustfmt::skip]
        let words: [u32; 12] = [
            1, 1 << 24, 4, 0x0100_0020, // INT "int", 4 bytes, 32 bits
            0, (13 << 24) | 1, 1, 23, 1, // FUNC_PROTO returning int; parameter "ctx": int
            5, 12 << 24, 2, // FUNC "cil_sock4_connect", of type 2
        ];
        let types: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9fu16.to_ne_bytes());
        out.extend_from_slice(&[1, 0]);
        let header = [
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ];
        for word in header {
            out.extend_from_slice(&word.to_ne_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn btf_gives_a_functions_full_name() {
        let btf = btf();
        assert_eq!(btf_func_name(&btf, 3).as_deref(), Some("cil_sock4_connect"));
        assert_eq!(btf_func_name(&btf, 1), None, "not a function");
        assert_eq!(btf_func_name(&btf, 9), None, "no such type");
        assert_eq!(btf_func_name(&btf[..40], 3), None, "cut short");
        assert_eq!(btf_func_name(b"garbage", 1), None);
    }
}

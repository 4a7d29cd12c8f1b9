//! The two `bpf(2)` commands aya 0.14 does not offer for every program type: creating a bpf
//! link on a cgroup as a file descriptor we own, and pinning it. (aya cannot turn a
//! `cgroup/getsockopt` link into a pinnable `FdLink`.) Adopting a pinned link afterwards goes
//! through aya again (`PinnedLink::from_pin`).

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

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

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

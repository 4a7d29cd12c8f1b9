//! Another mesh's program, as far as meshlet can tell: a minimal cgroup program loaded and
//! attached with raw `bpf(2)` calls (no aya, no meshlet pins), the way a program meshlet does
//! not know would be. Detached and unloaded when its guard drops, also when a test panics.
#![allow(
    unsafe_code,
    reason = "bpf(2) (BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_DETACH) has no safe wrapper"
)]

use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use meshlet::sys::bpf as sys;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;

/// How the program is attached: the two ways other software does it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// A bpf link (`BPF_LINK_CREATE`), as Cilium >= 1.14 and meshlet do.
    Link,
    /// `BPF_PROG_ATTACH` with `BPF_F_ALLOW_MULTI`, the older way.
    Multi,
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable bpf_attr of the size passed; every pointer inside it
    // (instructions, license, log buffer) outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn put_u32(attr: &mut [u8; 128], at: usize, value: u32) {
    attr[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; 128], at: usize, value: u64) {
    attr[at..at + 8].copy_from_slice(&value.to_ne_bytes());
}

/// A `cgroup/connect4` program that lets every connect through (`r0 = 1; exit`), attached to a
/// cgroup.
#[derive(Debug)]
pub struct ForeignProgram {
    program: OwnedFd,
    cgroup: File,
    attach: Attach,
    link: Option<OwnedFd>,
    id: u32,
}

impl ForeignProgram {
    /// Loads the program under `name` (at most 15 bytes) and attaches it to `cgroup` at
    /// `cgroup/connect4`, the way `attach` says.
    pub fn connect4(cgroup: &Path, name: &str, attach: Attach) -> Self {
        assert!(name.len() < 16, "the kernel keeps 15 bytes of a name");
        #[rustfmt::skip]
        let instructions: [u8; 16] = [
            0xb7, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // mov64 r0, 1
            0x95, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // exit
        ];
        let license = CString::new("GPL").expect("no NUL");
        let mut log = vec![0u8; 4096];
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR); // prog_type
        put_u32(&mut attr, 4, 2); // insn_cnt
        put_u64(&mut attr, 8, instructions.as_ptr() as u64); // insns
        put_u64(&mut attr, 16, license.as_ptr() as u64); // license
        put_u32(&mut attr, 24, 1); // log_level
        put_u32(&mut attr, 28, log.len() as u32); // log_size
        put_u64(&mut attr, 32, log.as_mut_ptr() as u64); // log_buf
        attr[48..48 + name.len()].copy_from_slice(name.as_bytes()); // prog_name
        put_u32(&mut attr, 68, sys::BPF_CGROUP_INET4_CONNECT); // expected_attach_type
        let fd = bpf(BPF_PROG_LOAD, &mut attr).unwrap_or_else(|err| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            panic!(
                "BPF_PROG_LOAD {name}: {err}\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        });
        // SAFETY: on success BPF_PROG_LOAD returns a new descriptor that nothing else owns.
        let program = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let id = sys::prog_info(program.as_fd())
            .expect("read the program's id")
            .id;
        let cgroup =
            File::open(cgroup).unwrap_or_else(|err| panic!("open {}: {err}", cgroup.display()));
        let link = match attach {
            Attach::Link => Some(
                sys::link_create(
                    program.as_fd(),
                    cgroup.as_fd(),
                    sys::BPF_CGROUP_INET4_CONNECT,
                )
                .unwrap_or_else(|err| panic!("BPF_LINK_CREATE {name}: {err}")),
            ),
            Attach::Multi => {
                let mut attr = [0u8; 128];
                put_u32(&mut attr, 0, cgroup.as_raw_fd() as u32); // target_fd
                put_u32(&mut attr, 4, program.as_raw_fd() as u32); // attach_bpf_fd
                put_u32(&mut attr, 8, sys::BPF_CGROUP_INET4_CONNECT); // attach_type
                put_u32(&mut attr, 12, BPF_F_ALLOW_MULTI); // attach_flags
                bpf(BPF_PROG_ATTACH, &mut attr)
                    .unwrap_or_else(|err| panic!("BPF_PROG_ATTACH {name}: {err}"));
                None
            }
        };
        Self {
            program,
            cgroup,
            attach,
            link,
            id,
        }
    }

    /// The kernel's id of the program.
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for ForeignProgram {
    fn drop(&mut self) {
        // A link detaches when its last descriptor closes; a BPF_PROG_ATTACH needs a detach.
        self.link = None;
        if self.attach == Attach::Multi {
            let mut attr = [0u8; 128];
            put_u32(&mut attr, 0, self.cgroup.as_raw_fd() as u32); // target_fd
            put_u32(&mut attr, 4, self.program.as_raw_fd() as u32); // attach_bpf_fd
            put_u32(&mut attr, 8, sys::BPF_CGROUP_INET4_CONNECT); // attach_type
            let _ = bpf(BPF_PROG_DETACH, &mut attr);
        }
    }
}

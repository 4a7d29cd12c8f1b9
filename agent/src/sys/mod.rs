//! The syscalls std does not wrap: entering network namespaces, namespace cookies, the
//! original destination of a captured connection, transparent upstream sockets and their
//! routing, and giving free heap back to the kernel. The one userspace module allowed `unsafe`;
//! every block says why it is sound.
#![allow(
    unsafe_code,
    reason = "setns(2), getsockopt(2), SCM_RIGHTS descriptors and malloc_trim(3) have no safe wrapper in std"
)]

pub mod bpf;
pub mod fdpass;
pub mod netns;
pub mod socket;
pub mod transparent;

pub use netns::Netns;

/// Raises this process's soft limit of open files to its hard limit and returns the new soft
/// limit. Every proxied connection holds two sockets per side; the usual soft limit of 1,024
/// would cap a node at a few hundred connections.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one valid rlimit; raising the soft limit up to the hard
        // limit needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}

/// Gives the allocator's free memory back to the kernel: glibc's `malloc_trim(0)`, which walks
/// every arena and releases whole free pages anywhere in the heap, not only at its top (where
/// glibc trims by itself). Returns whether anything was released. It holds each arena's lock
/// while it walks it: call it rarely, and off the async workers.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only inspects and madvises the allocator's own free chunks, under
        // the arenas' locks; it touches no memory in use.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn open_files_limit_is_raised_to_the_hard_limit() {
        let soft = super::raise_open_files_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_open_files_limit.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) },
            0
        );
        assert_eq!(soft, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}

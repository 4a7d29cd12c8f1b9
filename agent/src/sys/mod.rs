//! The syscalls std does not wrap: entering network namespaces, namespace cookies, and the
//! original destination of a captured connection. The one userspace module allowed `unsafe`;
//! every block says why it is sound.
#![allow(
    unsafe_code,
    reason = "setns(2) and getsockopt(2) have no safe wrapper in std"
)]

pub mod bpf;
pub mod netns;
pub mod socket;

pub use netns::Netns;

//! The per-node proxy, serving each enrolled pod's in-pod listeners.
//!
//! This stage carries captured connections in plaintext ([`passthrough`]): outbound from the
//! pod's 15001 listener to the original destination, inbound from its 15006 listener to the
//! application. Every socket the proxy makes is marked and made inside the pod's network
//! namespace, so the pod's address is the source on the wire.

pub mod passthrough;

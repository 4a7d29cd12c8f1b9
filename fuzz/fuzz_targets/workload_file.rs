//! `--source file:<path>`: arbitrary text through the workload file parser, and what parses
//! into a workload store, as the file source does on every change of the file.
//!
//! The file is written by users (or by tools on their behalf): the parser must reject bad
//! input with an error naming the document, never panic, and whatever it accepts the store must
//! take.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlet::{
    source::file,
    workload::{Store, model::Object},
};

fuzz_target!(|text: &str| {
    let Ok(objects) = file::parse(text) else {
        return;
    };
    let store = Store::new();
    file::apply(&store, objects.clone());
    for object in &objects {
        match object {
            Object::Pod(pod) => {
                for &ip in &pod.ips {
                    let _ = store.pod_by_ip(ip);
                }
            }
            Object::Service(service) => {
                for &ip in &service.cluster_ips {
                    for port in &service.ports {
                        let _ = store.service_by_vip((ip, port.port).into());
                    }
                }
            }
            _ => {}
        }
    }
    let _ = store.dump();
});

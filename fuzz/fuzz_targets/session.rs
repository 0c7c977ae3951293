//! Arbitrary bytes after a valid CONNECT, through a real session into the real router: the
//! router must stay alive and a good device must still be served.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sitegate::edge::harness::{wire, Harness};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&version, rest)) = data.split_first() else {
        return;
    };
    runtime().block_on(async {
        let harness = Harness::new().expect("harness");
        let subscribe = [wire::connect("dev-sub", true, 0x02), wire::subscribe(1, &[(b"#", 0)], true, &[])].concat();
        harness.session("dev-sub", &subscribe).await;
        let mut input = wire::connect("dev-fuzz", version & 1 == 1, 0x02);
        input.extend_from_slice(rest);
        harness.session("dev-fuzz", &input).await;
        assert_eq!(harness.stats().snapshot().router_rebuilds, 0, "the router died");
        assert!(harness.good_device_served().await, "a good device was not served");
    });
});

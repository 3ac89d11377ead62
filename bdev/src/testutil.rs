//! Test harness: runs a body on the main reactor of a fresh two-core
//! reactor set (each run has its own registry).

use std::future::Future;

use reactor::{CoreId, CoreSet, PollMode, Runtime, RuntimeConfig};

pub fn cores() -> CoreSet {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    CoreSet::from_ids(0..(n.min(2) as u32)).expect("core set")
}

pub fn other_core() -> CoreId {
    *reactor::cores().last().expect("a core")
}

pub fn run<F, Fut>(body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    run_mode(PollMode::Adaptive, body)
}

pub fn run_mode<F, Fut>(mode: PollMode, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let rt = Runtime::start(
        RuntimeConfig::new(cores()).poll_mode(mode),
        move || async move {
            body().await;
            crate::registry::unregister_all().await;
            reactor::shutdown(0);
        },
    )
    .expect("runtime");
    assert_eq!(rt.join(), 0, "a reactor panicked");
}

pub fn malloc_params(
    name: &str,
    num_blocks: u64,
    block_size: u32,
) -> crate::module::malloc::rpc::CreateParams {
    crate::module::malloc::rpc::CreateParams {
        name: Some(name.to_string()),
        uuid: None,
        num_blocks,
        block_size,
        physical_block_size: 0,
        optimal_io_boundary: 0,
        md_size: 0,
        md_interleave: false,
        dif_type: 0,
        dif_is_head_of_md: false,
        dif_pi_format: 0,
        numa_id: None,
    }
}

pub async fn malloc(name: &str, num_blocks: u64, block_size: u32) -> crate::BdevHandle {
    crate::module::malloc::rpc::create(malloc_params(name, num_blocks, block_size))
        .await
        .expect("malloc create");
    crate::registry::lookup(name).expect("registered")
}

use crate::io::{IoBox, IoBuf, IoCompletion, IoType};
use crate::registry;
use crate::testutil::run;
use std::cell::Cell;
use std::rc::Rc;

struct Resubmit {
    left: Cell<u32>,
    done: Cell<u32>,
    ch: crate::IoChannel,
    me: std::cell::RefCell<Option<Rc<Resubmit>>>,
}

impl IoCompletion for Resubmit {
    fn io_done(&self, io: IoBox) {
        assert!(io.status().is_success());
        self.done.set(self.done.get() + 1);
        if self.left.get() > 0 {
            self.left.set(self.left.get() - 1);
            let me = self.me.borrow().clone().unwrap();
            self.ch.submit(io, me);
        }
    }
}

#[test]
fn resubmitting_from_the_callback_does_not_recurse() {
    run(|| async {
        super::rpc::create(super::rpc::CreateParams {
            name: "N0".into(),
            uuid: None,
            num_blocks: 1 << 20,
            block_size: 4096,
            physical_block_size: 0,
            md_size: 0,
            dif_type: 0,
            dif_is_head_of_md: false,
            dif_pi_format: 0,
            preferred_write_alignment: 0,
            preferred_write_granularity: 0,
            optimal_write_size: 0,
            preferred_unmap_alignment: 0,
            preferred_unmap_granularity: 0,
        })
        .await
        .unwrap();
        let desc = registry::open("N0", false, None).unwrap();
        let ch = desc.channel();
        // 200k chained I/Os would overflow the stack if completion recursed.
        let job = Rc::new(Resubmit {
            left: Cell::new(200_000),
            done: Cell::new(0),
            ch: ch.clone(),
            me: Default::default(),
        });
        *job.me.borrow_mut() = Some(job.clone());
        ch.submit(
            IoBox::with(IoType::Read, 0, 1, IoBuf::new(4096)),
            job.clone(),
        );
        while job.done.get() < 200_001 {
            reactor::sleep(std::time::Duration::from_millis(1)).await;
        }
        job.me.borrow_mut().take();
        assert_eq!(ch.stats().num_read_ops, 200_001);
        assert_eq!(ch.in_flight(), 0);
        // Unsupported type fails in the framework.
        assert!(ch.command(IoType::Unmap, 0, 1).await.is_err());
    });
}

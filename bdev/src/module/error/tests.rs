use std::time::Duration;

use super::rpc::create;
use super::{ErrorBdev, ErrorKind, ErrorOptions, Injection};
use crate::error::BdevError;
use crate::io::IoType;
use crate::registry;
use crate::testutil::{malloc, run};

fn inject(name: &str, t: Option<Vec<IoType>>, kind: ErrorKind, num: u32, value: u8) {
    let b = registry::lookup(name).unwrap();
    b.downcast::<ErrorBdev>()
        .unwrap()
        .rules()
        .inject(&Injection {
            io_types: t,
            kind,
            num,
            queue_depth: 0,
            corrupt_offset: 3,
            corrupt_value: value,
        });
}

#[test]
fn failures_are_injected_exactly_n_times() {
    run(|| async {
        malloc("B", 64, 512).await;
        let name = create(ErrorOptions {
            base_name: "B".into(),
            uuid: None,
        })
        .await
        .unwrap();
        assert_eq!(name, "EE_B");
        let d = registry::open("EE_B", true, None).unwrap();
        let _keep = d.channel();
        d.channel().write(0, &[1u8; 512]).await.unwrap();
        inject("EE_B", Some(vec![IoType::Read]), ErrorKind::Failure, 2, 0);
        assert_eq!(d.channel().read(0, 1).await, Err(BdevError::Io));
        assert_eq!(d.channel().read(0, 1).await, Err(BdevError::Io));
        assert_eq!(d.channel().read(0, 1).await.unwrap(), vec![1u8; 512]);
        // Writes were never targeted.
        d.channel().write(0, &[2u8; 512]).await.unwrap();
        assert_eq!(d.channel().stats().failed, 2);
    });
}

#[test]
fn corrupt_data_flips_one_byte_and_pending_io_is_released_by_clear() {
    run(|| async {
        malloc("C", 64, 512).await;
        create(ErrorOptions {
            base_name: "C".into(),
            uuid: None,
        })
        .await
        .unwrap();
        let d = registry::open("EE_C", true, None).unwrap();
        inject(
            "EE_C",
            Some(vec![IoType::Write]),
            ErrorKind::CorruptData,
            1,
            0xff,
        );
        d.channel().write(0, &[0u8; 512]).await.unwrap();
        let base = registry::lookup("C").unwrap();
        let data = base.get_channel().read(0, 1).await.unwrap();
        assert_eq!(data[3], 0xff);
        assert_eq!(data.iter().filter(|&&x| x != 0).count(), 1);

        inject("EE_C", Some(vec![IoType::Read]), ErrorKind::Pending, 1, 0);
        let ch = d.channel();
        let held = reactor::spawn_local_joinable(async move { ch.read(0, 1).await });
        reactor::sleep(Duration::from_millis(20)).await;
        assert_eq!(d.channel().in_flight(), 1);
        inject("EE_C", None, ErrorKind::Failure, 0, 0);
        assert_eq!(held.await.unwrap(), Err(BdevError::Cancelled));
        assert_eq!(d.channel().read(0, 1).await.unwrap()[3], 0xff);
    });
}

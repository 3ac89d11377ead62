use crate::error::BdevError;
use crate::io::IoType;
use crate::registry;
use crate::testutil::{malloc, malloc_params, other_core, run};

#[test]
fn data_written_on_one_core_reads_back_on_another() {
    run(|| async {
        let b = malloc("M0", 256, 512).await;
        let data: Vec<u8> = (0..2048u32).map(|i| (i * 7 % 251) as u8).collect();
        let desc = registry::open("M0", true, None).unwrap();
        desc.channel().write(10, &data).await.unwrap();
        let read = reactor::call_async(other_core(), move || async move {
            b.get_channel().read(10, 4).await
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(read, data);
        // Unmap and write_zeroes zero the range.
        desc.channel().command(IoType::Unmap, 10, 2).await.unwrap();
        let read = desc.channel().read(10, 4).await.unwrap();
        assert!(read[..1024].iter().all(|&x| x == 0));
        assert_eq!(&read[1024..], &data[1024..]);
        // Out of range fails without touching anything.
        assert_eq!(desc.channel().read(255, 2).await, Err(BdevError::Io));
        drop(desc);
        registry::unregister("M0", Some("malloc")).await.unwrap();
        assert!(registry::lookup("M0").is_none());
    });
}

#[test]
fn duplicate_name_and_bad_geometry_leave_nothing() {
    run(|| async {
        malloc("M1", 16, 4096).await;
        let dup = super::rpc::create(malloc_params("M1", 16, 512)).await;
        assert_eq!(dup.unwrap_err().errno(), libc::EEXIST);
        let bad = super::rpc::create(malloc_params("M2", 16, 500)).await;
        assert_eq!(bad.unwrap_err().errno(), libc::EINVAL);
        // The failed create freed its name.
        malloc("M2", 16, 512).await;
        assert_eq!(registry::list().len(), 2);
        // The UUID is an alias.
        let m1 = registry::lookup("M1").unwrap();
        assert_eq!(registry::lookup(&m1.uuid().to_string()), Some(m1));
    });
}

/// Completion callback that keeps the I/O for inspection.
struct Keep(std::cell::RefCell<Option<crate::io::IoBox>>);

impl crate::io::IoCompletion for Keep {
    fn io_done(&self, io: crate::io::IoBox) {
        *self.0.borrow_mut() = Some(io);
    }
}

#[test]
fn a_zero_copy_read_lends_the_blocks_without_touching_the_buffer() {
    run(|| async {
        let b = malloc("Z0", 64, 512).await;
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 13 % 241) as u8).collect();
        let ch = b.get_channel();
        ch.write(5, &data).await.unwrap();
        for zcopy in [true, false] {
            let keep = std::rc::Rc::new(Keep(std::cell::RefCell::new(None)));
            let mut io = crate::io::IoBox::with(IoType::Read, 5, 2, crate::io::IoBuf::zeroed(1024));
            io.zcopy = zcopy;
            ch.submit(io, keep.clone());
            let mut io = loop {
                if let Some(io) = keep.0.borrow_mut().take() {
                    break io;
                }
                futures_lite::future::yield_now().await;
            };
            assert!(io.status().is_success());
            if zcopy {
                assert_eq!(io.shared.as_slice(), &data[..]);
                assert!(
                    io.buf.as_slice().iter().all(|&x| x == 0),
                    "buffer untouched"
                );
            } else {
                assert!(io.shared.is_empty());
                assert_eq!(io.take_buf().as_slice(), &data[..]);
            }
        }
    });
}

use std::path::{Path, PathBuf};

use super::rpc::create;
use super::{CreatedBy, UringOptions};
use crate::io::IoType;
use crate::registry;
use crate::testutil::{other_core, run};

fn scratch(name: &str, len: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fp-uring-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("disk.img");
    let file = std::fs::File::create(&f).unwrap();
    file.set_len(len).unwrap();
    f
}

fn opts(name: &str, file: &Path, block_size: u32) -> UringOptions {
    UringOptions {
        name: name.into(),
        filename: file.to_path_buf(),
        block_size,
        uuid: None,
        readonly: false,
        created_by: CreatedBy::Uring,
    }
}

#[test]
fn data_round_trips_through_the_file_on_every_core() {
    let file = scratch("data", 4 << 20);
    let f2 = file.clone();
    run(move || async move {
        create(opts("U0", &f2, 4096)).await.unwrap();
        let u = registry::lookup("U0").unwrap();
        assert_eq!(u.block_size(), 4096);
        assert_eq!(u.num_blocks(), 1024);
        let desc = registry::open("U0", true, None).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        desc.channel().write(5, &data).await.unwrap();
        desc.channel().command(IoType::Flush, 0, 0).await.unwrap();
        let b = u.clone();
        let read = reactor::call_async(other_core(), move || async move {
            b.get_channel().read(5, 2).await
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(read, data);
        // Unmap and write_zeroes read back as zeros.
        desc.channel().command(IoType::Unmap, 5, 1).await.unwrap();
        desc.channel()
            .command(IoType::WriteZeroes, 6, 1)
            .await
            .unwrap();
        assert!(desc
            .channel()
            .read(5, 2)
            .await
            .unwrap()
            .iter()
            .all(|&x| x == 0));
        // Out of range never reaches the kernel.
        assert!(desc.channel().read(1023, 2).await.is_err());
    });
    // The data is in the file itself.
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes[5 * 4096..7 * 4096].iter().all(|&x| x == 0));
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

#[test]
fn bad_files_and_block_sizes_are_refused_and_leave_nothing() {
    let file = scratch("bad", 1 << 20);
    let tiny = scratch("tiny", 100);
    let dir = file.parent().unwrap().to_path_buf();
    let (file2, tiny2) = (file.clone(), tiny.clone());
    run(move || async move {
        let (file, tiny) = (file2, tiny2);
        let cases = [
            (
                opts("B", Path::new("/nonexistent/disk.img"), 0),
                libc::ENOENT,
            ),
            (opts("B", &dir, 0), libc::EINVAL),
            (opts("B", &tiny, 512), libc::EINVAL),
            (opts("B", &file, 3000), libc::EINVAL),
            (opts("B", &file, 256), libc::EINVAL),
        ];
        for (o, errno) in cases {
            let what = format!("{:?} bs {}", o.filename, o.block_size);
            let e = create(o).await.unwrap_err();
            assert_eq!(e.errno(), errno, "{what}: {e:?}");
            assert!(registry::lookup("B").is_none());
        }
        // The name is free again, and the default block size is the file's.
        create(opts("B", &file, 0)).await.unwrap();
        assert_eq!(registry::lookup("B").unwrap().block_size(), 512);
    });
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
    let _ = std::fs::remove_dir_all(tiny.parent().unwrap());
}

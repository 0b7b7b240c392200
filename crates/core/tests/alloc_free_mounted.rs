//! The hot path allocates nothing per request in steady state, on real mounts: a raw image
//! exported writable, driven by O_DIRECT 64 KiB preads and pwrites and fstat from this process,
//! once served by read(2) (one queue, idle blocking reads) and once through FUSE-over-io_uring
//! (two ring threads). The queue threads (`blockfuse-q*`, `blockfuse-r*`) must make zero heap
//! allocations once warm. Needs root, /dev/fuse and the kernel's `enable_uring` on; fails
//! loudly otherwise.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use blockfuse_core::backend::CacheMode;
use blockfuse_core::config::{self, ExportConfig, Source};
use blockfuse_core::transport::{IoUringMode, PassthroughMode};

mod counting_alloc;
use counting_alloc::{Counting, MEASURING, QUEUE_ALLOCATIONS, QUEUE_ALLOCATIONS_EVER};

/// Whether the calling thread is a queue thread, by its kernel name (prctl allocates nothing).
fn on_queue_thread() -> bool {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer we pass.
    let r = unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    r == 0 && (name.starts_with(b"blockfuse-q") || name.starts_with(b"blockfuse-r"))
}

#[global_allocator]
static GLOBAL: Counting = Counting { is_queue_thread: on_queue_thread };

const IMAGE: usize = 4 << 20;
const BLOCK: usize = 64 << 10;

fn require_environment() {
    // SAFETY: geteuid takes nothing and cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts with mount(2): run it as root");
    assert!(std::path::Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
    let param = "/sys/module/fuse/parameters/enable_uring";
    let on = std::fs::read_to_string(param).map(|v| v.trim() == "Y").unwrap_or(false);
    assert!(on, "FUSE-over-io_uring is off ({param}); as root: echo Y > {param}");
}

/// Serves a fresh image in `mode` with `threads` queues and counts the queue threads'
/// allocations over 30 000 requests after 3 000 of warm-up.
fn allocations_in_steady_state(mode: IoUringMode, threads: usize) -> u64 {
    let dir = std::env::temp_dir().join(format!("blockfuse-alloc-{}-{mode:?}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("img.raw");
    let mountpoint: PathBuf = dir.join("mnt");
    std::fs::write(&image, vec![7u8; IMAGE]).unwrap();
    std::fs::write(&mountpoint, b"").unwrap();
    let cfg = ExportConfig {
        source: Source::Raw(image.clone()),
        mountpoint: mountpoint.clone(),
        writable: true,
        growable: false,
        allow_other: false,
        threads,
        cache: CacheMode::Writeback,
        writethrough: false,
        io_uring: mode,
        passthrough: PassthroughMode::Off,
        locking: Default::default(),
        force_share: false,
        layers: Default::default(),
    };
    let mut session = config::start(cfg, Box::new(|e| panic!("unexpected event {e:?}")))
        .unwrap_or_else(|e| panic!("cannot export ({mode:?}): {e}"));
    assert_eq!(session.io_uring(), mode == IoUringMode::On);

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&mountpoint)
        .expect("open the export");
    let fd = file.as_raw_fd();
    // A page-aligned 64 KiB window of a larger buffer, for O_DIRECT.
    let mut storage = vec![0u8; BLOCK + 4096];
    let start = storage.as_ptr().align_offset(4096);
    let buf = &mut storage[start..start + BLOCK];
    let mut round = |n: usize| {
        for i in 0..n {
            let off = ((i * 7919) % (IMAGE / BLOCK) * BLOCK) as libc::off_t;
            let p = buf.as_mut_ptr();
            // SAFETY: `buf` holds BLOCK bytes at `p` for the whole call; `fd` is open.
            let r = unsafe {
                match i % 3 {
                    0 => libc::pread(fd, p.cast(), BLOCK, off),
                    1 => libc::pwrite(fd, p.cast(), BLOCK, off),
                    _ => {
                        let mut st: libc::stat = std::mem::zeroed();
                        if libc::fstat(fd, &mut st) == 0 {
                            BLOCK as isize
                        } else {
                            -1
                        }
                    }
                }
            };
            assert_eq!(r, BLOCK as isize, "request {i}: {}", std::io::Error::last_os_error());
        }
    };
    round(3000);
    MEASURING.store(true, Ordering::SeqCst);
    round(30_000);
    MEASURING.store(false, Ordering::SeqCst);
    let counted = QUEUE_ALLOCATIONS.swap(0, Ordering::SeqCst);
    drop(file);
    session.shutdown().expect("close");
    let _ = std::fs::remove_dir_all(&dir);
    counted
}

#[test]
fn mounted_queues_do_not_allocate_in_steady_state() {
    require_environment();
    for (mode, threads) in [(IoUringMode::Off, 1), (IoUringMode::On, 2)] {
        let counted = allocations_in_steady_state(mode, threads);
        assert_eq!(
            counted, 0,
            "{mode:?}: the queue threads allocated {counted} times in 30000 requests"
        );
    }
    assert!(
        QUEUE_ALLOCATIONS_EVER.load(Ordering::SeqCst) > 0,
        "the counter never saw a queue thread"
    );
}

//! FUSE kernel ABI: opcodes, flags and struct sizes of include/uapi/linux/fuse.h, in the kernel's names.
//! Pure data: no I/O. Structs are described by their wire size; decode.rs and encode.rs lay them out.

/// The protocol major version we speak.
pub const KERNEL_VERSION: u32 = 7;
/// The newest minor version we know; the reply carries min(kernel's, ours).
pub const KERNEL_MINOR_VERSION: u32 = 42;
/// Oldest minor we accept: 7.9 added `fuse_attr.blksize` and the 40-byte read/write structs.
pub const MIN_KERNEL_MINOR_VERSION: u32 = 9;

/// The root inode: the export is a single regular file, and it is the root.
pub const FUSE_ROOT_ID: u64 = 1;

pub mod opcode {
    pub const FUSE_LOOKUP: u32 = 1;
    pub const FUSE_FORGET: u32 = 2;
    pub const FUSE_GETATTR: u32 = 3;
    pub const FUSE_SETATTR: u32 = 4;
    pub const FUSE_READLINK: u32 = 5;
    pub const FUSE_SYMLINK: u32 = 6;
    pub const FUSE_MKNOD: u32 = 8;
    pub const FUSE_MKDIR: u32 = 9;
    pub const FUSE_UNLINK: u32 = 10;
    pub const FUSE_RMDIR: u32 = 11;
    pub const FUSE_RENAME: u32 = 12;
    pub const FUSE_LINK: u32 = 13;
    pub const FUSE_OPEN: u32 = 14;
    pub const FUSE_READ: u32 = 15;
    pub const FUSE_WRITE: u32 = 16;
    pub const FUSE_STATFS: u32 = 17;
    pub const FUSE_RELEASE: u32 = 18;
    pub const FUSE_FSYNC: u32 = 20;
    pub const FUSE_SETXATTR: u32 = 21;
    pub const FUSE_GETXATTR: u32 = 22;
    pub const FUSE_LISTXATTR: u32 = 23;
    pub const FUSE_REMOVEXATTR: u32 = 24;
    pub const FUSE_FLUSH: u32 = 25;
    pub const FUSE_INIT: u32 = 26;
    pub const FUSE_OPENDIR: u32 = 27;
    pub const FUSE_READDIR: u32 = 28;
    pub const FUSE_RELEASEDIR: u32 = 29;
    pub const FUSE_FSYNCDIR: u32 = 30;
    pub const FUSE_GETLK: u32 = 31;
    pub const FUSE_SETLK: u32 = 32;
    pub const FUSE_SETLKW: u32 = 33;
    pub const FUSE_ACCESS: u32 = 34;
    pub const FUSE_CREATE: u32 = 35;
    pub const FUSE_INTERRUPT: u32 = 36;
    pub const FUSE_BMAP: u32 = 37;
    pub const FUSE_DESTROY: u32 = 38;
    pub const FUSE_IOCTL: u32 = 39;
    pub const FUSE_POLL: u32 = 40;
    pub const FUSE_NOTIFY_REPLY: u32 = 41;
    pub const FUSE_BATCH_FORGET: u32 = 42;
    pub const FUSE_FALLOCATE: u32 = 43;
    pub const FUSE_READDIRPLUS: u32 = 44;
    pub const FUSE_RENAME2: u32 = 45;
    pub const FUSE_LSEEK: u32 = 46;
    pub const FUSE_COPY_FILE_RANGE: u32 = 47;
    pub const FUSE_SETUPMAPPING: u32 = 48;
    pub const FUSE_REMOVEMAPPING: u32 = 49;
    pub const FUSE_SYNCFS: u32 = 50;
    pub const FUSE_TMPFILE: u32 = 51;
    pub const FUSE_STATX: u32 = 52;

    /// Kernel name of an opcode (without the FUSE_ prefix), for logs and stats.
    pub fn name(op: u32) -> &'static str {
        match op {
            FUSE_LOOKUP => "LOOKUP",
            FUSE_FORGET => "FORGET",
            FUSE_GETATTR => "GETATTR",
            FUSE_SETATTR => "SETATTR",
            FUSE_READLINK => "READLINK",
            FUSE_SYMLINK => "SYMLINK",
            FUSE_MKNOD => "MKNOD",
            FUSE_MKDIR => "MKDIR",
            FUSE_UNLINK => "UNLINK",
            FUSE_RMDIR => "RMDIR",
            FUSE_RENAME => "RENAME",
            FUSE_LINK => "LINK",
            FUSE_OPEN => "OPEN",
            FUSE_READ => "READ",
            FUSE_WRITE => "WRITE",
            FUSE_STATFS => "STATFS",
            FUSE_RELEASE => "RELEASE",
            FUSE_FSYNC => "FSYNC",
            FUSE_SETXATTR => "SETXATTR",
            FUSE_GETXATTR => "GETXATTR",
            FUSE_LISTXATTR => "LISTXATTR",
            FUSE_REMOVEXATTR => "REMOVEXATTR",
            FUSE_FLUSH => "FLUSH",
            FUSE_INIT => "INIT",
            FUSE_OPENDIR => "OPENDIR",
            FUSE_READDIR => "READDIR",
            FUSE_RELEASEDIR => "RELEASEDIR",
            FUSE_FSYNCDIR => "FSYNCDIR",
            FUSE_GETLK => "GETLK",
            FUSE_SETLK => "SETLK",
            FUSE_SETLKW => "SETLKW",
            FUSE_ACCESS => "ACCESS",
            FUSE_CREATE => "CREATE",
            FUSE_INTERRUPT => "INTERRUPT",
            FUSE_BMAP => "BMAP",
            FUSE_DESTROY => "DESTROY",
            FUSE_IOCTL => "IOCTL",
            FUSE_POLL => "POLL",
            FUSE_NOTIFY_REPLY => "NOTIFY_REPLY",
            FUSE_BATCH_FORGET => "BATCH_FORGET",
            FUSE_FALLOCATE => "FALLOCATE",
            FUSE_READDIRPLUS => "READDIRPLUS",
            FUSE_RENAME2 => "RENAME2",
            FUSE_LSEEK => "LSEEK",
            FUSE_COPY_FILE_RANGE => "COPY_FILE_RANGE",
            FUSE_SETUPMAPPING => "SETUPMAPPING",
            FUSE_REMOVEMAPPING => "REMOVEMAPPING",
            FUSE_SYNCFS => "SYNCFS",
            FUSE_TMPFILE => "TMPFILE",
            FUSE_STATX => "STATX",
            _ => "UNKNOWN",
        }
    }
}

/// `fuse_init_in`/`fuse_init_out` flags (the `flags` word).
pub mod init_flags {
    pub const FUSE_ASYNC_READ: u32 = 1 << 0;
    pub const FUSE_BIG_WRITES: u32 = 1 << 5;
    pub const FUSE_ASYNC_DIO: u32 = 1 << 15;
    pub const FUSE_MAX_PAGES: u32 = 1 << 22;
    pub const FUSE_INIT_EXT: u32 = 1 << 30;
}

/// `fuse_init_in.flags2`/`fuse_init_out.flags2`: the flags' upper 32 bits (with FUSE_INIT_EXT).
pub mod init_flags2 {
    /// `FUSE_OVER_IO_URING` (1 << 41): requests through io_uring commands instead of read(2).
    pub const FUSE_OVER_IO_URING: u32 = 1 << (41 - 32);
    /// `FUSE_DIRECT_IO_ALLOW_MMAP` (1 << 36, 7.39): `mmap(MAP_SHARED)` of a FOPEN_DIRECT_IO file
    /// works (the kernel keeps the mapping coherent with direct reads and writes).
    pub const FUSE_DIRECT_IO_ALLOW_MMAP: u32 = 1 << (36 - 32);
    /// `FUSE_PASSTHROUGH` (1 << 37, 7.40): an open may send reads, writes and mmap straight to a
    /// backing file registered with `FUSE_DEV_IOC_BACKING_OPEN`.
    pub const FUSE_PASSTHROUGH: u32 = 1 << (37 - 32);
}

/// FUSE-over-io_uring (7.42): `IORING_OP_URING_CMD` commands on a /dev/fuse fd, each owning
/// one ring entry of the kernel's per-CPU queue (`fuse_uring_req_header` + a payload buffer).
pub mod uring {
    /// `FUSE_IO_URING_CMD_REGISTER`: hand an entry to the kernel and wait for a request.
    pub const CMD_REGISTER: u32 = 1;
    /// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`: answer the entry's request, wait for the next one.
    pub const CMD_COMMIT_AND_FETCH: u32 = 2;
    /// `FUSE_URING_IN_OUT_HEADER_SZ`: room for `fuse_in_header` / `fuse_out_header`.
    pub const IN_OUT_HEADER_SZ: usize = 128;
    /// `FUSE_URING_OP_IN_OUT_SZ`: room for the op's fixed struct (`in_args[0]`).
    pub const OP_IN_OUT_SZ: usize = 128;
    /// Offset of `fuse_uring_ent_in_out` in `fuse_uring_req_header`.
    pub const ENT_IN_OUT_OFFSET: usize = IN_OUT_HEADER_SZ + OP_IN_OUT_SZ;
    /// `sizeof(struct fuse_uring_req_header)`.
    pub const REQ_HEADER_SZ: usize = ENT_IN_OUT_OFFSET + 32;
    /// Offsets in `fuse_uring_ent_in_out`: `commit_id` (u64) and `payload_sz` (u32).
    pub const ENT_COMMIT_ID: usize = 8;
    pub const ENT_PAYLOAD_SZ: usize = 16;
}

/// `fuse_open_out.open_flags`.
pub mod fopen {
    pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
    pub const FOPEN_NOFLUSH: u32 = 1 << 5;
    pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
    /// The open uses the backing file named by `fuse_open_out.backing_id` (with FOPEN_DIRECT_IO
    /// only for mmap: reads and writes still come to us).
    pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;
}

/// `fuse_setattr_in.valid`.
pub mod fattr {
    pub const FATTR_MODE: u32 = 1 << 0;
    pub const FATTR_UID: u32 = 1 << 1;
    pub const FATTR_GID: u32 = 1 << 2;
    pub const FATTR_SIZE: u32 = 1 << 3;
    pub const FATTR_ATIME: u32 = 1 << 4;
    pub const FATTR_MTIME: u32 = 1 << 5;
    pub const FATTR_FH: u32 = 1 << 6;
    pub const FATTR_ATIME_NOW: u32 = 1 << 7;
    pub const FATTR_MTIME_NOW: u32 = 1 << 8;
    pub const FATTR_LOCKOWNER: u32 = 1 << 9;
    pub const FATTR_CTIME: u32 = 1 << 10;
    pub const FATTR_KILL_SUIDGID: u32 = 1 << 11;
}

/// fallocate(2) modes as they arrive in `fuse_fallocate_in.mode`.
pub mod falloc {
    pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
    pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
    pub const FALLOC_FL_ZERO_RANGE: u32 = 0x10;
}

/// lseek(2) whence values that FUSE_LSEEK forwards.
pub mod whence {
    pub const SEEK_SET: u32 = 0;
    pub const SEEK_CUR: u32 = 1;
    pub const SEEK_END: u32 = 2;
    pub const SEEK_DATA: u32 = 3;
    pub const SEEK_HOLE: u32 = 4;
}

/// Wire sizes of the structs we read or write.
pub mod size {
    pub const IN_HEADER: usize = 40;
    pub const OUT_HEADER: usize = 16;
    pub const INIT_IN_COMPAT: usize = 16;
    /// `fuse_init_in` up to `flags2` (7.36).
    pub const INIT_IN_FLAGS2: usize = 20;
    pub const INIT_OUT: usize = 64;
    /// `FUSE_COMPAT_22_INIT_OUT_SIZE`: the reply size before 7.23.
    pub const INIT_OUT_COMPAT_22: usize = 24;
    pub const ATTR: usize = 88;
    pub const ATTR_OUT: usize = 16 + ATTR;
    pub const SETATTR_IN: usize = 88;
    pub const OPEN_IN: usize = 8;
    pub const OPEN_OUT: usize = 16;
    pub const READ_IN: usize = 40;
    pub const WRITE_IN: usize = 40;
    pub const WRITE_OUT: usize = 8;
    pub const RELEASE_IN: usize = 24;
    pub const FLUSH_IN: usize = 24;
    pub const FSYNC_IN: usize = 16;
    pub const FORGET_IN: usize = 8;
    pub const BATCH_FORGET_IN: usize = 8;
    pub const FORGET_ONE: usize = 16;
    pub const STATFS_OUT: usize = 80;
    pub const FALLOCATE_IN: usize = 32;
    pub const LSEEK_IN: usize = 24;
    pub const LSEEK_OUT: usize = 8;
    pub const INTERRUPT_IN: usize = 8;
    /// Header plus `fuse_write_in`: where a WRITE's payload starts.
    pub const WRITE_PREFIX: usize = IN_HEADER + WRITE_IN;
}

/// The kernel refuses a /dev/fuse read buffer smaller than this (`FUSE_MIN_READ_BUFFER`).
pub const FUSE_MIN_READ_BUFFER: usize = 8192;

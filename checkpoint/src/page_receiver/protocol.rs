//! CRIU's page-server protocol as the dumping CRIU speaks it (criu/page-xfer.c), and the
//! pagemap image format the receiver writes (images/pagemap.proto, criu/image.c).
//!
//! The stream is a sequence of 32-byte headers (`struct page_server_iov`: u32 cmd, 4 bytes of
//! padding, u64 nr_pages, u64 vaddr, u64 dst_id, native endian), each `ADD` with the
//! `PE_PRESENT` flag followed by `nr_pages` pages of data.

use protobuf::CodedOutputStream;

/// Bytes of one header.
pub const HEADER_LEN: usize = 32;
/// CRIU's page size on the platforms cryo runs on.
pub const PAGE_SIZE: u64 = 4096;

/// Pagemap entry flags.
pub const PE_PARENT: u32 = 1 << 0;
/// The pages may be restored lazily.
pub const PE_LAZY: u32 = 1 << 1;
/// The pages follow in the stream and go to the pages image.
pub const PE_PRESENT: u32 = 1 << 2;

const PS_IOV_ADD: u32 = 1;
const PS_IOV_HOLE: u32 = 2;
const PS_IOV_OPEN: u32 = 3;
const PS_IOV_OPEN2: u32 = 4;
const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_BITS: u32 = 16;
const PS_CMD_MASK: u32 = (1 << PS_CMD_BITS) - 1;

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;

/// Whose pages a pagemap holds (`dst_id` of an open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dest {
    /// A task, by its pid inside the dumped pid namespace: `pagemap-<pid>.img`.
    Task(u64),
    /// A shared memory segment, by CRIU's shmid: `pagemap-shmem-<id>.img`.
    Shmem(u64),
}

impl Dest {
    /// Decode a `dst_id` (low 8 bits: type, the rest: id). Older CRIUs used other type
    /// numbers for the same two kinds; they are accepted as CRIU itself accepts them.
    pub fn decode(dst_id: u64) -> Option<Dest> {
        let id = dst_id >> 8;
        match dst_id & 0xff {
            1 | 10 | 11 | 16 | 17 => Some(Dest::Task(id)),
            2 | 27 | 28 | 29 | 32 | 33 | 34 => Some(Dest::Shmem(id)),
            _ => None,
        }
    }

    /// Encode as CRIU 4.x does (for tests and fakes).
    pub fn encode(self) -> u64 {
        match self {
            Dest::Task(id) => (id << 8) | 1,
            Dest::Shmem(id) => (id << 8) | 2,
        }
    }

    /// The pagemap image's file name.
    pub fn pagemap_name(self) -> String {
        match self {
            Dest::Task(id) => format!("pagemap-{id}.img"),
            Dest::Shmem(id) => format!("pagemap-shmem-{id}.img"),
        }
    }
}

/// One decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Start the pagemap of `dest`; with `reply`, CRIU waits for a one-byte "has parent".
    Open {
        /// Whose pages follow.
        dest: Option<Dest>,
        /// OPEN2 (answered) rather than the legacy OPEN.
        reply: bool,
    },
    /// A run of pages at `vaddr`; data follows when `flags` has [`PE_PRESENT`].
    Add {
        /// Virtual address of the first page.
        vaddr: u64,
        /// Number of pages.
        nr_pages: u64,
        /// `PE_*` flags.
        flags: u32,
    },
    /// End of the session; CRIU waits for a 4-byte status.
    Close,
    /// Anything else (parent checks and lazy-page requests are not for a dump receiver).
    Other(u32),
}

/// Parse a header.
pub fn parse(h: &[u8; HEADER_LEN]) -> Command {
    let word = |at: usize| u64::from_ne_bytes(h[at..at + 8].try_into().unwrap_or([0; 8]));
    let raw = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]);
    let (nr_pages, vaddr, dst_id) = (word(8), word(16), word(24));
    let flags = raw >> PS_CMD_BITS;
    match raw & PS_CMD_MASK {
        PS_IOV_OPEN2 => Command::Open {
            dest: Dest::decode(dst_id),
            reply: true,
        },
        PS_IOV_OPEN => Command::Open {
            dest: Dest::decode(dst_id),
            reply: false,
        },
        PS_IOV_ADD_F => Command::Add {
            vaddr,
            nr_pages,
            flags,
        },
        PS_IOV_ADD => Command::Add {
            vaddr,
            nr_pages,
            flags: PE_PRESENT,
        },
        PS_IOV_HOLE => Command::Add {
            vaddr,
            nr_pages,
            flags: PE_PARENT,
        },
        _ if raw == PS_IOV_CLOSE || raw == PS_IOV_FORCE_CLOSE => Command::Close,
        _ => Command::Other(raw),
    }
}

/// Encode a header as CRIU 4.x sends it (for tests and fakes).
pub fn encode(cmd: Command, dst_id: u64) -> [u8; HEADER_LEN] {
    let (raw, nr_pages, vaddr) = match cmd {
        Command::Open { reply, .. } => (if reply { PS_IOV_OPEN2 } else { PS_IOV_OPEN }, 0, 0),
        Command::Add {
            vaddr,
            nr_pages,
            flags,
        } => ((flags << PS_CMD_BITS) | PS_IOV_ADD_F, nr_pages, vaddr),
        Command::Close => (PS_IOV_FORCE_CLOSE, 0, 0),
        Command::Other(raw) => (raw, 0, 0),
    };
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&raw.to_ne_bytes());
    h[8..16].copy_from_slice(&nr_pages.to_ne_bytes());
    h[16..24].copy_from_slice(&vaddr.to_ne_bytes());
    h[24..32].copy_from_slice(&dst_id.to_ne_bytes());
    h
}

/// The start of a pagemap image: the two magics and the `pagemap_head` naming its pages image.
pub fn pagemap_head(pages_id: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&IMG_COMMON_MAGIC.to_ne_bytes());
    out.extend_from_slice(&PAGEMAP_MAGIC.to_ne_bytes());
    push_record(&mut out, |s| s.write_uint32(1, pages_id));
    out
}

/// Append one `pagemap_entry` record, with the fields CRIU 4.x writes (the required
/// `compat_nr_pages` as 0, `flags`, and the 64-bit `nr_pages`).
pub fn push_pagemap_entry(out: &mut Vec<u8>, vaddr: u64, nr_pages: u64, flags: u32) {
    push_record(out, |s| {
        s.write_uint64(1, vaddr)?;
        s.write_uint32(2, 0)?;
        s.write_uint32(4, flags)?;
        s.write_uint64(5, nr_pages)
    });
}

/// CRIU's record framing: a native-endian u32 length, then the protobuf message.
fn push_record(
    out: &mut Vec<u8>,
    fields: impl FnOnce(&mut CodedOutputStream) -> protobuf::Result<()>,
) {
    let mut msg = Vec::with_capacity(24);
    {
        let mut s = CodedOutputStream::vec(&mut msg);
        // Writing into a Vec cannot fail.
        let _ = fields(&mut s).and_then(|_| s.flush());
    }
    out.extend_from_slice(&(msg.len() as u32).to_ne_bytes());
    out.extend_from_slice(&msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let dst = Dest::Task(7).encode();
        let add = Command::Add {
            vaddr: 0x7f00_0000_1000,
            nr_pages: 3,
            flags: PE_PRESENT | PE_LAZY,
        };
        for cmd in [
            Command::Open {
                dest: Some(Dest::Task(7)),
                reply: true,
            },
            add,
            Command::Close,
        ] {
            assert_eq!(parse(&encode(cmd, dst)), cmd);
        }
    }

    #[test]
    fn legacy_commands_and_types() {
        let mut h = encode(Command::Other(PS_IOV_ADD), 0);
        h[8..16].copy_from_slice(&2u64.to_ne_bytes());
        assert!(matches!(
            parse(&h),
            Command::Add {
                flags: PE_PRESENT,
                nr_pages: 2,
                ..
            }
        ));
        assert_eq!(Dest::decode((5 << 8) | 11), Some(Dest::Task(5)));
        assert_eq!(Dest::decode((9 << 8) | 34), Some(Dest::Shmem(9)));
        assert_eq!(Dest::decode((9 << 8) | 3), None);
        assert_eq!(parse(&encode(Command::Other(7), 0)), Command::Other(7));
    }

    #[test]
    fn names() {
        assert_eq!(Dest::Task(1).pagemap_name(), "pagemap-1.img");
        assert_eq!(Dest::Shmem(42).pagemap_name(), "pagemap-shmem-42.img");
    }

    /// The first 29 bytes CRIU 4.2.1 itself wrote for a task's pagemap (pages image 1, first
    /// entry one present page at 0x401000).
    #[test]
    fn pagemap_bytes_match_criu() {
        let mut img = pagemap_head(1);
        push_pagemap_entry(&mut img, 0x40_1000, 1, PE_PRESENT);
        let criu: [u8; 29] = [
            0x19, 0x43, 0x56, 0x54, 0x25, 0x40, 0x08, 0x56, 0x02, 0, 0, 0, 0x08, 0x01, 0x0b, 0, 0,
            0, 0x08, 0x80, 0xa0, 0x80, 0x02, 0x10, 0x00, 0x20, 0x04, 0x28, 0x01,
        ];
        assert_eq!(img, criu.to_vec());
    }
}

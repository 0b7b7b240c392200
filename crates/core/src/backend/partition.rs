//! Finds partition N of a disk's MBR (primary 1-4, logical 5+ in the extended partition) or GPT
//! partition table, read through the export's own backend (so a partition of a qcow2 image or
//! an NBD export is found as one of a raw file). The tables are parsed by the `mbrman` and `gpt`
//! crates; this module gives them a reader and checks what they find against the disk.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};

use super::layer::base_read;
use super::{Backend, BlockBackend, Refusal};

/// Logical sector sizes a GPT may be written for; MBR tables are read with 512-byte sectors.
const SECTOR: u64 = 512;
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// MBR type of the protective entry of a GPT disk.
const GPT_PROTECTIVE: u8 = 0xee;
/// MBR types of extended partitions (CHS, LBA, Linux).
const EXTENDED: [u8; 3] = [0x05, 0x0f, 0x85];

/// Where a partition lies on the disk, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub len: u64,
}

/// The byte range of partition `number` (1-based, as Linux numbers them: `sda1`, `sda5`).
pub fn find(disk: &Backend, number: u32, name: &str) -> io::Result<Span> {
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let mut reader = Reader { disk, pos: 0, rt: &rt };
    let not_found = |why: String| {
        Refusal::error("PARTITION_NOT_FOUND", format!("{name}: partition {number}: {why}"))
    };
    if number == 0 {
        return Err(not_found("partitions are numbered from 1".into()));
    }
    let gpt_sector = [SECTOR, 4096].into_iter().find(|&at| {
        let mut sig = [0u8; 8];
        at + 8 <= disk.len() && reader.read_exact_at(&mut sig, at).is_ok() && &sig == GPT_SIGNATURE
    });
    let span = match gpt_sector {
        Some(sector) => gpt_partition(&mut reader, sector, number).map_err(not_found)?,
        None => mbr_partition(&mut reader, number).map_err(not_found)?,
    };
    let end = span.start.checked_add(span.len);
    if span.len == 0 || end.is_none_or(|end| end > disk.len()) {
        return Err(Refusal::error(
            "SLICE_OUT_OF_RANGE",
            format!(
                "{name}: partition {number} (bytes {}..{}) does not lie inside the disk ({} \
                 bytes)",
                span.start,
                span.start.saturating_add(span.len),
                disk.len()
            ),
        ));
    }
    Ok(span)
}

fn gpt_partition(reader: &mut Reader<'_>, sector: u64, number: u32) -> Result<Span, String> {
    let lb = if sector == SECTOR {
        gpt::disk::LogicalBlockSize::Lb512
    } else {
        gpt::disk::LogicalBlockSize::Lb4096
    };
    let disk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(lb)
        .open_from_device(reader)
        .map_err(|e| format!("cannot read the GPT partition table: {e}"))?;
    let used: Vec<u32> =
        disk.partitions().iter().filter(|(_, p)| p.is_used()).map(|(n, _)| *n).collect();
    let part = disk
        .partitions()
        .get(&number)
        .filter(|p| p.is_used())
        .ok_or_else(|| format!("no such partition in the GPT (it has {})", list(&used)))?;
    let start = part.bytes_start(lb).map_err(|e| e.to_string())?;
    let len = part.bytes_len(lb).map_err(|e| e.to_string())?;
    Ok(Span { start, len })
}

fn mbr_partition(reader: &mut Reader<'_>, number: u32) -> Result<Span, String> {
    let mut boot = [0u8; 2];
    reader
        .read_exact_at(&mut boot, 510)
        .map_err(|_| "the disk is too small for an MBR".to_string())?;
    if boot != [0x55, 0xaa] {
        return Err("the disk has no partition table (no MBR or GPT signature)".into());
    }
    reader.pos = 0;
    let mbr = mbrman::MBR::read_from(reader, SECTOR as u32)
        .map_err(|e| format!("cannot read the MBR partition table: {e}"))?;
    let used: Vec<u32> = mbr.iter().filter(|(_, p)| p.is_used()).map(|(n, _)| n as u32).collect();
    let (_, entry) = mbr
        .iter()
        .find(|(n, p)| *n as u32 == number && p.is_used())
        .ok_or_else(|| format!("no such partition in the MBR (it has {})", list(&used)))?;
    if entry.sys == GPT_PROTECTIVE {
        return Err("the MBR is a GPT's protective MBR, but the GPT header is missing".into());
    }
    if EXTENDED.contains(&entry.sys) {
        return Err("it is the extended partition, a container of the logical partitions \
                    (numbered from 5); export one of those"
            .into());
    }
    Ok(Span {
        start: u64::from(entry.starting_lba) * SECTOR,
        len: u64::from(entry.sectors) * SECTOR,
    })
}

fn list(numbers: &[u32]) -> String {
    if numbers.is_empty() {
        return "no partitions".into();
    }
    let names: Vec<String> = numbers.iter().map(|n| n.to_string()).collect();
    format!("partitions {}", names.join(", "))
}

/// `Read + Seek` over a backend, for the table parsers; writes are refused.
struct Reader<'a> {
    disk: &'a Backend,
    pos: u64,
    rt: &'a tokio::runtime::Runtime,
}

impl Reader<'_> {
    fn read_exact_at(&mut self, buf: &mut [u8], at: u64) -> io::Result<()> {
        self.pos = at;
        self.read_exact(buf)
    }
}

impl fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "disk reader at {}", self.pos)
    }
}

impl Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.disk.len().saturating_sub(self.pos) as usize);
        self.rt.block_on(base_read(self.disk, &mut buf[..n], self.pos))?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Reader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.disk.len().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

impl Write for Reader<'_> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::ReadOnlyFilesystem))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

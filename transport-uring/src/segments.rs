//! A batch of records flattened into byte segments in stream order, shared by both send paths.

use crate::error::Error;
use crate::memory::GuestMap;
use crate::record::{OutRecord, Payload, HEADER_LEN};

/// A contiguous run of bytes to put on the stream.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    pub(crate) ptr: *const u8,
    pub(crate) len: usize,
    /// Registered guest piece holding the bytes, if any.
    pub(crate) piece: Option<usize>,
}

/// Appends the segments of `rec` (header already copied to `hdr`) to `segs`.
///
/// `hdr` must point to `HEADER_LEN` bytes that stay put until the segments are sent.
pub(crate) fn push_record(
    map: &GuestMap,
    index: usize,
    rec: &OutRecord<'_>,
    hdr: *const u8,
    segs: &mut Vec<Seg>,
) -> Result<(), Error> {
    segs.push(Seg {
        ptr: hdr,
        len: HEADER_LEN,
        piece: None,
    });
    match rec.payload {
        Payload::None => {}
        Payload::Bytes(b) => {
            if !b.is_empty() {
                segs.push(Seg {
                    ptr: b.as_ptr(),
                    len: b.len(),
                    piece: None,
                });
            }
        }
        Payload::Guest {
            region,
            offset,
            len,
        } => {
            let p = map
                .check(region, offset, len)
                .map_err(|range| Error::SendOutOfRange { index, range })?;
            let mut done = 0u64;
            while done < len {
                let (piece, left) = map.piece_of(region, offset + done);
                let n = (left as u64).min(len - done) as usize;
                if n == 0 {
                    break;
                }
                // `done < len` and the range was checked, so this stays inside the region.
                let ptr = p.wrapping_add(done as usize) as *const u8;
                segs.push(Seg {
                    ptr,
                    len: n,
                    piece: Some(piece),
                });
                done += n as u64;
            }
        }
    }
    Ok(())
}

/// Flattens `records` into `segs` in stream order, their headers copied into `headers`
/// first (the segments point into it: it must not change until they are sent).
pub(crate) fn flatten(
    map: &GuestMap,
    records: &[OutRecord<'_>],
    headers: &mut Vec<[u8; HEADER_LEN]>,
    segs: &mut Vec<Seg>,
) -> Result<(), Error> {
    headers.clear();
    headers.extend(records.iter().map(|r| r.header));
    segs.clear();
    for (i, rec) in records.iter().enumerate() {
        push_record(map, i, rec, headers[i].as_ptr(), segs)?;
    }
    Ok(())
}

/// Number of segments `rec` turns into (an upper bound).
pub(crate) fn seg_count(rec: &OutRecord<'_>) -> usize {
    match rec.payload {
        Payload::None => 1,
        Payload::Bytes(_) => 2,
        Payload::Guest { len, .. } => 2 + (len as usize) / crate::memory::MAX_FIXED_BUFFER + 1,
    }
}

/// Walks `segs` from byte `start`, yielding (ptr, len, piece) for what is left of each.
pub(crate) fn from_offset(segs: &[Seg], start: u64) -> impl Iterator<Item = Seg> + '_ {
    let mut skip = start;
    segs.iter().filter_map(move |s| {
        if skip >= s.len as u64 {
            skip -= s.len as u64;
            return None;
        }
        let k = skip as usize;
        skip = 0;
        Some(Seg {
            ptr: s.ptr.wrapping_add(k),
            len: s.len - k,
            piece: s.piece,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_from_any_byte() {
        let data = [0u8; 100];
        let p = data.as_ptr();
        let segs = [
            Seg {
                ptr: p,
                len: 32,
                piece: None,
            },
            Seg {
                ptr: p.wrapping_add(32),
                len: 8,
                piece: Some(0),
            },
            Seg {
                ptr: p.wrapping_add(40),
                len: 60,
                piece: Some(1),
            },
        ];
        // Every byte offset resumes at exactly that byte, and the rest adds up.
        for start in 0..=100u64 {
            let rest: Vec<Seg> = from_offset(&segs, start).collect();
            let total: usize = rest.iter().map(|s| s.len).sum();
            assert_eq!(total as u64, 100 - start);
            if let Some(first) = rest.first() {
                assert_eq!(first.ptr, p.wrapping_add(start as usize));
            }
        }
        let rest: Vec<Seg> = from_offset(&segs, 35).collect();
        assert_eq!(rest.len(), 2);
        assert_eq!((rest[0].len, rest[0].piece), (5, Some(0)));
    }
}

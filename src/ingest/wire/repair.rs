//! Invalid UTF-8 in string fields, replaced lossily along the schema: prost refuses a whole
//! request for one bad string; this rewrites only the strings that are not UTF-8 and copies
//! every other field as it came.
//!
//! Everything is written into one buffer, whatever the nesting: a message's length is written
//! as a 5-byte varint (padded with continuation bits, which prost reads) once its contents are.
//! So the output is at most about 3× the body (a replaced byte becomes U+FFFD's three), never a
//! copy per level of nesting. `regularize` re-encodes it minimally anyway.

use super::schema::{LEN, M};
use super::{next_field, Field, Malformed, MAX_DEPTH};

/// `body` with every string field that is not UTF-8 replaced lossily, and how many were.
pub(super) fn repair_utf8(body: &[u8]) -> Result<(Vec<u8>, u64), Malformed> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut replaced = 0;
    rewrite(body, M::Request, 0, &mut out, &mut replaced)?;
    Ok((out, replaced))
}

/// Bytes of a message length as `rewrite` writes it: up to 32 GiB, past any body it sees.
const LEN_BYTES: usize = 5;

/// `n` as a varint filling all of `slot`: every byte but the last has its continuation bit.
fn padded_varint(n: u64, slot: &mut [u8]) {
    let last = slot.len().saturating_sub(1);
    for (i, b) in slot.iter_mut().enumerate() {
        let bits = ((n >> (7 * i)) & 0x7f) as u8;
        *b = if i < last { bits | 0x80 } else { bits };
    }
}

fn rewrite(
    mut buf: &[u8],
    m: M,
    depth: usize,
    out: &mut Vec<u8>,
    replaced: &mut u64,
) -> Result<(), Malformed> {
    if depth > MAX_DEPTH {
        return Err(Malformed("nested too deep"));
    }
    while !buf.is_empty() {
        let field_start = buf;
        let Field { tag, inner } = next_field(&mut buf)?;
        let field = tag >> 3;
        let child = if tag & 7 == u64::from(LEN) {
            m.child(field)
        } else {
            None
        };
        if let Some(child) = child {
            prost::encoding::encode_varint(tag, out);
            let at = out.len();
            out.extend_from_slice(&[0; LEN_BYTES]);
            rewrite(inner, child, depth + 1, out, replaced)?;
            let len = out.len() - at - LEN_BYTES;
            if len >> (7 * LEN_BYTES) != 0 {
                return Err(Malformed("message too long to repair"));
            }
            if let Some(slot) = out.get_mut(at..at + LEN_BYTES) {
                padded_varint(len as u64, slot);
            }
        } else if tag & 7 == u64::from(LEN)
            && m.is_string(field)
            && std::str::from_utf8(inner).is_err()
        {
            let fixed = String::from_utf8_lossy(inner);
            *replaced += 1;
            prost::encoding::encode_varint(tag, out);
            prost::encoding::encode_varint(fixed.len() as u64, out);
            out.extend_from_slice(fixed.as_bytes());
        } else {
            out.extend_from_slice(&field_start[..field_start.len() - buf.len()]);
        }
    }
    Ok(())
}

//! Invalid UTF-8 in string fields, replaced lossily along the schema: prost refuses a whole
//! request for one bad string; this rewrites only the strings that are not UTF-8 and copies
//! every other byte as it came.

use super::schema::{LEN, M};
use super::{next_field, Field, Malformed, MAX_DEPTH};

/// `body` with every string field that is not UTF-8 replaced lossily, and how many were.
pub fn repair_utf8(body: &[u8]) -> Result<(Vec<u8>, u64), Malformed> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut replaced = 0;
    rewrite(body, M::Request, 0, &mut out, &mut replaced)?;
    Ok((out, replaced))
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
            let mut sub = Vec::with_capacity(inner.len());
            rewrite(inner, child, depth + 1, &mut sub, replaced)?;
            prost::encoding::encode_varint(tag, out);
            prost::encoding::encode_varint(sub.len() as u64, out);
            out.extend_from_slice(&sub);
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

//! Invalid UTF-8 in string fields, replaced lossily along the schema: prost refuses a whole
//! request for one bad string; this rewrites only the strings that are not UTF-8 and copies
//! every other byte as it came.

use super::schema::M;
use super::{field_of, skip, varint, Malformed, MAX_DEPTH};

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
        let tag = varint(&mut buf)?;
        let field = field_of(tag)?;
        let copy_field = |buf: &[u8], out: &mut Vec<u8>| {
            out.extend_from_slice(&field_start[..field_start.len() - buf.len()]);
        };
        match tag & 7 {
            0 => {
                varint(&mut buf)?;
                copy_field(buf, out);
            }
            1 => {
                skip(&mut buf, 8)?;
                copy_field(buf, out);
            }
            5 => {
                skip(&mut buf, 4)?;
                copy_field(buf, out);
            }
            2 => {
                let len = varint(&mut buf)?;
                let start = buf;
                skip(&mut buf, len)?;
                let inner = &start[..start.len() - buf.len()];
                if let Some(child) = m.child(field) {
                    let mut sub = Vec::with_capacity(inner.len());
                    rewrite(inner, child, depth + 1, &mut sub, replaced)?;
                    prost::encoding::encode_varint(tag, out);
                    prost::encoding::encode_varint(sub.len() as u64, out);
                    out.extend_from_slice(&sub);
                } else if m.is_string(field) && std::str::from_utf8(inner).is_err() {
                    let fixed = String::from_utf8_lossy(inner);
                    *replaced += 1;
                    prost::encoding::encode_varint(tag, out);
                    prost::encoding::encode_varint(fixed.len() as u64, out);
                    out.extend_from_slice(fixed.as_bytes());
                } else {
                    copy_field(buf, out);
                }
            }
            _ => return Err(Malformed("group or unknown wire type")),
        }
    }
    Ok(())
}

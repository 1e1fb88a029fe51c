//! What a protobuf request will cost to decode, and whether the views can read it as it is,
//! found in one walk of its wire format.
//!
//! A protobuf message can be two bytes on the wire (a tag and a zero length) and a hundred
//! bytes or more once decoded: 7.6 MiB of empty data points decode to ~700 MiB. This walks the
//! request along the OTLP metrics schema, counts every message it holds, and prices each at the
//! size of the struct prost would build for it (twice, for `Vec` growth), plus the body itself
//! for strings and packed numbers: what the slow path ([`regularize`]) may cost. The walk
//! allocates nothing and touches each byte once; a malformed body is an error here, before
//! anything is allocated for it.
//!
//! The same walk says whether the body is *regular* ([`Cost::regular`]): every known field with
//! its declared wire type, singular fields and oneofs set at most once, packed numbers in one
//! run of whole values, every string UTF-8. That is the form prost encodes, and the form
//! `view` reads without decoding. Any other body is brought to it by [`regularize`]: invalid
//! UTF-8 is replaced lossily (U+FFFD, counted: prost would refuse the whole request for one bad
//! string), then prost decodes it (refusing what it refuses, merging what it merges) and
//! encodes it again. The regular body is what is applied and logged.

mod repair;
mod schema;

use std::mem::size_of;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

use repair::repair_utf8;
use schema::{Decl, LEN, M};

/// Deeper nesting is refused (prost refuses past 100; `AnyValue` can nest).
const MAX_DEPTH: usize = 64;

/// What a request will cost to decode, and whether the views can read it as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Data points of every kind.
    pub points: u64,
    /// Estimated bytes of the request decoded by prost, the body included.
    pub bytes: u64,
    /// The body is in regular form (see the module doc).
    pub regular: bool,
    /// A string field is not UTF-8.
    pub bad_utf8: bool,
}

impl Cost {
    /// A price without a walk (a JSON body: its points are counted once decoded).
    pub fn of_bytes(bytes: u64) -> Self {
        Self {
            points: 0,
            bytes,
            regular: true,
            bad_utf8: false,
        }
    }
}

/// Why the body cannot be priced: it is not a well-formed protobuf message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed protobuf: {0}")]
pub struct Malformed(&'static str);

/// Prices an `ExportMetricsServiceRequest` body and says whether it is regular.
pub fn cost(body: &[u8]) -> Result<Cost, Malformed> {
    let mut c = Cost {
        points: 0,
        bytes: (body.len() + M::Request.size()) as u64,
        regular: true,
        bad_utf8: false,
    };
    walk(body, M::Request, 0, &mut c)?;
    Ok(c)
}

/// One field read off the wire: its tag, and its bytes if it is length-delimited.
struct Field<'a> {
    tag: u64,
    inner: &'a [u8],
}

/// The next field of `buf`, which is left after it. Every walk of the schema reads fields so.
#[inline(always)]
fn next_field<'a>(buf: &mut &'a [u8]) -> Result<Field<'a>, Malformed> {
    let tag = varint(buf)?;
    field_of(tag)?;
    let mut inner: &[u8] = &[];
    match tag & 7 {
        0 => {
            varint(buf)?;
        }
        1 => skip(buf, 8)?,
        5 => skip(buf, 4)?,
        2 => {
            let len = varint(buf)?;
            let start = *buf;
            skip(buf, len)?;
            inner = &start[..start.len() - buf.len()];
        }
        _ => return Err(Malformed("group or unknown wire type")),
    }
    Ok(Field { tag, inner })
}

/// The field number of a tag: prost refuses field 0 and a tag past `u32`.
fn field_of(tag: u64) -> Result<u64, Malformed> {
    if tag > u64::from(u32::MAX) {
        return Err(Malformed("tag out of range"));
    }
    match tag >> 3 {
        0 => Err(Malformed("field number 0")),
        f => Ok(f),
    }
}

/// Whether a packed run is whole varints (prost refuses the request otherwise).
fn whole_varints(mut run: &[u8]) -> bool {
    while !run.is_empty() {
        if varint(&mut run).is_err() {
            return false;
        }
    }
    true
}

/// Most varints on the wire (tags, short lengths) are one byte: read those inline.
#[inline]
fn varint(buf: &mut &[u8]) -> Result<u64, Malformed> {
    if let Some((&b, rest)) = buf.split_first() {
        if b < 0x80 {
            *buf = rest;
            return Ok(u64::from(b));
        }
    }
    prost::encoding::decode_varint(buf).map_err(|_| Malformed("invalid varint"))
}

fn skip(buf: &mut &[u8], n: u64) -> Result<(), Malformed> {
    let n = usize::try_from(n).map_err(|_| Malformed("length out of range"))?;
    if n > buf.len() {
        return Err(Malformed("truncated field"));
    }
    *buf = &buf[n..];
    Ok(())
}

fn walk(mut buf: &[u8], m: M, depth: usize, c: &mut Cost) -> Result<(), Malformed> {
    if depth > MAX_DEPTH {
        return Err(Malformed("nested too deep"));
    }
    // Singular fields seen (by field number, all below 64 in the schema), and the oneof.
    let mut seen = 0u64;
    let mut oneof = false;
    while !buf.is_empty() {
        let Field { tag, inner } = next_field(&mut buf)?;
        let (field, wire) = (tag >> 3, (tag & 7) as u8);
        let info = m.field(field);
        if let Some(decl) = info.decl {
            let bit = 1u64 << (field & 63);
            let regular = match decl {
                Decl::One(w) => w == wire && seen & bit == 0,
                Decl::Many(w) => w == wire,
                Decl::OneOf(w) => w == wire && !std::mem::replace(&mut oneof, true),
                Decl::Packed64 => wire == LEN && seen & bit == 0 && inner.len().is_multiple_of(8),
                Decl::PackedVarint => wire == 0 || wire == LEN && whole_varints(inner),
            };
            seen |= bit;
            c.regular &= regular;
        }
        if wire != LEN {
            continue;
        }
        match info.child {
            Some(child) => {
                c.points += u64::from(info.child_is_point);
                // Twice: the `Vec` holding it may have doubled its capacity.
                c.bytes += 2 * u64::from(info.child_size);
                walk(inner, child, depth + 1, c)?;
            }
            // A string, bytes or packed numbers: their bytes are counted with the body, plus a
            // `String` header should it be one of many. Packed varints (the exponential
            // buckets) widen to 8 bytes each.
            None => {
                let widen = if m == M::Buckets { 7 } else { 0 };
                c.bytes += widen * inner.len() as u64 + size_of::<String>() as u64;
                // Most label text is ASCII: checked a word at a time before the full check.
                if info.string && !inner.is_ascii() && std::str::from_utf8(inner).is_err() {
                    c.bad_utf8 = true;
                    c.regular = false;
                }
            }
        }
    }
    Ok(())
}

/// The walk alone, checking and pricing nothing: the data points a well-formed body holds.
/// What any reader of the request must do at least; the floor bench measures spanagg by it.
pub fn skim(body: &[u8]) -> Result<u64, Malformed> {
    fn go(mut buf: &[u8], m: M, depth: usize, points: &mut u64) -> Result<(), Malformed> {
        if depth > MAX_DEPTH {
            return Err(Malformed("nested too deep"));
        }
        while !buf.is_empty() {
            let Field { tag, inner } = next_field(&mut buf)?;
            if tag & 7 != u64::from(LEN) {
                continue;
            }
            let info = m.field(tag >> 3);
            if let Some(child) = info.child {
                *points += u64::from(info.child_is_point);
                go(inner, child, depth + 1, points)?;
            }
        }
        Ok(())
    }
    let mut points = 0;
    go(body, M::Request, 0, &mut points)?;
    Ok(points)
}

/// A body `cost` found irregular, in regular form, and how many strings had invalid UTF-8
/// replaced. An error is prost's reason to refuse the body.
pub fn regularize(body: &[u8], cost: &Cost) -> Result<(Bytes, u64), String> {
    use prost::Message;
    let repaired;
    let (body, replaced) = if cost.bad_utf8 {
        let (fixed, n) = repair_utf8(body).map_err(|m| m.to_string())?;
        repaired = fixed;
        (&repaired[..], n)
    } else {
        (body, 0)
    };
    let req = ExportMetricsServiceRequest::decode(body).map_err(|e| e.to_string())?;
    Ok((Bytes::from(req.encode_to_vec()), replaced))
}

/// `body` in regular form: walked, and regularized only if it has to be (WAL replay; the
/// live path prices the walk for admission first).
pub fn read(body: Bytes) -> Result<Bytes, String> {
    let c = cost(&body).map_err(|e| e.to_string())?;
    if c.regular {
        return Ok(body);
    }
    regularize(&body, &c).map(|(fixed, _)| fixed)
}

#[cfg(test)]
mod tests;

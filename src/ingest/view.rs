//! Borrowed views of an OTLP metrics export request: what spanagg reads of it, read straight
//! from its protobuf bytes. No message is built and no string copied: a view is a slice of the
//! body, and its fields are found by walking that slice when asked for.
//!
//! Invariant: views read a body in *regular* form (`wire::Cost::regular`): known fields with
//! their declared wire type, singular fields and oneofs set at most once, packed numbers in one
//! run, strings UTF-8. prost's encoding is regular, and `wire::regularize` brings any other
//! well-formed body to it through prost, so a view reads exactly what prost would decode. On a
//! body that breaks the invariant views do not panic: a field they cannot read is absent, a
//! string that is not UTF-8 is empty.

use bytes::Bytes;

pub use crate::aggregate::batch::Span;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

/// A request body in regular form, shared cheaply (the shards resolve new series' labels from it).
#[derive(Debug, Clone)]
pub struct OtlpBody(Bytes);

impl OtlpBody {
    /// A decoded request, encoded: prost's encoding is regular.
    pub fn encode(req: &ExportMetricsServiceRequest) -> Self {
        Self(Bytes::from(prost::Message::encode_to_vec(req)))
    }

    /// A body the wire walk found regular (or `wire::regularize` made so).
    pub fn regular(body: Bytes) -> Self {
        Self(body)
    }

    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    pub fn view(&self) -> RequestView<'_> {
        RequestView(&self.0)
    }

    /// Where `part` (a slice of this body, from a view) lies in it.
    pub fn span_of(&self, part: &[u8]) -> Span {
        if part.is_empty() {
            return Span::default();
        }
        let at = (part.as_ptr() as usize).wrapping_sub(self.0.as_ptr() as usize);
        Span {
            at: u32::try_from(at).unwrap_or(u32::MAX),
            len: u32::try_from(part.len()).unwrap_or(0),
        }
    }

    /// The bytes at `span`, if it lies within the body.
    pub fn at(&self, span: Span) -> Option<&[u8]> {
        let from = span.at as usize;
        self.0.get(from..from.checked_add(span.len as usize)?)
    }
}

impl From<ExportMetricsServiceRequest> for OtlpBody {
    fn from(req: ExportMetricsServiceRequest) -> Self {
        Self::encode(&req)
    }
}

/// One field as the wire has it.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    I64(u64),
    Len(&'a [u8]),
    I32,
}

/// The fields of a message in wire order; stops at the first byte it cannot read.
#[derive(Clone)]
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = (u64, Value<'a>);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let field = read_field(&mut self.0);
        if field.is_none() {
            self.0 = &[];
        }
        field
    }
}

/// Most varints (tags, short lengths, flags) are one byte: read those inline.
#[inline]
fn varint(buf: &mut &[u8]) -> Option<u64> {
    if let Some((&b, rest)) = buf.split_first() {
        if b < 0x80 {
            *buf = rest;
            return Some(u64::from(b));
        }
    }
    prost::encoding::decode_varint(buf).ok()
}

#[inline]
fn read_field<'a>(buf: &mut &'a [u8]) -> Option<(u64, Value<'a>)> {
    let tag = varint(buf)?;
    let value = match tag & 7 {
        0 => Value::Varint(varint(buf)?),
        1 => {
            let (head, rest) = buf.split_first_chunk::<8>()?;
            *buf = rest;
            Value::I64(u64::from_le_bytes(*head))
        }
        2 => {
            let len = usize::try_from(varint(buf)?).ok()?;
            if len > buf.len() {
                return None;
            }
            let (inner, rest) = buf.split_at(len);
            *buf = rest;
            Value::Len(inner)
        }
        5 => {
            *buf = buf.get(4..)?;
            Value::I32
        }
        _ => return None,
    };
    // Field numbers past `u32` never match a field views read.
    Some((tag >> 3, value))
}

/// The length-delimited occurrences of `field` in `msg`: a repeated message field.
fn repeated(msg: &[u8], field: u64) -> impl Iterator<Item = &[u8]> + Clone {
    Fields(msg).filter_map(move |(f, v)| match v {
        Value::Len(inner) if f == field => Some(inner),
        _ => None,
    })
}

/// A string field as a view reads it: one that is not UTF-8 (outside a regular body) is empty.
pub fn text(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap_or("")
}

#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a>(&'a [u8]);

impl<'a> RequestView<'a> {
    pub fn resource_metrics(self) -> impl Iterator<Item = ResourceMetricsView<'a>> {
        repeated(self.0, 1).map(ResourceMetricsView::read)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ResourceMetricsView<'a> {
    /// The `Resource` message (empty when absent).
    pub resource: &'a [u8],
    msg: &'a [u8],
}

impl<'a> ResourceMetricsView<'a> {
    fn read(msg: &'a [u8]) -> Self {
        // Singular fields are set once in a regular body: the first is the one.
        let resource = repeated(msg, 1).next().unwrap_or_default();
        Self { resource, msg }
    }

    pub fn attributes(&self) -> Attrs<'a> {
        Attrs::of(self.resource, 1)
    }

    pub fn scope_metrics(&self) -> impl Iterator<Item = ScopeMetricsView<'a>> {
        repeated(self.msg, 2).map(ScopeMetricsView::read)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ScopeMetricsView<'a> {
    pub scope_name: &'a str,
    msg: &'a [u8],
}

impl<'a> ScopeMetricsView<'a> {
    fn read(msg: &'a [u8]) -> Self {
        let scope = repeated(msg, 1).next().unwrap_or_default();
        let scope_name = repeated(scope, 1).next().map_or("", text);
        Self { scope_name, msg }
    }

    pub fn metrics(&self) -> impl Iterator<Item = MetricView<'a>> {
        repeated(self.msg, 2).map(MetricView::read)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct MetricView<'a> {
    pub name: &'a str,
    pub description: &'a str,
    pub unit: &'a str,
    pub data: Option<Data<'a>>,
}

/// A metric's data, by kind.
#[derive(Debug, Clone, Copy)]
pub enum Data<'a> {
    Gauge(Points<'a>),
    Sum {
        points: Points<'a>,
        temporality: i32,
        monotonic: bool,
    },
    Histogram {
        points: Points<'a>,
        temporality: i32,
    },
    ExponentialHistogram(Points<'a>),
    Summary(Points<'a>),
}

impl<'a> Data<'a> {
    pub fn points(&self) -> Points<'a> {
        match *self {
            Data::Sum { points, .. } | Data::Histogram { points, .. } => points,
            Data::Gauge(p) | Data::ExponentialHistogram(p) | Data::Summary(p) => p,
        }
    }

    /// Sums and histograms are scanned once for their temporality and monotonicity; the
    /// points are read where they are used.
    fn read(field: u64, msg: &'a [u8]) -> Option<Self> {
        let points = Points(msg);
        let (mut temporality, mut monotonic) = (0i32, false);
        if matches!(field, 7 | 9) {
            for (f, v) in Fields(msg) {
                match (f, v) {
                    (2, Value::Varint(t)) => temporality = t as i32,
                    (3, Value::Varint(m)) => monotonic = m != 0,
                    _ => {}
                }
            }
        }
        Some(match field {
            5 => Data::Gauge(points),
            7 => Data::Sum {
                points,
                temporality,
                monotonic,
            },
            9 => Data::Histogram {
                points,
                temporality,
            },
            10 => Data::ExponentialHistogram(points),
            11 => Data::Summary(points),
            _ => return None,
        })
    }
}

impl<'a> MetricView<'a> {
    fn read(msg: &'a [u8]) -> Self {
        let mut m = MetricView {
            name: "",
            description: "",
            unit: "",
            data: None,
        };
        for (f, v) in Fields(msg) {
            let Value::Len(b) = v else { continue };
            match f {
                1 => m.name = text(b),
                2 => m.description = text(b),
                3 => m.unit = text(b),
                5 | 7 | 9 | 10 | 11 => m.data = Data::read(f, b),
                _ => {}
            }
        }
        m
    }
}

/// The data points of a metric (field 1 of its data message).
#[derive(Debug, Clone, Copy)]
pub struct Points<'a>(&'a [u8]);

impl<'a> Points<'a> {
    /// Counted by a walk of the message: the live path counts points when it prices the
    /// request (`wire::cost`), so this serves the fuzz checks and tests.
    pub fn count(&self) -> usize {
        repeated(self.0, 1).count()
    }

    pub fn messages(&self) -> impl Iterator<Item = &'a [u8]> {
        repeated(self.0, 1)
    }
}

/// A repeated `KeyValue` field of a message, and how many it holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attrs<'a> {
    msg: &'a [u8],
    field: u64,
    len: usize,
}

impl<'a> Attrs<'a> {
    pub fn of(msg: &'a [u8], field: u64) -> Self {
        let len = repeated(msg, field).count();
        Self { msg, field, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = KeyValueView<'a>> + Clone {
        self.raw().map(|kv| KeyValueView {
            key: text(kv.key),
            value: kv.value,
        })
    }

    /// The attributes with their keys as bytes: the keying path reads these, so a key is
    /// checked as UTF-8 once per request (when its name is first made), not once per point.
    pub fn raw(&self) -> impl Iterator<Item = RawKeyValue<'a>> + Clone {
        repeated(self.msg, self.field).map(RawKeyValue::read)
    }
}

/// An attribute as the wire has it: the key's bytes (UTF-8 in a regular body) and its
/// `AnyValue` message, if present.
#[derive(Debug, Clone, Copy)]
pub struct RawKeyValue<'a> {
    pub key: &'a [u8],
    pub value: Option<&'a [u8]>,
}

impl<'a> RawKeyValue<'a> {
    fn read(msg: &'a [u8]) -> Self {
        let mut kv = RawKeyValue {
            key: &[],
            value: None,
        };
        for (f, v) in Fields(msg) {
            match (f, v) {
                (1, Value::Len(b)) => kv.key = b,
                (2, Value::Len(b)) => kv.value = Some(b),
                _ => {}
            }
        }
        kv
    }
}

#[derive(Debug, Clone, Copy)]
pub struct KeyValueView<'a> {
    pub key: &'a str,
    /// The `AnyValue` message, if present.
    pub value: Option<&'a [u8]>,
}

/// An attribute value as spanagg renders it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AnyValueView<'a> {
    String(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    Bytes(&'a [u8]),
    /// An array, a key-value list or a value this reader does not know: the message.
    Other(&'a [u8]),
    Empty,
}

impl<'a> AnyValueView<'a> {
    pub fn read(msg: &'a [u8]) -> Self {
        Self::of(msg, Self::member(msg))
    }

    fn of(msg: &'a [u8], member: Option<(u64, Value<'a>)>) -> Self {
        match member {
            Some((1, Value::Len(b))) => AnyValueView::String(text(b)),
            Some((2, Value::Varint(b))) => AnyValueView::Bool(b != 0),
            Some((3, Value::Varint(i))) => AnyValueView::Int(i as i64),
            Some((4, Value::I64(d))) => AnyValueView::Double(f64::from_bits(d)),
            Some((7, Value::Len(b))) => AnyValueView::Bytes(b),
            Some(_) => AnyValueView::Other(msg),
            None => AnyValueView::Empty,
        }
    }

    /// A string value's bytes, as [`read`](Self::read) would give them but without checking
    /// UTF-8 again (a regular body's strings were checked by the walk), or any other value read.
    pub fn read_bytes(msg: &'a [u8]) -> Result<&'a [u8], Self> {
        match Self::member(msg) {
            Some((1, Value::Len(b))) => Ok(b),
            member => Err(Self::of(msg, member)),
        }
    }

    /// The member of the value's oneof set last (in a regular body, the only one), as the
    /// wire has it; fields of other numbers or wire types are skipped.
    fn member(msg: &'a [u8]) -> Option<(u64, Value<'a>)> {
        Fields(msg)
            .filter(|(f, v)| {
                matches!(
                    (f, v),
                    (1 | 7, Value::Len(_))
                        | (2 | 3, Value::Varint(_))
                        | (4, Value::I64(_))
                        | (5 | 6 | 8, _)
                )
            })
            .last()
    }
}

/// A `NumberDataPoint`.
#[derive(Debug, Clone, Copy)]
pub struct NumberPoint<'a> {
    pub attributes: Attrs<'a>,
    pub start: u64,
    pub time: u64,
    pub value: Option<Number>,
    pub flags: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Double(f64),
    Int(i64),
}

impl<'a> NumberPoint<'a> {
    pub fn read(msg: &'a [u8]) -> Self {
        let mut p = NumberPoint {
            attributes: Attrs {
                msg,
                field: 7,
                len: 0,
            },
            start: 0,
            time: 0,
            value: None,
            flags: 0,
        };
        for (f, v) in Fields(msg) {
            match (f, v) {
                (7, Value::Len(_)) => p.attributes.len += 1,
                (2, Value::I64(t)) => p.start = t,
                (3, Value::I64(t)) => p.time = t,
                (4, Value::I64(d)) => p.value = Some(Number::Double(f64::from_bits(d))),
                (6, Value::I64(i)) => p.value = Some(Number::Int(i as i64)),
                (8, Value::Varint(x)) => p.flags = x as u32,
                _ => {}
            }
        }
        p
    }
}

/// A `HistogramDataPoint`.
#[derive(Debug, Clone, Copy)]
pub struct HistogramPoint<'a> {
    pub attributes: Attrs<'a>,
    pub start: u64,
    pub time: u64,
    pub count: u64,
    pub sum: Option<f64>,
    pub bucket_counts: Packed64<'a>,
    pub explicit_bounds: Packed64<'a>,
    pub flags: u32,
}

impl<'a> HistogramPoint<'a> {
    pub fn read(msg: &'a [u8]) -> Self {
        let mut p = HistogramPoint {
            attributes: Attrs {
                msg,
                field: 9,
                len: 0,
            },
            start: 0,
            time: 0,
            count: 0,
            sum: None,
            bucket_counts: Packed64(&[]),
            explicit_bounds: Packed64(&[]),
            flags: 0,
        };
        for (f, v) in Fields(msg) {
            match (f, v) {
                (9, Value::Len(_)) => p.attributes.len += 1,
                (2, Value::I64(t)) => p.start = t,
                (3, Value::I64(t)) => p.time = t,
                (4, Value::I64(n)) => p.count = n,
                (5, Value::I64(s)) => p.sum = Some(f64::from_bits(s)),
                (6, Value::Len(b)) => p.bucket_counts = Packed64::new(b),
                (7, Value::Len(b)) => p.explicit_bounds = Packed64::new(b),
                (10, Value::Varint(x)) => p.flags = x as u32,
                _ => {}
            }
        }
        p
    }
}

/// A packed run of 8-byte little-endian numbers (`fixed64` or `double`).
#[derive(Debug, Clone, Copy)]
pub struct Packed64<'a>(&'a [u8]);

impl<'a> Packed64<'a> {
    /// Whole values only: a trailing partial one is not read.
    fn new(b: &'a [u8]) -> Self {
        Self(&b[..b.len() - b.len() % 8])
    }

    pub fn len(&self) -> usize {
        self.0.len() / 8
    }

    /// The values' bytes as the wire has them.
    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn u64s(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.0.chunks_exact(8).map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_le_bytes(b)
        })
    }

    pub fn f64s(&self) -> impl ExactSizeIterator<Item = f64> + 'a {
        self.u64s().map(f64::from_bits)
    }
}

#[cfg(test)]
mod tests;

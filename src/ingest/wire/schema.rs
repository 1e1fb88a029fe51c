//! The OTLP metrics schema as the wire walk needs it: which message each length-delimited field
//! holds, what prost builds for it, and how every field is declared (its wire type, and whether
//! it is repeated, packed or a member of a oneof). A new field in the protos is unknown here
//! until it is added: unknown fields are skipped, as prost skips them.

use std::mem::size_of;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, EntityRef, InstrumentationScope, KeyValue, KeyValueList,
};
use opentelemetry_proto::tonic::metrics::v1::{
    exponential_histogram_data_point::Buckets, summary_data_point::ValueAtQuantile, Exemplar,
    ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, Summary, SummaryDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

/// Protobuf wire types.
pub(super) const VARINT: u8 = 0;
pub(super) const I64: u8 = 1;
pub(super) const LEN: u8 = 2;

/// How a field is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decl {
    /// A singular field of this wire type.
    One(u8),
    /// A repeated field of this wire type.
    Many(u8),
    /// A repeated `fixed64` or `double`: packed (one length-delimited run) or not.
    Packed64,
    /// A repeated varint: packed or not.
    PackedVarint,
    /// A member of the message's oneof, of this wire type.
    OneOf(u8),
}

/// The messages of the OTLP metrics schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum M {
    Request,
    ResourceMetrics,
    Resource,
    EntityRef,
    ScopeMetrics,
    Scope,
    Metric,
    Gauge,
    Sum,
    Histogram,
    ExpHistogram,
    Summary,
    NumberPoint,
    HistogramPoint,
    ExpHistogramPoint,
    SummaryPoint,
    Buckets,
    Quantile,
    Exemplar,
    KeyValue,
    AnyValue,
    ArrayValue,
    KvList,
}

impl M {
    /// The message a length-delimited field of `self` holds, if it is one.
    pub(super) const fn child(self, field: u64) -> Option<M> {
        use M::*;
        Some(match (self, field) {
            (Request, 1) => ResourceMetrics,
            (ResourceMetrics, 1) => Resource,
            (ResourceMetrics, 2) => ScopeMetrics,
            (Resource, 1) => KeyValue,
            (Resource, 3) => EntityRef,
            (ScopeMetrics, 1) => Scope,
            (ScopeMetrics, 2) => Metric,
            (Scope, 3) => KeyValue,
            (Metric, 5) => Gauge,
            (Metric, 7) => Sum,
            (Metric, 9) => Histogram,
            (Metric, 10) => ExpHistogram,
            (Metric, 11) => Summary,
            (Metric, 12) => KeyValue,
            (Gauge | Sum, 1) => NumberPoint,
            (Histogram, 1) => HistogramPoint,
            (ExpHistogram, 1) => ExpHistogramPoint,
            (Summary, 1) => SummaryPoint,
            (NumberPoint, 7) | (HistogramPoint, 9) | (ExpHistogramPoint, 1) => KeyValue,
            (SummaryPoint, 7) | (Exemplar, 7) | (KvList, 1) => KeyValue,
            (NumberPoint, 5) | (HistogramPoint, 8) | (ExpHistogramPoint, 11) => Exemplar,
            (ExpHistogramPoint, 8 | 9) => Buckets,
            (SummaryPoint, 6) => Quantile,
            (KeyValue, 2) | (ArrayValue, 1) => AnyValue,
            (AnyValue, 5) => ArrayValue,
            (AnyValue, 6) => KvList,
            _ => return None,
        })
    }

    /// Bytes of the struct prost builds for one such message.
    pub(super) const fn size(self) -> usize {
        match self {
            M::Request => size_of::<ExportMetricsServiceRequest>(),
            M::ResourceMetrics => size_of::<ResourceMetrics>(),
            M::Resource => size_of::<Resource>(),
            M::EntityRef => size_of::<EntityRef>(),
            M::ScopeMetrics => size_of::<ScopeMetrics>(),
            M::Scope => size_of::<InstrumentationScope>(),
            M::Metric => size_of::<Metric>(),
            M::Gauge => size_of::<Gauge>(),
            M::Sum => size_of::<Sum>(),
            M::Histogram => size_of::<Histogram>(),
            M::ExpHistogram => size_of::<ExponentialHistogram>(),
            M::Summary => size_of::<Summary>(),
            M::NumberPoint => size_of::<NumberDataPoint>(),
            M::HistogramPoint => size_of::<HistogramDataPoint>(),
            M::ExpHistogramPoint => size_of::<ExponentialHistogramDataPoint>(),
            M::SummaryPoint => size_of::<SummaryDataPoint>(),
            M::Buckets => size_of::<Buckets>(),
            M::Quantile => size_of::<ValueAtQuantile>(),
            M::Exemplar => size_of::<Exemplar>(),
            M::KeyValue => size_of::<KeyValue>(),
            M::AnyValue => size_of::<AnyValue>(),
            M::ArrayValue => size_of::<ArrayValue>(),
            M::KvList => size_of::<KeyValueList>(),
        }
    }

    /// Whether a length-delimited field of `self` is a `string` (as opposed to bytes, packed
    /// numbers or a message).
    pub(super) const fn is_string(self, field: u64) -> bool {
        matches!(
            (self, field),
            (M::ResourceMetrics | M::ScopeMetrics, 3)
                | (M::Scope, 1 | 2)
                | (M::Metric, 1..=3)
                | (M::KeyValue | M::AnyValue, 1)
                | (M::EntityRef, 1..=4)
        )
    }

    pub(super) const fn is_point(self) -> bool {
        matches!(
            self,
            M::NumberPoint | M::HistogramPoint | M::ExpHistogramPoint | M::SummaryPoint
        )
    }
}

impl M {
    /// How field `field` of `self` is declared; `None` for a field the schema does not know.
    pub(super) const fn decl(self, field: u64) -> Option<Decl> {
        use Decl::*;
        use M::*;
        Some(match (self, field) {
            (Request, 1) => Many(LEN),
            (ResourceMetrics, 1 | 3) | (ScopeMetrics, 1 | 3) => One(LEN),
            (ResourceMetrics, 2) | (ScopeMetrics, 2) => Many(LEN),
            (Resource, 1 | 3) => Many(LEN),
            (Resource, 2) => One(VARINT),
            (EntityRef, 1 | 2) => One(LEN),
            (EntityRef, 3 | 4) => Many(LEN),
            (Scope, 1 | 2) => One(LEN),
            (Scope, 3) => Many(LEN),
            (Scope, 4) => One(VARINT),
            (Metric, 1..=3) => One(LEN),
            (Metric, 5 | 7 | 9 | 10 | 11) => OneOf(LEN),
            (Metric, 12) => Many(LEN),
            (Gauge | Summary, 1) => Many(LEN),
            (Sum | Histogram | ExpHistogram, 1) => Many(LEN),
            (Sum | Histogram | ExpHistogram, 2) | (Sum, 3) => One(VARINT),
            (NumberPoint, 7 | 5) => Many(LEN),
            (NumberPoint, 2 | 3) => One(I64),
            (NumberPoint, 4 | 6) => OneOf(I64),
            (NumberPoint, 8) => One(VARINT),
            (HistogramPoint, 9 | 8) => Many(LEN),
            (HistogramPoint, 2..=5 | 11 | 12) => One(I64),
            (HistogramPoint, 6 | 7) => Packed64,
            (HistogramPoint, 10) => One(VARINT),
            (ExpHistogramPoint, 1 | 11) => Many(LEN),
            (ExpHistogramPoint, 2..=5 | 7 | 12..=14) => One(I64),
            (ExpHistogramPoint, 6 | 10) => One(VARINT),
            (ExpHistogramPoint, 8 | 9) => One(LEN),
            (Buckets, 1) => One(VARINT),
            (Buckets, 2) => PackedVarint,
            (SummaryPoint, 7 | 6) => Many(LEN),
            (SummaryPoint, 2..=5) => One(I64),
            (SummaryPoint, 8) => One(VARINT),
            (Quantile, 1 | 2) => One(I64),
            (Exemplar, 7) => Many(LEN),
            (Exemplar, 2) => One(I64),
            (Exemplar, 3 | 6) => OneOf(I64),
            (Exemplar, 4 | 5) => One(LEN),
            (KeyValue, 1 | 2) => One(LEN),
            (KeyValue, 3) => One(VARINT),
            (AnyValue, 1 | 5 | 6 | 7) => OneOf(LEN),
            (AnyValue, 2 | 3 | 8) => OneOf(VARINT),
            (AnyValue, 4) => OneOf(I64),
            (ArrayValue | KvList, 1) => Many(LEN),
            _ => return None,
        })
    }
}

/// Everything the walk asks about a field, found with one lookup.
#[derive(Debug, Clone, Copy)]
pub(super) struct Field {
    pub decl: Option<Decl>,
    /// The message a length-delimited field holds.
    pub child: Option<M>,
    /// Bytes of what prost builds for `child`.
    pub child_size: u32,
    pub child_is_point: bool,
    pub string: bool,
}

const UNKNOWN: Field = Field {
    decl: None,
    child: None,
    child_size: 0,
    child_is_point: false,
    string: false,
};

/// Every field number the schema declares is below this.
const FIELDS: usize = 16;

const ALL: [M; 23] = [
    M::Request,
    M::ResourceMetrics,
    M::Resource,
    M::EntityRef,
    M::ScopeMetrics,
    M::Scope,
    M::Metric,
    M::Gauge,
    M::Sum,
    M::Histogram,
    M::ExpHistogram,
    M::Summary,
    M::NumberPoint,
    M::HistogramPoint,
    M::ExpHistogramPoint,
    M::SummaryPoint,
    M::Buckets,
    M::Quantile,
    M::Exemplar,
    M::KeyValue,
    M::AnyValue,
    M::ArrayValue,
    M::KvList,
];

/// The functions above, evaluated at compile time for every (message, field number).
static TABLE: [[Field; FIELDS]; ALL.len()] = {
    let mut t = [[UNKNOWN; FIELDS]; ALL.len()];
    let mut i = 0;
    while i < ALL.len() {
        let m = ALL[i];
        let mut f = 0;
        while f < FIELDS {
            let child = m.child(f as u64);
            t[m as usize][f] = Field {
                decl: m.decl(f as u64),
                child,
                child_size: match child {
                    Some(c) => c.size() as u32,
                    None => 0,
                },
                child_is_point: match child {
                    Some(c) => c.is_point(),
                    None => false,
                },
                string: m.is_string(f as u64),
            };
            f += 1;
        }
        i += 1;
    }
    t
};

impl M {
    /// Field `n` of `self` as the schema declares it.
    #[inline]
    pub(super) fn field(self, n: u64) -> Field {
        usize::try_from(n)
            .ok()
            .and_then(|n| TABLE[self as usize].get(n))
            .copied()
            .unwrap_or(UNKNOWN)
    }
}

//! Unit tests of output labels and keys (`labels.rs`): the fast key path equals the key of the
//! label set a scrape shows, for every input.

use super::*;
use crate::workload::kv;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

/// Attributes as the wire has them: a message whose field 1 repeats them.
fn enc(kvs: &[KeyValue]) -> Vec<u8> {
    Resource {
        attributes: kvs.to_vec(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn attrs(encoded: &[u8]) -> Attrs<'_> {
    Attrs::of(encoded, 1)
}

const LIMITS: AttributeLimits = AttributeLimits {
    max_attributes: 128,
    max_name_len: 256,
    max_value_len: 4096,
};

fn projection() -> Projection {
    Projection::new(
        &["service.name".into(), "service_name".into(), "le".into()],
        &["k8s.pod.name".into()],
    )
}

/// (output key, labels) of one point through the fast path, and the key of its labels.
fn key(
    resource: &[KeyValue],
    attrs_of: &[KeyValue],
    histogram: bool,
) -> (u128, u128, Vec<(String, String)>) {
    let p = projection();
    let (resource, point) = (enc(resource), enc(attrs_of));
    let kept = p.kept_resource(attrs(&resource));
    let mut keyer = Keyer::new(&p, LIMITS);
    let res = keyer.resource(&kept, histogram);
    let rendered = ResourceLabels::new(&kept);
    let (fast, _) = keyer
        .point(
            &res,
            rendered.of(histogram),
            attrs(&point),
            histogram,
            (7, 9),
        )
        .unwrap();
    let labels = canonical(histogram, rendered.of(histogram), attrs(&point), &p);
    (fast, key_of(&labels, 7), labels)
}

#[test]
fn reserved_names_are_exported_and_the_scrape_keeps_one_le() {
    let (_, _, labels) = key(
        &[kv("service.name", "a")],
        &[
            kv("le", "x"),
            kv("__name__", "y"),
            kv("otel_metric_overflow", "true"),
        ],
        true,
    );
    let names: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "exported___name__",
            "exported_le",
            "exported_otel_metric_overflow",
            "service_name"
        ]
    );
    let (_, _, labels) = key(&[], &[kv("le", "x")], false);
    assert_eq!(
        labels,
        vec![("le".to_owned(), "x".to_owned())],
        "a counter may have le"
    );
}

#[test]
fn keys_that_sanitise_alike_on_different_points_are_one_series() {
    let (a, _, la) = key(&[], &[kv("http.method", "GET")], false);
    let (b, _, lb) = key(&[], &[kv("http_method", "GET")], false);
    assert_eq!(a, b);
    assert_eq!(la, lb);
    // On one point they are joined, in raw-key order.
    let (_, _, both) = key(
        &[],
        &[kv("http_method", "b"), kv("http.method", "a")],
        false,
    );
    assert_eq!(both, vec![("http_method".to_owned(), "a;b".to_owned())]);
}

#[test]
fn an_empty_value_is_no_label() {
    let (a, _, la) = key(&[kv("service.name", "s")], &[kv("x", "")], false);
    let (b, _, lb) = key(&[kv("service.name", "s")], &[], false);
    assert_eq!((a, la.len()), (b, 1));
    assert_eq!(la, lb);
    // An empty point value does not hide the resource's.
    let (_, _, l) = key(&[kv("service.name", "s")], &[kv("service.name", "")], false);
    assert_eq!(l, vec![("service_name".to_owned(), "s".to_owned())]);
}

#[test]
fn a_point_attribute_replaces_a_resource_attribute_of_the_same_output_name() {
    let (a, _, l) = key(
        &[kv("service.name", "s")],
        &[kv("service_name", "p")],
        false,
    );
    assert_eq!(l, vec![("service_name".to_owned(), "p".to_owned())]);
    let (b, _, _) = key(&[], &[kv("service.name", "p")], false);
    assert_eq!(a, b);
}

#[test]
fn limits_refuse_the_point() {
    let p = projection();
    let none = Attrs::default();
    let many = enc(&(0..129)
        .map(|i| kv(&format!("k{i}"), "v"))
        .collect::<Vec<_>>());
    let long = enc(&[kv("k", "v".repeat(4097))]);
    let long_key = enc(&[kv(&"k".repeat(257), "v")]);
    // Colliding names are joined: the joined value is held to the same limit.
    let joined = enc(&(0..3)
        .map(|i| kv(&format!("a{}b", [".", "_", "-"][i]), "v".repeat(2000)))
        .collect::<Vec<_>>());
    // Kept resource attributes count too.
    let many_resource = enc(&(0..200)
        .map(|_| kv("service.name", "s"))
        .collect::<Vec<_>>());
    let resource = enc(&[kv("service.name", "s".repeat(5000))]);
    let mut keyer = Keyer::new(&p, LIMITS);
    let res = keyer.resource(&[], false);
    assert_eq!(
        keyer.point(&res, &[], attrs(&many), false, (0, 0)),
        Err(Reason::TooManyAttributes)
    );
    assert_eq!(
        keyer.point(&res, &[], attrs(&long), false, (0, 0)),
        Err(Reason::AttributeTooLong)
    );
    assert_eq!(
        keyer.point(&res, &[], attrs(&long_key), false, (0, 0)),
        Err(Reason::AttributeTooLong)
    );
    assert_eq!(
        keyer.point(&res, &[], attrs(&joined), false, (0, 0)),
        Err(Reason::AttributeTooLong)
    );
    // A point without attributes of a resource encoded as `resource`.
    let point_of = |resource: &[u8]| {
        let mut keyer = Keyer::new(&p, LIMITS);
        let kept = p.kept_resource(attrs(resource));
        let res = keyer.resource(&kept, false);
        let labels = ResourceLabels::new(&kept);
        keyer.point(&res, labels.of(false), none, false, (0, 0))
    };
    assert_eq!(point_of(&many_resource), Err(Reason::TooManyAttributes));
    assert_eq!(
        point_of(&resource),
        Err(Reason::AttributeTooLong),
        "a kept resource attribute over the limit refuses its points"
    );
}

#[test]
fn the_fast_key_is_the_key_of_the_labels_for_random_points() {
    let seed = std::env::var("SPANAGG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("seed {seed} (SPANAGG_TEST_SEED reruns it)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let names = [
        "service.name",
        "service_name",
        "le",
        "__name__",
        "_.x",
        "http.method",
        "http_method",
        "a-b",
        "a_b",
        "1x",
        "",
        "k8s.pod.name",
        "otel_metric_overflow",
        "ü",
    ];
    let values = ["", "x", "y", "GET", "ä;b", "\"q\"\n"];
    // Some values of other kinds: the keys hash their label text, as a scrape shows it.
    let typed = [
        Value::IntValue(-42),
        Value::BoolValue(true),
        Value::DoubleValue(0.5),
        Value::BytesValue(vec![0, 255]),
        Value::StringValue("x".into()),
    ];
    let pick = |rng: &mut fastrand::Rng| {
        let k = names[rng.usize(..names.len())];
        if rng.u8(..8) == 0 {
            let mut kv = kv(k, "");
            kv.value = Some(AnyValue {
                value: Some(typed[rng.usize(..typed.len())].clone()),
            });
            return kv;
        }
        kv(k, values[rng.usize(..values.len())])
    };
    let mut cases: Vec<(Vec<KeyValue>, Vec<KeyValue>, bool)> = Vec::new();
    for _ in 0..5_000 {
        let resource = (0..rng.usize(0..4)).map(|_| pick(&mut rng)).collect();
        // A third of the points repeat an earlier point's attributes, of either kind, as a
        // calls counter and a duration histogram do.
        let attrs = match rng.u8(..3) {
            0 if !cases.is_empty() => cases[rng.usize(..cases.len())].1.clone(),
            _ => (0..rng.usize(0..6)).map(|_| pick(&mut rng)).collect(),
        };
        cases.push((resource, attrs, rng.bool()));
    }
    // One keyer for every point, as `prepare` uses one per request: its caches (names by raw
    // key and by position, shared between kinds) are part of what is checked, against a keyer
    // that has seen nothing before.
    let encoded: Vec<(Vec<u8>, Vec<u8>)> = cases
        .iter()
        .map(|(resource, point, _)| (enc(resource), enc(point)))
        .collect();
    let p = projection();
    let mut keyer = Keyer::new(&p, LIMITS);
    for ((resource, attrs_of, histogram), (r, a)) in cases.iter().zip(&encoded) {
        let histogram = *histogram;
        let kept = p.kept_resource(attrs(r));
        let res = keyer.resource(&kept, histogram);
        let rendered = ResourceLabels::new(&kept);
        let before = keyer.relabeled;
        let keys = keyer
            .point(&res, rendered.of(histogram), attrs(a), histogram, (7, 9))
            .unwrap();
        let mut cold = Keyer::new(&p, LIMITS);
        let cold_res = cold.resource(&kept, histogram);
        let cold_keys = cold
            .point(
                &cold_res,
                rendered.of(histogram),
                attrs(a),
                histogram,
                (7, 9),
            )
            .unwrap();
        assert_eq!(keys, cold_keys, "seed {seed}: {resource:?} {attrs_of:?}");
        let counted = Relabeled {
            reserved: keyer.relabeled.reserved - before.reserved,
            colliding: keyer.relabeled.colliding - before.colliding,
        };
        assert_eq!(counted, cold.relabeled, "seed {seed}: {attrs_of:?}");
        // Renamed: a label of the point (a kept point attribute or resource one, not empty)
        // has a reserved name for its kind.
        let (mut value, mut name) = (String::new(), String::new());
        let mut renames = |kv: &KeyValueView<'_>| {
            !value_str(kv.value, &mut value).is_empty()
                && output_label_name(kv.key, histogram, &mut name)
        };
        let reserved = attrs(a).iter().any(|kv| p.keeps(kv.key) && renames(&kv))
            || kept.iter().any(&mut renames);
        assert_eq!(
            counted.reserved,
            u64::from(reserved),
            "seed {seed}: {attrs_of:?}"
        );
        let labels = canonical(histogram, rendered.of(histogram), attrs(a), &p);
        assert_eq!(
            keys.0,
            key_of(&labels, 7),
            "seed {seed}: {resource:?} {attrs_of:?} -> {labels:?}"
        );
        let mut seen = std::collections::HashSet::new();
        for (k, v) in &labels {
            assert!(!v.is_empty() && seen.insert(k), "seed {seed}: {labels:?}");
            assert!(
                !(k.starts_with("__") || histogram && k == "le"),
                "{labels:?}"
            );
        }
    }
}

#[test]
fn a_joined_resource_value_over_the_limit_refuses_only_the_points_it_labels() {
    let p = projection();
    let resource = enc(&[
        kv("service.name", "a".repeat(3000)),
        kv("service_name", "b".repeat(3000)),
    ]);
    let shadowing = enc(&[kv("service_name", "p")]);
    let mut keyer = Keyer::new(&p, LIMITS);
    let kept = p.kept_resource(attrs(&resource));
    let res = keyer.resource(&kept, false);
    let labels = ResourceLabels::new(&kept);
    assert_eq!(
        labels.of(false)[0].1.len(),
        6001,
        "joined once, with the resource"
    );
    assert_eq!(
        keyer.point(&res, labels.of(false), Attrs::default(), false, (0, 0)),
        Err(Reason::AttributeTooLong)
    );
    // A point attribute of the same output name replaces the joined value: it is fine.
    assert!(keyer
        .point(&res, labels.of(false), attrs(&shadowing), false, (0, 0))
        .is_ok());
}

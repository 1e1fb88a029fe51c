//! Arrow building blocks that the snapshot (`export/arrow.rs`) and the checkpoint
//! (`storage/columns.rs`) share: column types, the split of labels into fixed columns and a map,
//! and a schema's documented text.
//!
//! Both schemas are contracts (`schema/*.txt`), and the checkpoint's schema hash decides whether
//! an old file can be restored. They sit below both so that a change to the snapshot schema
//! cannot change the checkpoint's without anyone meaning it: only a change here touches both.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::builder::{MapBuilder, StringBuilder, StringDictionaryBuilder};
use arrow_array::types::Int32Type;
use arrow_schema::{ArrowError, DataType, Field, Schema, TimeUnit};

/// Output labels that get their own dictionary-encoded column; the rest go to `labels`.
pub const FIXED_LABELS: [&str; 4] = ["service_name", "span_name", "span_kind", "status_code"];

/// A field with its documentation (what `schema_text` prints after `--`).
pub(crate) fn doc(f: Field, text: &str) -> Field {
    f.with_metadata(HashMap::from([("doc".to_owned(), text.to_owned())]))
}

/// Dictionary-encoded strings.
pub(crate) fn dict() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// Nanosecond UTC timestamps.
pub(crate) fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// The `labels` column: every output label without a column of its own, name to value.
pub(crate) fn label_map() -> DataType {
    let entries = Field::new(
        "entries",
        DataType::Struct(
            vec![
                Field::new("key", DataType::Utf8, false),
                Field::new("value", DataType::Utf8, true),
            ]
            .into(),
        ),
        false,
    );
    DataType::Map(Arc::new(entries), false)
}

pub(crate) type LabelMapBuilder = MapBuilder<StringBuilder, StringBuilder>;

/// Appends one series' labels: those in `FIXED_LABELS` to their columns, the rest to the map.
pub(crate) fn append_labels<'a>(
    labels: impl Iterator<Item = (&'a str, &'a str)>,
    fixed: &mut [StringDictionaryBuilder<Int32Type>],
    map: &mut LabelMapBuilder,
) -> Result<(), ArrowError> {
    let mut present = [None; FIXED_LABELS.len()];
    for (k, v) in labels {
        match FIXED_LABELS.iter().position(|f| *f == k) {
            Some(i) => present[i] = Some(v),
            None => {
                map.keys().append_value(k);
                map.values().append_value(v);
            }
        }
    }
    map.append(true)?;
    for (b, v) in fixed.iter_mut().zip(present) {
        b.append_option(v);
    }
    Ok(())
}

/// The field lines of a documented schema file (`schema/*.txt`), for the tests that keep the
/// files and the code equal.
#[cfg(test)]
pub(crate) fn documented_fields(file: &str) -> String {
    let path = format!("{}/schema/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A schema as `schema/*.txt` documents it: one line per field, its documentation after `--`.
pub fn schema_text(schema: &Schema) -> String {
    let mut out = String::new();
    for f in schema.fields() {
        let doc = f.metadata().get("doc").map_or("", String::as_str);
        let null = if f.is_nullable() {
            "nullable"
        } else {
            "required"
        };
        out.push_str(&format!(
            "{}: {} ({null}) -- {doc}\n",
            f.name(),
            f.data_type()
        ));
    }
    out
}

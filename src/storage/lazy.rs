//! Checkpoint columns that cost nothing where a batch's rows leave them empty.
//!
//! A checkpoint batch holds one kind of row, and each kind fills only some of the schema's
//! columns: a million delta-stream rows leave the series columns, the value columns and the
//! cumulative columns null. A builder still stores 4–8 bytes per null; at 2 M streams those
//! nulls were most of a checkpoint's transient memory. A [`Lazy`] column starts building on its
//! first value (the rows before it null); a column no row filled becomes a null column over one
//! zeroed buffer that every such column of the batch shares.
//!
//! Invariant: every row appends exactly one value or null to every column, so all columns of
//! a batch have the same length (`RecordBatch::try_new` checks it).

use std::sync::Arc;

use arrow_array::builder::{
    ArrayBuilder, GenericListBuilder, MapBuilder, PrimitiveBuilder, StringBuilder,
    StringDictionaryBuilder,
};
use arrow_array::types::Int32Type;
use arrow_array::{make_array, ArrayRef, ArrowPrimitiveType};
use arrow_buffer::{Buffer, MutableBuffer};
use arrow_data::ArrayData;
use arrow_schema::{ArrowError, DataType, SchemaRef};

/// A column (or a group of adjacent columns) a batch can leave wholly null.
pub trait Column {
    fn fill_nulls(&mut self, n: usize);
    /// Its arrays, in schema order.
    fn finish_into(&mut self, out: &mut Vec<ArrayRef>);
}

impl<T: ArrowPrimitiveType> Column for PrimitiveBuilder<T> {
    fn fill_nulls(&mut self, n: usize) {
        self.append_nulls(n);
    }
    fn finish_into(&mut self, out: &mut Vec<ArrayRef>) {
        out.push(Arc::new(self.finish()));
    }
}

impl Column for StringDictionaryBuilder<Int32Type> {
    fn fill_nulls(&mut self, n: usize) {
        self.append_nulls(n);
    }
    fn finish_into(&mut self, out: &mut Vec<ArrayRef>) {
        out.push(Arc::new(self.finish()));
    }
}

impl<B: ArrayBuilder> Column for GenericListBuilder<i32, B> {
    fn fill_nulls(&mut self, n: usize) {
        (0..n).for_each(|_| self.append_null());
    }
    fn finish_into(&mut self, out: &mut Vec<ArrayRef>) {
        out.push(Arc::new(self.finish()));
    }
}

impl Column for MapBuilder<StringBuilder, StringBuilder> {
    fn fill_nulls(&mut self, n: usize) {
        // Fails only when keys and values differ in length, and a null appends neither.
        (0..n).for_each(|_| {
            let _ = self.append(false);
        });
    }
    fn finish_into(&mut self, out: &mut Vec<ArrayRef>) {
        out.push(Arc::new(self.finish()));
    }
}

impl<C: Column> Column for Vec<C> {
    fn fill_nulls(&mut self, n: usize) {
        self.iter_mut().for_each(|c| c.fill_nulls(n));
    }
    fn finish_into(&mut self, out: &mut Vec<ArrayRef>) {
        self.iter_mut().for_each(|c| c.finish_into(out));
    }
}

/// A column built on its first value.
pub struct Lazy<C> {
    make: fn(usize) -> C,
    /// Rows the batch will have: the builder's capacity once it is made.
    capacity: usize,
    /// Schema columns this spans.
    width: usize,
    /// Rows so far, all null, while nothing is built.
    nulls: usize,
    built: Option<C>,
}

impl<C: Column> Lazy<C> {
    pub fn new(capacity: usize, make: fn(usize) -> C) -> Self {
        Self::wide(1, capacity, make)
    }

    /// A group of `width` adjacent columns, filled together.
    pub fn wide(width: usize, capacity: usize, make: fn(usize) -> C) -> Self {
        Self {
            make,
            capacity,
            width,
            nulls: 0,
            built: None,
        }
    }

    pub fn null(&mut self) {
        match &mut self.built {
            Some(c) => c.fill_nulls(1),
            None => self.nulls += 1,
        }
    }

    /// The builder, made now if this is the first value (the rows before it null).
    pub fn get(&mut self) -> &mut C {
        let (make, capacity, nulls) = (self.make, self.capacity, self.nulls);
        self.built.get_or_insert_with(|| {
            let mut c = make(capacity);
            c.fill_nulls(nulls);
            c
        })
    }

    /// Appends its arrays to `out`, the next columns of `schema`; all null over `zeros` if
    /// nothing was built.
    pub fn finish_into(
        mut self,
        out: &mut Vec<ArrayRef>,
        schema: &SchemaRef,
        zeros: &mut Zeros,
    ) -> Result<(), ArrowError> {
        if let Some(c) = &mut self.built {
            c.finish_into(out);
            return Ok(());
        }
        for _ in 0..self.width {
            let field = schema
                .fields()
                .get(out.len())
                .ok_or_else(|| ArrowError::SchemaError("more columns than fields".into()))?;
            out.push(zeros.null_column(field.data_type(), self.nulls)?);
        }
        Ok(())
    }
}

impl<T: ArrowPrimitiveType> Lazy<PrimitiveBuilder<T>> {
    pub fn option(&mut self, v: Option<T::Native>) {
        match v {
            Some(v) => self.get().append_value(v),
            None => self.null(),
        }
    }
}

/// One zeroed buffer for a batch's all-null columns, made on first use.
#[derive(Default)]
pub struct Zeros(Option<Buffer>);

impl Zeros {
    /// An all-null column of `len` rows of type `dt`. Its validity bits, values, dictionary
    /// keys or list offsets are all zero: slices of one buffer.
    fn null_column(&mut self, dt: &DataType, len: usize) -> Result<ArrayRef, ArrowError> {
        let need = (len + 1) * 8;
        let zeros = match &self.0 {
            Some(z) if z.len() >= need => z.clone(),
            _ => {
                let z = Buffer::from(MutableBuffer::from_len_zeroed(need));
                self.0 = Some(z.clone());
                z
            }
        };
        let bits = zeros.slice_with_length(0, len.div_ceil(8));
        let (buffers, children) = match dt {
            DataType::Dictionary(keys, values) => {
                let width = keys.primitive_width().unwrap_or(8);
                (
                    vec![zeros.slice_with_length(0, len * width)],
                    vec![ArrayData::new_empty(values)],
                )
            }
            DataType::List(f) | DataType::Map(f, _) => (
                vec![zeros.slice_with_length(0, (len + 1) * 4)],
                vec![ArrayData::new_empty(f.data_type())],
            ),
            other => match other.primitive_width() {
                Some(w) if w <= 8 => (vec![zeros.slice_with_length(0, len * w)], vec![]),
                _ => return Ok(arrow_array::new_null_array(dt, len)),
            },
        };
        let data = ArrayData::try_new(dt.clone(), len, Some(bits), 0, buffers, children)?;
        Ok(make_array(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::builder::{Float64Builder, ListBuilder, UInt64Builder};
    use arrow_array::{Array, RecordBatch};
    use arrow_schema::{Field, Schema};

    #[test]
    fn unfilled_columns_are_null_over_one_buffer_and_filled_ones_keep_their_leading_nulls() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("a", DataType::UInt64, true),
            Field::new("b", crate::columnar::dict(), true),
            Field::new(
                "c",
                DataType::List(Arc::new(Field::new_list_field(DataType::Float64, true))),
                true,
            ),
            Field::new("d", crate::columnar::label_map(), true),
            Field::new("e", crate::columnar::ts(), true),
        ]));
        let mut a = Lazy::new(4, UInt64Builder::with_capacity);
        let mut b = Lazy::new(4, |n| {
            StringDictionaryBuilder::<Int32Type>::with_capacity(n, 1, 1)
        });
        let mut c = Lazy::new(4, |n| ListBuilder::with_capacity(Float64Builder::new(), n));
        let mut d = Lazy::new(4, |n| {
            MapBuilder::with_capacity(None, StringBuilder::new(), StringBuilder::new(), n)
        });
        let mut e = Lazy::new(4, |n| {
            arrow_array::builder::TimestampNanosecondBuilder::with_capacity(n).with_timezone("UTC")
        });
        for i in 0..3u64 {
            a.option((i == 2).then_some(7));
            b.null();
            c.null();
            d.null();
            e.null();
        }
        let (mut cols, mut zeros) = (Vec::new(), Zeros::default());
        a.finish_into(&mut cols, &schema, &mut zeros).unwrap();
        b.finish_into(&mut cols, &schema, &mut zeros).unwrap();
        c.finish_into(&mut cols, &schema, &mut zeros).unwrap();
        d.finish_into(&mut cols, &schema, &mut zeros).unwrap();
        e.finish_into(&mut cols, &schema, &mut zeros).unwrap();
        let batch = RecordBatch::try_new(schema, cols).unwrap();
        assert_eq!(batch.num_rows(), 3);
        let a = batch.column(0);
        assert_eq!((a.null_count(), a.is_valid(2)), (2, true));
        for col in &batch.columns()[1..] {
            assert_eq!(col.null_count(), 3, "{col:?}");
        }
        // The null columns share one allocation.
        let z = zeros.0.unwrap();
        assert_eq!(z.len(), 4 * 8);
        assert_eq!(batch.column(1).to_data().buffers()[0].as_ptr(), z.as_ptr());
        assert_eq!(batch.column(4).to_data().buffers()[0].as_ptr(), z.as_ptr());
    }
}

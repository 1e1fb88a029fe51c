//! Histogram bucket layouts: validated once, compared by value, and the exact folding of a finer
//! layout into a coarser one. A mismatch is a typed error, never interpolation.

use std::sync::Arc;

/// Why a set of bounds is not a layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("bucket bounds must be finite")]
    NotFinite,
    #[error("bucket bounds must be strictly increasing")]
    NotIncreasing,
    #[error("too many bucket bounds (at most {max})", max = MAX_BOUNDS)]
    TooMany,
}

/// Far more than any real span-metrics layout; keeps a hostile point from costing much.
pub const MAX_BOUNDS: usize = 4096;

/// Explicit bucket upper bounds, finite and strictly increasing; the `+Inf` bucket is implied.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketLayout {
    bounds: Arc<[f64]>,
}

impl BucketLayout {
    pub fn try_new(bounds: Vec<f64>) -> Result<Self, LayoutError> {
        Self::check(&bounds)?;
        Ok(Self {
            bounds: bounds.into(),
        })
    }

    /// Validates bounds without taking them.
    pub fn check(bounds: &[f64]) -> Result<(), LayoutError> {
        if bounds.len() > MAX_BOUNDS {
            return Err(LayoutError::TooMany);
        }
        if bounds.iter().any(|b| !b.is_finite()) {
            return Err(LayoutError::NotFinite);
        }
        if bounds.windows(2).any(|w| w[0] >= w[1]) {
            return Err(LayoutError::NotIncreasing);
        }
        Ok(())
    }

    pub fn bounds(&self) -> &[f64] {
        &self.bounds
    }

    /// Number of buckets, `+Inf` included.
    pub fn buckets(&self) -> usize {
        self.bounds.len() + 1
    }
}

/// A point whose layout cannot merge exactly into the output layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bucket bounds do not contain every output bound")]
pub struct LayoutMismatch;

/// For each input bucket, the output bucket it falls in wholly. Exists only when every output
/// bound is also an input bound: then input bucket (a, b] lies inside exactly one output bucket.
pub fn fold_map(input: &[f64], output: &[f64]) -> Result<Vec<u16>, LayoutMismatch> {
    let mut map = Vec::with_capacity(input.len() + 1);
    let mut j = 0usize;
    for &upper in input {
        // Every output bound must appear among the input bounds, in order.
        if j < output.len() && output[j] < upper {
            return Err(LayoutMismatch);
        }
        map.push(j as u16);
        if j < output.len() && output[j] == upper {
            j += 1;
        }
    }
    if j != output.len() {
        return Err(LayoutMismatch);
    }
    map.push(output.len() as u16);
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_refuse_nan_infinite_and_unsorted_bounds() {
        assert_eq!(
            BucketLayout::try_new(vec![1.0, f64::NAN]),
            Err(LayoutError::NotFinite)
        );
        assert_eq!(
            BucketLayout::try_new(vec![f64::INFINITY]),
            Err(LayoutError::NotFinite)
        );
        assert_eq!(
            BucketLayout::try_new(vec![1.0, 1.0]),
            Err(LayoutError::NotIncreasing)
        );
        assert!(BucketLayout::try_new(vec![]).is_ok());
    }

    #[test]
    fn identical_layouts_map_bucket_to_bucket() {
        assert_eq!(fold_map(&[1.0, 2.0], &[1.0, 2.0]), Ok(vec![0, 1, 2]));
    }

    #[test]
    fn finer_layout_folds_into_coarser_buckets_exactly() {
        // input buckets: (-inf,1] (1,2] (2,5] (5,10] (10,inf)
        // output:        (-inf,2]       (2,10]        (10,inf)
        let map = fold_map(&[1.0, 2.0, 5.0, 10.0], &[2.0, 10.0]).unwrap();
        assert_eq!(map, vec![0, 0, 1, 1, 2]);
    }

    #[test]
    fn missing_output_bound_is_a_mismatch() {
        assert_eq!(fold_map(&[1.0, 5.0], &[2.0]), Err(LayoutMismatch));
        assert_eq!(fold_map(&[1.0], &[1.0, 2.0]), Err(LayoutMismatch));
        assert_eq!(fold_map(&[], &[1.0]), Err(LayoutMismatch));
    }

    #[test]
    fn empty_output_layout_takes_everything_into_inf() {
        assert_eq!(fold_map(&[1.0, 2.0], &[]), Ok(vec![0, 0, 0]));
    }
}

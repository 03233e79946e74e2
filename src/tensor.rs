//! A small host tensor: a shape and contiguous row-major `f32` storage.
//!
//! Used at the edges (fixtures, checkpoints, tests, generation); the training hot path works on
//! flat arenas and slices (see `models::params`). bf16 arrives with the CUDA backend.

use thiserror::Error;

/// Element type of a tensor. Only `F32` exists on the CPU path today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
}

/// Errors from building or reshaping a tensor.
#[derive(Debug, Error, PartialEq)]
pub enum TensorError {
    #[error("tensor shape {shape:?} holds {expected} elements but {got} were given")]
    LenMismatch { shape: Vec<usize>, expected: usize, got: usize },
}

/// A contiguous, row-major tensor of `f32`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Self { shape: shape.to_vec(), data: vec![0.0; shape.iter().product()] }
    }

    /// Wraps `data` with `shape`.
    ///
    /// # Errors
    /// [`TensorError::LenMismatch`] when `data.len()` is not the product of `shape`.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Self, TensorError> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(TensorError::LenMismatch { shape: shape.to_vec(), expected, got: data.len() });
        }
        Ok(Self { shape: shape.to_vec(), data })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        DType::F32
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_vec_checks_length() {
        assert!(Tensor::from_vec(&[2, 3], vec![0.0; 6]).is_ok());
        let err = Tensor::from_vec(&[2, 3], vec![0.0; 5]).unwrap_err();
        assert_eq!(err, TensorError::LenMismatch { shape: vec![2, 3], expected: 6, got: 5 });
    }
}

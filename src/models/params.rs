//! Parameter tables and flat arenas. A model describes its parameters as a table of
//! (name, shape, weight-decay flag); parameters, gradients and optimizer moments each live in
//! one contiguous `Vec<f32>` laid out by that table, and layers read views (spans) into it.
//! Flat buffers make bucketed all-reduce and ZeRO sharding a matter of offsets.

/// A contiguous range of an arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub offset: usize,
    pub len: usize,
}

impl Span {
    pub fn range(self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// One parameter tensor in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub span: Span,
    /// Whether AdamW's decoupled weight decay applies (matrices yes; biases and norms no).
    pub decay: bool,
}

/// The (name, shape) table of a model's parameters, in arena order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamTable {
    specs: Vec<ParamSpec>,
    total: usize,
}

impl ParamTable {
    /// Appends a tensor; returns its span.
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize], decay: bool) -> Span {
        let len = shape.iter().product();
        let span = Span { offset: self.total, len };
        self.specs.push(ParamSpec { name: name.into(), shape: shape.to_vec(), span, decay });
        self.total += len;
        span
    }

    /// Total number of elements.
    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    pub fn get(&self, name: &str) -> Option<&ParamSpec> {
        self.specs.iter().find(|s| s.name == name)
    }
}

/// Two disjoint mutable views of one arena (`a` must end before `b` starts).
///
/// # Panics
/// When the spans overlap or are out of order (a bug in the caller's layout, not user input).
pub fn two_mut(buf: &mut [f32], a: Span, b: Span) -> (&mut [f32], &mut [f32]) {
    assert!(a.offset + a.len <= b.offset, "spans out of order: {a:?} {b:?}");
    let (lo, hi) = buf.split_at_mut(b.offset);
    (&mut lo[a.range()], &mut hi[..b.len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lays_out_contiguously() {
        let mut t = ParamTable::default();
        let a = t.push("a", &[2, 3], true);
        let b = t.push("b", &[3], false);
        assert_eq!(a, Span { offset: 0, len: 6 });
        assert_eq!(b, Span { offset: 6, len: 3 });
        assert_eq!(t.len(), 9);
        assert!(!t.get("b").unwrap().decay);
        let mut buf = vec![0.0; 9];
        let (x, y) = two_mut(&mut buf, a, b);
        x[0] = 1.0;
        y[2] = 2.0;
        assert_eq!(buf[0], 1.0);
        assert_eq!(buf[8], 2.0);
    }
}

//! `--set key=value` overrides on the TOML tree (the Megatron-style flags of `troupe train`,
//! `--lr` → `train.lr` and the like, become such overrides in the binary's `cli::train`).
//!
//! A value is parsed as a TOML literal (`3e-4`, `true`, `"text"`, `[1, 2]`); anything that does
//! not parse as one is taken as a string, so `--set checkpoint.save=runs/a` works unquoted.

use super::ConfigError;

/// Applies one `dotted.key=value` to the tree.
///
/// # Errors
/// [`ConfigError::Invalid`] when the text has no `=`, the key is empty, or a path segment is
/// not a table.
pub fn apply(root: &mut toml::Table, set: &str) -> Result<(), ConfigError> {
    let invalid =
        |reason: &str| ConfigError::Invalid { key: set.into(), value: String::new(), reason: reason.into() };
    let (key, raw) = set.split_once('=').ok_or_else(|| invalid("expected KEY=VALUE, e.g. train.lr=3e-4"))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if key.is_empty() || parts.iter().any(|p| p.is_empty()) {
        return Err(invalid("expected a dotted key such as train.lr"));
    }
    let value = parse_value(raw.trim());
    let mut table = root;
    for seg in &parts[..parts.len() - 1] {
        let entry = table.entry(seg.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| invalid(&format!("`{seg}` is not a section")))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_toml_or_string() {
        let mut t = toml::Table::new();
        apply(&mut t, "a.b=3").unwrap();
        apply(&mut t, "a.c=runs/x").unwrap();
        apply(&mut t, "a.d=[\"0.3\", \"p\"]").unwrap();
        assert_eq!(t["a"]["b"].as_integer(), Some(3));
        assert_eq!(t["a"]["c"].as_str(), Some("runs/x"));
        assert_eq!(t["a"]["d"].as_array().map(Vec::len), Some(2));
        assert!(apply(&mut t, "novalue").is_err());
        assert!(apply(&mut t, "a.b.c=1").is_err(), "a.b is a number, not a section");
    }
}

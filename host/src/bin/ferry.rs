//! The `ferry` command (not yet written).
fn main() {}

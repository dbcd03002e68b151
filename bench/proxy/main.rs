//! Placeholder; the side-by-side benchmark lands here.
fn main() {}

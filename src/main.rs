//! `vmm`: command line entry point.
fn main() {}

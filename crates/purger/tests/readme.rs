//! The configuration reference (docs/configuration.md) says exactly what `purger --help` says.

#[test]
fn configuration_reference_matches_help() {
    testbed::reference::assert_reference_matches_help("purger", env!("CARGO_BIN_EXE_purger"));
}

//! The configuration reference (docs/configuration.md) says exactly what `consumer --help` says.

#[test]
fn configuration_reference_matches_help() {
    testbed::reference::assert_reference_matches_help("consumer", env!("CARGO_BIN_EXE_consumer"));
}

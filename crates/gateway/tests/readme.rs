//! The configuration reference (docs/configuration.md) says exactly what `gateway --help` says.

#[test]
fn configuration_reference_matches_help() {
    testbed::reference::assert_reference_matches_help("gateway", env!("CARGO_BIN_EXE_gateway"));
}

//! The configuration reference (docs/configuration.md) says exactly what `producer --help` says.

#[test]
fn configuration_reference_matches_help() {
    testbed::reference::assert_reference_matches_help("producer", env!("CARGO_BIN_EXE_producer"));
}

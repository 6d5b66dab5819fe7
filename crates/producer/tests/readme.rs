//! The README's configuration reference says exactly what `producer --help` says.

#[test]
fn readme_configuration_matches_help() {
    testbed::reference::assert_readme_matches_help("producer", env!("CARGO_BIN_EXE_producer"));
}

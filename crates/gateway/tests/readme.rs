//! The README's configuration reference says exactly what `gateway --help` says.

#[test]
fn readme_configuration_matches_help() {
    testbed::reference::assert_readme_matches_help("gateway", env!("CARGO_BIN_EXE_gateway"));
}

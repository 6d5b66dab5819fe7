//! The README's configuration reference says exactly what `purger --help` says.

#[test]
fn readme_configuration_matches_help() {
    testbed::reference::assert_readme_matches_help("purger", env!("CARGO_BIN_EXE_purger"));
}

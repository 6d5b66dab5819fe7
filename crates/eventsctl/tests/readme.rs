//! The README's configuration reference says exactly what `eventsctl --help` says.

#[test]
fn readme_configuration_matches_help() {
    testbed::reference::assert_readme_matches_help("eventsctl", env!("CARGO_BIN_EXE_eventsctl"));
}

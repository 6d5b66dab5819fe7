//! The configuration reference (docs/configuration.md) says exactly what `eventsctl --help` says.

#[test]
fn configuration_reference_matches_help() {
    testbed::reference::assert_reference_matches_help("eventsctl", env!("CARGO_BIN_EXE_eventsctl"));
}

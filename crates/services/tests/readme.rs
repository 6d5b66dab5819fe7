//! The configuration reference (docs/configuration.md) says exactly what `migrate --help` says.

#[test]
fn configuration_reference_matches_help() {
    testbed::reference::assert_reference_matches_help("migrate", env!("CARGO_BIN_EXE_migrate"));
}

//! The README's configuration reference says exactly what `migrate --help` says.

#[test]
fn readme_configuration_matches_help() {
    testbed::reference::assert_readme_matches_help("migrate", env!("CARGO_BIN_EXE_migrate"));
}

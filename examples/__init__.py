"""Example tasks and scripts, each run end to end by the tests (a package: opacus installs a top-level "examples" too)."""

//! End-to-end tests live in tests/; labtool is in src/bin.

//! coffre's integration tests: one binary made of modules.

mod format;

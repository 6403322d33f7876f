//! End-to-end tests of the real `sensord` binary on loopback, asserting on
//! rows in real databases and on exit codes. One test binary, as ripgrep
//! does, so the binary is built once.

mod cli;
mod dashboard;
mod faults;
mod hardening;
mod ops;
mod postgres;
mod sensors;
mod serve;
mod sqlite;
mod util;

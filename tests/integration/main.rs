//! End-to-end tests of the real `sensord` binary on loopback, asserting on
//! rows in real databases and on exit codes. One test binary, as ripgrep
//! does, so the binary is built once.

mod cli;
mod dashboard;
mod delivery;
mod faults;
mod hardening;
mod lossy;
mod ops;
mod postgres;
mod python_client;
mod relay;
mod sensors;
mod serve;
mod sqlite;
mod util;

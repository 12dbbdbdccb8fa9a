//! The shipped deployment files under test: nginx/runbookd.conf in front of a real runbookd
//! (streaming, long silences, client disconnects, 500 concurrent streams, forwarded headers,
//! several instances) and systemd/runbookd.service checked by systemd-analyze. Tests that need
//! nginx, openssl or systemd-analyze are ignored by a plain `cargo test` and fail if the tool is
//! missing; CI runs them. The checks of the files' text always run.

mod nginx;
mod nginx_conf;
mod nginx_fixture;
mod systemd;

pub(crate) use nginx_conf::*;
pub(crate) use nginx_fixture::*;
pub(crate) use systemd::unit_service_settings;

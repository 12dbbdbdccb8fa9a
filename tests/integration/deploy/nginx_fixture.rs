//! nginx in front of a test runbookd: the fixture (its own prefix directory, started on a free
//! port, stopped on drop), `nginx -t`, and requests through it.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

use super::*;

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

pub(crate) fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Raises this process's soft descriptor limit to its hard limit (with prlimit(1), as the
/// tests use no unsafe code) and returns the new soft limit.
pub(crate) fn raise_own_nofile_limit() -> u64 {
    let read = || -> (u64, u64) {
        let limits = fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("no open files line in /proc/self/limits");
        let fields: Vec<&str> = line.split_whitespace().collect();
        let number = |s: &str| {
            if s == "unlimited" {
                u64::MAX
            } else {
                s.parse().unwrap()
            }
        };
        (number(fields[3]), number(fields[4]))
    };
    let (soft, hard) = read();
    if soft < hard {
        let hard_text = if hard == u64::MAX {
            "unlimited".to_string()
        } else {
            hard.to_string()
        };
        let prlimit = find_program("prlimit").expect("prlimit (util-linux) is needed");
        let out = Command::new(prlimit)
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard_text}:{hard_text}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "prlimit failed: {}",
            output_text(&out)
        );
    }
    read().0
}

// ---------------------------------------------------------------------------------------------
// nginx fixture
// ---------------------------------------------------------------------------------------------

/// The main nginx.conf around a site config: everything inside `dir`.
pub(crate) fn main_conf(dir: &Path, site: &Path) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\n\
         worker_rlimit_nofile 8192;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{\n    worker_connections 4096;\n}}\n\
         http {{\n\
         \x20   access_log {d}/access.log;\n\
         \x20   client_body_temp_path {d}/client_body_temp;\n\
         \x20   proxy_temp_path {d}/proxy_temp;\n\
         \x20   fastcgi_temp_path {d}/fastcgi_temp;\n\
         \x20   uwsgi_temp_path {d}/uwsgi_temp;\n\
         \x20   scgi_temp_path {d}/scgi_temp;\n\
         \x20   include {};\n\
         }}\n",
        site.display()
    )
}

pub(crate) fn nginx_args(dir: &Path) -> Vec<String> {
    vec![
        "-p".into(),
        format!("{}/", dir.display()),
        "-e".into(),
        dir.join("error.log").display().to_string(),
        "-c".into(),
        dir.join("nginx.conf").display().to_string(),
    ]
}

/// `nginx -t` of `site` wrapped in a main config; returns its output.
pub(crate) fn nginx_check(bin: &Path, site: &Path) -> Output {
    let dir = unique_root();
    fs::write(dir.join("nginx.conf"), main_conf(&dir, site)).unwrap();
    let out = Command::new(bin)
        .args(nginx_args(&dir))
        .arg("-t")
        .output()
        .unwrap();
    let _ = fs::remove_dir_all(&dir);
    out
}

/// A real nginx in the foreground, stopped on drop.
pub(crate) struct Nginx {
    bin: PathBuf,
    dir: PathBuf,
    child: Child,
    pub(crate) port: u16,
}

impl Nginx {
    /// Starts nginx with `site` (a config for the http block, listening on `port`).
    pub(crate) fn start(bin: &Path, site: &str, port: u16) -> Nginx {
        let dir = unique_root();
        let site_path = dir.join("site.conf");
        fs::write(&site_path, site).unwrap();
        fs::write(dir.join("nginx.conf"), main_conf(&dir, &site_path)).unwrap();
        let log = fs::File::create(dir.join("nginx.out")).unwrap();
        let child = Command::new(bin)
            .args(nginx_args(&dir))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Nginx {
            bin: bin.to_path_buf(),
            dir,
            child,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}):\n{}", nginx.logs());
            }
            assert!(
                Instant::now() < deadline,
                "nginx does not listen on {port}:\n{}",
                nginx.logs()
            );
            thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    /// The shipped config in front of `server`.
    pub(crate) fn shipped_in_front_of(bin: &Path, server: &Server) -> Nginx {
        Nginx::in_front_of(bin, server, &shipped_nginx_conf())
    }

    pub(crate) fn in_front_of(bin: &Path, server: &Server, conf: &str) -> Nginx {
        let port = free_port();
        Nginx::start(bin, &site_conf(conf, server.port, port), port)
    }

    fn logs(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "--- nginx output ---\n{}--- error.log ---\n{}",
            read("nginx.out"),
            read("error.log")
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The master stops its workers; a plain kill of the master would leave them running.
        let _ = Command::new(&self.bin)
            .args(nginx_args(&self.dir))
            .args(["-s", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let stopped = wait_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
        if std::env::var_os("RUNBOOKD_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Requests through nginx
// ---------------------------------------------------------------------------------------------

pub(crate) fn get(port: u16, path: &str, token: Option<&str>) -> Response {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    request(port, "GET", path, &headers, None)
}

pub(crate) fn sync_execute(port: u16, file: &str, token: &str) -> Response {
    let auth = format!("Bearer {token}");
    request(
        port,
        "POST",
        &format!("/api/runbooks/{file}/execute"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(br#"{"env_vars":{}}"#),
    )
}

/// Base options of the runbookd behind nginx in these tests.
pub(crate) fn server_opts() -> ServerOpts {
    ServerOpts::new().env("MAX_CONCURRENT_RUNS", "1000")
}

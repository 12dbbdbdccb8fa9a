//! `curl` as the client, for the figures an issue measures with curl: one process per
//! request, as a person or a script calling the API would run it. The token travels in a
//! header file, not on the command line.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::api::Api;
use crate::error::BenchError;

/// A curl client for one server: its base URL and the header file with the token.
pub struct Curl {
    base: String,
    headers: PathBuf,
}

/// Whether `curl` is on the PATH.
pub fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

impl Curl {
    /// Writes the authorization header into `dir` for later requests.
    pub fn new(api: &Api, dir: &Path) -> Result<Curl, BenchError> {
        if find("curl").is_none() {
            return Err(BenchError::Server("curl is not installed".into()));
        }
        let headers = dir.join("curl-headers");
        std::fs::write(
            &headers,
            format!(
                "Authorization: Bearer {}\nContent-Type: application/json\n",
                api.token
            ),
        )
        .map_err(BenchError::io("write the curl header file"))?;
        Ok(Curl {
            base: format!("http://{}", api.addr),
            headers,
        })
    }

    /// `GET /healthz`, body to stdout.
    pub fn healthz(&self) -> Command {
        let mut c = quiet();
        c.arg(format!("{}/healthz", self.base));
        c
    }

    /// A synchronous execute of `runbook` (the result object on stdout).
    pub fn execute(&self, runbook: &str) -> Command {
        let mut c = quiet();
        c.arg("-H")
            .arg(format!("@{}", self.headers.display()))
            .args(["-X", "POST", "-d", "{}"])
            .arg(format!("{}/api/runbooks/{runbook}/execute", self.base));
        c
    }

    /// An SSE execute of `runbook` read with `curl -N` (the event stream on stdout).
    pub fn execute_sse(&self, runbook: &str) -> Command {
        let mut c = self.execute(runbook);
        c.args(["-N", "-H", "Accept: text/event-stream"]);
        c
    }

    /// [`Curl::execute_sse`] asking the server to close the connection after the response, as
    /// nginx asks its upstreams.
    pub fn execute_sse_closing(&self, runbook: &str) -> Command {
        let mut c = self.execute_sse(runbook);
        c.args(["-H", "Connection: close"]);
        c
    }
}

/// `curl -sS --fail` with stdin closed and stderr dropped.
fn quiet() -> Command {
    let mut c = Command::new("curl");
    c.args(["-sS", "--fail"])
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    c
}

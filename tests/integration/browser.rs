//! The web page in a real browser: starts runbookd (dev login on) with the runbooks the
//! browser test needs and runs `tests/browser/page.test.mjs`, which drives Debian's chromium
//! through playwright-core. Needs chromium, node and `npm ci` in tests/browser (`.ci/run`
//! does all three); screenshots land in `target/browser-screenshots/`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

const TICKER: &str = "# Ticker\nPrints a line every 300 ms for 3 s.\n\n# Environment Requirements\n```yaml\n```\n# File System Requirements\n```yaml\nInput:\n```\n# Script\n```sh\nfor i in 1 2 3 4 5 6 7 8 9 10; do echo \"line $i\"; sleep 0.3; done\n```\n\n# History\n";

const BROKEN: &str = "# Broken\nA runbook without its History section.\n# Environment Requirements\n```yaml\n```\n# Script\n```sh\necho hi\n```\n";

const EVIL: &str = "# Evil\nTries <script>window.pwned = 1</script> and <img src=x onerror=\"window.pwned = 2\"> in its text.\n\n# Environment Requirements\n```yaml\n```\n# File System Requirements\n```yaml\nInput:\n```\n# Script\n```sh\necho '<img src=x onerror=\"window.pwned = 2\">'\necho '<script>window.pwned = 3</script>' >&2\n```\n\n# History\n";

#[test]
#[ignore = "needs chromium and node; CI runs it"]
fn the_web_page_in_a_real_browser() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let script = repo.join("tests/browser/page.test.mjs");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        have_program("node"),
        "node is not installed (CI installs it; see .ci/run)"
    );
    assert!(
        PathBuf::from(&chromium).is_file(),
        "{chromium} is missing: apt-get install chromium (see .ci/run)"
    );
    assert!(
        repo.join("tests/browser/node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci)"
    );

    let term = "printf 'progress 10%%\\rprogress 50%%\\rprogress 100%%\\n'\nprintf '\\033[31mred\\033[0m plain \\033[1;92mbold green\\033[0m\\033]0;title\\007\\033[2K\\n'\necho out1\nsleep 0.3\necho err1 >&2\nsleep 0.3\necho out2\n";
    let server = Server::start(
        ServerOpts::new()
            .env("ENABLE_LOGIN", "true")
            .file("Ticker.md", TICKER.as_bytes())
            .file("Broken.md", BROKEN.as_bytes())
            .file("Evil.md", EVIL.as_bytes())
            .runbook(
                "Slow.md",
                Runbook::new(
                    "Slow",
                    "i=1\nwhile [ $i -le 24 ]; do echo \"tick $i\"; i=$((i+1)); sleep 0.25; done\n",
                ),
            )
            .runbook("Term.md", Runbook::new("Term", term))
            .runbook(
                "Forever.md",
                Runbook::new("Forever", "echo started\nsleep 120\n"),
            )
            .runbook("Big.md", Runbook::new("Big", "seq 1 200000\n"))
            .runbook(
                "Needs.md",
                Runbook::new("Needs", "echo \"to $TARGET\"\n")
                    .env("TARGET", "Where the deployment goes")
                    .env("HOME", "A home directory"),
            ),
    );
    let out = repo.join("target/browser-screenshots");
    // Only this run's screenshots (a failure of an earlier run leaves failure-*.png).
    let _ = std::fs::remove_dir_all(&out);
    let started = Instant::now();
    let mut child = Command::new("node")
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}/", server.port))
        .arg(&out)
        .env("CHROMIUM", &chromium)
        .current_dir(repo.join("tests/browser"))
        .spawn()
        .expect("node starts");
    let deadline = Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the browser test took longer than {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "the browser test failed ({status}); see its output above and {}",
        out.display()
    );
}

//! The HTTP/1.1 layer as a hostile client meets it: heads bounded in size and time, framing
//! that could mean two things to a proxy refused (and the connection closed, so nothing
//! smuggled behind it is served), a clear JSON error for each, `100 Continue` for clients that
//! wait for it, and pipelined or keep-alive requests served in order, also after a refusal
//! that left its body unread.

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use runbookd::client::http as http_client;
use serde_json::Value;

use crate::util::*;

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// One response read from `reader`: status, headers and whole body.
fn next_response(
    reader: &mut BufReader<TcpStream>,
    method: &str,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut response = http_client::read_response(&mut *reader, method)
        .unwrap_or_else(|e| panic!("no response: {e}"));
    let body = response.read_body_limited(1 << 20).unwrap();
    (response.status, response.headers().to_vec(), body)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// True when the server closes the connection (nothing more arrives but its end).
fn closed_after(reader: &mut BufReader<TcpStream>) -> bool {
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).is_ok() && rest.is_empty()
}

fn json_error(body: &[u8]) -> String {
    let value: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(body)));
    assert_eq!(value["success"], false, "{value}");
    value["error"].as_str().unwrap_or_default().to_string()
}

/// Sends `raw` on a new connection; returns the one answer and whether the server closed the
/// connection after it.
fn exchange(port: u16, raw: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>, bool) {
    let mut stream = connect(port);
    stream.write_all(raw).unwrap();
    let mut reader = BufReader::new(stream);
    let (status, headers, body) = next_response(&mut reader, "POST");
    let closed = closed_after(&mut reader);
    (status, headers, body, closed)
}

#[test]
fn a_head_over_72_kib_is_refused_with_431_and_the_server_goes_on() {
    let server = Server::start(ServerOpts::new());
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(80 * 1024)
    );
    let mut stream = connect(server.port);
    // The server may answer (and stop reading) before all of it is written.
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let _ = writer.write_all(huge.as_bytes());
    });
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let (status, headers, body) = next_response(&mut reader, "GET");
    assert_eq!(status, 431);
    assert_eq!(header(&headers, "Connection"), Some("close"));
    assert!(json_error(&body).contains("larger than"), "{body:?}");
    sender.join().unwrap();
    let _ = stream.flush();

    // Many fields are bounded too.
    let fields: String = (0..150).map(|i| format!("X-{i}: v\r\n")).collect();
    let (status, _, body, closed) = exchange(
        server.port,
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{fields}\r\n").as_bytes(),
    );
    assert_eq!(status, 431, "{}", String::from_utf8_lossy(&body));
    assert!(closed);
    assert_eq!(server.get("/healthz", None).status, 200);

    // As large a head as the shipped nginx passes on (4 lines of up to 16 KiB) is served.
    let line = format!("X-Filler: {}\r\n", "b".repeat(15 * 1024));
    let (status, _, body, _) = exchange(
        server.port,
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{}\r\n",
            line.repeat(4)
        )
        .as_bytes(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn ambiguous_framing_is_refused_and_nothing_behind_it_is_served() {
    let server = Server::start(ServerOpts::new());
    // A request smuggled in a body whose length a proxy and runbookd could disagree on.
    let smuggled = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let chunked = format!("{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len());
    let cases: Vec<(String, u16)> = vec![
        (
            format!(
                "POST /dev-login HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
                 Transfer-Encoding: chunked\r\n\r\n{chunked}"
            ),
            400,
        ),
        (
            format!(
                "POST /dev-login HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
                 Content-Length: 40\r\n\r\n{chunked}"
            ),
            400,
        ),
        (
            format!(
                "POST /dev-login HTTP/1.1\r\nHost: x\r\n\
                 Transfer-Encoding: gzip, chunked\r\n\r\n{chunked}"
            ),
            501,
        ),
        (
            format!(
                "POST /dev-login HTTP/1.1\r\nHost: x\r\nContent-Length : 4\r\n\r\n{smuggled}"
            ),
            400,
        ),
        (
            format!(
                "POST /dev-login HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n Content-Length: 4\r\n\r\n{smuggled}"
            ),
            400,
        ),
        (format!("GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n{smuggled}"), 505),
    ];
    for (raw, expected) in cases {
        let (status, headers, body, closed) = exchange(server.port, raw.as_bytes());
        assert_eq!(
            status,
            expected,
            "{raw:?}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(!json_error(&body).is_empty());
        assert_eq!(header(&headers, "Connection"), Some("close"), "{raw:?}");
        // One answer and the end of the connection: the smuggled request got none.
        assert!(closed, "more than one answer to {raw:?}");
    }
    assert_eq!(server.get("/healthz", None).status, 200);
}

#[test]
fn a_head_dripping_in_is_cut_at_the_request_timeout() {
    let server = Server::start(ServerOpts::new().env("REQUEST_TIMEOUT_SECONDS", "2"));
    let stream = connect(server.port);
    let started = Instant::now();
    // A byte every 300 ms: no read waits the timeout, but the head never completes in time.
    let mut writer = stream.try_clone().unwrap();
    let dripper = thread::spawn(move || {
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
            .take(100)
        {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(300));
        }
    });
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let (status, headers, body) = next_response(&mut reader, "GET");
    let took = started.elapsed();
    assert_eq!(status, 408);
    assert_eq!(header(&headers, "Connection"), Some("close"));
    assert!(json_error(&body).contains("request timeout"));
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
        "cut after {took:?}"
    );
    let _ = stream.shutdown(std::net::Shutdown::Both);
    dripper.join().unwrap();
}

#[test]
fn a_client_waiting_for_100_continue_gets_it_and_then_its_result() {
    let server = Server::start(ServerOpts::new().runbook(
        "Env.md",
        Runbook::new("Env", "echo \"got $NAME\"\n").env("NAME", "a name"),
    ));
    let token = dev_token();
    let body = br#"{"env_vars":{"NAME":"continued"}}"#;
    let mut stream = connect(server.port);
    let head = format!(
        "POST /api/runbooks/Env.md/execute HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body).unwrap();
    let mut reader = BufReader::new(stream);
    let (status, _, result) = next_response(&mut reader, "POST");
    let text = String::from_utf8_lossy(&result);
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("got continued"), "{text}");

    // A refusal before the body is read sends no 100 and closes the connection.
    let mut stream = connect(server.port);
    stream
        .write_all(
            b"POST /api/runbooks/Env.md/execute HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\
              Content-Length: 5\r\n\r\n",
        )
        .unwrap();
    let mut reader = BufReader::new(stream);
    let (status, headers, _) = next_response(&mut reader, "POST");
    assert_eq!(status, 401);
    assert_eq!(header(&headers, "Connection"), Some("close"));
}

#[test]
fn pipelined_requests_are_answered_in_order_also_after_a_refusal() {
    let server =
        Server::start(ServerOpts::new().runbook("Echo.md", Runbook::new("Echo", "echo piped\n")));
    let token = dev_token();
    let mut stream = connect(server.port);
    let body = b"{}";
    let raw = format!(
        // Refused (no token) with its body unread, then a chunked execute, then a plain GET.
        "POST /api/runbooks/Echo.md/execute HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}\
         POST /api/runbooks/Echo.md/execute HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Transfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n\
         GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        String::from_utf8_lossy(body)
    );
    stream.write_all(raw.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let (first, headers, _) = next_response(&mut reader, "POST");
    assert_eq!(first, 401);
    assert_eq!(
        header(&headers, "Connection"),
        None,
        "a small unread body closed the connection"
    );
    let (second, _, result) = next_response(&mut reader, "POST");
    let text = String::from_utf8_lossy(&result);
    assert_eq!(second, 200, "{text}");
    assert!(text.contains("piped"), "{text}");
    let (third, _, health) = next_response(&mut reader, "GET");
    assert_eq!(third, 200, "{}", String::from_utf8_lossy(&health));
    // The connection stays open for more.
    let mut stream = reader.into_inner();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let (fourth, headers, _) = next_response(&mut reader, "GET");
    assert_eq!(fourth, 200);
    assert_eq!(header(&headers, "Connection"), Some("close"));
    assert!(closed_after(&mut reader));
}

#[test]
fn connections_over_max_connections_get_503_and_the_rest_are_served() {
    const MAX: usize = 16;
    let server = Server::start(ServerOpts::new().env("MAX_CONNECTIONS", &MAX.to_string()));
    // Idle connections hold their slots until the request timeout (30 s by default).
    let held: Vec<TcpStream> = (0..MAX).map(|_| connect(server.port)).collect();
    let mut reader = BufReader::new(connect(server.port));
    let (status, headers, body) = next_response(&mut reader, "GET");
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(json_error(&body).contains("too many connections"));
    assert_eq!(header(&headers, "Connection"), Some("close"));
    assert!(header(&headers, "Retry-After").is_some());
    assert!(closed_after(&mut reader));
    // The held connections are served as usual.
    let mut first = held.into_iter().next().unwrap();
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut first = BufReader::new(first);
    assert_eq!(next_response(&mut first, "GET").0, 200);
    // Once slots are free again, new connections are served.
    drop(first);
    let served = wait_until(Duration::from_secs(10), || {
        request(server.port, "GET", "/healthz", &[], None).status == 200
    });
    assert!(served, "a freed slot was never used again");
}

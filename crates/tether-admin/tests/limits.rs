//! What one admin request can hold, over real loopback sockets: a body cut into one-byte TCP segments holds about
//! its size, not a read buffer per segment; a body that stalls, or chunks that never end, get `408` at the
//! request deadline and free their connection, so stalled clients cannot lock the port; an idle keep-alive
//! connection is closed at the same deadline. The deadlines run on a paused clock.

#[path = "../../tether/tests/support/mod.rs"]
mod support;
mod support_http;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::time::Duration;

use support::{test_config, TestServer};
use support_http::{get, start_admin};
use tether_admin::{AdminConfig, MAX_ADMIN_CONNECTIONS, MAX_BODY, REQUEST_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Counts the bytes allocated and not yet freed by the current thread: the tests run the server, the admin
/// listener and the clients on one current-thread runtime, so this is what one test holds, whatever the
/// others in this binary do at the same time.
struct PerThread;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    let _ = LIVE.try_with(|l| l.set(l.get() + delta));
}

// SAFETY: every call is passed to the system allocator unchanged; only a thread-local counter is added.
unsafe impl GlobalAlloc for PerThread {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: PerThread = PerThread;

fn live() -> isize {
    LIVE.with(Cell::get)
}

/// Open a connection and send a request's head; `length`: `Content-Length`, else chunked.
async fn send_head(admin: SocketAddr, path: &str, length: Option<usize>) -> TcpStream {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.set_nodelay(true).unwrap();
    let framing = match length {
        Some(n) => format!("Content-Length: {n}"),
        None => "Transfer-Encoding: chunked".into(),
    };
    let head = format!("POST {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Read the whole reply until the server closes the connection; its status and body (the JSON error replies
/// carry `Content-Length`).
async fn reply_then_close(s: &mut TcpStream) -> (u16, serde_json::Value) {
    let mut raw = Vec::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT * 3, s.read_to_end(&mut raw)).await;
    read.expect("no reply, or the connection was left open").expect("read the reply");
    let text = String::from_utf8(raw).expect("UTF-8 reply");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not a reply: {text:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}")))
}

/// A body of just under the limit, sent one byte per TCP segment (with `Content-Length` on one connection,
/// chunked on the other), letting the server read each byte before the next is sent. Each segment used to
/// become a chunk that kept its own read buffer (about 8 KiB) alive until the body was complete: some 128 MiB
/// per connection. Read frame by frame into one buffer, both together hold little more than the bodies.
#[tokio::test]
async fn a_body_sent_a_byte_per_segment_holds_about_its_size() {
    let s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    // A JSON object padded with spaces to one byte under the limit.
    let mut body = br#"{"retry_after": 1}"#.to_vec();
    body.resize(MAX_BODY - 1, b' ');
    let path = "/v1/sessions/nobody/kick";
    let mut sized = send_head(admin, path, Some(body.len())).await;
    let mut chunked = send_head(admin, path, None).await;
    let baseline = live();
    let mut held = 0;
    for (i, b) in body.iter().enumerate() {
        sized.write_all(&[*b]).await.unwrap();
        chunked.write_all(format!("1\r\n{}\r\n", *b as char).as_bytes()).await.unwrap();
        // Let the runtime poll its sockets (the server reads what came) before the next byte.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        held = held.max(live() - baseline);
        if i == body.len() - 2 {
            break;
        }
    }
    sized.write_all(&body[body.len() - 1..]).await.unwrap();
    chunked.write_all(b"1\r\n \r\n0\r\n\r\n").await.unwrap();
    for s in [&mut sized, &mut chunked] {
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 404", "the whole body reached the handler, which found no such client");
    }
    println!("two bodies of {} bytes, a byte per segment, held at most {held} bytes", body.len());
    assert!(held < 8 * MAX_BODY as isize, "{held} bytes held for two bodies of {} bytes", body.len());
}

/// A body that stops halfway, and chunks that keep coming but never end, each get `408` at the request deadline
/// and their connection is closed.
#[tokio::test(start_paused = true)]
async fn a_request_body_that_does_not_arrive_in_time_gets_408() {
    let s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let started = Instant::now();
    let mut half = send_head(admin, "/v1/drain", Some(2)).await;
    half.write_all(b"{").await.unwrap();
    let (status, v) = reply_then_close(&mut half).await;
    assert_eq!(status, 408, "{v}");
    assert!(v["error"].as_str().unwrap().contains("did not arrive"), "{v}");
    let waited = started.elapsed();
    assert!(waited >= REQUEST_TIMEOUT && waited < REQUEST_TIMEOUT + Duration::from_secs(1), "{waited:?}");

    // A chunk every second, for ever.
    let started = Instant::now();
    let mut endless = send_head(admin, "/v1/sessions/nobody/kick", None).await;
    let mut reply = Vec::new();
    loop {
        tokio::select! {
            r = endless.read_to_end(&mut reply) => { r.unwrap(); break }
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                endless.write_all(b"1\r\n \r\n").await.unwrap();
            }
        }
        assert!(started.elapsed() < REQUEST_TIMEOUT * 3, "the endless body was never cut off");
    }
    let reply = String::from_utf8(reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    let waited = started.elapsed();
    assert!(waited >= REQUEST_TIMEOUT && waited < REQUEST_TIMEOUT + Duration::from_secs(2), "{waited:?}");
    assert!(s.handle.is_ready(), "no half-read drain request was acted on");
}

/// Every connection slot held by a stalled body: a scraper is turned away while they last, and served once the
/// deadline has freed them. An idle keep-alive connection is closed at the same deadline.
#[tokio::test(start_paused = true)]
async fn stalled_bodies_cannot_lock_the_admin_port() {
    let s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let mut stalled = Vec::new();
    for _ in 0..MAX_ADMIN_CONNECTIONS {
        let mut c = send_head(admin, "/v1/drain", Some(2)).await;
        c.write_all(b"{").await.unwrap();
        stalled.push(c);
    }
    // Accepted after them, while all slots are taken: closed without an answer.
    let mut turned_away = TcpStream::connect(admin).await.unwrap();
    let mut rest = Vec::new();
    let _ = turned_away.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\n\r\n").as_bytes()).await;
    let _ = turned_away.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "served beyond the connection cap");
    for c in &mut stalled {
        assert_eq!(reply_then_close(c).await.0, 408);
    }
    assert_eq!(get(admin, "/metrics").await.status, 200, "the port is free again");

    // A keep-alive connection that goes quiet after one request.
    let mut idle = TcpStream::connect(admin).await.unwrap();
    idle.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let since = Instant::now();
    let closed = tokio::time::timeout(REQUEST_TIMEOUT * 3, idle.read(&mut buf)).await;
    assert_eq!(closed.expect("an idle keep-alive connection was left open").unwrap(), 0);
    let idled = since.elapsed();
    assert!(idled >= REQUEST_TIMEOUT && idled < REQUEST_TIMEOUT + Duration::from_secs(1), "{idled:?}");
}

/// A chunked body over the limit is refused as soon as it passes it, with the API's JSON error.
#[tokio::test(start_paused = true)]
async fn a_chunked_body_over_the_limit_gets_413() {
    let s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let mut c = send_head(admin, "/v1/drain", None).await;
    let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
    for _ in 0..MAX_BODY / 1024 + 1 {
        if c.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let (status, v) = reply_then_close(&mut c).await;
    assert_eq!(status, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("over 16384 bytes"), "{v}");
    assert!(s.handle.is_ready(), "nothing was drained");
}

/// A client that sends requests down its connection and reads no answer (a tiny receive buffer, so the answers
/// back up into the server's send buffer) is closed once the server's writes to it have made no progress for the
/// request deadline: it cannot hold its slot, and the answers queued for it, for good.
#[tokio::test(start_paused = true)]
async fn a_client_that_reads_no_answer_is_closed_at_the_deadline() {
    let s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    sock.set_nonblocking(true).unwrap();
    let c = tokio::net::TcpSocket::from_std_stream(sock.into()).connect(admin).await.unwrap();
    let (mut rd, mut wr) = c.into_split();
    // 2,000 scrapes of about 9 KB each: far more than the kernel's buffers hold.
    let requests = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\n\r\n").repeat(2000);
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(requests.as_bytes()).await;
        wr
    });
    tokio::time::sleep(REQUEST_TIMEOUT * 3).await;
    // Closed by now: what the kernels held comes out, then the end (or a reset), well before the 2,000 answers.
    let mut buf = vec![0u8; 1 << 16];
    let mut read = 0;
    let closed = loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break true,
            Ok(n) if read < 8 << 20 => read += n,
            Ok(_) => break false,
        }
    };
    writer.abort();
    assert!(closed, "still answering after {read} bytes: a client that read nothing was left connected");
    assert_eq!(get(admin, "/healthz").await.status, 200);
}

//! The admin dashboard in a real browser: the system Chromium, headless, driven through chromedriver (WebDriver)
//! against a real `tether serve` and real `tether connect` clients on loopback. It checks what an operator sees:
//! a hung (SIGSTOPped) client appears in the page as a `heartbeat_timeout` disconnect within 2 s of the server's
//! verdict, and the kick button on the page disconnects a client with reason `kicked`. Against a server with an
//! admin token, the page asks for it, says so when the one typed is wrong and sends nothing more until another
//! is saved.
//!
//! Waits on tether are for its output lines; waits on the page poll the DOM every 100 ms; every wait has a
//! deadline. With `TETHER_SCREENSHOT=1` the test also saves `docs/dashboard.png`. Without `/usr/bin/chromium`
//! and `/usr/bin/chromedriver` (scripts/test installs them) it says SKIPPED and passes.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{event, Proc, PATIENCE};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use socket2::{Domain, Socket, Type};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How often the page is looked at while waiting for it to show something.
const POLL: Duration = Duration::from_millis(100);

/// A chromedriver process on a free loopback port, with a fresh Chromium profile directory. Dropping it
/// kills its whole process group (chromedriver and the browser it started) and removes the profile.
struct Chromedriver {
    child: Child,
    port: u16,
    profile: PathBuf,
}

impl Chromedriver {
    /// chromedriver on a loopback port found by [`free_port`]; it prints "ChromeDriver was started successfully
    /// on port N." on stdout once it listens. Tried again with another port if it exits instead (another
    /// process took the port in between).
    fn start() -> Chromedriver {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let profile = std::env::temp_dir().join(format!("tether-dashboard-{}-{nanos}", std::process::id()));
        for _ in 0..10 {
            let port = free_port();
            let child = Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                // Its own process group: the browser inherits it, so one kill(-pgid) ends them all.
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn chromedriver");
            let mut driver = Chromedriver { child, port, profile: profile.clone() };
            let stdout = driver.child.stdout.take().unwrap();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                // Read to the end, so that chromedriver never blocks on a full pipe.
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line.contains("started successfully on port ") {
                        let _ = tx.send(());
                    }
                }
            });
            match rx.recv_timeout(PATIENCE) {
                Ok(()) => {
                    std::fs::create_dir_all(&driver.profile).unwrap();
                    return driver;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => println!("chromedriver could not listen on {port}"),
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("chromedriver did not start"),
            }
        }
        panic!("chromedriver found no port to listen on");
    }

    /// A WebDriver session with the system Chromium: headless, no background connections, a fresh profile.
    async fn session(&self) -> Client {
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1600,1300",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("--user-data-dir={}", self.profile.display())])
        .collect::<Vec<_>>();
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps.as_object().unwrap().clone())
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a WebDriver session with Chromium")
    }
}

/// A loopback port nobody holds, for chromedriver. Not `--port=0`: with it chromedriver binds [::1]:0 and then
/// 127.0.0.1 on the number it got, and exits when that number is the local port of a loopback connection in
/// TIME_WAIT (other tests leave thousands; its SO_REUSEADDR does not help against a client socket without it).
/// A probe bound to 127.0.0.1:0 without SO_REUSEADDR gets a number clear of those; [::1] is then checked too.
fn free_port() -> u16 {
    let probe = |addr: SocketAddr| {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        s.bind(&addr.into())?;
        Ok::<_, std::io::Error>((s.local_addr()?.as_socket().unwrap().port(), s))
    };
    for _ in 0..100 {
        let (port, _v4) = probe(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind 127.0.0.1:0");
        match probe(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
            Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
            _ => return port, // free, or no IPv6 loopback at all (then chromedriver does without it)
        }
    }
    panic!("no loopback port free on both 127.0.0.1 and [::1]");
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of our own child (it leads it: process_group(0)).
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.wait();
        // The browser's last helpers may still be writing into the profile for a moment.
        for _ in 0..50 {
            if std::fs::remove_dir_all(&self.profile).is_ok() || !self.profile.exists() {
                break;
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Poll `check` every [`POLL`] until it yields a value, for at most `patience`; panic naming `what` after that.
async fn page_until<T, F, Fut>(what: &str, patience: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "the page never showed: {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// The text of the first element matching `css`, if there is one.
async fn text_of(c: &Client, css: &str) -> Option<String> {
    let found = c.find_all(Locator::Css(css)).await.expect("find elements");
    match found.first() {
        Some(el) => Some(el.text().await.expect("element text")),
        None => None,
    }
}

/// The number in the `#reason-counts` cell of `reason`, if the row is there.
async fn reason_count(c: &Client, reason: &str) -> Option<u64> {
    let text = text_of(c, &format!("#reason-counts td.count[data-reason=\"{reason}\"]")).await?;
    Some(text.trim().parse().unwrap_or_else(|_| panic!("count of {reason} is not a number: {text:?}")))
}

/// Whether `#disconnects` has a row for `client` closed with `reason`.
async fn has_row(c: &Client, client: &str, reason: &str) -> bool {
    let css = format!("#disconnects tbody tr[data-client=\"{client}\"][data-reason=\"{reason}\"]");
    !c.find_all(Locator::Css(&css)).await.expect("find rows").is_empty()
}

/// Type `id` into the client lookup, press "look up", and wait for the kick button of its session.
async fn look_up(c: &Client, id: &str) {
    let input = c.find(Locator::Css("#search-id")).await.expect("#search-id");
    input.clear().await.expect("clear #search-id");
    input.send_keys(id).await.expect("type into #search-id");
    c.find(Locator::Css("#search-go")).await.expect("#search-go").click().await.expect("click #search-go");
    page_until(&format!("the session of {id} with its kick button"), PATIENCE, || async move {
        let title = text_of(c, "#session-title").await?;
        let kick = c.find(Locator::Css("#kick")).await.expect("#kick");
        let ready = kick.is_displayed().await.expect("displayed") && kick.is_enabled().await.expect("enabled");
        (title == id && ready).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_hung_client_and_kicks_another() {
    if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
        println!("SKIPPED: chromium/chromedriver not installed (scripts/test installs them)");
        return;
    }
    let driver = Chromedriver::start();
    println!("chromedriver on 127.0.0.1:{}", driver.port);

    let (srv, addr, admin) = common::serve_with_admin(&["--heartbeat-interval", "1s", "--heartbeat-timeout", "3s"]);

    let ids = ["sensor-1", "sensor-2", "sensor-3", "sensor-4", "sensor-5", "hung-1"];
    let clients: Vec<Proc> = ids
        .iter()
        .map(|id| Proc::spawn(&["connect", &addr, "--id", id, "--json", "--heartbeat-interval", "1s"]))
        .collect();
    let client = |id: &str| &clients[ids.iter().position(|x| *x == id).unwrap()];
    let mut waiting: BTreeSet<String> = ids.iter().map(|id| id.to_string()).collect();
    while !waiting.is_empty() {
        let on = srv.expect("the clients online", |v| {
            event(v) == "online" && v["client"].as_str().is_some_and(|c| waiting.contains(c))
        });
        waiting.remove(on["client"].as_str().unwrap());
    }

    // For the saved picture, the page is shown under load: 2,000 more connections from one load generator.
    let save = std::env::var("TETHER_SCREENSHOT").is_ok_and(|v| v == "1");
    let _load = save.then(|| {
        let load = Proc::spawn(&[
            "bench-worker",
            "--addr",
            &addr,
            "--count",
            "2000",
            "--interval",
            "1s",
            "--concurrency",
            "16",
        ]);
        load.expect("the load generator connected", |v| event(v) == "connected");
        load
    });

    let browser = driver.session().await;
    let c = &browser;
    c.goto(&format!("http://{admin}/")).await.expect("open the dashboard");
    page_until("the live dot (event stream connected)", PATIENCE, || async move {
        let live = c.find_all(Locator::Css("#live-dot[data-state=\"live\"]")).await.expect("find #live-dot");
        (!live.is_empty()).then_some(())
    })
    .await;

    // The hung client: its process stops, its kernel still ACKs; only the heartbeat timeout can tell.
    client("hung-1").signal(libc::SIGSTOP);
    let off = srv.expect("hung-1 offline", |v| event(v) == "offline" && v["client"] == "hung-1");
    let t_verdict = Instant::now();
    assert_eq!((off["reason"].as_str(), off["by"].as_str()), (Some("heartbeat_timeout"), Some("server")));
    let shown = page_until("hung-1 as a heartbeat_timeout row and count", Duration::from_secs(10), || async move {
        let row = has_row(c, "hung-1", "heartbeat_timeout").await;
        let count = reason_count(c, "heartbeat_timeout").await.unwrap_or(0);
        (row && count >= 1).then(|| t_verdict.elapsed())
    })
    .await;
    println!("the page showed hung-1's heartbeat_timeout {} ms after the test read the verdict", shown.as_millis());
    assert!(shown < Duration::from_secs(2), "the page took {shown:?} to show the verdict");

    // Kick sensor-2 from the page: look it up, press kick, confirm.
    look_up(c, "sensor-2").await;
    c.find(Locator::Css("#kick")).await.expect("#kick").click().await.expect("click #kick");
    page_until("the kick confirmation", PATIENCE, || async move {
        match c.accept_alert().await {
            Ok(()) => Some(()),
            Err(e) if e.is_no_such_alert() => None,
            Err(e) => panic!("accept the confirmation: {e}"),
        }
    })
    .await;
    let off = srv.expect("sensor-2 offline", |v| event(v) == "offline" && v["client"] == "sensor-2");
    assert_eq!(off["reason"], "kicked", "{off}");
    page_until("the kick result", PATIENCE, || async move {
        text_of(c, "#kick-result").await.filter(|t| t.contains("kicked sensor-2"))
    })
    .await;
    page_until(
        "sensor-2 as a kicked row",
        PATIENCE,
        || async move { has_row(c, "sensor-2", "kicked").await.then_some(()) },
    )
    .await;

    // An operator's view under some churn: one client crashes (SIGKILL: eof, or reset), one leaves (ctrl-c: bye).
    client("sensor-5").signal(libc::SIGKILL);
    let off = srv.expect("sensor-5 offline", |v| event(v) == "offline" && v["client"] == "sensor-5");
    let crashed = off["reason"].as_str().unwrap().to_owned();
    assert!(crashed == "eof" || crashed == "reset", "{off}");
    client("sensor-4").signal(libc::SIGINT);
    let off = srv.expect("sensor-4 offline", |v| event(v) == "offline" && v["client"] == "sensor-4");
    assert_eq!(off["reason"], "bye", "{off}");
    let crashed = crashed.as_str();
    page_until("every reason counted", PATIENCE, || async move {
        for reason in ["heartbeat_timeout", "kicked", crashed, "bye"] {
            if reason_count(c, reason).await.unwrap_or(0) < 1 {
                return None;
            }
        }
        Some(())
    })
    .await;
    look_up(c, "sensor-1").await;

    if save {
        // For the picture only: a few more 1 s snapshots so the charts show the disconnects in time.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let js = "const e = document.documentElement; return [e.scrollHeight, innerHeight];";
        let size = c.execute(js, vec![]).await.expect("page height");
        let (page, view) = (size[0].as_u64().unwrap(), size[1].as_u64().unwrap());
        assert!(page <= view, "the page ({page} px) is taller than the window ({view} px): enlarge --window-size");
    }
    let png = c.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "the screenshot is a PNG");
    if save {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/dashboard.png");
        std::fs::write(&path, &png).unwrap();
        println!("saved {} ({} bytes)", path.display(), png.len());
    }

    browser.close().await.expect("close the browser session");
    drop(clients);
    drop(srv);
    drop(driver);
}

/// The token form's message while the form is shown.
async fn token_form_says(c: &Client) -> Option<String> {
    let form = c.find(Locator::Css("#token-form")).await.expect("#token-form");
    if !form.is_displayed().await.expect("displayed") {
        return None;
    }
    text_of(c, "#token-msg").await
}

/// Type `token` into the token form and save it.
async fn enter_token(c: &Client, token: &str) {
    let input = c.find(Locator::Css("#token-input")).await.expect("#token-input");
    input.send_keys(token).await.expect("type into #token-input");
    c.find(Locator::Css("#token-save")).await.expect("#token-save").click().await.expect("click #token-save");
}

/// How many API requests the page has completed (its resource timing entries under `/v1/`).
async fn api_requests(c: &Client) -> u64 {
    let js = "return performance.getEntriesByType('resource').filter((e) => e.name.includes('/v1/')).length;";
    c.execute(js, vec![]).await.expect("count the page's requests").as_u64().expect("a count")
}

/// A file holding the admin token, removed when dropped.
struct TokenFile(PathBuf);

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_asks_again_for_a_token_the_server_refuses_and_waits_for_it() {
    if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
        println!("SKIPPED: chromium/chromedriver not installed (scripts/test installs them)");
        return;
    }
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let file = TokenFile(std::env::temp_dir().join(format!("tether-admin-token-{}-{nanos}", std::process::id())));
    std::fs::write(&file.0, "right-token\n").unwrap();
    let driver = Chromedriver::start();
    let (srv, _addr, admin) = common::serve_with_admin(&["--admin-token-file", file.0.to_str().unwrap()]);

    let browser = driver.session().await;
    let c = &browser;
    c.goto(&format!("http://{admin}/")).await.expect("open the dashboard");
    // No token yet: 401, and the form asks for one.
    page_until("the token form asking for a token", PATIENCE, || async move {
        token_form_says(c).await.filter(|m| m.contains("admin token required"))
    })
    .await;
    // A wrong one: 403, and the form says so.
    enter_token(c, "wrong-token").await;
    page_until("the token form saying the token is not valid", PATIENCE, || async move {
        token_form_says(c).await.filter(|m| m.contains("the token is not valid"))
    })
    .await;
    // The page's three requests at start (the overview, the disconnects, the event stream) were each answered
    // twice, 401 and then 403, and now wait for a new token: nothing more is sent. (The page used to retry its
    // event stream every second; the watch lasts 3 s.)
    page_until("the three requests answered 401 and 403", PATIENCE, || async move {
        (api_requests(c).await == 6).then_some(())
    })
    .await;
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        let sent = api_requests(c).await;
        assert_eq!(sent, 6, "the page sent {} more requests with a refused token", sent - 6);
        tokio::time::sleep(POLL).await;
    }
    let dot = c.find(Locator::Css("#live-dot")).await.expect("#live-dot");
    assert_eq!(dot.attr("data-state").await.expect("data-state").as_deref(), Some("auth"));
    // The right one: the page goes live.
    enter_token(c, "right-token").await;
    page_until("the live dot (event stream connected)", PATIENCE, || async move {
        let live = c.find_all(Locator::Css("#live-dot[data-state=\"live\"]")).await.expect("find #live-dot");
        (!live.is_empty()).then_some(())
    })
    .await;
    assert!(token_form_says(c).await.is_none(), "the token form is still shown");

    browser.close().await.expect("close the browser session");
    drop(srv);
    drop(driver);
}

//! The c10d TCPStore protocol: our client against our server, plus raw wire bytes checked
//! against the documented framing (ecosystem.md §2) so a Python client would interoperate.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use troupe::comm::store::{MAGIC, StoreClient, StoreError, StoreServer};

fn server() -> (StoreServer, String) {
    let s = StoreServer::start("127.0.0.1:0").unwrap();
    let a = s.addr().to_string();
    (s, a)
}

fn client(addr: &str) -> StoreClient {
    StoreClient::connect(addr, Duration::from_secs(5)).unwrap()
}

#[test]
fn set_get_add_check_delete() {
    let (_s, addr) = server();
    let mut c = client(&addr);
    c.set("a", b"hello").unwrap();
    assert_eq!(c.get("a", Duration::from_secs(1)).unwrap(), b"hello");
    assert_eq!(c.add("n", 5).unwrap(), 5);
    assert_eq!(c.add("n", -2).unwrap(), 3);
    assert_eq!(c.get("n", Duration::from_secs(1)).unwrap(), b"3");
    assert!(c.check(&["a", "n"]).unwrap());
    assert!(!c.check(&["a", "missing"]).unwrap());
    assert_eq!(c.num_keys().unwrap(), 2);
    assert!(c.delete("a").unwrap());
    assert!(!c.delete("a").unwrap());
    c.append("log", b"x").unwrap();
    c.append("log", b"y").unwrap();
    assert_eq!(c.get("log", Duration::from_secs(1)).unwrap(), b"xy");
    c.ping(7).unwrap();
}

#[test]
fn compare_set_semantics() {
    let (_s, addr) = server();
    let mut c = client(&addr);
    // Missing key with empty expected: set it.
    assert_eq!(c.compare_set("k", b"", b"v1").unwrap(), b"v1");
    // Missing key with non-empty expected: reply expected, store nothing.
    assert_eq!(c.compare_set("m", b"x", b"y").unwrap(), b"x");
    assert!(!c.check(&["m"]).unwrap());
    // Present and equal: replace. Present and different: keep.
    assert_eq!(c.compare_set("k", b"v1", b"v2").unwrap(), b"v2");
    assert_eq!(c.compare_set("k", b"v1", b"v3").unwrap(), b"v2");
}

#[test]
fn wait_times_out_then_connection_still_works() {
    let (_s, addr) = server();
    let mut c = client(&addr);
    let t = Instant::now();
    let e = c.wait(&["never"], Duration::from_millis(200)).unwrap_err();
    assert!(matches!(e, StoreError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("never"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
    c.set("x", b"1").unwrap();
    assert_eq!(c.get("x", Duration::from_secs(1)).unwrap(), b"1");
}

#[test]
fn wait_wakes_when_another_client_sets() {
    let (_s, addr) = server();
    let mut waiter = client(&addr).with_prefix("job/attempt_0");
    let a2 = addr.clone();
    let h = std::thread::spawn(move || {
        let mut c = client(&a2).with_prefix("job/attempt_0");
        c.set("ready", b"yes").unwrap();
    });
    assert_eq!(waiter.get("ready", Duration::from_secs(5)).unwrap(), b"yes");
    h.join().unwrap();
    // Prefixes isolate attempts.
    let mut other = client(&addr).with_prefix("job/attempt_1");
    assert!(!other.check(&["ready"]).unwrap());
}

fn put(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

#[test]
fn raw_wire_bytes_match_the_c10d_framing() {
    let (_s, addr) = server();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = vec![0u8];
    req.extend_from_slice(&[0xCE, 0xF7, 0x85, 0x3C]); // VALIDATE, magic LE
    assert_eq!(u32::from_le_bytes([0xCE, 0xF7, 0x85, 0x3C]), MAGIC);
    req.push(1); // SET "/k" = "v"
    put(&mut req, b"/k");
    put(&mut req, b"v");
    req.push(4); // ADD "/c" += 2
    put(&mut req, b"/c");
    req.extend_from_slice(&2i64.to_le_bytes());
    req.push(3); // GET "/k"
    put(&mut req, b"/k");
    req.push(13); // PING 0xdeadbeef
    req.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 8 + 8 + 1 + 4];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(i64::from_le_bytes(reply[0..8].try_into().unwrap()), 2);
    assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 1);
    assert_eq!(reply[16], b'v');
    assert_eq!(&reply[17..21], &0xdead_beefu32.to_le_bytes());
    // Our client sees the raw key "/k" as "k".
    let mut c = client(&addr);
    assert_eq!(c.get("k", Duration::from_secs(1)).unwrap(), b"v");
}

#[test]
fn connection_without_validate_is_dropped() {
    let (_s, addr) = server();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[0, 1, 2, 3, 4]).unwrap(); // wrong magic
    let mut b = [0u8; 1];
    let n = s.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "server must close the connection");
}

#[test]
fn silent_server_fails_within_timeout() {
    // Something listens but never answers (a hung store): the PING after VALIDATE times out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let t = Instant::now();
    let e = StoreClient::connect(&addr, Duration::from_millis(300)).err().unwrap();
    assert!(matches!(e, StoreError::Timeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
    drop(silent);
}

//! A loopback TCP proxy a test can cut and restore.

use std::time::Duration;

use super::wait_for;

/// A loopback TCP proxy a test can cut (every connection closed, new ones
/// refused) and restore, to stage a database or network outage.
pub struct Proxy {
    pub port: u16,
    target: String,
    state: std::sync::Arc<std::sync::Mutex<ProxyState>>,
}

#[derive(Default)]
struct ProxyState {
    up: bool,
    generation: u64,
    streams: Vec<std::net::TcpStream>,
}

impl Proxy {
    pub fn start(target: &str) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = Proxy {
            port,
            target: target.to_owned(),
            state: Default::default(),
        };
        p.state.lock().unwrap().up = true;
        p.serve(listener);
        p
    }

    fn serve(&self, listener: std::net::TcpListener) {
        let state = self.state.clone();
        let target = self.target.clone();
        let generation = state.lock().unwrap().generation;
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let mut st = state.lock().unwrap();
                if !st.up || st.generation != generation {
                    // Cut: drop the listener so new connections are refused.
                    return;
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                st.streams.push(client.try_clone().unwrap());
                st.streams.push(server.try_clone().unwrap());
                drop(st);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        let mut st = self.state.lock().unwrap();
        st.up = false;
        st.generation += 1;
        for s in st.streams.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        drop(st);
        // Wake the accept loop so it sees the cut and drops its listener.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        wait_for(
            "the proxy to stop listening",
            Duration::from_secs(10),
            || {
                std::net::TcpStream::connect(("127.0.0.1", self.port))
                    .is_err()
                    .then_some(())
            },
        );
    }

    /// Accepts connections again on the same port.
    pub fn restore(&self) {
        let listener = wait_for(
            "the proxy port to bind again",
            Duration::from_secs(10),
            || std::net::TcpListener::bind(("127.0.0.1", self.port)).ok(),
        );
        self.state.lock().unwrap().up = true;
        self.serve(listener);
    }
}

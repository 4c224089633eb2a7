//! The `tollgate` binary as a child process, configured by environment.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A running gateway process.
pub struct GatewayProcess {
    pub child: Child,
    /// `http://…` of the proxy listener.
    pub url: String,
    /// `http://…` of the admin listener.
    pub admin_url: String,
}

impl GatewayProcess {
    /// Starts `tollgate serve` with `env` (listeners on port 0, JSON logs) and
    /// waits until it listens. Warnings and errors of its log are echoed.
    pub fn spawn(env: &[(&str, String)]) -> GatewayProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("TOLLGATE__SERVER__LISTEN", "127.0.0.1:0")
            .env("TOLLGATE__ADMIN__LISTEN", "127.0.0.1:0")
            .env("TOLLGATE__LOG__FORMAT", "json")
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start tollgate");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let (url, admin_url) = loop {
            let line = lines
                .next()
                .expect("tollgate exited before listening")
                .expect("log line");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let (Some(p), Some(a)) = (v["proxy_addr"].as_str(), v["admin_addr"].as_str()) {
                break (format!("http://{p}"), format!("http://{a}"));
            }
            if !line.starts_with('{') || line.contains("ERROR") {
                eprintln!("tollgate: {line}");
            }
        };
        // Keep draining the log so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line.contains("WARN") || line.contains("ERROR") || !line.starts_with('{') {
                    eprintln!("tollgate: {line}");
                }
            }
        });
        GatewayProcess {
            child,
            url,
            admin_url,
        }
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait for tollgate").code()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

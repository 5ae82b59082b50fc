//! The lab's mesh CA: its key material, node credentials, its process.
use super::*;

impl Lab {
    pub fn ca_dir(&self) -> PathBuf {
        Path::new(STATE_DIR).join("ca")
    }

    pub fn ca_log(&self) -> PathBuf {
        Path::new(STATE_DIR).join("ca.log")
    }

    pub fn node_token_file(&self, node: &str) -> PathBuf {
        Path::new(STATE_DIR).join(format!("node-{node}.token"))
    }

    pub fn node_credentials_file(&self) -> PathBuf {
        self.ca_dir().join("node-credentials.yaml")
    }

    /// A root CA (made by `mesh-agent ca init`) and one bootstrap credential
    /// per node: the token for the node's agent, its hash for the CA.
    pub(super) fn write_ca_material(&self) -> anyhow::Result<()> {
        run(Command::new(&self.agent_bin)
            .arg("ca")
            .arg("init")
            .arg("--dir")
            .arg(self.ca_dir()))?;
        let mut creds = String::from("# node bootstrap credentials (hashes only), made by `lab up`\ncredentials:\n");
        for n in &self.nodes {
            let token = random_hex(32)?;
            write_secret(&self.node_token_file(&n.name), token.as_bytes())?;
            let hash: String = sha2::Sha256::digest(token.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            creds.push_str(&format!("  - node: {}\n    tokenSha256: {hash}\n", n.name));
        }
        fs::write(self.node_credentials_file(), creds)?;
        Ok(())
    }

    /// Starts the mesh CA in its namespace and cgroup.
    pub fn start_ca(&self) -> anyhow::Result<()> {
        let mut cmd = self.wrapped(
            CA_NETNS,
            &self.cgroup_root.join("ca"),
            &self.agent_bin.to_string_lossy(),
        );
        cmd.args(["ca", "serve", "--listen", &format!("{CA_IP}:{CA_PORT}")])
            .arg("--dir")
            .arg(self.ca_dir())
            .arg("--node-credentials")
            .arg(self.node_credentials_file())
            .arg("--source-dir")
            .arg(&self.source_dir);
        self.spawn_logged(
            cmd,
            &self.ca_log(),
            &Path::new(STATE_DIR).join("ca.pid"),
            "mesh CA serving",
            "CA",
        )
    }

    pub fn ca_pid(&self) -> Option<u32> {
        let pid: u32 = fs::read_to_string(Path::new(STATE_DIR).join("ca.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        pid_alive(pid).then_some(pid)
    }

    pub fn stop_ca(&self) -> anyhow::Result<()> {
        if let Some(pid) = self.ca_pid() {
            stop_pid(pid, Duration::from_secs(5));
        }
        Ok(())
    }
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_secret(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    Ok(())
}

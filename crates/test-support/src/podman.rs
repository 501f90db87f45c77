//! Real containers for tests: podman with the runc runtime (crun refuses to start containers
//! on these machines: cgroups in hybrid mode), all of its state under one test directory, a
//! CNI network on a [`crate::netbed::NetBed`] bridge, an image imported from a busybox rootfs
//! built here (no registry is reachable), and `podman system service` for the Docker API.
//! Everything is removed when the [`Podman`] drops. Facts from ../shared/notes/testbed-facts.md.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::Temp;

/// A podman whose state lives in a test directory.
pub struct Podman {
    dir: Temp,
    service: Option<Child>,
    /// The Docker API socket (`unix://…`), once [`Podman::serve`] ran.
    pub socket: String,
}

/// The image every test container runs: busybox httpd on 8080, serving `index.html` and
/// `/cgi-bin/one` (50 ms).
pub const IMAGE: &str = "localhost/trellis-test-app:1";

impl Podman {
    /// Configure podman for `bridge` with containers at `first..=last` of `subnet` (the
    /// bridge's `/24`), and import [`IMAGE`]. Panics with what is missing.
    pub fn new(bridge: &str, gateway: Ipv4Addr, first: u8, last: u8) -> Self {
        crate::need("podman", "podman");
        crate::need("runc", "runc");
        crate::need("busybox", "busybox-static");
        let dir = Temp::dir("podman");
        let d = dir.0.clone();
        let [a, b, c, _] = gateway.octets();
        std::fs::create_dir_all(d.join("cni")).unwrap();
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"{e}/events.log\"\ntmp_dir = \"{e}/tmp\"\nstatic_dir = \"{e}/static\"\n\
                 volume_path = \"{e}/volumes\"\nnetwork_cmd_path = \"\"\n\
                 [network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{e}/cni\"\ncni_plugin_dirs = [\"/usr/lib/cni\"]\n",
                e = d.display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{e}/storage\"\nrunroot = \"{e}/run\"\n",
                e = d.display()
            ),
        )
        .unwrap();
        // The bridge plugin on the bed's bridge: no gateway, masquerade, port maps or
        // firewall rules, so nothing is routed off the bridge.
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "trellisnet",
            "plugins": [{
                "type": "bridge", "bridge": bridge, "isGateway": false, "ipMasq": false,
                "hairpinMode": true,
                "capabilities": { "ips": true },
                "ipam": {
                    "type": "host-local",
                    "dataDir": d.join("ipam").display().to_string(),
                    "ranges": [[{
                        "subnet": format!("{a}.{b}.{c}.0/24"),
                        "rangeStart": format!("{a}.{b}.{c}.{first}"),
                        "rangeEnd": format!("{a}.{b}.{c}.{last}"),
                    }]],
                    "routes": [{ "dst": "10.96.0.0/16" }],
                },
            }],
        });
        std::fs::write(d.join("cni/trellisnet.conflist"), conflist.to_string()).unwrap();
        let p = Self {
            dir,
            service: None,
            socket: String::new(),
        };
        p.import_image();
        p
    }

    /// `podman ARGS` with this instance's configuration.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env(
                "CONTAINERS_REGISTRIES_CONF",
                self.dir.join("registries.conf"),
            )
            .args(args);
        c
    }

    /// Run `podman ARGS`; its stdout. Panics with stderr on failure.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().expect("run podman");
        assert!(
            out.status.success(),
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn import_image(&self) {
        let root = self.dir.join("rootfs");
        for sub in ["bin", "www/cgi-bin", "tmp"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let busybox = crate::need("busybox", "busybox-static");
        std::fs::copy(&busybox, root.join("bin/busybox")).expect("copy busybox");
        for applet in ["sh", "httpd", "sleep", "cat", "usleep"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        std::fs::write(root.join("www/index.html"), "container-app\n").unwrap();
        // The page the test bed's VM serves one at a time, here as elastic as containers
        // are: 50 ms each, as many at once as come.
        let one = root.join("www/cgi-bin/one");
        std::fs::write(
            &one,
            "#!/bin/sh\nusleep 50000\nprintf 'Content-Type: text/plain\\r\\n\\r\\ncontainer-one\\n'\n",
        )
        .unwrap();
        std::fs::set_permissions(&one, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut tar = Command::new("tar")
            .args(["-C", root.to_str().unwrap(), "-cf", "-", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("tar");
        let out = self
            .cmd(&[
                "import",
                "--change",
                r#"CMD ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]"#,
                "-",
                IMAGE,
            ])
            .stdin(tar.stdout.take().expect("tar stdout"))
            .output()
            .expect("podman import");
        let _ = tar.wait();
        assert!(
            out.status.success(),
            "podman import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Start `podman system service` (the Docker API) and wait until it answers.
    pub async fn serve(&mut self) -> &str {
        let sock = self.dir.join("podman.sock");
        self.socket = format!("unix://{}", sock.display());
        let child = self
            .cmd(&["system", "service", "--time=0", &self.socket])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("podman system service");
        self.service = Some(child);
        crate::eventually(
            "the podman API answers",
            Duration::from_secs(20),
            async || {
                let s = tokio::net::UnixStream::connect(&sock).await.ok()?;
                drop(s);
                Some(())
            },
        )
        .await;
        &self.socket
    }

    /// Where this instance keeps its files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A directory for test files next to podman's.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .cmd(&["rm", "--force", "--all", "--time", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.service.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Mounts podman may leave under its state (vfs makes none; the run dir's shm may).
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "grep -o ' {}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
                    self.dir.display()
                ),
            ])
            .status();
    }
}

//! A real virtual machine for tests: QEMU with software emulation (TCG; this machine's KVM is
//! a paravirtualised one that a stock kernel crawls under), Debian's kernel and an initramfs
//! that `testbed/vm/build.sh` makes with busybox and the `trellis` binary under test, a tap
//! on a [`NetBed`] bridge. Its `/init` (testbed/vm/init) serves `vm-app` on :8080 and runs
//! `trellis join` with what the kernel command line says; a command channel on :2323 lets a
//! test inject faults. QEMU is killed and the tap removed when the [`Vm`] drops.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{netbed::NetBed, Temp};

/// A running VM.
pub struct Vm {
    qemu: Child,
    dir: Temp,
    /// Its address on the bed.
    pub ip: Ipv4Addr,
}

/// The repository's root (this crate is crates/test-support).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl Vm {
    /// Build (or reuse) the kernel and initramfs for `trellis`; panics with what is missing.
    pub fn build(trellis: &str) -> PathBuf {
        let out = repo().join("target/testbed/vm");
        let st = Command::new("bash")
            .arg(repo().join("testbed/vm/build.sh"))
            .arg(&out)
            .arg(trellis)
            .status()
            .expect("run testbed/vm/build.sh");
        assert!(st.success(), "testbed/vm/build.sh failed");
        out
    }

    /// Boot host `n` of `bed` from `images` with `vm_*` settings (`vm_ip` and `vm_gw` are
    /// added), and wait until its init says it is up.
    pub async fn boot(bed: &mut NetBed, n: u8, images: &Path, settings: &[(&str, &str)]) -> Self {
        let tap = bed.tap(n);
        let ip = bed.addr(n);
        let dir = Temp::dir("vm");
        let mut append = format!(
            "console=ttyS0 quiet panic=-1 vm_ip={ip}/24 vm_gw={}",
            bed.gateway()
        );
        for (k, v) in settings {
            append.push_str(&format!(" vm_{k}={v}"));
        }
        let console = dir.join("console.log");
        // The uncompressed kernel boots in about half the time under TCG, when there is one.
        let kernel = [images.join("vmlinux"), images.join("vmlinuz")]
            .into_iter()
            .find(|k| k.exists())
            .expect("a kernel in the image dir");
        let qemu = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "512",
                "-smp",
                "1",
                "-nographic",
                "-nodefaults",
            ])
            .args(["-no-reboot", "-rtc", "base=utc"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(images.join("initramfs.cpio"))
            .args(["-append", &append])
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            ])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:78:00:{n:02x}"),
            ])
            .args(["-serial", &format!("file:{}", console.display())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64 (Debian: apt-get install qemu-system-x86)");
        let vm = Self { qemu, dir, ip };
        vm.wait_console("VM-READY", Duration::from_secs(90)).await;
        vm
    }

    /// What the VM printed on its console so far.
    pub fn console(&self) -> String {
        let bytes = std::fs::read(self.dir.join("console.log")).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Wait until the console shows `text`.
    pub async fn wait_console(&self, text: &str, timeout: Duration) {
        let what = format!("the VM's console to show {text:?}");
        crate::eventually(&what, timeout, async || {
            self.console().contains(text).then_some(())
        })
        .await;
    }

    /// Run a shell command in the VM (over its command channel); its output.
    pub async fn exec(&self, cmd: &str) -> String {
        let addr = SocketAddr::from((self.ip, 2323));
        let mut s = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .expect("connect to the VM's command channel in time")
        .expect("connect to the VM's command channel");
        s.write_all(format!("{cmd}\nexit\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut out)).await;
        out
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("==== the VM's console\n{}", self.console());
        }
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

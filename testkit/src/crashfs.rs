//! A directory that loses, at a power cut, exactly what POSIX lets a power cut take:
//! `tests/powercut/crashfs.py` (a FUSE filesystem in the pinned Python environment) mounted
//! over the agent's state directory. What it keeps at a cut is written to an image directory,
//! the "disk", which the next mount starts from.
//!
//! A real cut stops every process at once, so a test stops the agent (SIGSTOP) before
//! [`CrashFs::cut`], then kills it and [`CrashFs::unmount`]s: the agent never sees the
//! filesystem fail, only its next run sees what survived.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pyenv::{pyenv_python, workspace_root};

/// How long a mount may take to appear, or an unmount to finish.
const MOUNT_WAIT: Duration = Duration::from_secs(20);

/// A mounted crashfs and its control socket.
pub struct CrashFs {
    child: Child,
    mount: PathBuf,
    control: PathBuf,
    stderr: PathBuf,
    mounted: bool,
}

impl CrashFs {
    /// Mounts a crashfs at `mount` (created if missing) holding what `image` holds (created
    /// empty if missing). `seed` makes the cut's random writeback repeatable; every fsync
    /// takes `fsync_delay_ms` (slow flash).
    pub fn mount(mount: &Path, image: &Path, seed: u64, fsync_delay_ms: u64) -> CrashFs {
        std::fs::create_dir_all(mount).unwrap();
        std::fs::create_dir_all(image).unwrap();
        let control = image.with_extension("sock");
        let stderr = image.with_extension("log");
        let script = workspace_root().join("tests/powercut/crashfs.py");
        let child = Command::new(pyenv_python())
            .arg(&script)
            .arg(mount)
            .arg("--image")
            .arg(image)
            .arg("--control")
            .arg(&control)
            .arg("--seed")
            .arg(seed.to_string())
            .arg("--fsync-delay-ms")
            .arg(fsync_delay_ms.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start crashfs.py");
        let mut fs = CrashFs {
            child,
            mount: mount.to_path_buf(),
            control,
            stderr,
            mounted: false,
        };
        let deadline = Instant::now() + MOUNT_WAIT;
        while !(fs.is_mounted() && fs.control.exists()) {
            if let Some(status) = fs.child.try_wait().unwrap() {
                panic!(
                    "crashfs exited ({status}) before mounting {}: {}\n\
                     (it needs /dev/fuse, libfuse3 and root)",
                    fs.mount.display(),
                    fs.stderr_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "crashfs did not mount within {MOUNT_WAIT:?}: {}",
                fs.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        fs.mounted = true;
        fs
    }

    fn is_mounted(&self) -> bool {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mount = self.mount.to_string_lossy();
        mountinfo
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(&*mount) && l.contains(" - fuse"))
    }

    fn request(&self, command: &str) -> String {
        let mut stream = UnixStream::connect(&self.control)
            .unwrap_or_else(|e| panic!("crashfs control {}: {e}", self.control.display()));
        stream.write_all(format!("{command}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer).unwrap();
        answer.trim_end().to_owned()
    }

    /// The power cut: every later operation fails, and the image becomes what a disk would
    /// hold now. Stop the processes using the mount first.
    pub fn cut(&self) {
        let answer = self.request("cut");
        assert_eq!(answer, "ok", "crashfs cut: {}", self.stderr_text());
    }

    /// The filesystem's counters: fsyncs, fsyncdirs, writes, fsync_ms_total, fsync_ms_max,
    /// cuts.
    pub fn stats(&self) -> serde_json::Value {
        let answer = self.request("stats");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("crashfs stats {answer:?}: {e}"))
    }

    /// Unmounts (lazily, so a process not yet reaped does not keep it busy) and waits for
    /// crashfs to exit.
    pub fn unmount(mut self) {
        self.umount();
    }

    fn umount(&mut self) {
        if !self.mounted {
            return;
        }
        self.mounted = false;
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount)
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + MOUNT_WAIT;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("crashfs did not exit after umount: {}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for CrashFs {
    fn drop(&mut self) {
        if self.mounted {
            self.mounted = false;
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

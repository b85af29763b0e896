#!/usr/bin/env python3
"""crashfs: a FUSE filesystem that forgets what a power cut would.

The agent's state directory is mounted from here in the power-cut and slow-flash tests
(tests/powercut.rs). It keeps every file in memory and tracks, beside what a reader sees now,
what is *durable*: what a disk would still hold if the power went now.

The model is the one POSIX guarantees, not what one filesystem happens to do:
  * a file's contents are durable as of its last fsync or fdatasync;
  * a directory's entries (creations, renames, unlinks) are durable as of its last fsync.
On top of that, a cut may also have written back some of what was not synced, as a real
kernel does in the background: each file may keep a random prefix of the bytes appended
after its last fsync (which tears a record in two as often as not), and each directory may
keep its current entries instead of its synced ones. Nothing else survives.

Usage:
  crashfs.py MOUNTPOINT --image DIR --control SOCKET [--seed N] [--fsync-delay-ms MS]

At start it loads DIR (the disk as the last cut left it) into memory and mounts MOUNTPOINT.
SOCKET is a Unix socket taking one command per connection, answered with one line:
  cut     Freeze: every later operation fails with EIO. Write the durable state, with the
          random writeback above, into DIR (replacing it), and answer "ok". Stop the
          processes using the mount first (SIGSTOP): a power cut stops them at the same
          instant, so they must not see the freeze. Then kill them and unmount.
  stats   Answer a JSON object of counters (fsyncs, fsync_ms_total, writes, ...).
--fsync-delay-ms makes each fsync and fdatasync take that long (slow flash); other
operations are not delayed, and may run while an fsync is in progress. What an fsync makes
durable is what the file held when it began.

Runs until the mount is unmounted. Standard library and mfusepy (libfuse 3) only.
"""

import argparse
import errno
import json
import os
import random
import shutil
import socket
import stat
import sys
import threading
import time

import mfusepy as fuse


class Node:
    def __init__(self, mode, data=b"", entries=None):
        self.mode = mode
        self.data = bytearray(data)
        # The contents a cut keeps: as of the last fsync (loaded files start synced).
        self.durable = bytes(data)
        self.entries = entries if entries is not None else ({} if stat.S_ISDIR(mode) else None)
        self.durable_entries = dict(self.entries) if self.entries is not None else None
        now = time.time()
        self.mtime = now
        self.ctime = now

    def is_dir(self):
        return stat.S_ISDIR(self.mode)


class CrashFS(fuse.Operations):
    use_ns = True

    def __init__(self, image, seed, fsync_delay):
        self.mutex = threading.Lock()
        self.frozen = False
        self.rng = random.Random(seed)
        self.fsync_delay = fsync_delay
        self.handles = {}
        self.next_fh = 1
        self.stats = {"fsyncs": 0, "fsyncdirs": 0, "writes": 0, "fsync_ms_total": 0.0,
                      "fsync_ms_max": 0.0, "cuts": 0}
        self.root = self.load(image)

    # --- the disk image ---------------------------------------------------------------------

    def load(self, path):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            entries = {name: self.load(os.path.join(path, name)) for name in os.listdir(path)}
            return Node(st.st_mode, entries=entries)
        with open(path, "rb") as f:
            return Node(st.st_mode, f.read())

    def survivor(self, node):
        """What of `node` a cut leaves, as (mode, bytes) or (mode, {name: survivor})."""
        if node.is_dir():
            entries = node.durable_entries
            if node.entries != node.durable_entries and self.rng.random() < 0.5:
                entries = node.entries
            return node.mode, {name: self.survivor(child) for name, child in entries.items()}
        data = node.durable
        current = bytes(node.data)
        if len(current) > len(data) and current.startswith(data) and self.rng.random() < 0.5:
            data = current[: self.rng.randint(len(data), len(current))]
        return node.mode, data

    @staticmethod
    def write_tree(path, tree):
        mode, content = tree
        if isinstance(content, dict):
            os.mkdir(path)
            for name, child in content.items():
                CrashFS.write_tree(os.path.join(path, name), child)
        else:
            with open(path, "wb") as f:
                f.write(content)
        os.chmod(path, stat.S_IMODE(mode))

    def cut(self, image):
        with self.mutex:
            self.frozen = True
            self.stats["cuts"] += 1
            tree = self.survivor(self.root)
        staging = image + ".cut"
        shutil.rmtree(staging, ignore_errors=True)
        self.write_tree(staging, tree)
        shutil.rmtree(image)
        os.rename(staging, image)

    # --- helpers -----------------------------------------------------------------------------

    def check(self):
        if self.frozen:
            raise fuse.FuseOSError(errno.EIO)

    def lookup(self, path):
        node = self.root
        for part in [p for p in path.split("/") if p]:
            if not node.is_dir() or part not in node.entries:
                raise fuse.FuseOSError(errno.ENOENT)
            node = node.entries[part]
        return node

    def parent(self, path):
        head, name = os.path.split(path.rstrip("/"))
        node = self.lookup(head)
        if not node.is_dir():
            raise fuse.FuseOSError(errno.ENOTDIR)
        return node, name

    def handle(self, node):
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = node
        return fh

    def node_of(self, path, fh):
        return self.handles.get(fh) if fh else self.lookup(path)

    # --- operations --------------------------------------------------------------------------

    def getattr(self, path, fh=None):
        with self.mutex:
            self.check()
            node = self.node_of(path, fh) if fh in self.handles else self.lookup(path)
            size = 4096 if node.is_dir() else len(node.data)
            return {
                "st_mode": node.mode,
                "st_nlink": 2 if node.is_dir() else 1,
                "st_size": size,
                "st_blocks": (size + 511) // 512,
                "st_uid": os.getuid(),
                "st_gid": os.getgid(),
                "st_mtime": int(node.mtime * 1e9),
                "st_ctime": int(node.ctime * 1e9),
                "st_atime": int(node.mtime * 1e9),
            }

    def readdir(self, path, fh):
        with self.mutex:
            self.check()
            node = self.lookup(path)
            return [".", ".."] + list(node.entries)

    def opendir(self, path):
        with self.mutex:
            self.check()
            return self.handle(self.lookup(path))

    def releasedir(self, path, fh):
        with self.mutex:
            self.handles.pop(fh, None)
        return 0

    def mkdir(self, path, mode):
        with self.mutex:
            self.check()
            parent, name = self.parent(path)
            if name in parent.entries:
                raise fuse.FuseOSError(errno.EEXIST)
            parent.entries[name] = Node(stat.S_IFDIR | mode)
        return 0

    def rmdir(self, path):
        with self.mutex:
            self.check()
            parent, name = self.parent(path)
            node = parent.entries.get(name)
            if node is None:
                raise fuse.FuseOSError(errno.ENOENT)
            if node.entries:
                raise fuse.FuseOSError(errno.ENOTEMPTY)
            del parent.entries[name]
        return 0

    def create(self, path, mode, fi=None):
        with self.mutex:
            self.check()
            parent, name = self.parent(path)
            node = parent.entries.get(name)
            if node is None:
                node = Node(stat.S_IFREG | (mode & 0o7777))
                parent.entries[name] = node
            return self.handle(node)

    def open(self, path, flags):
        with self.mutex:
            self.check()
            node = self.lookup(path)
            if flags & os.O_TRUNC:
                node.data.clear()
            return self.handle(node)

    def release(self, path, fh):
        with self.mutex:
            self.handles.pop(fh, None)
        return 0

    def read(self, path, size, offset, fh):
        with self.mutex:
            self.check()
            node = self.node_of(path, fh)
            return bytes(node.data[offset:offset + size])

    def write(self, path, data, offset, fh):
        with self.mutex:
            self.check()
            node = self.node_of(path, fh)
            end = offset + len(data)
            if len(node.data) < offset:
                node.data.extend(b"\0" * (offset - len(node.data)))
            node.data[offset:end] = data
            node.mtime = time.time()
            self.stats["writes"] += 1
            return len(data)

    def truncate(self, path, length, fh=None):
        with self.mutex:
            self.check()
            node = self.node_of(path, fh) if fh in self.handles else self.lookup(path)
            if length < len(node.data):
                del node.data[length:]
            else:
                node.data.extend(b"\0" * (length - len(node.data)))
        return 0

    def fsync(self, path, datasync, fh):
        started = time.monotonic()
        with self.mutex:
            self.check()
            node = self.node_of(path, fh)
            snapshot = bytes(node.data)
        if self.fsync_delay:
            time.sleep(self.fsync_delay)
        with self.mutex:
            self.check()
            node.durable = snapshot
            took = (time.monotonic() - started) * 1000
            self.stats["fsyncs"] += 1
            self.stats["fsync_ms_total"] += took
            self.stats["fsync_ms_max"] = max(self.stats["fsync_ms_max"], took)
        return 0

    def fsyncdir(self, path, datasync, fh):
        with self.mutex:
            self.check()
            node = self.handles.get(fh) or self.lookup(path)
            snapshot = dict(node.entries)
        if self.fsync_delay:
            time.sleep(self.fsync_delay)
        with self.mutex:
            self.check()
            node.durable_entries = snapshot
            self.stats["fsyncdirs"] += 1
        return 0

    def flush(self, path, fh):
        return 0

    def unlink(self, path):
        with self.mutex:
            self.check()
            parent, name = self.parent(path)
            if name not in parent.entries:
                raise fuse.FuseOSError(errno.ENOENT)
            del parent.entries[name]
        return 0

    def rename(self, old, new, flags=0):
        with self.mutex:
            self.check()
            src, old_name = self.parent(old)
            dst, new_name = self.parent(new)
            if old_name not in src.entries:
                raise fuse.FuseOSError(errno.ENOENT)
            dst.entries[new_name] = src.entries.pop(old_name)
        return 0

    def chmod(self, path, mode, fh=None):
        with self.mutex:
            self.check()
            node = self.lookup(path)
            node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
        return 0

    def chown(self, path, uid, gid, fh=None):
        return 0

    def utimens(self, path, times=None, fh=None):
        return 0

    def statfs(self, path):
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 20, "f_bfree": 1 << 19,
                "f_bavail": 1 << 19, "f_files": 1 << 16, "f_ffree": 1 << 15, "f_namemax": 255}


def serve_control(fs, path, image):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    sock.bind(path)
    sock.listen(4)
    while True:
        conn, _ = sock.accept()
        with conn:
            command = conn.makefile().readline().strip()
            try:
                if command == "cut":
                    fs.cut(image)
                    answer = "ok"
                elif command == "stats":
                    with fs.mutex:
                        answer = json.dumps(fs.stats)
                else:
                    answer = "error: unknown command %r" % command
            except Exception as e:  # the test must see why, not hang
                answer = "error: %s" % e
            conn.sendall((answer + "\n").encode())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mountpoint")
    ap.add_argument("--image", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fsync-delay-ms", type=int, default=0)
    args = ap.parse_args()
    # libfuse may change directory once mounted: nothing below may depend on the cwd.
    args.image = os.path.abspath(args.image)
    args.control = os.path.abspath(args.control)
    fs = CrashFS(args.image, args.seed, args.fsync_delay_ms / 1000.0)
    threading.Thread(target=serve_control, args=(fs, args.control, args.image),
                     daemon=True).start()
    # Default permissions and no caching of attributes or entries: what the agent sees is
    # always what this process holds.
    fuse.FUSE(fs, args.mountpoint, foreground=True, nothreads=False, default_permissions=True,
              attr_timeout=0, entry_timeout=0, negative_timeout=0, fsname="crashfs")


if __name__ == "__main__":
    sys.exit(main())

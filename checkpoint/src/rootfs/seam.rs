//! The seam tests use to fail an apply, a rollback or a commit at any one filesystem
//! operation: every operation that changes the target (or the undo directory in it) first asks
//! the [`FsSeam`], and an error it returns is that operation's error. Production code passes
//! [`NoFaults`].

use std::fmt;

/// What kind of change an operation makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsOpKind {
    /// Append a record to the undo journal (or cut records off it during a rollback).
    Journal,
    /// Make a directory.
    Mkdir,
    /// Create a file (a temporary file, or the journal).
    Create,
    /// Write file data.
    Write,
    /// Set a file's final length.
    Truncate,
    /// Rename (move an entry aside, put a new one in place, put an old one back).
    Rename,
    /// Unlink a file or remove a directory (with what it holds).
    Remove,
    /// Make a device node or a fifo.
    Mknod,
    /// Make a symlink.
    Symlink,
    /// Make a hard link.
    Link,
    /// Change the owner.
    Owner,
    /// Change the permission bits.
    Mode,
    /// Set or remove an extended attribute.
    Xattr,
    /// Set access and modification times.
    Times,
}

/// One filesystem operation about to happen: its kind and the path it changes (relative to
/// the target root, `a/b`; names in the undo directory are given as `<undo>/<name>`).
#[derive(Debug, Clone, Copy)]
pub struct FsOp<'a> {
    /// What it does.
    pub kind: FsOpKind,
    /// Where.
    pub path: &'a str,
}

impl fmt::Display for FsOp<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}", self.kind, self.path)
    }
}

/// Consulted before every filesystem operation of an apply, a rollback and a commit.
pub trait FsSeam: Send + Sync {
    /// `Err` makes the operation fail with that error, as if the kernel had returned it.
    fn before(&self, op: &FsOp<'_>) -> std::io::Result<()>;
}

/// The production seam: never interferes.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFaults;

impl FsSeam for NoFaults {
    fn before(&self, _op: &FsOp<'_>) -> std::io::Result<()> {
        Ok(())
    }
}

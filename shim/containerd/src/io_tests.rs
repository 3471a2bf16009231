use super::*;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{sendmsg, ControlMessage};
use nix::sys::stat::Mode;

fn fifo(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o600)).expect("mkfifo");
    path.to_string_lossy().into_owned()
}

/// The process's ends of the pipes, as cryo would pass them on.
fn process_ends(io: CommandIo) -> (Option<File>, Option<File>, Option<File>) {
    match io {
        CommandIo::Passed {
            stdin,
            stdout,
            stderr,
        } => (
            stdin.map(File::from),
            stdout.map(File::from),
            stderr.map(File::from),
        ),
        CommandIo::Captured => panic!("pipes are passed"),
    }
}

#[test]
fn output_reaches_the_fifo_and_drains_at_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = StdioPaths {
        stdout: fifo(dir.path(), "stdout"),
        stderr: fifo(dir.path(), "stderr"),
        ..Default::default()
    };
    // containerd's side reads the fifos (non-blocking open: no writer yet).
    let reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&paths.stdout)
        .expect("open reader");
    let (pipes, io) = make_pipes(&paths, 0, 0).expect("pipes");
    let (_, stdout, stderr) = process_ends(io);
    let process_io = ProcessIo::copy_pipes(&paths, pipes).expect("copy");
    let (mut stdout, stderr) = (stdout.expect("stdout"), stderr.expect("stderr"));
    stdout.write_all(b"hello 1\n").expect("write");
    // The process exits: its ends close, the copies end.
    drop((stdout, stderr));
    process_io.drain();
    let flags = fcntl(reader.as_raw_fd(), FcntlArg::F_GETFL).expect("flags");
    fcntl(
        reader.as_raw_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK),
    )
    .expect("blocking");
    let mut line = String::new();
    BufReader::new(reader).read_line(&mut line).expect("read");
    assert_eq!(line, "hello 1\n");
}

#[test]
fn output_written_before_the_client_opens_its_reader_is_not_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = StdioPaths {
        stdout: fifo(dir.path(), "stdout"),
        ..Default::default()
    };
    let (pipes, io) = make_pipes(&paths, 0, 0).expect("pipes");
    let (_, stdout, _) = process_ends(io);
    let process_io = ProcessIo::copy_pipes(&paths, pipes).expect("copy");
    // A short exec: it writes and exits before containerd's client opened the fifo.
    let mut stdout = stdout.expect("stdout");
    stdout.write_all(b"exec-works\n").expect("write");
    drop(stdout);
    thread::sleep(Duration::from_millis(50));
    let reader = thread::spawn({
        let path = paths.stdout.clone();
        move || {
            let mut text = String::new();
            File::open(path)
                .expect("client reader")
                .read_to_string(&mut text)
                .expect("read");
            text
        }
    });
    process_io.drain();
    assert_eq!(reader.join().expect("reader"), "exec-works\n");
}

#[test]
fn drain_gives_up_on_a_fifo_nobody_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = StdioPaths {
        stdout: fifo(dir.path(), "stdout"),
        ..Default::default()
    };
    let (pipes, io) = make_pipes(&paths, 0, 0).expect("pipes");
    let (_, stdout, _) = process_ends(io);
    let process_io = ProcessIo::copy_pipes(&paths, pipes).expect("copy");
    drop(stdout);
    let start = Instant::now();
    process_io.drain();
    assert!(start.elapsed() < DRAIN_TIMEOUT + Duration::from_secs(1));
}

#[test]
fn stdin_sees_eof_only_after_close_io() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = StdioPaths {
        stdin: fifo(dir.path(), "stdin"),
        ..Default::default()
    };
    let (pipes, io) = make_pipes(&paths, 0, 0).expect("pipes");
    let (stdin, _, _) = process_ends(io);
    let process_io = ProcessIo::copy_pipes(&paths, pipes).expect("copy");
    // The client writes and goes away.
    {
        let mut client = OpenOptions::new()
            .write(true)
            .open(&paths.stdin)
            .expect("client writer");
        client.write_all(b"input\n").expect("write");
    }
    let mut stdin = BufReader::new(stdin.expect("stdin"));
    let mut line = String::new();
    stdin.read_line(&mut line).expect("read");
    assert_eq!(line, "input\n");
    // No EOF while the shim keeps its writer: the read would block, so check with poll.
    let fd = stdin.get_ref().as_fd();
    let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
    let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)).expect("poll");
    assert_eq!(ready, 0, "stdin must not reach EOF before CloseIO");
    process_io.close_stdin();
    let mut rest = Vec::new();
    stdin.read_to_end(&mut rest).expect("EOF after CloseIO");
    assert!(rest.is_empty());
}

#[test]
fn output_to_a_file_is_appended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("logs").join("out.log");
    std::fs::create_dir_all(log.parent().expect("parent")).expect("mkdir");
    std::fs::write(&log, "before\n").expect("write");
    let paths = StdioPaths {
        stdout: format!("file://{}", log.display()),
        ..Default::default()
    };
    let (pipes, io) = make_pipes(&paths, 0, 0).expect("pipes");
    let (_, stdout, _) = process_ends(io);
    let process_io = ProcessIo::copy_pipes(&paths, pipes).expect("copy");
    let mut stdout = stdout.expect("stdout");
    stdout.write_all(b"after\n").expect("write");
    drop(stdout);
    process_io.drain();
    assert_eq!(
        std::fs::read_to_string(&log).expect("read"),
        "before\nafter\n"
    );
}

#[test]
fn binary_log_uris_are_refused_by_name() {
    let paths = StdioPaths {
        stdout: "binary:///usr/bin/logger?x=1".into(),
        ..Default::default()
    };
    let (pipes, _io) = make_pipes(&paths, 0, 0).expect("pipes");
    let text = ProcessIo::copy_pipes(&paths, pipes)
        .err()
        .expect("refused")
        .to_string();
    assert!(text.contains("binary:///usr/bin/logger"), "{text}");
}

#[test]
fn the_console_socket_delivers_the_master() {
    let socket = ConsoleSocket::new().expect("socket");
    let dir = socket.dir.clone();
    assert!(socket.path().starts_with(&dir));
    // What cryo does: connect and send an fd (here one end of a pipe) with SCM_RIGHTS.
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
    let client = UnixStream::connect(socket.path()).expect("connect");
    let payload = [io::IoSlice::new(b"/dev/pts/9")];
    let fds = [write_end.as_raw_fd()];
    sendmsg::<()>(
        client.as_raw_fd(),
        &payload,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    let mut master = socket.receive_master().expect("master");
    master
        .write_all(b"through")
        .expect("write through the received fd");
    drop((master, write_end));
    let mut got = String::new();
    File::from(read_end).read_to_string(&mut got).expect("read");
    assert_eq!(got, "through");
    drop(socket);
    assert!(!dir.exists(), "the socket's directory goes with it");
}

//! `thaw-vmm`: boots one micro-VM and runs it until the guest stops or the
//! control socket says stop. Exit status: 0 when the guest reset/powered
//! off or was stopped, 2 on a guest triple fault, 1 on any VMM/KVM error,
//! 64 on a bad command line.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use thaw_vmm::boot_marker;
use thaw_vmm::cli::{self, Invocation, Launch};
use thaw_vmm::control::{self, VmmControl};
use thaw_vmm::jail::JailConfig;
use thaw_vmm::pid_namespace;
use thaw_vmm::snapshot::{self, VmHandle};
use thaw_vmm::vcpu::VmExit;
use thaw_vmm::{vm, Error};

/// Binds the control socket; a stale socket file nobody listens on is
/// replaced, a live one is an error.
fn bind_api_socket(path: &Path) -> Result<UnixListener, Error> {
    let io = |source| Error::Io {
        what: format!("control socket {}", path.display()),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another VMM is listening there",
            )));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    // Whoever may connect can stop or reconfigure the VM: owner only.
    thaw_snapshots::private::bind_socket(path).map_err(io)
}

/// The virtio-fs server keeps up to 65536 inodes and as many open files
/// per share: lift the soft descriptor limit to the hard one, so that bound
/// (not the default 1024) is what a guest meets.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Guest memory must never leave the process: no core file (RLIMIT_CORE
/// 0), and not dumpable, so neither a crash nor a process of another uid
/// (ptrace, `/proc/<pid>/mem`) can read it. Set before guest memory is
/// mapped.
fn keep_guest_memory_private() -> Result<(), Error> {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass; prctl takes integers.
    let failed = unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &none) != 0
            || libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
    };
    if failed {
        return Err(Error::Io {
            what: "making the VMM non-dumpable (RLIMIT_CORE, PR_SET_DUMPABLE)".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn run(
    launch: Launch,
    deny_syscalls: &[libc::c_long],
    jail: Option<&JailConfig>,
) -> Result<VmExit, Error> {
    keep_guest_memory_private()?;
    raise_fd_limit();
    // A template in a store is held for as long as this VM runs, so the
    // store's quota never evicts it under us (and its space is counted).
    let _pin = match &launch {
        Launch::Restore(opts) => thaw_snapshots::template::Store::pin(&opts.snapshot)?,
        Launch::Boot(_) => None,
    };
    if let Some(jail) = jail {
        // From here on this is the pid namespace's init; the process the
        // caller started waits for it.
        let parent = thaw_vmm::pid_namespace::enter()?;
        // What the jail hides, looked up or opened first.
        thaw_vmm::vm::host_is_pvm();
        thaw_vmm::proc_self::open().map_err(|source| Error::Io {
            what: "opening /proc/self before the jail".into(),
            source,
        })?;
        thaw_vmm::jail::enter(
            jail,
            &thaw_vmm::jail::binds_for(&launch, &jail.binds),
            &parent,
        )?;
    }
    // Before any other thread exists: all inherit the process filter, and
    // the device threads a restore starts get their own lists.
    thaw_vmm::seccomp::install(&[])?;
    thaw_vmm::confined::enable(deny_syscalls)?;
    let mut vm = match launch {
        Launch::Boot(config) => vm::build(config)?,
        Launch::Restore(opts) => {
            let vm = snapshot::restore(&opts)?;
            vm.times.record("restored".into());
            vm
        }
    };
    let api_socket = vm.config.api_socket.clone();
    // Bind before the vCPUs run, so a caller that sees the socket can use it.
    let listener = api_socket.as_deref().map(bind_api_socket).transpose()?;
    let handle = Arc::new(VmHandle::new(&vm)?);
    // Set up with them allowed, from here on the VM runs without the calls
    // an operator forbade (the control thread inherits this; the launcher,
    // started next, starts the vCPUs and device threads, whose lists lack
    // them).
    thaw_vmm::seccomp::deny_on_this_thread(deny_syscalls)?;
    thaw_vmm::confined::start_launcher().map_err(|source| Error::Io {
        what: "starting the thread launcher".into(),
        source,
    })?;
    let exits = vm.start()?;

    if let Some(listener) = listener {
        let ctl = VmmControl {
            vm: handle,
            exits: vm.exit_sender(),
            times: vm.times.clone(),
            guest_ram: vm.guest_ram_host_ranges(),
            disks: vm.disk_attacher(),
            taps: vm.tap_attacher(),
            shares: vm.share_attacher(),
        };
        control::spawn_server(listener, Arc::new(ctl)).map_err(|source| Error::Io {
            what: "starting the control thread".into(),
            source,
        })?;
    }

    release_freed_heap();
    // The first vCPU to stop, or the control socket, says why we end.
    let exit = exits
        .recv()
        .unwrap_or(VmExit::Error("all vCPUs vanished".into()));
    vm.control.stop_and_join();
    // The control thread still holds the devices, so their destructors do
    // not run before exit: remove the host-side sockets we created here.
    if let Some(path) = &api_socket {
        let _ = std::fs::remove_file(path);
    }
    if let Some(v) = &vm.config.vsock {
        let _ = std::fs::remove_file(&v.uds_path);
    }
    Ok(exit)
}

/// One malloc arena for the whole process. glibc gives each new thread an
/// arena of its own (up to 8 per CPU), each with dirty pages of its own; a
/// VMM has a thread per device. With one arena and the trim below, an idle
/// sandbox's VMM went from 784 to 720 KiB Private_Dirty without guest
/// memory (PVM, release). Its threads allocate little, so sharing one lock
/// costs nothing.
fn one_malloc_arena() {
    // SAFETY: mallopt only sets an allocator parameter; no thread exists yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// Hands the heap freed while restoring (the state file, its decoding) back
/// to the host, so an idle VM does not keep it as private memory.
fn release_freed_heap() {
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
}

fn main() {
    one_malloc_arena();
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() == Some(std::ffi::OsStr::new(pid_namespace::PARENT_ARG)) {
        match pid_namespace::parse_parent_arg(args.next().as_deref()) {
            Some(child) => pid_namespace::wait_for(child),
            None => {
                eprintln!("thaw-vmm: {} needs a pid", pid_namespace::PARENT_ARG);
                std::process::exit(64);
            }
        }
    }
    boot_marker::set_process_start();
    let (launch, deny_syscalls, jail) = match cli::parse(std::env::args_os()) {
        Ok(Invocation::Launch {
            launch,
            deny_syscalls,
            jail,
        }) => (launch, deny_syscalls, jail),
        Ok(Invocation::Template(t)) => std::process::exit(t.run()),
        Err(e) => std::process::exit(cli::report(&e)),
    };
    thaw_vmm::logger::init();
    match run(launch, &deny_syscalls, jail.as_ref()) {
        Ok(exit) => {
            match &exit {
                VmExit::GuestReset => {
                    eprintln!("thaw-vmm: guest requested reset/poweroff; stopped")
                }
                VmExit::GuestHalted => eprintln!("thaw-vmm: guest halted; stopped"),
                VmExit::GuestShutdown => {
                    eprintln!("thaw-vmm: guest triple-faulted (shutdown); stopped")
                }
                VmExit::Stopped => eprintln!("thaw-vmm: stopped by the control socket"),
                VmExit::Error(e) => eprintln!("thaw-vmm: error: {e}"),
            }
            std::process::exit(exit.exit_code());
        }
        Err(e) => {
            eprintln!("thaw-vmm: error: {e}");
            std::process::exit(1);
        }
    }
}

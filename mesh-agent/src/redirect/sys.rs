//! Raw bpf(2) calls that aya has no public API for.
use std::path::Path;

/// Puts `prog` into the link pinned at `pin` (BPF_LINK_UPDATE; aya has no
/// public call for it on sk_msg links). Ok(false): nothing is pinned there.
#[allow(unsafe_code)]
pub(super) fn update_pinned_link(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> std::io::Result<bool> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = match sys_bpf(BPF_OBJ_GET, &get) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
        Err(e) => return Err(e),
    };
    // SAFETY: BPF_OBJ_GET returned a new descriptor owned by nobody else.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let update = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    sys_bpf(BPF_LINK_UPDATE, &update)?;
    Ok(true)
}

/// bpf(2) with `attr` as the command's attribute struct.
#[allow(unsafe_code)]
fn sys_bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: the kernel reads `size_of::<T>()` bytes of a live struct (a
    // prefix of union bpf_attr; the rest counts as zero); pointers inside
    // it are the caller's and outlive the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

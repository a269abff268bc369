//! The unsafe helpers of `repair`: plain-data socket options and int ioctls nix does not wrap.
//! Each `unsafe` block is allowed where it stands, with a `// SAFETY:` comment.

use super::*;

/// Plain-old-data option values: `repr(C)` or primitive, no padding, every bit pattern valid.
pub(super) trait Pod: Copy {}
impl Pod for i32 {}
impl Pod for u32 {}
impl Pod for TcpWindow {}
impl Pod for TcpRepairOpt {}

/// `setsockopt(fd, level, name, &value, sizeof value)`.
#[allow(unsafe_code)]
pub(super) fn set_opt<T: Pod>(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    value: &T,
) -> Result<(), Errno> {
    // SAFETY: the fd is open for the borrow's duration; `value` points to a live `T` (plain
    // data, see `Pod`) and its exact size is passed, so the kernel reads only that memory.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    Errno::result(rc).map(drop)
}

/// `getsockopt(fd, level, name)` into a `T`; fails with `EINVAL` if the kernel wrote less
/// than a whole `T`.
#[allow(unsafe_code)]
pub(super) fn get_opt<T: Pod + Default>(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
) -> Result<T, Errno> {
    let mut value = T::default();
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the fd is open for the borrow's duration; `value` is a live, writable `T` of
    // plain data (any bytes the kernel writes are a valid `T`) and `len` holds its exact
    // size, so the kernel writes at most that many bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    Errno::result(rc)?;
    if len as usize == mem::size_of::<T>() {
        Ok(value)
    } else {
        Err(Errno::EINVAL)
    }
}

/// The fields of `struct tcp_info` read here (state, options, window scales).
#[derive(Debug, Clone, Copy)]
pub(super) struct TcpInfoHead {
    pub(super) state: u8,
    pub(super) options: u8,
    pub(super) snd_wscale: u8,
    pub(super) rcv_wscale: u8,
}

/// `getsockopt(TCP_INFO)`: the head of `struct tcp_info`.
#[allow(unsafe_code)]
pub(super) fn tcp_info(fd: BorrowedFd<'_>) -> Result<TcpInfoHead, Errno> {
    // SAFETY: `tcp_info` is a C struct of integers, for which all-zero bytes are valid.
    let mut info: libc::tcp_info = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is open for the borrow's duration; `info` is a live, writable
    // `tcp_info` and `len` its size, so the kernel writes at most that many bytes (fewer on
    // kernels with a shorter struct; the fields read below are in the first 8 bytes).
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    Errno::result(rc)?;
    if (len as usize) < 8 {
        return Err(Errno::EINVAL);
    }
    // `__u8 tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4;` — the first field in the low bits on
    // the little-endian targets Linux TCP_REPAIR users run.
    let wscales = info.tcpi_snd_rcv_wscale;
    Ok(TcpInfoHead {
        state: info.tcpi_state,
        options: info.tcpi_options,
        snd_wscale: wscales & 0x0f,
        rcv_wscale: wscales >> 4,
    })
}

/// An `ioctl` that writes one `int` (`SIOCINQ`, `SIOCOUTQ`, `SIOCOUTQNSD`).
#[allow(unsafe_code)]
pub(super) fn ioctl_int(fd: BorrowedFd<'_>, request: libc::c_ulong) -> Result<i32, Errno> {
    let mut value: libc::c_int = 0;
    // SAFETY: the fd is open for the borrow's duration, and these requests write exactly one
    // c_int through the pointer, which points to a live, writable c_int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, std::ptr::from_mut(&mut value)) };
    Errno::result(rc)?;
    Ok(value)
}

/// Attaches a classic BPF program of one instruction, `ret #0`, to `fd`: the kernel then
/// drops every packet for this socket before TCP looks at it (`tcp_filter` in
/// `tcp_v4_rcv`): no ACK, no state change; the peer retransmits.
#[allow(unsafe_code)]
pub(super) fn attach_drop_all(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    // BPF_RET | BPF_K with k = 0: accept 0 bytes, i.e. drop.
    let mut program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: the fd is open for the borrow's duration; `fprog` is a live `sock_fprog`
    // whose `filter` points to `len` live `sock_filter`s, and its exact size is passed; the
    // kernel copies the program during the call and keeps no pointer to our memory.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            std::ptr::from_ref(&fprog).cast(),
            mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    Errno::result(rc).map(drop)
}
